"""`--suite roofline`: what one training step would cost on a GPU whose every kernel ran at the
card's limits, counted op by op on the meta device (no GPU needed).

`OpCost` is a dispatch mode that records each device operator a step launches: its FLOPs
(PyTorch's own formulas, `torch.utils.flop_counter`: matrix products and the fused attention
kernels) and the bytes it must move (operands read, results written, each storage once; views
and reshapes move nothing). An operator's roofline time is

    max(FLOPs / matmul peak, bytes / memory bandwidth)

and the step's is their sum: the time of the step with perfect kernels and no gap between them,
a lower bound. Its split shows what bounds an eager step: matrix products, or the memory
traffic of the elementwise, cast and copy kernels between them (what kernel fusion, e.g.
`backbone.compile`, removes). ``MFU ceiling`` = step FLOPs / (peak x roofline time): the MFU
these kernels could reach at best. A measured step (`--suite train`, `--suite profile`) over
this bound is the kernels' inefficiency plus launch gaps.

Run on meta as `--suite memory` runs (`memory.LiveBytes` placement, `memory.target_kernels`:
the attention and dropout kernels an H100 takes), a step is counted for the 2B/7B shapes on any machine.
"""

from __future__ import annotations

import collections
import time
from contextlib import ExitStack

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ..memory import LiveBytes, SwapFunctional, meta_copy, target_kernels, to_meta, training_step
from ..model import ReMatchModel
from .common import make_batch, pick_variants, print_rows, shaped_backbone

aten = torch.ops.aten
# no kernel: metadata only, or memory that is never written before use
FREE = {aten._unsafe_view, aten.detach, aten.alias, aten.lift_fresh, aten.empty, aten.empty_strided,
        aten.empty_like, aten._reshape_alias, aten.set_}
MATRIX = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._scaled_mm, aten.convolution, aten._convolution,
          aten.convolution_backward}
GATHER = {aten.embedding, aten.index, aten.index_select}  # read only the rows they return
# H100 80GB SXM: the bf16 matrix-product peak measured by `bench` (8192^3, results/h100_2026-11-27)
# and the HBM3 bandwidth of its data sheet
H100_TFLOPS, H100_TBS = 794.5, 3.35


# data-sheet memory bandwidth (TB/s) by card name; the first match wins
BANDWIDTH_TBS = (("H100 PCIe", 2.0), ("H100", 3.35), ("H200", 4.8), ("A100-SXM4-40GB", 1.56), ("A100", 2.0))


def card_bandwidth_tbs(name: str) -> float:
    """The memory bandwidth of a card from its name (`torch.cuda.get_device_name`); the H100 SXM's
    for a card not listed (and for "cpu": the roofline then prices an H100)."""
    return next((tbs for key, tbs in BANDWIDTH_TBS if key in name), H100_TBS)


def _kind(func) -> str:
    packet = func._overloadpacket
    if packet in MATRIX:
        return "matrix"
    if "attention" in str(packet):
        return "attention"
    return "memory"


def _arg(func, args, kwargs, name: str, default=None):
    """An operator argument by its schema name."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else default)
    return default


def _bytes(t: torch.Tensor) -> int:
    """Bytes an operand occupies: an expanded (stride 0) view reads only its storage."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def op_flops(func, args, kwargs, out) -> float:
    """FLOPs of one operator (torch's formulas; 0 for the elementwise ones). A causal flash
    kernel skips the blocks above the diagonal: half of the full product's FLOPs."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0.0
    f = float(formula(*args, **kwargs, out_val=out))
    if "flash" in str(func._overloadpacket) and _arg(func, args, kwargs, "is_causal", False):
        f /= 2
    return f


def _distinct_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += _bytes(t)
    return total


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes read and written by one operator: its distinct operands read, its distinct results
    written (an in-place op reads and writes its first operand; `copy_` only writes it)."""
    operands = (args, {k: v for k, v in kwargs.items() if k != "out"})  # an out= buffer is written, not read
    ins = [t for t in tree_leaves(operands) if isinstance(t, torch.Tensor)]
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if func._overloadpacket in GATHER:  # the gathered rows (the size of the result) + the indices
        return 2 * sum(_bytes(t) for t in outs) + sum(_bytes(t) for t in ins[1:])
    if func._overloadpacket is aten.copy_:
        ins = ins[1:]
    return _distinct_bytes(ins) + _distinct_bytes(outs)


