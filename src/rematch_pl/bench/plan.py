"""`--suite memory`: the peak memory of a training step planned on the meta device."""

from __future__ import annotations

import time

import torch

from ..backbone.model import recompute_enabled
from ..model import ReMatchModel
from .common import VARIANTS, make_batch, shaped_backbone
from .train import largest_batch


def suite_memory(shape: str, image_size: int, batches: list[int], chunk: int, gpu_gib: float, reserve_gib: float,
                 search_limit: int = 0, dtype: str = "bf16", target: str = "cuda",
                 lora_compute: str = "backbone", recompute: bool | None = None, lora_dropout: float = 0.0) -> dict:
    """Predicted peak memory of one training step of each variant, no device needed.

    The real-size model is built on meta and the step runs there (`memory.step_memory`): the
    peak of live tensors a `target` device would hold, with bf16 weights, LoRA, gradient
    checkpointing, AdamW states and (with `chunk`) GradCache, exactly as `--suite train` runs it.
    A batch fits when its peak is at most `gpu_gib - reserve_gib` (the reserve is for the CUDA
    context, kernel workspaces and fragmentation). `search_limit` > 0: also the largest batch
    that fits for the baseline and full ReMatch, with and without GradCache. `lora_compute`:
    the LoRA branch's dtype (`backbone.lora.compute_dtype`); `recompute`: gradient checkpointing
    (None: on for 2b/7b, off for tiny); `lora_dropout`: PEFT's dropout on every LoRA input
    (`backbone.lora.dropout`, 0.05 in the shipped 2B/7B configs; on meta as CUDA's fused kernel).
    """
    from ..memory import GiB, meta_copy, plan_step

    torch.manual_seed(0)
    kw = dict(lora_compute=lora_compute, recompute=recompute, lora_dropout=lora_dropout)
    bb = (shaped_backbone(shape, "meta", dtype, **kw) if shape != "tiny"
          else meta_copy(shaped_backbone("tiny", "cpu", dtype, **kw)))
    budget = gpu_gib - reserve_gib
    res = {"shape": shape, "dtype": dtype, "lora_compute": lora_compute, "lora_dropout": lora_dropout,
           "recompute": recompute_enabled(bb.hf),
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
