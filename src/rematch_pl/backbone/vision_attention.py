"""Vision-tower attention over equal-length runs of images in one batched SDPA call.

Qwen2-VL / Qwen2.5-VL encode all images of a batch as one flat patch sequence and attend within
each image (Qwen2.5-VL: within each window on most layers), described by ``cu_seqlens``. Without
flash-attn, transformers runs one SDPA call per image per layer and reads the image lengths back
from the device at every layer (``lengths.tolist()``): B images x 32 layers small kernels and 32
host syncs per vision forward.

`grouped_forward` computes the same attention with one SDPA call per *run* of consecutive
images (or windows) of equal length, as a batch [n, heads, len, head_dim], and reads the lengths
once per ``cu_seqlens`` tensor (all layers share it); the rotary embedding of queries and keys
runs as one set of kernels for both (`rotate_qk`). Images of one size (fixed-size training
images, the evaluation engine's length-sorted batches) form a single run. The arithmetic per
image is unchanged (tested against transformers' per-image loop on both model families).
"""

from __future__ import annotations

import inspect
import sys
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

# Plans of the last few cu_seqlens tensors (a vision forward passes the same tensor object to
# every layer; Qwen2.5-VL alternates two). Each entry keeps its tensor alive, so ids stay unique.
_PLANS: dict[int, tuple[torch.Tensor, list[tuple[int, int, int]]]] = {}
_MAX_PLANS = 4


def runs_of(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(first token, number of segments, segment length)] for runs of equal-length segments."""
    hit = _PLANS.get(id(cu_seqlens))
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    return plan_runs(cu_seqlens, cu_seqlens.tolist())  # the one host read for this tensor


def plan_runs(cu_seqlens: torch.Tensor, bounds: list[int]) -> list[tuple[int, int, int]]:
    """Remember the runs of `cu_seqlens` (any device) from its values `bounds` known on the host."""
    runs: list[tuple[int, int, int]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        if n == 0:
            continue
        if runs and runs[-1][2] == n:
            s, c, _ = runs[-1]
            runs[-1] = (s, c + 1, n)
        else:
            runs.append((a, 1, n))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[id(cu_seqlens)] = (cu_seqlens, runs)
    return runs


def vision_geometry(visual: nn.Module, grid_thw: torch.Tensor, device: torch.device) -> dict:
    """The vision tower's packing inputs computed from a host grid [n, 3] and sent to `device` in
    asynchronous copies, as keyword arguments its forward takes instead of deriving them from
    the grid itself (transformers' `vision_utils` helpers, run here on the host): rotary position
    ids, `cu_seqlens` (Qwen2.5-VL: also its windows) and their longest segment (flash-attention).
    Given a device grid, the tower reads it back at its start and launches a few small kernels
    per image; with these it never reads the device. Grouped attention learns each `cu_seqlens`'s
    runs from the host copy. Returns {} where this transformers lacks the helpers."""
    try:
        from transformers.vision_utils import (get_max_seqlen, get_vision_attention_seqlens,
                                               get_vision_position_ids, get_vision_window_index)
    except ImportError:  # older transformers: the tower derives them from the grid
        return {}
    from .sequence import to_device

    grid = grid_thw.cpu()
    merge = visual.spatial_merge_size
    cu, max_len = get_vision_attention_seqlens(grid, visual.config)
    out = {"position_ids": get_vision_position_ids(grid, merge), "cu_seqlens": cu, "max_seqlen": max_len}
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: window attention on the other layers
        index, cu_win = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        out.update(window_index=index, cu_window_seqlens=cu_win,
                   max_window_seqlen=get_max_seqlen(cu_win, visual.config))
    # compact storages (`unique_consecutive` leaves cu_window_seqlens in an oversize one): the
    # plans below keep their tensors alive, and a device copy is compact anyway
    host = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone()
            for k, v in out.items() if isinstance(v, torch.Tensor)}
    out.update({k: to_device(v, device) for k, v in host.items()})
    for k in ("cu_seqlens", "cu_window_seqlens"):
        if k in out:
            plan_runs(out[k], host[k].tolist())
    return out


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]],
                      scale: float) -> torch.Tensor:
    """Block-diagonal attention. q, k, v: [heads, S, head_dim] -> [S, heads, head_dim]."""
    H, S, D = q.shape
    outs = []
    for start, n, length in runs:
        span = slice(start, start + n * length)
        # [H, n*len, D] -> [n, H, len, D]: each image (window) one batch entry
        qs, ks, vs = (t[:, span].view(H, n, length, D).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # [n, H, len, D]
        outs.append(o.transpose(1, 2).reshape(n * length, H, D))  # [n*len, H, D]
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # [S, H, D]


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of the queries and keys of `qkv` [S, 3, H, D] with cos, sin [S, D]; returns
    q, k [S, H, D] in qkv's dtype. transformers' `apply_rotary_pos_emb_vision` arithmetic (fp32,
    x·cos + rotate_half(x)·sin), on q and k together in three kernels instead of about eight each:
    rotate_half(x)·sin = cat(x2, x1)·cat(-sin1, sin2), so the negation moves to the small [S, D]
    sin, and the product and the sum are one addcmul.

    Memory traffic (the whole cost of these kernels): the fp32 upcast happens inside the kernels
    (type promotion: a bf16 operand times an fp32 one is computed in fp32, exactly as after
    `.float()`), the halves are swapped at the input's width, and the addcmul writes its fp32
    result rounded straight into the output's dtype. Per element of q and k that moves about 18
    bytes in bf16 where upcasting first moved 40, with bit-identical results (tested)."""
    h = qkv.shape[-1] // 2
    qk = qkv[:, :2]  # [S, 2, H, D], a view
    cos, sin = cos.float()[:, None, None], sin.float()  # [S, 1, 1, D], [S, D]
    signed = torch.cat((-sin[:, :h], sin[:, h:]), -1)[:, None, None]  # [S, 1, 1, D]
    swapped = torch.cat((qk[..., h:], qk[..., :h]), -1)  # [S, 2, H, D]: (x2, x1), qkv's dtype
    base = qk * cos  # [S, 2, H, D] fp32
    differentiable = torch.is_grad_enabled() and (qkv.requires_grad or cos.requires_grad or sin.requires_grad)
    if differentiable or torch.compiler.is_compiling() or qkv.dtype == torch.float32:
        out = torch.addcmul(base, swapped, signed).to(qkv.dtype)  # compiled: fused anyway
    else:  # out= takes no autograd; the fp32 sum is rounded as it is stored
        out = torch.addcmul(base, swapped, signed, out=torch.empty(qk.shape, dtype=qkv.dtype, device=qkv.device))
    return out[:, 0], out[:, 1]


@torch.compiler.disable
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """`grouped_attention` over the runs of `cu_seqlens`, kept out of `torch.compile` graphs
    (`backbone.compile` compiles the vision blocks around it): the runs are host-side Python
    values that would otherwise specialise the graph to each batch's image sizes."""
    return grouped_attention(q, k, v, runs_of(cu_seqlens), scale)


def grouped_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """Drop-in forward of transformers' Qwen2-VL / Qwen2.5-VL vision attention (SDPA, no dropout)."""
    S = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).view(S, 3, self.num_heads, -1)  # [S, 3, H, D]
    q, k = rotate_qk(qkv, *position_embeddings)  # [S, H, D]
    q, k, v = (t.transpose(0, 1) for t in (q, k, qkv[:, 2]))  # [H, S, D]
    out = _attend(q, k, v, cu_seqlens, self.scaling)  # [S, H, D]
    return self.proj(out.reshape(S, -1))


