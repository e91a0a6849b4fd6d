#!/usr/bin/env bash
# Set up (if needed) and run the default test suite. Extra arguments go to pytest (e.g. -m slow).
# Without arguments (what CI runs) the installed wheel is checked first, outside the checkout (check-install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  bash scripts/check-install.sh
fi
exec .venv/bin/python -m pytest -q "$@"
