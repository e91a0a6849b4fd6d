#!/usr/bin/env bash
# Set up dyncompile from nothing: system packages (as root, Debian), a virtualenv in .venv, pinned wheels.
# Idempotent: a second run only checks. Used by scripts/demo.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: tests/test_report.py renders the report in headless Chromium (skipped without it)
APT_PACKAGES=(python3-venv python3-dev gcc dataset-fashion-mnist gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
              chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install these Debian packages first: ${missing[*]}" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.dyncompile-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and exactly: this picks the CPU wheel; a looser requirement would pull GBs of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # tune: MetaSchedule (build --tune-trials; xgboost-cpu: no CUDA); bench: ONNX Runtime for bench --compare
  .venv/bin/python -m pip install -q -e ".[dev,tune,bench]"
  echo "$want" > "$stamp"
fi
