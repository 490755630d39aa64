"""Peak memory of a training step without the device: the step runs with its float tensors on
PyTorch's `meta` device (shapes and dtypes, no storage, no compute) while the integer and boolean
bookkeeping (token ids, lengths, masks, image grids) stays real, so the model's host-side logic
(packing, image placement, M-RoPE positions, cu_seqlens) runs exactly as on a GPU.

`LiveBytes` is a dispatch mode that adds up the bytes of every live tensor storage and keeps the
high-water mark: run on real tensors it measures a step, run with `meta=True` it predicts one.
`FusedAttention` makes `scaled_dot_product_attention` on meta tensors take the fused kernel a
real device takes (on meta, PyTorch would otherwise take the math path and hold the full
attention matrix): `target="cuda"` flash attention without a mask, memory-efficient attention
with one, as on an H100; `target="cpu"` the CPU flash kernel (what the CPU test compares with).
`FusedDropout` likewise gives `F.dropout` (PEFT's LoRA dropout) CUDA's one fused kernel and its
bool mask; `target_kernels(target)` enters both.

`plan_step` plans one training step as the trainer runs it (AdamW, GradCache) and
`check_memory` is `train.memory_check`: the configured model, built from its config on meta,
planned on the first batch of the data stream before any weight is read (`bench --suite memory`
plans the 2B/7B shapes on MMEB-like batches).

What the figure is: the peak of `torch.cuda.max_memory_allocated()` that the step would reach,
up to the caching allocator's block rounding. Not in it: the CUDA context (~0.5 GiB, outside the
allocator), cuBLAS/flash workspaces, and fragmentation (reserved minus allocated).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import ExitStack, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

GiB = 2**30
log = logging.getLogger("rematch_pl.memory")


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages (each counted once, views included) and their peak.

    Tensors made before the mode is entered (weights, inputs) are added with `track`.
    With `meta=True`, an op that touches a meta tensor runs on meta with its real operands moved
    there (a boolean index becomes integer indices first: its size depends on its values), and
    integer/boolean factories asked for on meta are made on the CPU (their values are read by
    the host: lengths, positions, masks).
    """

    def __init__(self, meta: bool = False):
        super().__init__()
        self.meta = meta
        self.live: dict[int, int] = {}  # storage id -> bytes
        self.now = 0
        self.peak = 0

    def track(self, *trees) -> None:
        for t in tree_leaves(trees):
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._run(func, args, kwargs or {})[2]

    def _run(self, func, args, kwargs):
        """Run `func` (placed on meta when planning) and track its results: (args, kwargs, out)."""
        if self.meta:
            args, kwargs = self._placed(func, args, kwargs)
        out = func(*args, **kwargs)
        self.track(out)
        return args, kwargs, out

    @staticmethod
    def _placed(func, args, kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "meta":
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            if not dtype.is_floating_point:
                return args, dict(kwargs, device="cpu")
            return args, kwargs
        # ops take tensors directly or in one flat list (cat, index): no full tree walk needed
        flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else (a,))
                if isinstance(x, torch.Tensor)]
        n_meta = sum(x.device.type == "meta" for x in flat)
        if n_meta == 0 or n_meta == len(flat):
            return args, kwargs
        if func is torch.ops.aten.index.Tensor:
            src, idx = args
            flat_idx = []
            for i in idx:
                if i is not None and i.dtype == torch.bool and not _is_meta(i):
                    flat_idx.extend(i.nonzero().unbind(1))
                else:
                    flat_idx.append(i)
            args = (src, flat_idx)
        return tree_map_only(torch.Tensor, lambda t: t if _is_meta(t) else t.to("meta"), (args, kwargs))


class SwapFunctional:
    """While active, `torch.nn.functional.<name>` is `self.replacement` (callers look the function
    up at call time); a function mode would not be active when gradient checkpointing recomputes
    a layer inside the backward pass. `self._saved` is the original."""

    name = ""

    def __enter__(self):
        self._saved = getattr(F, self.name)
        setattr(F, self.name, self.replacement)
        return self

    def __exit__(self, *exc):
        setattr(F, self.name, self._saved)


