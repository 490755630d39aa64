#!/usr/bin/env bash
# Create .venv (Python 3.11) and install rematch_pl with the pinned versions of constraints.txt.
# torch is pinned to 2.13.0: on CPU machines that is the local CPU wheel, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"  # DeepSpeed: no compiled ops
