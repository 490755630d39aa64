"""Training-step benchmarks: `--suite matching`, `--suite train`, `--suite max_batch`."""

from __future__ import annotations

import time

import torch

from ..backbone.model import recompute_enabled
from ..model import ReMatchModel
from .common import VARIANTS, make_batch, matmul_peak_tflops, pick_variants, print_rows, shaped_backbone, timeit
from .flops import step_flops


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


def suite_train(shape: str, device: str, dtype: str, batches: list[int], image_size: int, iters: int,
                chunk: int, lora_compute: str = "backbone", variants: list[str] | None = None,
                gradcache: str = "both", compile: bool = False, warmup: int = 1, lora_fused: bool = True,
                fused_norm: bool = True, recompute: bool | None = None, lora_dropout: float = 0.0) -> dict:
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
    from ..memory import training_step

    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype, lora_compute=lora_compute, compile=compile, lora_fused=lora_fused,
                         fused_norm=fused_norm, recompute=recompute, lora_dropout=lora_dropout)
    peak = matmul_peak_tflops(device)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "image_size": image_size, "matmul_peak_tflops": peak, "lora_compute": lora_compute, "lora_fused": lora_fused,
           "fused_norm": fused_norm, "compile": compile, "recompute": recompute_enabled(bb.hf), "lora_dropout": lora_dropout, "runs": []}
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

                def run(model=model, step=training_step(model, batch, gc, opt)):  # bound now: the loop rebinds
                    model.reset_counts()
                    step()

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
    from ..gradcache import gradcache_step

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
