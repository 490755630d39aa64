#!/usr/bin/env bash
# The main job: install, then train full ReMatch on the embedded default (tiny Qwen2-VL, synthetic MMEB).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m rematch_pl.train "$@"
