"""backbone.patch_embed: the patch-embedding Conv3d run as a matrix product."""

import pytest
import torch
from torch import nn

from tinyutil import KINDS, OpLog
from rematch_pl.backbone.patch_embed import PatchifyConv3d, set_linear_patch_embed


@pytest.mark.parametrize("kind", KINDS)
def test_linear_patch_embed_equals_the_convolution(backbones, kind):
    """Both families: the patch embedding (and the whole tower) equal the Conv3d's to fp32
    rounding, with one matrix product and no convolution; names and weights unchanged."""
    bb = backbones[kind]
    embed = bb.hf.model.visual.patch_embed
    assert bb.linear_patch_embed == 1 and type(embed.proj) is PatchifyConv3d
    keys = list(bb.state_dict())
    v = bb.hf.config.vision_config
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])
    pixels = torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size**2,
                         generator=g)
    try:
        with torch.no_grad(), OpLog() as ops:
            linear, tower = embed(pixels), bb.encode_images(pixels, grid)
        assert set_linear_patch_embed(bb.hf, False) == 0 and type(embed.proj) is nn.Conv3d
        with torch.no_grad(), OpLog() as conv_ops:
            conv, conv_tower = embed(pixels), bb.encode_images(pixels, grid)
    finally:
        set_linear_patch_embed(bb.hf, True)
    assert "convolution" not in [n for n, _ in ops.ops] and "convolution" in [n for n, _ in conv_ops.ops]
    assert list(bb.state_dict()) == keys
    torch.testing.assert_close(linear, conv, atol=1e-5, rtol=1e-4)  # a sum of 1176 products, another order
    for a, b in zip(tower, conv_tower):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_other_inputs_and_convolutions_keep_the_convolution():
    """An input larger than one kernel runs the convolution itself; a strided conv with overlap or
    padding is never converted."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    x = torch.randn(5, 3, 2, 8, 8)
    ref = conv(x)
    conv.__class__ = PatchifyConv3d
    torch.testing.assert_close(conv(x), ref)
    one = torch.randn(5, 3, 2, 4, 4)
    conv.__class__ = nn.Conv3d
    ref_one = conv(one)
    conv.__class__ = PatchifyConv3d
    torch.testing.assert_close(conv(one), ref_one, atol=1e-6, rtol=1e-5)
    from rematch_pl.backbone.patch_embed import _patchify

    assert _patchify(nn.Conv3d(3, 8, kernel_size=2, stride=2))
    assert not _patchify(nn.Conv3d(3, 8, kernel_size=3, stride=2))
    assert not _patchify(nn.Conv3d(3, 8, kernel_size=2, stride=2, padding=1))
