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
`--suite syncs` (CPU) lists where a step would make the host wait for the GPU (`sync_audit`);
`--suite gpu` (CUDA only) runs the train suite for the 2B and 7B shapes and the 2B batch search
into one JSON (what `scripts/gpu_bench.sh` runs, plus the matching and encode suites).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .backbone.model import Backbone, load_backbone, recompute_enabled
from .model import ReMatchModel

SHAPES = {
    # Qwen2-VL-2B / 7B text and vision dimensions (public configs), random weights.
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2), vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4), vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
}


def shaped_backbone(shape: str, device: str, dtype: str, lora_r: int = 32, lora_compute: str = "backbone",
                    compile: bool = False, lora_fused: bool = True, fused_norm: bool = True,
                    recompute: bool | None = None) -> Backbone:
    """A tiny backbone, or a real-size one built from config with the tiny tokenizer.

    `compile`: each decoder layer and vision block through `torch.compile`, as `backbone.compile=true` does.
    `lora_fused`: the LoRA scaling and add in the B product's epilogue (`backbone.lora.fused`).
    `fused_norm`: RMSNorms as one `F.rms_norm` (`backbone.fused_rms_norm`). `recompute`:
    gradient checkpointing (`backbone.gradient_checkpointing`); None: on for 2b/7b, off for tiny."""
    if shape == "tiny":
        bb = load_backbone("tiny://qwen2vl", dtype=dtype,
                           lora={"r": lora_r, "alpha": 2 * lora_r, "dropout": 0.0, "compute_dtype": lora_compute,
                                 "fused": lora_fused},
                           compile=compile, fused_rms_norm=fused_norm, gradient_checkpointing=bool(recompute))
        return bb.to(device)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from .backbone.lora import LLM_LINEAR, lora_in_activation_dtype, lora_target_regex
    from .backbone.model import DTYPES, compile_backbone, enable_recompute
    from .backbone.norm import fuse_rms_norms
    from .backbone.processor import MultimodalProcessor
    from .backbone.tiny import resolve_tiny

    tiny = resolve_tiny("qwen2vl")
    proc = MultimodalProcessor.from_pretrained(tiny, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    base = Qwen2VLConfig.from_pretrained(tiny)
    s = SHAPES[shape]
    head_dim = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
    sec = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    text = dict(base.text_config.to_dict(), **s["text"], vocab_size=151936,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec})
    text.pop("layer_types", None)  # the tiny config's per-layer list has the tiny depth: derive it from the new one
    vision = dict(base.vision_config.to_dict(), **s["vision"], hidden_size=s["text"]["hidden_size"])
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=base.image_token_id,
                        video_token_id=base.video_token_id, vision_start_token_id=base.vision_start_token_id,
                        vision_end_token_id=base.vision_end_token_id)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=DTYPES[dtype], attn_implementation="sdpa")
    if fused_norm:  # as load_backbone does by default (backbone.fused_rms_norm)
        fuse_rms_norms(model)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                             target_modules=lora_target_regex(LLM_LINEAR)))
    if lora_compute == "backbone":  # as load_backbone does by default (LoraSettings.compute_dtype)
        lora_in_activation_dtype(model, fused=lora_fused)
    if recompute is None or recompute:
        enable_recompute(model.get_base_model())
    bb = Backbone(model, proc, name=f"qwen2vl_{shape}_random")
    if compile:
        compile_backbone(bb)
    return bb


def make_batch(processor, B: int, image_size: int, device, seed: int = 0, meta_pixels: bool = False,
               pixel_dtype: torch.dtype = torch.float32) -> dict:
    """B (query, positive, negative) triples, MMEB-like: image+instruction queries, text or image docs.

    `meta_pixels`: the pixels are a meta tensor of the right shape (memory planning: one image is
    processed for its grid, the 2B images' pixel values are never made). `pixel_dtype`: the
    vision tower's, as the datamodule collates them (`Backbone.pixel_dtype`).
    """
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    imgs = [Image.fromarray((torch.rand(image_size, image_size, 3, generator=g) * 255).byte().numpy())
            for _ in range(1 if meta_pixels else 2 * B)]
    ib = processor.process_images(imgs)
    grids, pixels = ib.grid_thw, ib.pixel_values.to(pixel_dtype)
    if meta_pixels:  # [patches, dim] of one image -> [2B * patches, dim] on meta
        grids = grids.repeat(2 * B, 1)
        pixels = torch.empty(2 * B * pixels.shape[0], pixels.shape[1], dtype=pixels.dtype, device="meta")

    def side(texts, image_idx):
        ids = [processor.encode_content(t, None if i < 0 else processor.num_image_tokens(grids[i]))
               for t, i in zip(texts, image_idx)]
        L = max(map(len, ids))
        out = torch.full((len(ids), L), processor.pad_id)
        for j, x in enumerate(ids):
            out[j, : len(x)] = torch.tensor(x)
        return {"ids": out, "lengths": torch.tensor([len(x) for x in ids]), "image": torch.tensor(image_idx)}

    q = side(["<|image_1|>\nRepresent the given image with the following question: how many red circles are there?"] * B,
             list(range(B)))
    pos = side(["<|image_1|>\nRepresent the given image." if i % 2 else "two red circles and a blue square"
                for i in range(B)], [B + i if i % 2 else -1 for i in range(B)])
    neg = side(["three blue circles and a red square"] * B, [-1] * B)
    # as `MMEBDataModule.transfer_batch_to_device` leaves a batch: pixels on the device, the packing
    # metadata (ids, lengths, image indices, grids) on the host
    return {"qry": q, "pos": pos, "neg": neg, "pixel_values": pixels if meta_pixels else pixels.to(device),
            "image_grid_thw": grids}


