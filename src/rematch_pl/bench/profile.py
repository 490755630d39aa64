"""`--suite profile`: one training step of each variant under torch.profiler."""

from __future__ import annotations

import time

import torch

from ..model import ReMatchModel
from .common import make_batch, matmul_peak_tflops, pick_variants, shaped_backbone
from .roofline import H100_TFLOPS, OpCost, card_bandwidth_tbs


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
        "by_op": {e.key: self_t(e) / 1e6 for e in ops},  # self time per operator (its kernels on a GPU)
        "top": [{"op": e.key, "count": e.count, "self_s": self_t(e) / 1e6}
                for e in sorted((e for e in ev if not e.key.startswith("rematch/")), key=self_t, reverse=True)[:top]],
    }


# operators whose kernels the profiler books under another operator (their own self time is ~0)
PROFILED_AS = {"_to_copy": "copy_", "clone": "copy_", "contiguous": "copy_", "zeros": "fill_", "new_zeros": "fill_",
               "zero_": "fill_", "zeros_like": "fill_", "ones_like": "fill_", "full": "fill_", "new_full": "fill_",
               "full_like": "fill_"}


def roofline_efficiency(profiled: dict, cost, tflops: float, tbs: float, top: int = 12) -> dict:
    """Each operator's measured self time (`profile_step`'s ``by_op``) against its roofline time
    (`bench.roofline.OpCost` of the same step): which kernels are slow for their work. Returns the
    step's roofline, its efficiency against the device's busy time (on a CPU: the operators' self
    time), and the `top` operators by measured time with ``efficiency`` = roofline / measured."""
    s = cost.summary(tflops, tbs)
    roof: dict[str, list] = {}
    for r in s["ops"]:
        op = r["op"].split(" ")[0].removeprefix("aten.")
        name = "aten::" + PROFILED_AS.get(op, op)  # the profiler's key
        acc = roof.setdefault(name, [0.0, 0, r["bound"]])
        acc[0] += r["roofline_ms"] / 1e3
        acc[1] += r["kernels"]
    rows = []
    for op, measured in sorted(profiled["by_op"].items(), key=lambda kv: -kv[1]):
        if op in roof and measured > 0:
            rows.append({"op": op, "measured_s": measured, "roofline_s": roof[op][0], "kernels": roof[op][1],
                         "bound": roof[op][2], "efficiency": roof[op][0] / measured})
    busy = profiled["device_busy_s"]
    if busy != busy:  # no device: the operators' own time
        busy = sum(profiled["by_op"].values())
    return {"roofline_s": s["roofline_ms"] / 1e3, "busy_s": busy, "efficiency": s["roofline_ms"] / 1e3 / busy,
            "matmul_peak_tflops": tflops, "bandwidth_tbs": tbs, "top": rows[:top]}


def suite_profile(shape: str, device: str, dtype: str, B: int, image_size: int,
                  variants: list[str] | None = None, recompute: bool | None = None) -> dict:
    """`profile_step` of one training step of each variant in `VARIANTS` (or `variants`) on the same
    batch, and each operator's time against its roofline (`roofline_efficiency`; on a GPU at its
    measured matmul peak and its data sheet's memory bandwidth, `card_bandwidth_tbs`)."""
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
        cost = OpCost(device)
        with cost:  # the same step, op by op (the dispatch mode's overhead is not timed)
            run()
        tflops = matmul_peak_tflops(device) if device == "cuda" else H100_TFLOPS
        tbs = card_bandwidth_tbs(res["device"])
        e = r["roofline"] = roofline_efficiency(r, cost, tflops, tbs)
        if device == "cuda":  # priced for an H100 on a CPU: its times are not comparable
            print(f"    against the roofline ({tflops:.0f} TFLOP/s, {tbs:g} TB/s): the device was busy "
                  f"{e['busy_s'] * 1e3:.1f} ms for {e['roofline_s'] * 1e3:.1f} ms of roofline work "
                  f"(efficiency {e['efficiency']:.0%})")
            for t in e["top"][:8]:
                print(f"    {t['measured_s'] * 1e3:8.1f} ms measured {t['roofline_s'] * 1e3:8.1f} ms roofline "
                      f"{t['efficiency']:5.0%}  {t['op']} ({t['bound']}-bound, {t['kernels']} kernels)")
        del model
    return res
