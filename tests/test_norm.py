"""backbone.norm: the RMSNorms as one F.rms_norm, against transformers' own forward."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rematch_pl.backbone.model import load_backbone
from rematch_pl.backbone.norm import fuse_rms_norms


def _norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def _load(kind, fused, dtype="fp32"):
    load_backbone(f"tiny://{kind}")  # the first call makes the tiny checkpoint (draws random numbers)
    torch.manual_seed(0)
    return load_backbone(f"tiny://{kind}", dtype=dtype, fused_rms_norm=fused,
                         lora={"r": 4, "alpha": 8, "dropout": 0.0})


def _step(bb, images):
    """LLM (and, for images, vision tower) forward + backward; the output and every gradient."""
    g = torch.Generator().manual_seed(1)
    for n, p in bb.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05
    ids = torch.randint(0, bb.embed_tokens.num_embeddings, (3, 20), generator=g)
    out = bb.hf.model.language_model(input_ids=ids, use_cache=False).last_hidden_state
    if images:
        v = bb.hf.config.vision_config
        grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
        pixels = torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size**2,
                             generator=g)
        bb.hf.model.visual.requires_grad_(True)  # the tower's gradients too (frozen in training)
        out = torch.cat([out.flatten(), torch.cat(bb.encode_images(pixels, grid)).flatten()])
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in bb.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2vl", "qwen25vl"])
def test_fused_rms_norm_gives_transformers_outputs_and_gradients(kind):
    """fp32, whole LLM (and Qwen2.5-VL's vision tower, whose blocks use RMSNorm): outputs and
    every gradient, the norms' weights included, equal transformers' to fp32 rounding."""
    ref_bb, bb = _load(kind, False), _load(kind, True)
    n_fused = sum(type(m).__name__.startswith("Fused") for m in _norms(bb.hf))
    layers = bb.hf.config.text_config.num_hidden_layers
    assert n_fused == len(_norms(bb.hf)) >= 2 * layers + 1
    assert not any(type(m).__name__.startswith("Fused") for m in _norms(ref_bb.hf))
    assert list(bb.state_dict()) == list(ref_bb.state_dict())
    ref, ref_g = _step(ref_bb, images=True)
    out, g = _step(bb, images=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert g.keys() == ref_g.keys() and any("norm" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], atol=1e-7, rtol=1e-4)


def test_fused_rms_norm_calls_rms_norm_and_rounds_bf16_once():
    """One bf16 norm: the fused forward is one F.rms_norm call (one kernel on CUDA), its result no
    further from float64 than transformers' (rounded once, not twice), in transformers' dtype,
    also under autocast; a weight of another dtype keeps transformers' forward and promotion."""
    bb = _load("qwen2vl", False, dtype="bf16")
    ref_norm = bb.hf.model.language_model.norm
    ref_norm.weight.data = (1 + 0.3 * torch.randn(ref_norm.weight.shape)).to(torch.bfloat16)
    x = (torch.randn(64, ref_norm.weight.shape[0]) * 3).to(torch.bfloat16)
    ref = ref_norm(x)
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + ref_norm.variance_epsilon) * ref_norm.weight.double()

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    assert fuse_rms_norms(bb.hf) > 0
    with Calls() as calls:
        out = ref_norm(x)
    assert "rms_norm" in calls.names and "pow" not in calls.names
    assert out.dtype == ref.dtype == torch.bfloat16
    err = lambda y: float((y.double() - exact).norm() / exact.norm())  # noqa: E731
    assert err(out) <= err(ref) and err(out) < 5e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref_norm(x).dtype == torch.bfloat16
    ref_norm.weight.data = ref_norm.weight.data.float()  # fp32 weight, bf16 input: transformers promotes
    with Calls() as calls:
        mixed = ref_norm(x)
    assert mixed.dtype == torch.float32 and "rms_norm" not in calls.names