class FusedAttention(SwapFunctional):
    """Within it, `F.scaled_dot_product_attention` on meta tensors takes the kernel `target` runs
    (HF attention and the grouped vision attention look it up at call time)."""

    name = "scaled_dot_product_attention"

    def __init__(self, target: str = "cuda"):
        if target not in ("cuda", "cpu"):
            raise ValueError(f"FusedAttention target must be 'cuda' or 'cpu', not {target!r}")
        self.target = target
        self._saved = None

    def replacement(self, *args, **kwargs):
        return self.attention(*args, **kwargs)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not _is_meta(q):
            return self._saved(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale, enable_gqa=enable_gqa)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # [.., Lq, Lk] -> additive bias, as SDPA does
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        aten = torch.ops.aten
        if self.target == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=mask,
                                                                    scale=scale)[0]
        if mask is None and q.dtype in (torch.float16, torch.bfloat16):
            # flash attention takes grouped KV heads as they are (transformers passes enable_gqa
            # without a mask): it reads, and keeps for backward, k and v unrepeated
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if k.shape[-3] != q.shape[-3]:  # the memory-efficient kernel wants grouped KV heads repeated
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        return aten._scaled_dot_product_efficient_attention(q, k, v, mask, q.requires_grad, dropout_p, is_causal,
                                                            scale=scale)[0]


class FusedDropout(SwapFunctional):
    """Within it, `F.dropout` on meta tensors takes the kernel `target` runs. CUDA runs one fused
    kernel (`aten.native_dropout`: reads the input, writes the output and a bool mask, and its
    backward one kernel reading the gradient and that mask); meta, like the CPU, decomposes it
    into a mask in the input's dtype, a division and a product (more bytes moved and kept)."""

    name = "dropout"

    def __init__(self, target: str = "cuda"):
        self.target = target
        self._saved = None

    def replacement(self, input, p=0.5, training=True, inplace=False):
        if self.target != "cuda" or not _is_meta(input) or not training or not 0.0 < p < 1.0:
            return self._saved(input, p, training, inplace)
        out = torch.ops.aten.native_dropout(input, p, training)[0]
        return input.copy_(out) if inplace else out


def target_kernels(target: str = "cuda") -> ExitStack:
    """The fused kernels `target` runs for meta tensors: attention (`FusedAttention`) and
    dropout (`FusedDropout`), entered together."""
    stack = ExitStack()
    stack.enter_context(FusedAttention(target))
    stack.enter_context(FusedDropout(target))
    return stack


def to_meta(batch):
    """The batch with its float tensors (pixels) on meta; ids, lengths and grids stay real."""
    return tree_map_only(torch.Tensor, lambda t: t.to("meta") if t.is_floating_point() else t, batch)


def _tracking(model: torch.nn.Module, batch, meta: bool) -> tuple[LiveBytes, int, int]:
    """A `LiveBytes` mode holding the model's weights and the batch; (mode, weight bytes, input bytes)."""
    mode = LiveBytes(meta=meta)
    mode.track(list(model.parameters()), list(model.buffers()))
    weights = mode.now
    mode.track(batch)
    return mode, weights, mode.now - weights


def step_memory(model: torch.nn.Module, batch: dict, step: Callable[[], None], optimizer: torch.optim.Optimizer,
                meta: bool, target: str = "cuda") -> dict:
    """Peak bytes of `step()` (forward, backward, `optimizer` step) and what is resident around it.

    The optimizer states exist before the measured step, as in a long run: a first optimizer
    step on zero gradients makes them. Returns bytes: `weights` (parameters and buffers),
    `inputs`, `optimizer` (its states), `resident` (live after the step), `peak`, and `transient`
    (peak minus resident: activations, gradients, temporaries).
    """
    mode, weights, inputs = _tracking(model, batch, meta)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with mode:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    states = mode.now - weights - inputs
    with mode, (target_kernels(target) if meta else nullcontext()):
        mode.reset_peak()
        step()
    return {"weights": weights, "inputs": inputs, "optimizer": states, "resident": mode.now, "peak": mode.peak,
            "transient": mode.peak - mode.now}


