#!/usr/bin/env bash
# The test suite: install, then the fast tests and the slow (end-to-end, multi-process) ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_MODE=offline
.venv/bin/python -m pytest -m "not slow" "$@"
.venv/bin/python -m pytest -m slow "$@"
