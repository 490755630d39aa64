"""The vision tower's patch embedding as the matrix product it is.

Qwen2-VL and Qwen2.5-VL embed each patch (3 channels x 2 frames x 14 x 14 pixels, already cut
out by the image processor) with an `nn.Conv3d` whose kernel equals its stride and its input: one
output position per patch, i.e. a [C·T·P·P] -> [d] linear map. As a convolution it goes through
cuDNN's 3-D kernels, which on some GPU, cuDNN and dtype combinations are one to several orders of
magnitude slower than the equivalent GEMM (reported for bf16 on H20/H100/Blackwell in
transformers #45750 and vLLM); `PatchifyConv3d` runs it as `F.linear` on the flattened patch
with the weight viewed as [d, C·T·P·P]. The weight and its name are the Conv3d's (checkpoints
unchanged) and the layer is still called as a module (FSDP and DeepSpeed gather it as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchifyConv3d(nn.Conv3d):
    """A Conv3d with kernel == stride, no padding, dilation or groups, that runs inputs of exactly
    one kernel's extent ([N, C, T, P, P] -> [N, d, 1, 1, 1]) as a matrix product; anything else
    as the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        w = self.weight.reshape(self.out_channels, -1)  # [d, C·T·P·P]
        return F.linear(x.reshape(x.shape[0], -1), w, self.bias)[:, :, None, None, None]  # [N, d, 1, 1, 1]


def _patchify(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv3d and tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation)
            and conv.padding_mode == "zeros")


def set_linear_patch_embed(hf_model: nn.Module, enabled: bool = True) -> int:
    """Make the vision tower's patch-embedding Conv3d a `PatchifyConv3d` (or, `enabled=False`, a
    plain Conv3d again); returns 1 if it now runs as a matrix product, else 0."""
    visual = getattr(getattr(hf_model, "model", hf_model), "visual", None)
    conv = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if conv is None:
        return 0
    if type(conv) is PatchifyConv3d:
        conv.__class__ = nn.Conv3d
    if enabled and _patchify(conv):
        conv.__class__ = PatchifyConv3d
        return 1
    return 0
