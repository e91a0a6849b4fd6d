#!/usr/bin/env bash
# The install a user gets: build the wheel, install it (not editable) into a fresh virtual environment in a
# folder outside the checkout, and run the product from there: the checkout is never on the import path.
# Fails if a module is missing from the wheel or anything imports from the source tree. Run by scripts/test.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/dyncompile-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
step() { printf '\ncheck-install: %s\n' "$*" >&2; }
# pip's warnings about this machine's local package mirrors are noise; its errors still stop the script
quiet_pip() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }

step "building the wheel"
(cd "$repo" && quiet_pip "$repo/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" .)
wheel=$(ls "$work"/dist/dyncompile-*.whl)

step "every module of the source tree is in the wheel"
python3 - "$repo" "$wheel" <<'PY'
import sys, zipfile
from pathlib import Path
repo, wheel = Path(sys.argv[1]), sys.argv[2]
installed_as = {"dyncompile": "dyncompile", "passes": "dyncompile/passes", "targets": "dyncompile/targets",
                "examples/zoo": "dyncompile/zoo"}
want = {f"{dest}/{p.relative_to(repo / src)}" for src, dest in installed_as.items()
        for p in (repo / src).rglob("*.py") if "__pycache__" not in p.parts}
have = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(want - have)
if missing:
    sys.exit(f"check-install: the wheel lacks {len(missing)} modules, e.g. {missing[:5]}: list their packages in "
             f"pyproject.toml [tool.setuptools] packages")
print(f"check-install: {len(want)} modules, all in {Path(wheel).name}", file=sys.stderr)
PY

step "installing it into a fresh virtual environment (torch first: the CPU wheel)"
python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install -q)
quiet_pip "${pip[@]}" "torch==2.13.0"
quiet_pip "${pip[@]}" "$wheel[tune]"

step "running as a user, in a folder outside the checkout"
mkdir "$work/user"
cp "$repo/examples/my_model.py" "$work/user/"
cd "$work/user"
export PATH="$work/venv/bin:$PATH" PYTHONPATH=
python - <<'PY'
import dyncompile, dyncompile.search.run, dyncompile.zoo.resnet, dyncompile.targets.cpu
assert "/venv/" in dyncompile.__file__ and "site-packages" in dyncompile.__file__, dyncompile.__file__
PY
dyncompile --version
python -m dyncompile --version >/dev/null
dyncompile convert dyncompile.zoo.resnet:resnet20_fashion --input-shape 1,1,28,28 --groups 4 -w zoo-workspace >/dev/null
dyncompile convert my_model:tiny_cnn --input-shape 1,1,28,28 --groups 4
dyncompile verify --widths 1.0,0.5
dyncompile search --subnets 0.5,1.0 --epochs 0.2 --noise-epochs 0.2 --train-limit 1024 --val-limit 512
dyncompile build --target cpu
python -c "import numpy as np; np.save('x.npy', np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype('float32'))"
dyncompile run dyncompile-workspace/deploy/cpu --input x.npy --output y.npy
python -c "import numpy as np; y = np.load('y.npy'); assert y.shape == (1, 10), y.shape"
dyncompile report
test -s dyncompile-workspace/report/report.html
step "passed: the installed wheel converts, verifies, searches, builds, runs and reports outside the checkout"
