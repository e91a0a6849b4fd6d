#!/usr/bin/env bash
# The main job on the embedded default: convert an in-repo ResNet-20 (CIFAR stem), verify every width, inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ws=demo-workspace
.venv/bin/dyncompile convert examples.zoo.resnet:resnet20_cifar --input-shape 1,3,32,32 --groups 8 --workspace "$ws"
.venv/bin/dyncompile verify --workspace "$ws"
.venv/bin/dyncompile inspect --workspace "$ws"
echo "workspace: $(pwd)/$ws"