def encode_memory(model: torch.nn.Module, batch: dict, sides: list[list[str]], meta: bool,
                  target: str = "cuda") -> dict:
    """Peak bytes of one evaluation forward (`evaluation.engine.embed_batch`: vision tower and
    embedding pass, no gradients) of `model` on a collated eval `batch` (pixels on meta when
    `meta`). Returns bytes: `weights`, `inputs`, `peak` and `transient` (peak minus both)."""
    from .evaluation.engine import embed_batch

    p = next(model.parameters())
    mode, weights, inputs = _tracking(model, batch, meta)
    with mode, (target_kernels(target) if meta else nullcontext()):
        mode.reset_peak()
        out = embed_batch(model, batch, sides, p.device, p.dtype, out_device=p.device)
        del out
    return {"weights": weights, "inputs": inputs, "peak": mode.peak, "transient": mode.peak - weights - inputs}


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` moved to meta (in place), with tied weights tied again (the move unties them)."""
    from transformers import PreTrainedModel

    model = model.to("meta")
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.tie_weights()
    return model


class MemoryPlanError(RuntimeError):
    """The planned peak of the configured training step exceeds the device's memory."""


def _chunk_candidates(current: int, batch: int, pairs: bool) -> list[int]:
    """GradCache chunk sizes to try below `current`, about halving each time. With `pairs`
    (matching without hard negatives) no chunk may hold a single triple (`config.py`): each
    halving moves to the nearest size that leaves none (up to the next halving, then down)."""
    def ok(c):
        return c >= 1 and (not pairs or (c >= 2 and batch % c != 1))

    out, c = [], current // 2
    while c >= 1:
        pick = next((x for x in list(range(c, min(2 * c, current))) + list(range(c - 1, 0, -1))
                     if ok(x) and (not out or x < out[-1])), None)
        if pick is None:
            break
        out.append(pick)
        c = pick // 2
    return out


def plan_step(model: torch.nn.Module, batch: dict, chunk: int | None, target: str = "cuda") -> dict:
    """`step_memory` of one training step of a meta `model` on `batch` (its pixels moved to meta),
    as the trainer runs it: AdamW on the trainable parameters, GradCache when `chunk` < batch."""
    batch = to_meta(batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return step_memory(model, batch, training_step(model, batch, chunk, opt), opt, meta=True, target=target)


def training_step(model: torch.nn.Module, batch: dict, chunk: int | None, opt) -> Callable[[], None]:
    """One training step as the trainer runs it: forward and backward (GradCache when `chunk` <
    batch), then the optimizer step."""
    from .gradcache import gradcache_step

    B = batch["qry"]["ids"].shape[0]

    def step():
        if chunk and B > chunk:
            gradcache_step(model, batch, chunk, backward=lambda t: t.backward())
        else:
            model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _at_max_pixels(image, max_pixels: int):
    """`image` scaled (aspect kept) to the largest area the processor keeps: its worst case."""
    w, h = image.size
    s = (max_pixels / (w * h)) ** 0.5
    return image.resize((max(1, round(w * s)), max(1, round(h * s))))


def _first_batch(cfg, processor, images: str = "as_read") -> dict:
    """The stream's first training batch, read and collated as the trainer would;
    `images="max_pixels"`: every image scaled to the processor's largest area first.

    Called before the process group exists, the stream reads as one process: every rank plans
    the same batch, so all ranks reach the same verdict (none waits for a rank that stopped).
    """
    from .build import build_datamodule
    from .data.collate import TrainCollator

    dm = build_datamodule(cfg, processor)
    dm.prepare_data()
    examples = next(iter(dm.train_stream()))
    if images == "max_pixels":
        top = processor.pixel_range[1]
        big = lambda im: None if im is None else _at_max_pixels(im, top)  # noqa: E731
        examples = [dict(ex, qry_image=big(ex["qry_image"]), pos_image=big(ex["pos_image"]),
                         neg_images=[big(im) for im in ex["neg_images"]]) for ex in examples]
    return TrainCollator(processor, dm.max_length, dm.pixel_dtype)(examples)


def _image_tokens(batch: dict, backbone) -> int:
    """LLM tokens of the batch's images (patches / merge^2)."""
    return int(batch["image_grid_thw"].prod(-1).sum()) // backbone.merge**2


def check_memory(cfg, target: str = "cuda") -> dict | None:
    """`train.memory_check`: plan the peak memory of the configured step before any weight is read.

    mode `auto` plans on a CUDA device, `always` everywhere, `only` plans and stops, `never`
    skips. `images`: `as_read` plans the first batch as the stream yields it, `max_pixels` with
    every image scaled to the processor's largest area (the worst case of that batch's mix).
    The budget is `budget_gib` or the device's memory, minus `reserve_gib`. Over budget, a
    `MemoryPlanError` names the planned peak and the largest GradCache chunk that fits (for a
    sharded strategy the plan counts weights and optimizer states whole, an upper bound: it warns
    instead). `target`: whose attention kernels are planned ("cpu" to compare with a CPU run).
    `backbone.gradient_checkpointing=auto`: the step is first planned without recomputation at
    its worst case (every image of the batch at max_pixels, whatever `images` says); if that fits
    the budget recomputation stays off (a third fewer language-model FLOPs per step), else it is
    on; with no budget known it is on. The choice is the plan's ``gradient_checkpointing``.
    Returns the plan (GiB figures), or None when skipped.
    """
    from .build import build_backbone, build_model

    mc = cfg.train.memory_check
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    if mc.mode == "never" or (mc.mode == "auto" and not cuda):
        return None
    device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB if cuda else None
    total = mc.budget_gib if mc.budget_gib is not None else device_gib
    budget = None if total is None else total - mc.reserve_gib
    if "mixed" in str(cfg.trainer.precision) and cfg.backbone.dtype in ("fp32", "float32"):
        log.warning(f"memory plan: trainer.precision={cfg.trainer.precision} is not replayed on meta (no autocast): "
                    "activations are planned in backbone.dtype=fp32, an overestimate")
    setting = cfg.backbone.gradient_checkpointing
    chunk = cfg.train.gradcache.chunk_size

    def planned(bb, batch, c: int | None) -> dict:
        torch.manual_seed(cfg.seed)
        return plan_step(meta_copy(build_model(cfg, bb)).train(), batch, c, target)

    recompute, probe = setting, None
    if setting == "auto":
        recompute = True
        if budget is not None:  # off if the worst case of this batch fits without it
            backbone = build_backbone(cfg.backbone, meta=True, gradient_checkpointing=False)
            worst = _first_batch(cfg, backbone.processor, "max_pixels")
            probe = planned(backbone, worst, chunk)["peak"] / GiB
            recompute = probe > budget
            log.info(f"memory plan: without gradient checkpointing the step would peak at {probe:.2f} GiB with every "
                     f"image at max_pixels, {'over' if recompute else 'within'} the {budget:.1f} GiB budget: "
                     f"gradient checkpointing {'on' if recompute else 'off'}")
    backbone = build_backbone(cfg.backbone, meta=True, gradient_checkpointing=recompute)
    batch = _first_batch(cfg, backbone.processor, mc.images)
    B = batch["qry"]["ids"].shape[0]
    r = planned(backbone, batch, chunk)
    plan = {"batch": B, "gradcache_chunk": chunk, "images": mc.images, "image_tokens": _image_tokens(batch, backbone),
            "budget_gib": budget, "device_gib": device_gib, "gradient_checkpointing": recompute,
            "gradient_checkpointing_setting": setting, "no_recompute_worst_case_gib": probe,
            **{f"{k}_gib": v / GiB for k, v in r.items()}}
    plan["fits"] = None if budget is None else plan["peak_gib"] <= budget
    verdict = ("" if budget is None else f" of a {budget:.1f} GiB budget ({total:.1f} - {mc.reserve_gib:g} reserved)")
    log.info(f"memory plan: batch {B} ({plan['image_tokens']} image tokens, images {mc.images}), GradCache chunk "
             f"{chunk}, gradient checkpointing {'on' if recompute else 'off'}"
             f"{' (auto)' if setting == 'auto' else ''}: peak {plan['peak_gib']:.2f} GiB{verdict} (weights "
             f"{plan['weights_gib']:.2f}, optimizer {plan['optimizer_gib']:.2f}, activations and gradients "
             f"{plan['transient_gib']:.2f})")
    if plan["fits"] is False:
        fix = "a smaller data.batch_size"
        for c in _chunk_candidates(min(chunk or B, B), B, pairs=cfg.data.num_hardneg == 0 and cfg.matching.views != "none"):
            peak = planned(backbone, batch, c)["peak"] / GiB
            if peak <= budget:
                plan["suggested_chunk"] = c
                fix = f"train.gradcache.chunk_size={c} (planned {peak:.1f} GiB) or {fix}"
                break
        msg = (f"train.memory_check: the planned peak memory of one training step is {plan['peak_gib']:.1f} GiB{verdict} "
               f"at data.batch_size={B}, train.gradcache.chunk_size={chunk}. Use {fix}; "
               "train.memory_check.mode=never skips this check.")
        if cfg.strategy.name in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
            log.warning(msg + f" (strategy={cfg.strategy.name} shards weights or optimizer states: the plan counts "
                        "them whole, so this is an upper bound)")
        else:
            raise MemoryPlanError(msg)
    return plan
