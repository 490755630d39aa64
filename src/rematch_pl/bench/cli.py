"""`python -m rematch_pl.bench --suite matching --out FILE.json`: figures, not tests.

Measures on random-weight backbones (the tiny ones on CPU; ``--shape 2b|7b`` builds
Qwen2-VL-2B/7B-shaped models from config on a GPU, no download):

(a) one packed multi-view matching pass against the isolated passes it replaces (same logits);
(b) a full ReMatch training step (K=16, 8 views, chat template) against the contrastive
    baseline ([EOS], no matching) on the same batch;
(c) encoding with K=16 learnable tokens against last-token pooling.

`--suite train` times training steps (baseline vs full ReMatch, with and without GradCache);
`--suite max_batch` searches the largest per-GPU batch that fits in memory for each;
`--suite lora` times the LoRA projections of one decoder layer, PEFT's branch against the fused
epilogue (`backbone.lora.fused`);
`--suite vision` times the vision tower with grouped attention (one SDPA call per run of
equal-size images) against transformers' per-image loop;
`--suite flops` (any machine) counts the FLOPs of one training step of each variant for a
2B/7B shape from the real token layout (tokens counted with the tiny model fed the same
inputs), i.e. the step-time ratios a FLOP-bound device would show;
`--suite memory` (any machine) predicts the peak memory of one training step of each variant
for a 2B/7B shape on a GPU (the step runs on the meta device, see memory.py) and, with
`--search N`, the largest batch that fits, with and without GradCache;
`--suite profile` profiles one training step of each variant (torch.profiler): where the time
goes (vision tower, embedding passes, matching pass, backward), how busy the device is, kernel
launches and host-device synchronisations, the top operators;
`--suite roofline` (any machine) counts one training step of each variant op by op on the meta
device: FLOPs and bytes moved per kernel, the step's time if every kernel ran at the card's
matrix peak or memory bandwidth, and so the MFU ceiling of these kernels (`bench.roofline`);
`--suite syncs` (CPU) lists where a step would make the host wait for the GPU (`sync_audit`);
`--suite gpu` (CUDA only) runs the train suite for the 2B and 7B shapes and the 2B batch search
into one JSON (what `scripts/gpu_bench.sh` runs, plus the matching and encode suites).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import VARIANTS, pick_variants, use_bench_tokenizer, write_results
from .flops import suite_flops
from .kernels import suite_lora, suite_vision
from .plan import suite_memory
from .profile import suite_profile
from .roofline import H100_TBS, H100_TFLOPS, suite_roofline
from .train import print_table, suite_matching, suite_max_batch, suite_train


def parser() -> argparse.ArgumentParser:
    """The command line's arguments (`scripts/gpu_bench.sh`'s command lines are checked against it)."""
    ap = argparse.ArgumentParser(prog="python -m rematch_pl.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["matching", "train", "max_batch", "vision", "lora", "profile", "flops", "memory",
                                        "roofline", "syncs", "gpu"],
                    default="matching")
    ap.add_argument("--limit", type=int, default=512, help="largest batch tried by --suite max_batch")
    ap.add_argument("--start", type=int, default=8, help="first batch tried by --suite max_batch")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes for --suite train")
    ap.add_argument("--chunk", type=int, default=4, help="GradCache chunk size for --suite train (0: off)")
    ap.add_argument("--shape", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (GPU default)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gpu-gib", type=float, default=79.0, help="--suite memory: the card's memory (H100 80GB: 79)")
    ap.add_argument("--reserve-gib", type=float, default=4.0,
                    help="--suite memory: kept free for the CUDA context, workspaces, fragmentation")
    ap.add_argument("--search", type=int, default=0, help="--suite memory: also search the largest batch up to this")
    ap.add_argument("--lora-compute", choices=["backbone", "fp32"], default="backbone",
                    help="--suite train/memory: LoRA branch in bf16 (default) or PEFT's fp32 (backbone.lora.compute_dtype)")
    ap.add_argument("--lora-unfused", action="store_true",
                    help="--suite train: PEFT's separate LoRA product, scale and add (backbone.lora.fused=false)")
    ap.add_argument("--norm-unfused", action="store_true",
                    help="--suite train: transformers' elementwise RMSNorm (backbone.fused_rms_norm=false)")
    ap.add_argument("--tokens", type=int, default=4096, help="--suite lora: tokens per projection call")
    ap.add_argument("--variants", default=None,
                    help=f"--suite train | profile: comma-separated subset of {','.join(VARIANTS)} (default all)")
    ap.add_argument("--gradcache", choices=["both", "on", "off"], default="both",
                    help="--suite train, batches above --chunk: baseline and full ReMatch with and/or without GradCache")
    ap.add_argument("--compile", action="store_true",
                    help="--suite train: torch.compile each decoder layer and vision block (backbone.compile=true)")
    ap.add_argument("--recompute", choices=["on", "off"], default=None,
                    help="--suite train | memory | profile | flops: gradient checkpointing (default: on for 2b/7b, "
                         "off for tiny; backbone.gradient_checkpointing)")
    ap.add_argument("--lora-dropout", type=float, default=0.0,
                    help="--suite train | roofline | memory: PEFT's dropout on the LoRA inputs (backbone.lora.dropout: "
                         "0.05 in the shipped 2B/7B configs; default 0 here)")
    ap.add_argument("--peak-tflops", type=float, default=H100_TFLOPS,
                    help="--suite roofline: the card's bf16 matrix-product peak (default: the H100's, measured)")
    ap.add_argument("--bandwidth-tbs", type=float, default=H100_TBS,
                    help="--suite roofline: the card's memory bandwidth in TB/s (default: the H100 SXM's 3.35)")
    ap.add_argument("--top", type=int, default=12, help="--suite roofline: operators listed per variant")
    ap.add_argument("--warmup", type=int, default=1, help="--suite train: untimed steps per run (compilation)")
    ap.add_argument("--tokenizer", default=None,
                    help="2b/7b shapes (and the token counts of --suite flops): the text tokenizer, a Qwen2-VL checkpoint "
                         "folder or hub id, or the folder `python -m rematch_pl.bench.vocab` writes (default "
                         "$REMATCH_BENCH_TOKENIZER, else the tiny model's 640-entry BPE)")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main(argv=None) -> dict:
    ap = parser()
    a = ap.parse_args(argv)
    recompute = None if a.recompute is None else a.recompute == "on"
    variants = a.variants.split(",") if a.variants else None
    try:
        pick_variants(variants)
    except ValueError as e:
        ap.error(f"--variants: {e}")
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    tokenizer = use_bench_tokenizer(a.tokenizer)
    image_size = a.image_size or (112 if a.shape == "tiny" else 448)
    if a.suite == "gpu":
        if a.device != "cuda":
            raise SystemExit("--suite gpu needs a CUDA device (on CPU: --suite train | matching | max_batch)")
        res = {"train_2b": suite_train("2b", "cuda", dtype, [16, 128], 448, a.iters, 16),
               "train_7b": suite_train("7b", "cuda", dtype, [16], 448, a.iters, 8),
               "max_batch_2b": suite_max_batch("2b", "cuda", dtype, 448, 16, a.limit, 16)}
    elif a.suite == "syncs":
        from ..sync_audit import suite_syncs

        res = suite_syncs(batch_size=min(a.batch, 8), image_size=a.image_size or 112, chunk=max(a.chunk, 1))
    elif a.suite == "flops":
        res = suite_flops("2b" if a.shape == "tiny" else a.shape, a.batch, a.image_size or 448, a.chunk,
                          recompute=recompute)
    elif a.suite == "roofline":
        res = suite_roofline("2b" if a.shape == "tiny" else a.shape, a.batch, a.image_size or 448, variants,
                             a.chunk, recompute, a.peak_tflops, a.bandwidth_tbs, a.top, lora_dropout=a.lora_dropout)
    elif a.suite == "memory":
        batches = [int(x) for x in (a.batches or str(a.batch)).split(",")]
        res = suite_memory(a.shape, image_size, batches, a.chunk, a.gpu_gib, a.reserve_gib, a.search,
                           a.dtype or "bf16", lora_compute=a.lora_compute, recompute=recompute,
                           lora_dropout=a.lora_dropout)
    elif a.suite == "profile":
        print(f"bench profile: shape={a.shape} device={a.device} dtype={dtype} batch={a.batch}")
        res = suite_profile(a.shape, a.device, dtype, a.batch, image_size, variants, recompute=recompute)
    elif a.suite == "lora":
        res = suite_lora(a.shape, a.device, dtype, a.tokens, a.iters)
    elif a.suite == "vision":
        res = suite_vision(a.shape, a.device, dtype, a.batch, image_size, a.iters)
    elif a.suite == "max_batch":
        print(f"bench max_batch: shape={a.shape} device={a.device} dtype={dtype} (GradCache chunk {a.chunk})")
        res = suite_max_batch(a.shape, a.device, dtype, image_size, a.chunk, a.limit, a.start)
    elif a.suite == "train":
        batches = [int(x) for x in (a.batches or str(a.batch)).split(",")]
        print(f"bench train: shape={a.shape} device={a.device} dtype={dtype}" + (" compiled" if a.compile else ""))
        res = suite_train(a.shape, a.device, dtype, batches, image_size, a.iters, a.chunk, a.lora_compute,
                          variants, a.gradcache, a.compile, a.warmup, lora_fused=not a.lora_unfused,
                          fused_norm=not a.norm_unfused, recompute=recompute, lora_dropout=a.lora_dropout)
        for r in res["runs"]:
            if "ratio_to_baseline" in r:
                print(f"  ratio {r['variant']} (gc={r['gradcache_chunk']}) / baseline at B={r['batch']}: "
                      f"{r['ratio_to_baseline']:.2f}x")
            if "ratio_to_no_matching" in r:
                print(f"  ratio feat_feat / no matching at B={r['batch']}: {r['ratio_to_no_matching']:.2f}x")
    else:
        res = suite_matching(a.shape, a.device, dtype, a.batch, image_size, a.iters)
        print_table(res)
    res["tokenizer"] = tokenizer
    write_results(res, a.out)
    return res
