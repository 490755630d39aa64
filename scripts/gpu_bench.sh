#!/usr/bin/env bash
# Benchmarks on one GPU (random-weight Qwen2-VL-2B/7B-shaped models, bf16, no download).
# Writes logs and JSON figures to $OUT (default: bench_out/). Usage: bash scripts/gpu_bench.sh
# On a machine without the pinned transformers/peft, put their wheels in .whl/ first.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export REMATCH_CACHE=${REMATCH_CACHE:-/tmp/rematch_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
run() { local name=$1; shift; echo "== $name: $*"; timeout "${STEP_TIMEOUT:-170}" python3 -m "$@" 2>&1 | grep -v "Loading weights" | tee "$OUT/$name.log"; }
# SUITES picks and orders the parts (default: all, most informative first), e.g. SUITES="profile_2b vision_2b".
# train_2b also checks the planned peaks of `bench --suite memory` (README) against max_memory_allocated.
SUITES=${SUITES:-train_2b encode_2b profile_2b strategies train_7b vision_2b max_batch_2b train_2b_lora_fp32 matching_2b encode_2b_rows64 encode_2b_lora_separate}
for suite in $SUITES; do
  case $suite in
    profile_2b) run profile_2b rematch_pl.bench --suite profile --shape 2b --batch 16 --out "$OUT/profile_2b.json" ;;
    vision_2b) run vision_2b rematch_pl.bench --suite vision --shape 2b --batch 32 --iters 3 --out "$OUT/vision_2b.json" ;;
    encode_2b) run encode_2b rematch_pl.eval_bench ${EVAL_BENCH_ARGS:---suite encode --shape 2b --out "$OUT/encode_2b.json"} ;;
    encode_2b_lora_separate) run encode_2b_lora_separate rematch_pl.eval_bench --suite encode --shape 2b --lora separate \
      --out "$OUT/encode_2b_lora_separate.json" ;;
    encode_2b_rows64) run encode_2b_rows64 rematch_pl.eval_bench --suite encode --shape 2b --batch 64 --max-tokens 0 \
      --out "$OUT/encode_2b_rows64.json" ;;
    train_2b) run train_2b rematch_pl.bench --suite train --shape 2b --batches 16,128 --chunk 16 --iters 2 --out "$OUT/train_2b.json" ;;
    train_2b_lora_fp32) run train_2b_lora_fp32 rematch_pl.bench --suite train --shape 2b --batches 16 --chunk 0 --iters 2 \
      --lora-compute fp32 --out "$OUT/train_2b_lora_fp32.json" ;;
    max_batch_2b) run max_batch_2b rematch_pl.bench --suite max_batch --shape 2b --chunk 16 --start 16 --limit 256 \
      --out "$OUT/max_batch_2b.json" ;;
    train_7b) run train_7b rematch_pl.bench --suite train --shape 7b --batches 16 --chunk 8 --iters 2 --out "$OUT/train_7b.json" ;;
    matching_2b) run matching_2b rematch_pl.bench --suite matching --shape 2b --batch 8 --iters 3 --out "$OUT/matching_2b.json" ;;
    strategies)
      # Strategies through the real entry point on the tiny backbone (needs hydra, lightning, datasets on the machine).
      if python3 -c "import hydra, lightning, datasets" 2>/dev/null; then
        for s in fsdp deepspeed_zero2 deepspeed_zero3; do
          run "strategy_$s" rematch_pl.train debug=fast logger=csv trainer.accelerator=gpu trainer.devices=1 \
            trainer.precision=bf16-mixed strategy=$s train.gradcache.chunk_size=4 data.batch_size=8 \
            "hydra.run.dir=$OUT/runs/$s"
        done
      else
        echo "== strategies: skipped (hydra, lightning or datasets missing)"
      fi ;;
    *) echo "unknown suite $suite" >&2 ;;
  esac
done
