"""backbone.vision_mlp: Qwen2-VL's QuickGELU folded into the vision MLP's products, and the rotary
embedding of backbone.vision_attention, against transformers' own arithmetic."""

import pytest
import torch

from tinyutil import KINDS, OpLog
from rematch_pl.backbone.vision_attention import rotate_qk
from rematch_pl.backbone.vision_mlp import set_folded_vision_mlp


def _pixels(bb, grids):
    v = bb.hf.config.vision_config
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(0)
    return torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size**2,
                       generator=g), grid


@pytest.mark.parametrize("kind", KINDS)
def test_folded_vision_mlp_gives_the_towers_output(backbones, kind):
    """The whole tower (fp32) with folded MLPs equals transformers' MLPs to fp32 rounding; Qwen2-VL
    folds every block, Qwen2.5-VL (gated SiLU MLP) none; parameters and names unchanged."""
    bb = backbones[kind]
    blocks = len(bb.hf.model.visual.blocks)
    assert bb.folded_vision_mlps == (blocks if kind == "qwen2vl" else 0)
    keys = list(bb.state_dict())
    pv, grid = _pixels(bb, [[1, 8, 8], [1, 4, 6]])
    try:
        with torch.no_grad():
            folded = bb.encode_images(pv, grid)
            assert set_folded_vision_mlp(bb.hf, False) == 0
            reference = bb.encode_images(pv, grid)
    finally:
        set_folded_vision_mlp(bb.hf, True)
    assert list(bb.state_dict()) == keys
    for a, b in zip(folded, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_folded_vision_mlp_in_bf16_is_one_silu_and_as_exact(backbones):
    """One bf16 Qwen2-VL vision MLP: the folded forward leaves one elementwise kernel over the wide
    hidden tensor (SiLU) where transformers has three, and is no further from float64."""
    import copy

    mlp = copy.deepcopy(backbones["qwen2vl"].hf.model.visual.blocks[0].mlp).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for p in mlp.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.3).to(torch.bfloat16)
    x = (torch.randn(64, mlp.fc1.in_features, generator=g) * 2).to(torch.bfloat16)
    x64, w1, b1, w2, b2 = (t.double() for t in (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
    h = x64 @ w1.T + b1
    exact = (h * torch.sigmoid(1.702 * h)) @ w2.T + b2
    wide = 64 * mlp.fc1.out_features
    outs = {}
    for name, method in (("transformers", type(mlp).forward), ("folded", mlp.forward)):
        with torch.no_grad(), OpLog() as ops:
            outs[name] = method(x) if name == "folded" else method(mlp, x)
        outs[name + "_wide_elementwise"] = [n for n, numel in ops.ops if numel == wide
                                            and n not in ("addmm", "mm", "t", "view", "_unsafe_view", "expand")]
    assert outs["transformers_wide_elementwise"] == ["mul", "sigmoid", "mul"]
    assert outs["folded_wide_elementwise"] == ["silu"]
    err = {k: float((outs[k].double() - exact).norm() / exact.norm()) for k in ("transformers", "folded")}
    assert err["folded"] <= 1.1 * err["transformers"] and err["folded"] < 1e-2, err


def test_folded_vision_mlp_under_autocast_with_fp32_weights(backbones):
    """bf16 autocast over fp32 weights (trainer.precision=bf16-mixed on an fp32 backbone): the
    products see mixed dtypes and take the unfused arithmetic, still transformers' function
    (fc2's bias is not scaled)."""
    import copy

    mlp = copy.deepcopy(backbones["qwen2vl"].hf.model.visual.blocks[0].mlp)
    g = torch.Generator().manual_seed(0)
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    mlp.fc2.bias.data *= 30  # a bias that counts in the output
    x = torch.randn(32, mlp.fc1.in_features, generator=g) * 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded, ref = mlp(x), type(mlp).forward(mlp, x)
    assert folded.dtype == ref.dtype == torch.bfloat16
    assert float((folded.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_qk_equals_transformers_rotary(dtype):
    """The grouped attention's rotary embedding of q and k against transformers'
    `apply_rotary_pos_emb_vision`: fp32 to rounding, bf16 within one rounding of the result."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    g = torch.Generator().manual_seed(0)
    S, H, D = 50, 4, 16
    qkv = torch.randn(S, 3, H, D, generator=g).to(dtype)
    angles = torch.randn(S, D // 2, generator=g)
    emb = torch.cat((angles, angles), -1)  # as the tower builds it
    q, k = rotate_qk(qkv, emb.cos(), emb.sin())
    rq, rk = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], emb.cos(), emb.sin())
    assert q.dtype == k.dtype == dtype and q.shape == (S, H, D)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0.02, rtol=0.01)
    torch.testing.assert_close(q, rq, **tol)
    torch.testing.assert_close(k, rk, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotate_qk_moves_less_memory_with_the_same_bits(dtype):
    """rotate_qk upcasts inside its kernels and rounds as it stores (no fp32 copies of q and k):
    the results are bit-identical to upcasting first, with and without autograd."""
    g = torch.Generator().manual_seed(1)
    S, H, D = 300, 4, 16
    qkv = torch.randn(S, 3, H, D, generator=g).to(dtype)
    angles = torch.randn(S, D // 2, generator=g)
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos(), emb.sin()
    h = D // 2
    up = qkv[:, :2].float()  # the upcast-first arithmetic
    signed = torch.cat((-sin[:, :h], sin[:, h:]), -1)[:, None, None]
    ref = torch.addcmul(up * cos[:, None, None], torch.cat((up[..., h:], up[..., :h]), -1), signed).to(dtype)
    with torch.no_grad():
        q, k = rotate_qk(qkv, cos, sin)
    assert torch.equal(q, ref[:, 0]) and torch.equal(k, ref[:, 1])
    leaf = qkv.clone().requires_grad_()
    q, k = rotate_qk(leaf, cos, sin)
    assert torch.equal(q, ref[:, 0]) and torch.equal(k, ref[:, 1])
    (q.float().sum() + 2 * k.float().sum()).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()
