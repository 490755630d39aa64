"""`--suite profile`: one training step of each variant under torch.profiler."""

from __future__ import annotations

import time

import torch

from ..model import ReMatchModel
from .common import make_batch, pick_variants, shaped_backbone


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
