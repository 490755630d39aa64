"""The backbone's RMSNorms as one fused operator (`backbone.fused_rms_norm`).

transformers writes the Qwen2(.5)-VL RMSNorm out in elementwise steps: an fp32 copy of the
input, pow, mean, add, rsqrt, mul, a copy back to the input's dtype and the weight's mul (eight
kernels forward, about twelve backward, the fp32 copy kept for the backward), at every layer's
two norms and the final one, and at Qwen2.5-VL's vision blocks. `torch.nn.functional.rms_norm`
is the same formula as one operator, which on CUDA runs as one fused kernel each way
(`aten::_fused_rms_norm`); on CPU it decomposes into the same arithmetic. Arithmetic in fp32 as
transformers does; a bf16 result is rounded once (transformers rounds the normalised value, then
its product with the weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_FUSED: dict[type, type] = {}


def _is_rms_norm(m: nn.Module) -> bool:
    """transformers' RMSNorm of the Qwen2 family (`Qwen2VLRMSNorm`, `Qwen2RMSNorm`, ...): a weight and
    `variance_epsilon`, nothing else (Qwen3-style offset or bias-carrying variants are left alone)."""
    return (type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), nn.Parameter) and not list(m.children())
            and set(dict(m.named_parameters())) == {"weight"})


def _fused_class(base: type) -> type:
    if base not in _FUSED:
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            if hidden_states.dtype != self.weight.dtype:  # transformers' promotion rules: its own forward
                return base.forward(self, hidden_states)
            dev = hidden_states.device.type
            if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
                # autocast would run rms_norm in fp32 and return fp32: keep transformers' output dtype
                with torch.autocast(dev, enabled=False):
                    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)

        _FUSED[base] = type(f"Fused{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    return _FUSED[base]


def fuse_rms_norms(model: nn.Module) -> int:
    """Make every RMSNorm of `model` call `F.rms_norm`; returns how many. Names, parameters and
    state dicts are unchanged (the class becomes a subclass with another forward)."""
    n = 0
    for m in model.modules():
        if _is_rms_norm(m) and type(m) not in _FUSED.values():
            m.__class__ = _fused_class(type(m))
            n += 1
    return n
