"""Qwen2-VL's vision MLP with its QuickGELU folded into the two products around it.

transformers computes ``fc2(h · sigmoid(1.702 h))``, ``h = fc1(x)``: three elementwise kernels
(a scale, a sigmoid, a product) over the 4x-wide hidden tensor at each of the 32 vision blocks,
for every image patch. Since h·σ(1.702h) = silu(1.702h) / 1.702, the same function is
``fc2'(silu(fc1'(x)))`` where fc1' multiplies its product and bias by 1.702 and fc2' its
product by 1/1.702: the scalings ride in the products (`addmm`'s alpha) and one SiLU kernel
is left. The weights are untouched (state dicts, checkpoints and FSDP/DeepSpeed gathering as
before: both layers are still called as modules). Qwen2.5-VL's gated SiLU MLP is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vision_attention import patch_vision_blocks

QUICK_GELU = 1.702


class ScaledLinear(nn.Linear):
    """nn.Linear whose call takes a scale: scale·(x Wᵀ + b_scale·b) in one addmm, where the bias is
    scaled too (`scale_bias`) or not. With scale 1 it is nn.Linear."""

    def forward(self, x: torch.Tensor, scale: float = 1.0, scale_bias: bool = True) -> torch.Tensor:
        if scale == 1.0:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias * scale if scale_bias else self.bias  # [out], small
        if bias is None or x.dtype != self.weight.dtype:  # no bias to carry, or autocast's mixed dtypes
            out = F.linear(x, self.weight) * scale
            return out if bias is None else out + bias.to(out.dtype)
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), self.weight.t(), alpha=scale)  # [N, out]
        return out.view(*x.shape[:-1], -1)


def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
    """fc2(QuickGELU(fc1(x))) as fc2(silu(1.702·fc1(x))) / 1.702, the scalings inside the products."""
    u = self.fc1(x, QUICK_GELU)  # 1.702·(x W1ᵀ + b1): [..., 4d]
    return self.fc2(F.silu(u), 1 / QUICK_GELU, False)  # silu(u) W2ᵀ / 1.702 + b2: [..., d]


def _quick_gelu_mlp(mlp: nn.Module) -> bool:
    return (type(getattr(mlp, "act", None)).__name__ == "QuickGELUActivation"
            and all(isinstance(getattr(mlp, f, None), nn.Linear) for f in ("fc1", "fc2")))


def set_folded_vision_mlp(hf_model: nn.Module, enabled: bool = True) -> int:
    """Use (or stop using) `folded_forward` in every QuickGELU vision MLP of a Qwen2-VL model;
    returns the number of MLPs now folded (0 for Qwen2.5-VL)."""
    mlps = patch_vision_blocks(hf_model, "mlp", folded_forward if enabled else None, _quick_gelu_mlp)
    for mlp in mlps:
        for f in (mlp.fc1, mlp.fc2):
            if type(f) is nn.Linear:
                f.__class__ = ScaledLinear  # nn.Linear when called without a scale
    return len(mlps)
