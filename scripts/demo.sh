#!/usr/bin/env bash
# The main job on the embedded default, set-up included: an in-repo ResNet-20 on real Fashion-MNIST through the
# whole pipeline — convert → search (progressive, short budget) → build --target cpu (default schedules, no
# tuning) → bench → report. Budgets (environment): DEMO_TRAIN_LIMIT, DEMO_TUNE_TRIALS (MetaSchedule trials per
# kernel, 0 by default: on this CPU 8 trials took ~4 min and did not beat the default schedules end to end, see
# benchmarks/RESULTS.md), DEMO_TUNE_MINUTES (a cap on tuning time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== set-up done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
ws=demo-workspace
train_limit=${DEMO_TRAIN_LIMIT:-4000}
tune_trials=${DEMO_TUNE_TRIALS:-0}  # MetaSchedule trials per distinct kernel (0: the default schedules)
tune_minutes=${DEMO_TUNE_MINUTES:+--tune-minutes $DEMO_TUNE_MINUTES}
dc=.venv/bin/dyncompile
rm -rf "$ws"
echo "== 1/5 convert: ResNet-20 (untrained, 1x28x28), 8 channel groups per set"
$dc convert dyncompile.zoo.resnet:resnet20_fashion --input-shape 1,1,28,28 --groups 8 --workspace "$ws"
echo "== 2/5 search: progressive, on $train_limit Fashion-MNIST images (short budget: 2 epochs at full width"
echo "         first because the model is untrained, 1 noise-ranking epoch, 1 epoch of joint training)"
$dc search --workspace "$ws" --data fashion-mnist --subnets 0.25,0.5,1.0 --train-limit "$train_limit" \
  --val-limit 2000 --train-full 2 --epochs 1 --noise-epochs 1
echo "== 3/5 build --target cpu: TVM, default schedules, $tune_trials MetaSchedule trials per kernel"
$dc build --workspace "$ws" --target cpu --tune-trials "$tune_trials" $tune_minutes
echo "== 4/5 bench: every sub-net against ONNX Runtime and PyTorch eager"
$dc bench "$ws/deploy/cpu" --compare onnxruntime,torch
echo "== 5/5 report"
$dc report --workspace "$ws"
echo
echo "deployable: $(pwd)/$ws/deploy/cpu"
echo "report:     $(pwd)/$ws/report/report.html"
echo "whole journey: $((SECONDS / 60)) min $((SECONDS % 60)) s, set-up included"