class OpCost(LiveBytes):
    """Records (count, FLOPs, bytes) of every kernel-launching operator that touches `device`.

    Keys: (phase, region, operator) with phase "forward" or "backward" (backward passes and the
    forward recomputed inside them), region "vision" or "language model" for a forward op inside
    `backbone`'s tower or language model ("other" elsewhere, and everywhere without `backbone`).
    On meta (`device="meta"`) the step runs as `LiveBytes` runs it (the model's host bookkeeping
    stays real and uncounted), and attention, dropout and RMSNorm cost the fused kernels a GPU
    runs (`memory.target_kernels`, `FusedNorms`).
    """

    def __init__(self, device: str = "meta", backbone=None):
        super().__init__(meta=device == "meta")
        self.device = device
        self.records: dict[tuple[str, str, str], list] = collections.defaultdict(lambda: [0, 0.0, 0])
        self.kinds: dict[str, str] = {}
        self._regions = {} if backbone is None else {backbone.hf.model.visual: "vision",
                                                     backbone.hf.model.language_model: "language model"}
        self._stack: list[str] = []
        self._context = ExitStack()

    def __enter__(self):
        for module, name in self._regions.items():
            self._context.callback(module.register_forward_pre_hook(
                lambda m, a, n=name: self._stack.append(n)).remove)
            self._context.callback(module.register_forward_hook(lambda m, a, o: self._stack.pop() and None).remove)
        if self.meta:
            self._context.enter_context(target_kernels("cuda"))
            self._context.enter_context(FusedNorms())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._context.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args, kwargs, out = self._run(func, args, kwargs or {})
        if func.is_view or func._overloadpacket in FREE:
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not any(t.device.type == self.device for t in tensors):
            return out  # host work (token ids, positions, masks): not a device kernel
        node = torch._C._current_autograd_node()
        if node is not None:  # backward, or a forward recomputed inside it: named by its autograd node
            key = ("backward", "backward", f"{func._overloadpacket} ({node.name()})")
        else:
            key = ("forward", self._stack[0] if self._stack else "other", str(func._overloadpacket))
        r = self.records[key]
        r[0] += 1
        r[1] += op_flops(func, args, kwargs, out)
        r[2] += op_bytes(func, args, kwargs, out)
        self.kinds[key[2]] = _kind(func)
        return out

    def summary(self, tflops: float = H100_TFLOPS, tbs: float = H100_TBS) -> dict:
        """Roofline figures of what was recorded, at `tflops` matmul peak and `tbs` bandwidth."""
        peak, bw = tflops * 1e12, tbs * 1e12
        rows = []
        for (phase, region, op), (n, f, b) in self.records.items():
            t_flop, t_byte = f / peak, b / bw
            rows.append({"phase": phase, "region": region, "op": op, "kind": self.kinds[op], "kernels": n,
                         "tflop": f / 1e12, "gbytes": b / 1e9, "roofline_ms": max(t_flop, t_byte) * 1e3,
                         "bound": "compute" if t_flop >= t_byte else "memory"})
        rows.sort(key=lambda r: -r["roofline_ms"])
        tot = lambda rs, k: sum(r[k] for r in rs)  # noqa: E731
        ms = tot(rows, "roofline_ms")
        by_region = {}
        for r in rows:
            g = by_region.setdefault(r["region"], {"roofline_ms": 0.0, "matrix_ms": 0.0, "tflop": 0.0, "gbytes": 0.0,
                                                   "kernels": 0})
            g["roofline_ms"] += r["roofline_ms"]
            g["matrix_ms"] += r["roofline_ms"] if r["kind"] != "memory" else 0.0
            for k in ("tflop", "gbytes", "kernels"):
                g[k] += r[k]
        matrix_ms = sum(r["roofline_ms"] for r in rows if r["kind"] != "memory")
        return {"matmul_peak_tflops": tflops, "bandwidth_tbs": tbs, "roofline_ms": ms, "matrix_ms": matrix_ms,
                "memory_ms": ms - matrix_ms, "tflop": tot(rows, "tflop"), "gbytes": tot(rows, "gbytes"),
                "kernels": tot(rows, "kernels"), "mfu_ceiling": tot(rows, "tflop") / tflops / ms * 1e3 if ms else 0.0,
                "regions": by_region, "ops": rows}


