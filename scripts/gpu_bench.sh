#!/usr/bin/env bash
# Benchmarks on one GPU (random-weight Qwen2-VL-2B/7B-shaped models, bf16, no download).
# Writes logs and JSON figures to $OUT (default: bench_out/). Usage: bash scripts/gpu_bench.sh
# On a machine without the pinned transformers/peft, put their wheels in .whl/ first.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"  # every part's output in one file (the device tool returns at most 8 files)
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -e /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
[ -e /tmp/site/.installed ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export REMATCH_CACHE=${REMATCH_CACHE:-/tmp/rematch_cache}
# The shaped models' texts in Qwen2-VL's tokens when .cache/qwen2_tokenizer is here (scripts/install.sh
# makes it, `rematch_pl.bench.vocab`; carry it to a machine without network), else in the tiny
# 640-entry BPE's (about 1.5x Qwen2's text tokens). The log and the JSON say which.
if [ -z "${REMATCH_BENCH_TOKENIZER:-}" ] && [ -e .cache/qwen2_tokenizer/tokenizer.json ]; then
  export REMATCH_BENCH_TOKENIZER=$PWD/.cache/qwen2_tokenizer
fi
echo "text tokenizer: ${REMATCH_BENCH_TOKENIZER:-tiny BPE}" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$LOG"
run() {
  local name=$1; shift
  echo "== $name: $* ($(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS limit=${STEP_TIMEOUT:-170}
  if [ -n "${BUDGET_S:-}" ]; then  # the whole script ends within BUDGET_S seconds: a part gets what is left
    local left=$((BUDGET_S - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then echo "== $name: skipped (budget spent)" | tee -a "$LOG"; return; fi
  fi
  timeout "$limit" python3 -m "$@" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}
# BUDGET_S (optional): the whole script ends within this many seconds; STEP_TIMEOUT: one part's limit.
# SUITES picks and orders the parts (default: all, most informative first), e.g. SUITES="profile_2b vision_2b".
# The planned peaks of `bench --suite memory` (docs/benchmarks.md) are checked against the `peak` column of train_2b_*.
# First the test suite's CUDA cases (`pytest -m gpu`, about a minute); then the parts that answer the open goals: MFU and feat_feat at 128 triples, the waits per step,
# compiled decoder layers (the roofline puts a third of an eager step in memory-bound kernels that
# only fusion removes), recomputation off, the 30-minute MMEB projection.
SUITES=${SUITES:-cuda_tests train_2b_b128_nogc profile_2b_main train_2b_compile train_2b_b16 train_2b_b128_norecompute encode_2b encode_2b_compile train_2b_b16_unfused vision_2b lora_2b train_2b_b128 profile_2b train_7b train_2b_lora_fp32 strategies max_batch_2b matching_2b encode_2b_rows64 encode_2b_lora_separate train_2b_b128_dropout}
for suite in $SUITES; do
  case $suite in
    # the test suite's CUDA cases (tests marked gpu)
    cuda_tests) run cuda_tests pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests ;;
    train_2b_b16) run train_2b_b16 rematch_pl.bench --suite train --shape 2b --batches 16 --chunk 0 --iters 2 \
      --out "$OUT/train_2b_b16.json" ;;
    train_2b_b16_unfused) run train_2b_b16_unfused rematch_pl.bench --suite train --shape 2b --batches 16 --chunk 0 \
      --iters 2 --variants baseline,rematch --lora-unfused --norm-unfused --out "$OUT/train_2b_b16_unfused.json" ;;
    lora_2b) run lora_2b rematch_pl.bench --suite lora --shape 2b --tokens 16384 --iters 10 --out "$OUT/lora_2b.json" ;;
    train_2b_b128) run train_2b_b128 rematch_pl.bench --suite train --shape 2b --batches 128 --chunk 16 --gradcache on \
      --variants baseline,rematch --iters 1 --out "$OUT/train_2b_b128.json" ;;
    train_2b_b128_dropout) run train_2b_b128_dropout rematch_pl.bench --suite train --shape 2b --batches 128 --chunk 0 \
      --variants baseline,rematch --lora-dropout 0.05 --iters 1 --out "$OUT/train_2b_b128_dropout.json" ;;
    train_2b_b128_norecompute) run train_2b_b128_norecompute rematch_pl.bench --suite train --shape 2b --batches 128 \
      --chunk 16 --gradcache on --recompute off --iters 1 --out "$OUT/train_2b_b128_norecompute.json" ;;
    train_2b_b128_nogc) run train_2b_b128_nogc rematch_pl.bench --suite train --shape 2b --batches 128 --chunk 0 --iters 1 \
      --out "$OUT/train_2b_b128_nogc.json" ;;
    profile_2b_main) run profile_2b_main rematch_pl.bench --suite profile --shape 2b --batch 16 --variants baseline,rematch \
      --out "$OUT/profile_2b_main.json" ;;
    profile_2b) run profile_2b rematch_pl.bench --suite profile --shape 2b --batch 16 --out "$OUT/profile_2b.json" ;;
    vision_2b) run vision_2b rematch_pl.bench --suite vision --shape 2b --batch 32 --iters 3 --out "$OUT/vision_2b.json" ;;
    encode_2b) run encode_2b rematch_pl.eval_bench ${EVAL_BENCH_ARGS:---suite encode --shape 2b --out "$OUT/encode_2b.json"} ;;
    encode_2b_compile) run encode_2b_compile rematch_pl.eval_bench --suite encode --shape 2b --compile \
      --out "$OUT/encode_2b_compile.json" ;;
    encode_2b_lora_separate) run encode_2b_lora_separate rematch_pl.eval_bench --suite encode --shape 2b --lora separate \
      --out "$OUT/encode_2b_lora_separate.json" ;;
    encode_2b_rows64) run encode_2b_rows64 rematch_pl.eval_bench --suite encode --shape 2b --batch 64 --max-tokens 0 \
      --out "$OUT/encode_2b_rows64.json" ;;
    train_2b_lora_fp32) run train_2b_lora_fp32 rematch_pl.bench --suite train --shape 2b --batches 16 --chunk 0 --iters 2 \
      --variants baseline,rematch --lora-compute fp32 --out "$OUT/train_2b_lora_fp32.json" ;;
    max_batch_2b) run max_batch_2b rematch_pl.bench --suite max_batch --shape 2b --chunk 16 --start 16 --limit 256 \
      --out "$OUT/max_batch_2b.json" ;;
    train_2b_compile) run train_2b_compile rematch_pl.bench --suite train --shape 2b --batches 128 --chunk 0 \
      --variants baseline,rematch --compile --warmup 2 --iters 1 --out "$OUT/train_2b_compile.json" ;;
    train_7b) run train_7b rematch_pl.bench --suite train --shape 7b --batches 16 --chunk 0 --variants baseline,rematch \
      --iters 1 --out "$OUT/train_7b.json" ;;
    matching_2b) run matching_2b rematch_pl.bench --suite matching --shape 2b --batch 8 --iters 3 --out "$OUT/matching_2b.json" ;;
    strategies)
      # Strategies through the real entry point on the tiny backbone (needs hydra, lightning, datasets, deepspeed:
      # carried as wheels in .whl/). Run folders go to /tmp (checkpoints are not brought back).
      for s in ${STRATEGIES:-fsdp deepspeed_zero2 deepspeed_zero3}; do
        run "strategy_$s" rematch_pl.train debug=fast logger=csv trainer.accelerator=gpu trainer.devices=1 \
          trainer.precision=bf16-mixed backbone.dtype=bf16 strategy=$s train.gradcache.chunk_size=4 data.batch_size=8 \
          "hydra.run.dir=/tmp/runs/$s"
      done ;;
    *) echo "unknown suite $suite" | tee -a "$LOG" >&2 ;;
  esac
done