def timeit(fn, device, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def suite_matching(shape: str, device: str, dtype: str, B: int, image_size: int, iters: int) -> dict:
    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype)
    full = ReMatchModel(bb, k=16, matching="all", template="chat").to(device)
    base = ReMatchModel(bb, k=0, matching="none", template="plain").to(device)
    batch = make_batch(bb.processor, B, image_size, device, pixel_dtype=bb.pixel_dtype)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": dtype, "batch": B, "image_size": image_size}

    # (a) packed vs isolated matching pass
    full.eval()
    with torch.no_grad():
        feats = bb.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        q, p, n = (full.contents(batch[s]) for s in ("qry", "pos", "neg"))
        (eq, qs), (ep, ps), (en, ns) = full.embed([("qry", q), ("doc", p), ("doc", n)], feats, batch["image_grid_thw"])
        mi = full.matching_inputs(q, p, n, eq, ep, en, qs, ps, ns)[:-1]
        grids = batch["image_grid_thw"]
        packed = full.matching_logits(*mi, feats, grids)
        iso = torch.cat([full.matching_logits(*mi, feats, grids, isolate=v) for v in range(8)], dim=1)
        res["a_max_abs_diff"] = float((packed.float() - iso.float()).abs().max())
        t_packed = timeit(lambda: full.matching_logits(*mi, feats, grids), device, iters=iters)
        t_iso = timeit(lambda: [full.matching_logits(*mi, feats, grids, isolate=v) for v in range(8)], device,
                       iters=iters)
    res.update(a_packed_s=t_packed, a_isolated_s=t_iso, a_speedup=t_iso / t_packed)

    # (b) training step: full ReMatch vs contrastive baseline
    def step(model):
        def run():
            out = model(batch)
            out["loss"].backward()
            for prm in model.parameters():
                prm.grad = None
        return run

    full.train(), base.train()
    t_full = timeit(step(full), device, iters=iters)
    t_base = timeit(step(base), device, iters=iters)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(full)()
        res["b_full_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res.update(b_full_step_s=t_full, b_baseline_step_s=t_base, b_ratio=t_full / t_base)
    ff = ReMatchModel(bb, k=16, matching="feat_feat", template="chat").to(device).train()
    t_ff = timeit(step(ff), device, iters=iters)
    full_nomatch = ReMatchModel(bb, k=16, matching="none", template="chat").to(device).train()
    t_nm = timeit(step(full_nomatch), device, iters=iters)
    res.update(b_feat_feat_step_s=t_ff, b_k16_no_matching_step_s=t_nm, b_feat_feat_ratio=t_ff / t_nm,
               b_all_views_over_k16_ratio=t_full / t_nm)

    # (c) encoding: K=16 vs last token
    full.eval(), base.eval()
    with torch.no_grad():
        t_k16 = timeit(lambda: full.encode(batch["qry"], batch["pixel_values"], grids), device, iters=iters)
        t_eos = timeit(lambda: base.encode(batch["qry"], batch["pixel_values"], grids), device, iters=iters)
    res.update(c_k16_encode_s=t_k16, c_eos_encode_s=t_eos, c_ratio=t_k16 / t_eos)
    return res


def llm_forward_flops(bb: Backbone, tokens: int, attn_pairs: int) -> float:
    """Forward FLOPs of the language model over `tokens` tokens whose rows have sum(len^2) = `attn_pairs`.

    2 * N_llm per token (matrix products; LoRA's rank-r matrices included, the embedding table
    excluded) + 2 * layers * d * sum(len^2) for attention (QK^T and AV, 2 FLOPs per multiply-add,
    over the len^2 / 2 (query, key) pairs of a causal row).
    """
    hf = bb.hf
    n_llm = sum(p.numel() for n, p in hf.model.language_model.named_parameters() if "embed_tokens" not in n)
    cfg = hf.config.text_config
    return 2 * n_llm * tokens + 2 * cfg.num_hidden_layers * cfg.hidden_size * attn_pairs


def vision_flops(bb: Backbone, image_patches: list[int]) -> float:
    """Forward FLOPs of the vision tower (and merger) over images of the given patch counts:
    2 * N_vis per patch + 4 * layers * d * patches^2 per image (full attention within the image;
    an upper bound for Qwen2.5-VL, whose windowed layers attend less)."""
    hf = bb.hf
    n_vis = sum(p.numel() for p in hf.model.visual.parameters())
    v = hf.config.vision_config
    d = getattr(v, "embed_dim", None) or v.hidden_size
    return sum(2 * n_vis * p + 4 * v.depth * d * p * p for p in image_patches)


def step_flops(bb: Backbone, counts: dict, image_patches: list[int], gradcache: bool) -> float:
    """FLOPs executed by one training step, from the token counts the model recorded.

    Forward FLOPs of a pass: `llm_forward_flops`. LoRA: frozen weights get no weight gradient,
    so the backward pass costs one more forward (input gradients only); gradient checkpointing
    recomputes one forward; GradCache adds one no-grad forward of the embedding passes. The
    frozen vision tower runs one forward per image (`vision_flops`). Recomputation is included
    (this is hardware FLOP utilisation).
    """
    def fwd(kind):
        return llm_forward_flops(bb, counts.get(kind, 0), counts.get(f"{kind}_attn", 0))

    passes = 2 + (1 if recompute_enabled(bb.hf) else 0)
    total = passes * (fwd("embed") + fwd("match")) + vision_flops(bb, image_patches)
    if gradcache:  # the embed counts hold the no-grad pass and the re-forward (half each): the no-grad
        total -= (passes - 1) * fwd("embed") / 2  # half runs forward only: (1 + passes) / 2 * fwd("embed")
    return total


def matmul_peak_tflops(device: str) -> float:
    """Measured bf16 matrix-product throughput of the card (8192^3), in TFLOP/s."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timeit(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * 8192**3 / t / 1e12


# The step variants the train benchmarks compare (ReMatchModel keyword arguments).
VARIANTS = {
    "baseline": dict(k=0, matching="none", template="plain"),
    "rematch": dict(k=16, matching="all", template="chat"),
    "rematch_feat_feat": dict(k=16, matching="feat_feat", template="chat"),
    "rematch_no_matching": dict(k=16, matching="none", template="chat"),
}


def pick_variants(variants: list[str] | None) -> dict:
    """The `VARIANTS` named (all of them for None), in their order; an unknown name is an error."""
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {sorted(VARIANTS)}")
    return {k: v for k, v in VARIANTS.items() if not variants or k in variants}


def suite_train(shape: str, device: str, dtype: str, batches: list[int], image_size: int, iters: int,
                chunk: int, lora_compute: str = "backbone", variants: list[str] | None = None,
                gradcache: str = "both", compile: bool = False, warmup: int = 1, lora_fused: bool = True,
                fused_norm: bool = True, recompute: bool | None = None) -> dict:
    """Step time, samples/s, tokens/s, peak memory: baseline vs full ReMatch, with and without GradCache.

    `variants`: the `VARIANTS` to run (default all). `compile`: decoder layers compiled
    (`backbone.compile`); `warmup` untimed steps per run absorb the compilation. `gradcache` (batches above
    `chunk`): ``both`` runs the baseline and full ReMatch with and without GradCache (the other
    variants without), ``on`` every variant with it, ``off`` every variant without.
    A variant's ratio is to the baseline at the same batch and GradCache setting.
    """
    chosen = pick_variants(variants)
    if gradcache not in ("both", "on", "off"):
        raise ValueError(f"gradcache={gradcache!r}: choose both, on or off")
    from .gradcache import gradcache_step

    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype, lora_compute=lora_compute, compile=compile, lora_fused=lora_fused,
                         fused_norm=fused_norm, recompute=recompute)
    peak = matmul_peak_tflops(device)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "image_size": image_size, "matmul_peak_tflops": peak, "lora_compute": lora_compute, "lora_fused": lora_fused,
           "fused_norm": fused_norm, "compile": compile, "recompute": recompute_enabled(bb.hf), "runs": []}
    for B in batches:
        batch = make_batch(bb.processor, B, image_size, device, pixel_dtype=bb.pixel_dtype)
        for name, kw in chosen.items():
            gcs = [None]
            if chunk and B > chunk and (gradcache == "on" or name in ("baseline", "rematch")):
                gcs = {"both": [None, chunk], "on": [chunk], "off": [None]}[gradcache]
            for gc in gcs:
                model = ReMatchModel(bb, **kw).to(device).train()
                params = [p for p in model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-5)

                def run(model=model, opt=opt, gc=gc):  # bound now: the loop rebinds the names
                    model.reset_counts()
                    if gc is None:
                        model(batch)["loss"].backward()
                    else:
                        gradcache_step(model, batch, gc, backward=lambda t: t.backward())
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                row = {"variant": name, "batch": B, "gradcache_chunk": gc}
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    t = timeit(run, device, warmup=warmup, iters=iters)
                    counts = dict(model.token_counts)  # of the last timed step
                    n_tok = counts.get("embed", 0) + counts.get("match", 0)
                    row.update(step_s=t, samples_per_s=B / t, tokens_per_s=n_tok / t)
                    if device == "cuda":
                        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                        # one more step: how long the host takes to enqueue it. Near the step time: the
                        # host (launches, syncs) bounds the step; far below: the device does.
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        run()
                        t1 = time.perf_counter()
                        torch.cuda.synchronize()
                        row["host_enqueue_s"] = t1 - t0
                        row["host_fraction"] = (t1 - t0) / (time.perf_counter() - t0)
                        patches = batch["image_grid_thw"].prod(-1).tolist()
                        row["tflops_per_step"] = step_flops(bb, counts, patches, gc is not None) / 1e12
                        row["mfu"] = row["tflops_per_step"] / t / peak
                    row["tokens"] = counts
                except torch.OutOfMemoryError:
                    row["oom"] = True
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                res["runs"].append(row)
                print(_fmt_row(row), flush=True)
                del model, opt
    base = {(r["batch"], r["gradcache_chunk"]): r for r in res["runs"] if r["variant"] == "baseline" and "step_s" in r}
    nm = {(r["batch"], r["gradcache_chunk"]): r for r in res["runs"]
          if r["variant"] == "rematch_no_matching" and "step_s" in r}
    for r in res["runs"]:
        key = (r["batch"], r["gradcache_chunk"])
        if key not in base:  # the variants without a GradCache run: to the plain baseline
            key = (r["batch"], None)
        if "step_s" in r and key in base:
            r["ratio_to_baseline"] = r["step_s"] / base[key]["step_s"]
        if "step_s" in r and key in nm and r["variant"] == "rematch_feat_feat":
            r["ratio_to_no_matching"] = r["step_s"] / nm[key]["step_s"]
    return res


def largest_batch(fits, start: int = 8, limit: int = 512) -> tuple[int, bool]:
    """(largest B <= limit with fits(B), whether the limit was reached), for a monotone `fits`.

    Doubles from `start` until a batch fails, then bisects to 1/8 of the last fitting size.
    """
    lo, hi, B = 0, None, start
    while B <= limit:
        if not fits(B):
            hi = B
            break
        lo, B = B, B * 2
    if hi is None:
        if lo < limit and fits(limit):
            lo = limit
        return lo, True
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def suite_max_batch(shape: str, device: str, dtype: str, image_size: int, chunk: int, limit: int,
                    start: int = 8) -> dict:
    """Largest batch of one training step that fits, for the baseline and full ReMatch, with and
    without GradCache (chunks of `chunk` triples). On a CPU nothing runs out of memory: the
    search only stops at `limit`."""
    from .gradcache import gradcache_step

    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "image_size": image_size, "limit": limit, "runs": []}
    if device == "cuda":
        res["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    for name, kw in ((v, VARIANTS[v]) for v in ("baseline", "rematch")):
        for gc in (None, chunk):
            model = ReMatchModel(bb, **kw).to(device).train()

            def fits(B: int, model=model, gc=gc) -> bool:
                batch = None
                try:
                    batch = make_batch(bb.processor, B, image_size, device, pixel_dtype=bb.pixel_dtype)
                    if gc is None or B <= gc:
                        model(batch)["loss"].backward()
                    else:
                        gradcache_step(model, batch, gc, backward=lambda t: t.backward())
                    ok = True
                except torch.OutOfMemoryError:
                    ok = False
                model.zero_grad(set_to_none=True)
                del batch
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(f"  {name} gc={gc} B={B}: {'fits' if ok else 'out of memory'}", flush=True)
                return ok

            best, capped = largest_batch(fits, start=start, limit=limit)
            row = {"variant": name, "gradcache_chunk": gc, "max_batch": best, "limit_reached": capped}
            res["runs"].append(row)
            print(f"{name:10s} gradcache={str(gc):5s} largest batch {best}{' (the limit)' if capped else ''}",
                  flush=True)
            del model
    return res


def suite_vision(shape: str, device: str, dtype: str, n_images: int, image_size: int, iters: int) -> dict:
    """Vision tower, one fast path added per row: transformers' forward (per-image attention loop,
    its rotary, MLP and Conv3d patch embedding); grouped attention (`backbone.vision_attention`:
    one SDPA call per run of equal-size images, q and k rotated together); the folded QuickGELU
    MLP (`backbone.vision_mlp`, Qwen2-VL); the patch embedding as a GEMM (`backbone.patch_embed`):
    the default."""
    from PIL import Image

    from .backbone.patch_embed import set_linear_patch_embed
    from .backbone.vision_attention import set_grouped_vision_attention
    from .backbone.vision_mlp import set_folded_vision_mlp

    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype)
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(image_size, image_size, 3, generator=g) * 255).byte().numpy())
            for _ in range(n_images)]
    ib = bb.processor.process_images(imgs)
    pv, grid = ib.pixel_values.to(device, bb.embed_tokens.weight.dtype), ib.grid_thw.to(device)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "images": n_images, "image_size": image_size, "patches": int(grid.prod(-1).sum())}
    configs = (("per_image", (False, False, False), "transformers (per-image attention, Conv3d)"),
               ("grouped", (True, False, False), "+ grouped attention"),
               ("grouped_folded_mlp", (True, True, False), "+ folded MLP"),
               ("default", (True, True, True), "+ patch embedding as a GEMM (default)"))
    rows = []
    with torch.no_grad():
        for name, (grouped, folded, linear), label in configs:
            set_grouped_vision_attention(bb.hf, grouped)
            set_folded_vision_mlp(bb.hf, folded)
            set_linear_patch_embed(bb.hf, linear)
            t = timeit(lambda: bb.encode_images(pv, grid), device, warmup=1, iters=iters)
            res[f"{name}_s"] = t
            res[f"{name}_images_per_s"] = n_images / t
            rows.append((label, f"{t * 1e3:.1f} ms ({n_images / t:.1f} images/s)"))
    res["speedup"] = res["per_image_s"] / res["grouped_s"]
    res["speedup_default"] = res["per_image_s"] / res["default_s"]
    rows += [("speed-up, grouped attention", f"{res['speedup']:.2f}x"),
             ("speed-up, default", f"{res['speedup_default']:.2f}x")]
    print_rows(f"bench vision: shape={shape} device={res['device']} dtype={dtype} {n_images} images "
               f"{image_size}x{image_size}", rows)
    return res


def suite_lora(shape: str, device: str, dtype: str, tokens: int, iters: int, r: int = 32) -> dict:
    """The seven LoRA projections of one decoder layer of the shape, forward + backward over
    `tokens` tokens: PEFT's branch order (product, scale, add) against the fused epilogue
    (`backbone.lora.fused`: scale and add inside the B product). Frozen base weight in `dtype`,
    fp32 LoRA factors computing in `dtype` (`compute_dtype=backbone`), input gradient included."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from .backbone.lora import LLM_LINEAR, lora_in_activation_dtype
    from .backbone.model import DTYPES

    if shape == "tiny":
        raise SystemExit("--suite lora: pick --shape 2b or 7b (the tiny projections time nothing but overheads)")
    t = SHAPES[shape]["text"]
    d, inter = t["hidden_size"], t["intermediate_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    dims = dict(q_proj=(d, d), k_proj=(d, kv), v_proj=(d, kv), o_proj=(d, d), gate_proj=(d, inter),
                up_proj=(d, inter), down_proj=(inter, d))
    dt = DTYPES[dtype]
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "tokens": tokens, "r": r, "runs": []}
    rows = []
    for name in LLM_LINEAR:
        n_in, n_out = dims[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, n_in, generator=g).to(device, dt).requires_grad_()
        dy = torch.randn(tokens, n_out, generator=g).to(device, dt)
        row = {"projection": name, "in": n_in, "out": n_out}
        projs = {}
        for fused in (False, True):
            torch.manual_seed(0)  # the same weights for both
            layer = nn.Module()
            layer.proj = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dt)
            layer = get_peft_model(layer, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
            lora_in_activation_dtype(layer, fused=fused)
            projs[fused] = layer.base_model.model.proj
            nn.init.normal_(projs[fused].lora_B["default"].weight, std=0.02,
                            generator=torch.Generator(device).manual_seed(1))  # B starts at zero: make it count

        def step(proj):
            x.grad = None
            proj(x).backward(dy)

        times = {False: [], True: []}
        for _ in range(2):  # interleaved rounds, the best of each: the two see the same machine state
            for fused, proj in projs.items():
                times[fused].append(timeit(lambda proj=proj: step(proj), device, warmup=1, iters=iters))
        row.update(unfused_s=min(times[False]), fused_s=min(times[True]))
        row["speedup"] = row["unfused_s"] / row["fused_s"]
        p = projs[True]  # against float64: x Wᵀ + s·x Aᵀ Bᵀ
        x64, w64 = x.detach().double(), p.base_layer.weight.double()
        a64, b64 = p.lora_A["default"].weight.double(), p.lora_B["default"].weight.double()
        ref = x64 @ w64.T + p.scaling["default"] * (x64 @ a64.T) @ b64.T
        with torch.no_grad():
            for fused, proj in projs.items():
                err = float((proj(x).double() - ref).norm() / ref.norm())
                row["rel_err_fused" if fused else "rel_err_unfused"] = err
        res["runs"].append(row)
        rows.append((f"{name} {n_in}->{n_out}", f"unfused {row['unfused_s'] * 1e3:7.2f} ms  fused "
                     f"{row['fused_s'] * 1e3:7.2f} ms  {row['speedup']:.2f}x  (error vs fp64: unfused "
                     f"{row['rel_err_unfused']:.1e}, fused {row['rel_err_fused']:.1e})"))
    res["layer_unfused_s"] = sum(r_["unfused_s"] for r_ in res["runs"])
    res["layer_fused_s"] = sum(r_["fused_s"] for r_ in res["runs"])
    res["layer_speedup"] = res["layer_unfused_s"] / res["layer_fused_s"]
    rows.append(("all seven (one decoder layer)", f"unfused {res['layer_unfused_s'] * 1e3:7.2f} ms  fused "
                 f"{res['layer_fused_s'] * 1e3:7.2f} ms  {res['layer_speedup']:.2f}x"))
    print_rows(f"bench lora: Qwen2-VL-{shape} projections, {tokens} tokens, r={r}, device={res['device']} "
               f"dtype={dtype}, forward + backward", rows)
    return res


PHASES = ("rematch/vision", "rematch/embed", "rematch/matching")


def device_busy_s(events) -> float:
    """Seconds the device spent in kernels, copies and fills: the device-side events alone.

    A host op's ``self_device_time_total`` is the time of the kernels it launched, which appear
    again as device events: summing both counted every kernel twice.
    """
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6


def profile_step(run, device: str, top: int = 12) -> dict:
    """torch.profiler over one call of `run` (a training step): wall time, device-busy time, the
    phases marked by `ReMatchModel.forward` (``record_function``), kernel launches, host-device
    synchronisations and memory copies, and the `top` operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    ev = prof.key_averages()
    self_t = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    busy = device_busy_s(ev) if cuda else float("nan")
    by_key = {e.key: e for e in ev}
    phases = {p.split("/")[1]: (by_key[p].device_time_total if cuda else by_key[p].cpu_time_total) / 1e6
              for p in PHASES if p in by_key}
    count = lambda pred: sum(e.count for e in ev if pred(e.key))  # noqa: E731
    ops = [e for e in ev if e.key.startswith("aten::")]
    return {
        "wall_s": wall,
        "device_busy_s": busy,  # sum of kernel times (overlapping streams counted twice)
        "device_busy_fraction": busy / wall if cuda else float("nan"),
        "phase_s": phases,  # forward phases; on a GPU: device time of their kernels
        # host time laying out packed inputs (ids, M-RoPE positions, segment ids; `build_inputs`)
        "pack_host_s": by_key["rematch/pack"].cpu_time_total / 1e6 if "rematch/pack" in by_key else 0.0,
        "aten_ops": sum(e.count for e in ops),
        "kernel_launches": count(lambda k: "LaunchKernel" in k),
        # within the step: the closing `torch.cuda.synchronize` above is the profiler's, not the step's
        "syncs": count(lambda k: k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
        - int(cuda),
        "memcpy_calls": count(lambda k: k.startswith("cudaMemcpy")),
        "top": [{"op": e.key, "count": e.count, "self_s": self_t(e) / 1e6}
                for e in sorted((e for e in ev if not e.key.startswith("rematch/")), key=self_t, reverse=True)[:top]],
    }


def suite_profile(shape: str, device: str, dtype: str, B: int, image_size: int,
                  variants: list[str] | None = None, recompute: bool | None = None) -> dict:
    """`profile_step` of one training step of each variant in `VARIANTS` (or `variants`) on the same batch."""
    chosen = pick_variants(variants)
    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype, recompute=recompute)
    batch = make_batch(bb.processor, B, image_size, device, pixel_dtype=bb.pixel_dtype)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "batch": B, "image_size": image_size, "runs": {}}
    for name, kw in chosen.items():
        model = ReMatchModel(bb, **kw).to(device).train()

        def run(model=model):
            model(batch)["loss"].backward()
            model.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up: kernels, allocator
            run()
        r = res["runs"][name] = profile_step(run, device)
        busy = f" device busy {r['device_busy_fraction'] * 100:.0f}%" if device == "cuda" else ""
        phases = " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["phase_s"].items())
        print(f"{name:22s} step {r['wall_s'] * 1e3:8.1f} ms{busy} | {phases} | packing (host) "
              f"{r['pack_host_s'] * 1e3:.0f} ms | aten ops {r['aten_ops']} "
              f"launches {r['kernel_launches']} syncs {r['syncs']} memcpy {r['memcpy_calls']}", flush=True)
        for t in r["top"][:6]:
            print(f"    {t['self_s'] * 1e3:8.1f} ms  {t['count']:6d}x  {t['op']}")
        del model
    return res


def suite_flops(shape: str, B: int, image_size: int, chunk: int = 0, recompute: bool | None = None) -> dict:
    """FLOPs per training step of each variant in `VARIANTS` for a 2B/7B shape, no device needed.

    The token layout (template, K tokens, the matching pass's segments, image tokens) does not
    depend on the model's width: the tiny model is run on the inputs the real-size processor makes
    (MMEB-like 448 px images), its token counts are then priced with the real shape's parameter
    counts (`step_flops`, a parameter-free copy on the meta device, gradient checkpointing as
    `recompute` says: on by default).
    """
    from .backbone.processor import MultimodalProcessor
    from .backbone.tiny import resolve_tiny

    torch.manual_seed(0)
    big = shaped_backbone(shape, "meta", "bf16", recompute=recompute)  # parameter counts only
    tiny = shaped_backbone("tiny", "cpu", "fp32")
    lo, hi = big.processor.pixel_range
    tiny.processor = MultimodalProcessor.from_pretrained(resolve_tiny("qwen2vl"), min_pixels=lo, max_pixels=hi)
    batch = make_batch(tiny.processor, B, image_size, "cpu")
    patches = batch["image_grid_thw"].prod(-1).tolist()
    res = {"shape": shape, "batch": B, "image_size": image_size, "gradcache_chunk": chunk or None,
           "recompute": recompute_enabled(big.hf), "runs": {}}
    for name, kw in VARIANTS.items():
        model = ReMatchModel(tiny, **kw).eval()
        model.reset_counts()
        with torch.no_grad():
            model(batch)
        counts = model.reset_counts()
        if chunk:  # GradCache: a no-grad pass plus the re-forward of the embedding passes
            counts = dict(counts, embed=2 * counts["embed"], embed_attn=2 * counts["embed_attn"])
        res["runs"][name] = {"tflop": step_flops(big, counts, patches, bool(chunk)) / 1e12,
                             "embed_tokens": counts["embed"] // (2 if chunk else 1), "match_tokens": counts.get("match", 0)}
    base = res["runs"]["baseline"]["tflop"]
    nm = res["runs"]["rematch_no_matching"]["tflop"]
    rows = []
    for name, r in res["runs"].items():
        r["ratio_to_baseline"] = r["tflop"] / base
        r["ratio_to_no_matching"] = r["tflop"] / nm
        rows.append((name, f"{r['tflop']:8.1f} TFLOP  x{r['ratio_to_baseline']:.2f} baseline  "
                           f"x{r['ratio_to_no_matching']:.2f} K=16 no matching  "
                           f"({r['embed_tokens']} embedding + {r['match_tokens']} matching tokens)"))
    print_rows(f"bench flops: Qwen2-VL-{shape} shape, batch {B} triples, {image_size} px images, "
               f"gradient checkpointing {'on' if res['recompute'] else 'off'}{', GradCache' if chunk else ''}", rows)
    return res


def suite_memory(shape: str, image_size: int, batches: list[int], chunk: int, gpu_gib: float, reserve_gib: float,
                 search_limit: int = 0, dtype: str = "bf16", target: str = "cuda",
                 lora_compute: str = "backbone", recompute: bool | None = None) -> dict:
    """Predicted peak memory of one training step of each variant, no device needed.

    The real-size model is built on meta and the step runs there (`memory.step_memory`): the
    peak of live tensors a `target` device would hold, with bf16 weights, LoRA, gradient
    checkpointing, AdamW states and (with `chunk`) GradCache, exactly as `--suite train` runs it.
    A batch fits when its peak is at most `gpu_gib - reserve_gib` (the reserve is for the CUDA
    context, kernel workspaces and fragmentation). `search_limit` > 0: also the largest batch
    that fits for the baseline and full ReMatch, with and without GradCache. `lora_compute`:
    the LoRA branch's dtype (`backbone.lora.compute_dtype`); `recompute`: gradient checkpointing
    (None: on for 2b/7b, off for tiny).
    """
    from .memory import GiB, meta_copy, plan_step

    torch.manual_seed(0)
    bb = (shaped_backbone(shape, "meta", dtype, lora_compute=lora_compute, recompute=recompute) if shape != "tiny"
          else meta_copy(shaped_backbone("tiny", "cpu", dtype, lora_compute=lora_compute, recompute=recompute)))
    budget = gpu_gib - reserve_gib
    res = {"shape": shape, "dtype": dtype, "lora_compute": lora_compute, "recompute": recompute_enabled(bb.hf),
           "target": target, "image_size": image_size,
           "gpu_gib": gpu_gib, "reserve_gib": reserve_gib, "runs": [], "largest_batch": []}
    seen: dict[tuple, dict] = {}

    def predict(name: str, B: int, gc: int | None) -> dict:
        if (name, B, gc) in seen:
            return seen[name, B, gc]
        model = meta_copy(ReMatchModel(bb, **VARIANTS[name]).train())
        batch = make_batch(bb.processor, B, image_size, "cpu", meta_pixels=True, pixel_dtype=bb.pixel_dtype)
        t = time.perf_counter()
        r = {k: v / GiB for k, v in plan_step(model, batch, gc, target).items()}
        row = seen[name, B, gc] = {"variant": name, "batch": B, "gradcache_chunk": gc,
                                   **{f"{k}_gib": v for k, v in r.items()}, "fits": r["peak"] <= budget,
                                   "planned_in_s": time.perf_counter() - t}
        return row

    def show(r: dict) -> str:
        return (f"  {r['variant']:<20} B={r['batch']:<4} gc={r['gradcache_chunk']!s:<5} weights "
                f"{r['weights_gib']:6.2f}  optimizer {r['optimizer_gib']:5.2f}  activations+grads "
                f"{r['transient_gib']:6.2f}  peak {r['peak_gib']:6.2f} GiB  {'fits' if r['fits'] else 'DOES NOT FIT'}")

    print(f"\nbench memory: Qwen2-VL-{shape} shape, {dtype} weights, LoRA branch {lora_compute}, gradient "
          f"checkpointing {'on' if res['recompute'] else 'off'}, {image_size} px "
          f"images, predicted for {target} (budget {gpu_gib:g} - {reserve_gib:g} GiB reserve = {budget:g} GiB)", flush=True)
    for B in batches:
        for name in VARIANTS:
            for gc in ([None, chunk] if chunk and B > chunk else [None]):
                res["runs"].append(predict(name, B, gc))
                print(show(res["runs"][-1]), flush=True)
    if search_limit:
        for name in ("baseline", "rematch"):
            for gc in (None, chunk or None):
                best, capped = largest_batch(lambda B: predict(name, B, gc)["fits"], limit=search_limit)
                res["largest_batch"].append({"variant": name, "gradcache_chunk": gc, "max_batch": best,
                                             "limit_reached": capped})
                print(f"  largest batch {name:<10} gc={gc!s:<5} {best}{' (the limit)' if capped else ''}", flush=True)
        res["searched"] = [r for r in seen.values() if r not in res["runs"]]
    return res


def _fmt_row(r: dict) -> str:
    if r.get("oom"):
        return f"  {r['variant']:<22} B={r['batch']:<4} gc={r['gradcache_chunk']!s:<5} OOM"
    extra = (f" peak {r['peak_mem_gb']:.1f} GiB MFU {r['mfu'] * 100:.1f}% host enqueue "
             f"{r['host_fraction'] * 100:.0f}% of the step" if "peak_mem_gb" in r else "")
    return (f"  {r['variant']:<22} B={r['batch']:<4} gc={r['gradcache_chunk']!s:<5} step {r['step_s'] * 1e3:8.1f} ms "
            f"{r['samples_per_s']:8.1f} samples/s {r['tokens_per_s']:10.0f} tok/s{extra}")


def print_table(res: dict) -> None:
    rows = [
        ("(a) packed 8-view matching pass", f"{res['a_packed_s'] * 1e3:.1f} ms"),
        ("(a) 8 isolated passes", f"{res['a_isolated_s'] * 1e3:.1f} ms"),
        ("(a) speed-up (goal >= 2x)", f"{res['a_speedup']:.2f}x  (max |logit diff| {res['a_max_abs_diff']:.1e})"),
        ("(b) full ReMatch step (K=16, 8 views)", f"{res['b_full_step_s'] * 1e3:.1f} ms"),
        ("(b) contrastive baseline step", f"{res['b_baseline_step_s'] * 1e3:.1f} ms"),
        ("(b) ratio full / baseline", f"{res['b_ratio']:.2f}x"),
        ("(b) ratio feat_feat / no matching (K=16)", f"{res['b_feat_feat_ratio']:.2f}x"),
        ("(c) encode K=16 / last token", f"{res['c_ratio']:.2f}x"),
    ]
    print_rows(f"bench matching: shape={res['shape']} device={res['device']} dtype={res['dtype']} batch={res['batch']}",
               rows)


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column figure table under a title."""
    print(f"\n{title}")
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m rematch_pl.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["matching", "train", "max_batch", "vision", "lora", "profile", "flops", "memory",
                                        "syncs", "gpu"],
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
    ap.add_argument("--warmup", type=int, default=1, help="--suite train: untimed steps per run (compilation)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    recompute = None if a.recompute is None else a.recompute == "on"
    variants = a.variants.split(",") if a.variants else None
    try:
        pick_variants(variants)
    except ValueError as e:
        ap.error(f"--variants: {e}")
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    image_size = a.image_size or (112 if a.shape == "tiny" else 448)
    if a.suite == "gpu":
        if a.device != "cuda":
            raise SystemExit("--suite gpu needs a CUDA device (on CPU: --suite train | matching | max_batch)")
        res = {"train_2b": suite_train("2b", "cuda", dtype, [16, 128], 448, a.iters, 16),
               "train_7b": suite_train("7b", "cuda", dtype, [16], 448, a.iters, 8),
               "max_batch_2b": suite_max_batch("2b", "cuda", dtype, 448, 16, a.limit, 16)}
    elif a.suite == "syncs":
        from .sync_audit import suite_syncs

        res = suite_syncs(batch_size=min(a.batch, 8), image_size=a.image_size or 112, chunk=max(a.chunk, 1))
    elif a.suite == "flops":
        res = suite_flops("2b" if a.shape == "tiny" else a.shape, a.batch, a.image_size or 448, a.chunk,
                          recompute=recompute)
    elif a.suite == "memory":
        batches = [int(x) for x in (a.batches or str(a.batch)).split(",")]
        res = suite_memory(a.shape, image_size, batches, a.chunk, a.gpu_gib, a.reserve_gib, a.search,
                           a.dtype or "bf16", lora_compute=a.lora_compute, recompute=recompute)
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
                          fused_norm=not a.norm_unfused, recompute=recompute)
        for r in res["runs"]:
            if "ratio_to_baseline" in r:
                print(f"  ratio {r['variant']} (gc={r['gradcache_chunk']}) / baseline at B={r['batch']}: "
                      f"{r['ratio_to_baseline']:.2f}x")
            if "ratio_to_no_matching" in r:
                print(f"  ratio feat_feat / no matching at B={r['batch']}: {r['ratio_to_no_matching']:.2f}x")
    else:
        res = suite_matching(a.shape, a.device, dtype, a.batch, image_size, a.iters)
        print_table(res)
    write_results(res, a.out)
    return res


def write_results(res: dict, out: Path | None) -> None:
    """Write a benchmark's figures as JSON (when asked to)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"written {out}")


if __name__ == "__main__":
    main()