def _compatible(attn: nn.Module) -> bool:
    """The attention module looks like the one `grouped_forward` replaces (same parts, same call)."""
    params = inspect.signature(type(attn).forward).parameters
    parts = all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scaling", "config"))
    rotary = hasattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision")
    return parts and rotary and list(params)[1:4] == ["hidden_states", "cu_seqlens", "position_embeddings"]


def patch_vision_blocks(hf_model: nn.Module, part: str, forward=None, accept=lambda m: True) -> list[nn.Module]:
    """Give the `part` ("attn", "mlp") of every vision block of a Qwen2(.5)-VL model the method
    `forward` where `accept(part)` holds, and the class's own forward everywhere else (all of them
    for `forward=None`). Returns the modules now using `forward`."""
    visual = getattr(getattr(hf_model, "model", hf_model), "visual", None)
    patched = []
    for blk in getattr(visual, "blocks", ()):
        m = getattr(blk, part)
        if "forward" in m.__dict__:
            del m.forward  # back to the class's forward
        if forward is not None and accept(m):
            m.forward = MethodType(forward, m)
            patched.append(m)
    return patched


def set_grouped_vision_attention(hf_model: nn.Module, enabled: bool = True) -> int:
    """Use (or stop using) `grouped_forward` in every vision attention module of a Qwen2(.5)-VL
    model that runs SDPA. Returns the number of modules now grouped. Flash-attention (already
    varlen) and eager (returns attention maps) keep transformers' forward."""
    def accept(attn):
        return attn.config._attn_implementation == "sdpa" and _compatible(attn) and attn.attention_dropout == 0.0

    return len(patch_vision_blocks(hf_model, "attn", grouped_forward if enabled else None, accept))
