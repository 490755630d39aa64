"""LoRA on the language model: which layers get it, and how its branch computes.

PEFT holds the adapter (names, saving, merging); `lora_in_activation_dtype` changes only how the
branch multiplies: in the activations' dtype from fp32 weights, and with `fused` the scaling and
the add ride in the B product's epilogue. Parameters and checkpoints stay PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LLM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LLM_LINEAR))
    # "backbone": the LoRA branch computes in the activations' dtype (bf16) from fp32 weights, as
    # autocast would; "fp32": PEFT's default, the branch upcasts its input (a full-width fp32
    # copy of every LoRA input, fp32 matrix products)
    compute_dtype: str = "backbone"
    # with compute_dtype "backbone": the branch's scaling and its add to the base output ride in
    # the B product's epilogue, result + s·(A x)Bᵀ as one addmm (`fuse_lora_epilogue`); false:
    # PEFT's separate product, scale and add (three passes over the output instead of one)
    fused: bool = True


class _InputDtypeLinear(nn.Linear):
    """A LoRA factor that multiplies in its input's dtype: bf16 activations times its fp32 weight
    cast to bf16. The cast is differentiable, so the fp32 weight still gets the gradient.

    Called with a `residual` (the B factor of a fused branch, `fuse_lora_epilogue`) it returns
    residual + scale·x Wᵀ as one addmm: the scaling and the add happen in the product's epilogue
    (and in its backward, as the product's alpha) instead of as two passes over the output."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if residual is None:
            return torch.nn.functional.linear(x, w, b)
        if b is not None or residual.dtype != x.dtype:
            return residual + torch.nn.functional.linear(x, w, b) * scale  # the unfused arithmetic
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]),  # [N, out]
                          x.reshape(-1, x.shape[-1]), w.t(), alpha=scale)  # [N, r] @ [r, out]
        return out.view(residual.shape)


_FUSED: dict[type, type] = {}


def _fused_class(base: type) -> type:
    """A subclass of PEFT's LoRA `Linear` whose forward passes the base output to the B factor as
    its residual (see `_InputDtypeLinear`); anything but plain LoRA on one or more adapters (a
    disabled or merged adapter, DoRA and other variants, per-row adapter names) takes PEFT's forward."""
    if base not in _FUSED:
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs or self.disable_adapters or self.merged or self.lora_variant:
                return base.forward(self, x, *args, **kwargs)
            result = self.base_layer(x)  # [..., out]
            for name in self.active_adapters:
                if name in self.lora_A:
                    h = self.lora_A[name](self.lora_dropout[name](x))  # [..., r]
                    result = self.lora_B[name](h, result, self.scaling[name])  # result + s·h Bᵀ, one addmm
            return result

        _FUSED[base] = type(f"Fused{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    return _FUSED[base]


def lora_in_activation_dtype(model: nn.Module, fused: bool = True) -> int:
    """Make every LoRA branch of `model` compute in its input's dtype (see `LoraSettings`), and with
    `fused` carry its scaling and add in the B product (`_fused_class`); returns the number of LoRA
    factors changed. Parameter names, dtypes and values are unchanged."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.cast_input_dtype_enabled = False  # PEFT's x.to(lora_A.weight.dtype)
            for factors in (m.lora_A, m.lora_B):
                for lin in factors.values():
                    if type(lin) is nn.Linear:
                        lin.__class__ = _InputDtypeLinear
                        n += 1
            plain_b = all(type(b) is _InputDtypeLinear and b.bias is None for b in m.lora_B.values())
            if fused and type(m) is LoraLinear and plain_b:
                m.__class__ = _fused_class(LoraLinear)
    return n


def lora_target_regex(targets: list[str]) -> str:
    """A PEFT regex that hits the given linear layers of the *language model only*.

    A plain list of names would also hit the Qwen2.5-VL vision MLP (same names).
    """
    bad = [t for t in targets if not t.isidentifier()]
    if bad:
        raise ValueError(f"backbone.lora.targets: {bad} are not module names")
    return r".*language_model.*\.(" + "|".join(targets) + r")$"