class _FusedRMSNormTraffic(torch.autograd.Function):
    """Stand-in with the memory traffic of CUDA's fused RMSNorm kernels (`aten::_fused_rms_norm`
    and its backward), which meta decomposes into a dozen fp32 elementwise kernels: forward reads
    x and the weight and writes y; backward reads dy, x and the weight and writes dx, plus the
    weight gradient's reduction. Values are meaningless (meta has none)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x * weight  # [.., d]: one kernel, read x + weight, write y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = torch.addcmul(dy, x, weight)  # read dy, x, weight; write dx
        dw = (dy * x).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw


class FusedNorms(SwapFunctional):
    """Within it, `F.rms_norm` on meta tensors costs what CUDA's one fused kernel (forward and
    backward) costs (`_FusedRMSNormTraffic`); real tensors take the real function."""

    name = "rms_norm"

    def replacement(self, x, normalized_shape, weight=None, eps=None):
        if x.device.type != "meta" or weight is None:
            return self._saved(x, normalized_shape, weight, eps)
        return _FusedRMSNormTraffic.apply(x, weight)


def step_cost(model: ReMatchModel, batch: dict, chunk: int | None = None, device: str = "meta") -> OpCost:
    """`OpCost` of one training step of `model` (forward, backward, AdamW step; GradCache when
    `chunk` < batch), on meta as `memory.plan_step` plans it when `device="meta"`."""
    if device == "meta":
        batch = to_meta(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:  # the moments exist before a step of a long run
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    cost = OpCost(device, model.backbone)
    step = training_step(model, batch, chunk, opt)
    with cost:
        step()
    return cost


def suite_roofline(shape: str, B: int, image_size: int, variants: list[str] | None = None, chunk: int = 0,
                   recompute: bool | None = None, tflops: float = H100_TFLOPS, tbs: float = H100_TBS,
                   top: int = 12, lora_dropout: float = 0.0) -> dict:
    """Roofline time of one training step of each variant for a 2B/7B shape (bf16, meta device);
    `lora_dropout`: PEFT's dropout on every LoRA input (0.05 in the shipped 2B/7B configs)."""
    from .common import VARIANTS

    torch.manual_seed(0)
    kw = dict(recompute=recompute, lora_dropout=lora_dropout)
    bb = shaped_backbone(shape, "meta", "bf16", **kw) if shape != "tiny" else \
        meta_copy(shaped_backbone("tiny", "cpu", "bf16", **kw))
    from ..backbone.model import recompute_enabled

    res = {"shape": shape, "batch": B, "image_size": image_size, "gradcache_chunk": chunk or None,
           "recompute": recompute_enabled(bb.hf), "lora_dropout": lora_dropout, "runs": {}}
    title = (f"bench roofline: Qwen2-VL-{shape} shape, bf16, batch {B} triples, {image_size} px images, gradient "
             f"checkpointing {'on' if res['recompute'] else 'off'}{f', GradCache chunks of {chunk}' if chunk else ''}"
             f"{f', LoRA dropout {lora_dropout:g}' if lora_dropout else ''}; "
             f"{tflops:g} TFLOP/s matrix peak, {tbs:g} TB/s memory (H100 defaults)")
    rows = []
    for name in pick_variants(variants):
        model = meta_copy(ReMatchModel(bb, **VARIANTS[name]).train())
        batch = make_batch(bb.processor, B, image_size, "cpu", meta_pixels=True, pixel_dtype=bb.pixel_dtype)
        t = time.perf_counter()
        s = step_cost(model, batch, chunk).summary(tflops, tbs)
        s["counted_in_s"] = time.perf_counter() - t
        s["top"], s["ops"] = s["ops"][:top], s["ops"]
        res["runs"][name] = s
        regions = ", ".join(f"{k} {v['roofline_ms']:.0f}" for k, v in s["regions"].items())
        rows.append((name, f"step >= {s['roofline_ms']:7.1f} ms (matrix + attention {s['matrix_ms']:6.1f}, "
                           f"memory-bound {s['memory_ms']:6.1f})  {s['tflop']:6.1f} TFLOP  {s['gbytes']:7.1f} GB  "
                           f"{s['kernels']:6d} kernels  MFU ceiling {s['mfu_ceiling']:.1%}  [{regions} ms]"))
    print_rows(title, rows)
    for name, s in res["runs"].items():
        print(f"\n  {name}: the {top} costliest operators")
        for r in s["top"]:
            print(f"    {r['roofline_ms']:7.1f} ms  {r['phase']:<8} {r['region']:<15} {r['op']:<48} "
                  f"{r['kernels']:6d}x {r['tflop']:7.2f} TFLOP {r['gbytes']:7.1f} GB ({r['bound']})")
    return res
