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
# Qwen's BPE ranks (`qwen.tiktoken`, a data file inside the Apache-2.0 dashscope wheel; the wheel is
# kept in .cache/, not installed): `python -m rematch_pl.bench.vocab` makes Qwen2-VL's tokenizer
# from them for the 2B/7B-shaped benchmarks (`--tokenizer`), without hub access.
# Optional: without it everything else works (its tests skip, saying why).
if ls .cache/dashscope-2.0.2-*.whl >/dev/null 2>&1 ||
   .venv/bin/python -m pip download -q --no-deps --only-binary=:all: dashscope==2.0.2 -d .cache 2>/dev/null; then
  .venv/bin/python -m rematch_pl.bench.vocab --source .cache/dashscope-2.0.2-py3-none-any.whl \
    --out .cache/qwen2_tokenizer >/dev/null  # once (reused when complete)
else
  echo "install: could not fetch dashscope==2.0.2 (Qwen's BPE ranks): the benchmarks keep the tiny BPE" >&2
fi
