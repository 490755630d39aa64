"""`bench.roofline`: op-by-op FLOPs and bytes of a step, checked on known operators and against the
analytic FLOP formulas the benchmarks' MFU figures use."""

import json

import pytest
import torch
import torch.nn.functional as F

from rematch_pl.bench.common import make_batch, shaped_backbone
from rematch_pl.bench.flops import llm_forward_flops, vision_flops
from rematch_pl.bench.roofline import FusedNorms, OpCost
from rematch_pl.memory import meta_copy, to_meta
from rematch_pl.model import ReMatchModel


def test_op_cost_counts_the_flops_and_bytes_of_known_operators():
    """A product, an elementwise op on it, a broadcast operand and views: FLOPs from torch's
    formulas, bytes = operands read + results written (an expanded operand reads its storage only),
    views launch nothing."""
    x, w, b = torch.randn(64, 32), torch.randn(16, 32), torch.randn(16)
    cost = OpCost("cpu")
    with cost:
        y = F.linear(x, w)  # aten.mm (the transpose is a view)
        z = torch.relu(y).view(-1).view(64, 16)  # one kernel, two views
        z + b.expand(64, 16)  # reads b once
        z.add_(1.0)  # in place: reads and writes z
        z.copy_(y)  # reads y, writes z
        torch.neg(y, out=z)  # reads y, writes z
    rec = {op: (n, f, by) for (_, _, op), (n, f, by) in cost.records.items()}
    assert set(rec) == {"aten.mm", "aten.relu", "aten.add", "aten.add_", "aten.copy_", "aten.neg"}
    for op in ("aten.add_", "aten.copy_", "aten.neg"):
        assert rec[op] == (1, 0.0, 2 * 64 * 16 * 4), op
    assert rec["aten.mm"] == (1, 2 * 64 * 32 * 16, (64 * 32 + 16 * 32 + 64 * 16) * 4)
    assert rec["aten.relu"] == (1, 0.0, 2 * 64 * 16 * 4)
    assert rec["aten.add"] == (1, 0.0, (2 * 64 * 16 + 16) * 4)
    s = cost.summary(tflops=1.0, tbs=1.0)  # 1 TFLOP/s, 1 TB/s: ms = max(flops / 1e9, bytes / 1e9)
    assert s["kernels"] == 6
    mm = 2 * 64 * 32 * 16 / 1e9
    assert s["roofline_ms"] == pytest.approx(max(mm, (64 * 32 + 16 * 32 + 64 * 16) * 4 / 1e9)
                                             + 4 * 2 * 64 * 16 * 4 / 1e9 + (2 * 64 * 16 + 16) * 4 / 1e9)


def test_op_cost_splits_forward_and_backward():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    cost = OpCost("cpu")
    with cost:
        (x @ w).square().sum().backward()
    phases = {k[0] for k in cost.records}
    assert phases == {"forward", "backward"}
    # x @ w forward; its backward products only for w (x needs no gradient): one mm each way
    mm = {k: v[1] for k, v in cost.records.items() if k[2].startswith("aten.mm")}
    assert sorted(mm.values()) == [2 * 4 * 8 * 8] * 2


@pytest.fixture(scope="module")
def tiny_meta():
    torch.manual_seed(0)
    bb = meta_copy(shaped_backbone("tiny", "cpu", "bf16"))
    batch = make_batch(bb.processor, 4, 112, "cpu", meta_pixels=True, pixel_dtype=bb.pixel_dtype)
    return bb, batch


def visual_hooks(module) -> int:
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


def test_op_counted_products_equal_the_analytic_flops(tiny_meta):
    """The FLOP formulas behind every MFU figure (`llm_forward_flops`, `vision_flops`), checked op by
    op: the language model's products over the embedding passes' token positions and the vision
    tower's over its patches (the merger's MLP over merged tokens)."""
    bb, batch = tiny_meta
    model = ReMatchModel(bb, k=16, matching="none", template="chat").train()
    hf = bb.hf
    cost = OpCost("meta", bb)
    model.reset_counts()
    with cost, torch.no_grad():
        model(to_meta(batch), mode="embed")
    assert not visual_hooks(hf.model.visual)  # the region hooks go with the mode
    counts = model.reset_counts()
    matrix = {region: 0.0 for region in ("vision", "language model")}
    for (phase, region, op), (n, f, b) in cost.records.items():
        if cost.kinds[op] == "matrix" and region in matrix:
            matrix[region] += f
    patches = batch["image_grid_thw"].prod(-1).tolist()
    # every weight matrix (LoRA factors included) once per token position computed, padding included
    lm = hf.model.language_model
    n_matrix = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    assert matrix["language model"] == 2 * n_matrix * counts["embed_padded"]
    assert llm_forward_flops(bb, counts["embed_padded"], 0) == matrix["language model"]  # attention apart
    # every weight matrix (the patch embedding's kernel included) once per patch, the merger's MLP
    # once per merged token (merge^2 patches)
    visual = hf.model.visual
    merger = sum(p.numel() for p in visual.merger.mlp.parameters() if p.dim() >= 2)
    blocks = sum(p.numel() for p in visual.parameters() if p.dim() >= 2) - merger
    assert matrix["vision"] == sum(2 * blocks * p + 2 * merger * p // bb.merge**2 for p in patches)
    v = hf.config.vision_config
    attention = sum(4 * v.depth * v.embed_dim * p * p for p in patches)
    assert vision_flops(bb, patches) - attention == pytest.approx(matrix["vision"], rel=1e-12)


def test_fused_norms_cost_one_kernel_each_way(tiny_meta):
    """On meta `F.rms_norm` decomposes into a dozen fp32 kernels; CUDA runs one fused kernel: the
    stand-in costs one forward kernel (x and weight read, y written) and no pow/rsqrt chain."""
    x = torch.randn(64, 128, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.ones(128, dtype=torch.bfloat16, device="meta", requires_grad=True)
    fwd, bwd = OpCost("meta"), OpCost("meta")
    with fwd:  # on meta the mode takes the stand-in itself
        y = F.rms_norm(x, (128,), w, 1e-6)
    with bwd:
        y.backward(torch.ones_like(y))
    with FusedNorms():  # also on its own
        assert F.rms_norm(x, (128,), w, 1e-6).grad_fn.name() == "_FusedRMSNormTrafficBackward"
    assert {k[2]: v for k, v in fwd.records.items()} == {"aten.mul": [1, 0.0, 2 * 64 * 128 * 2 + 128 * 2]}
    assert not any(op.startswith(("aten.pow", "aten.rsqrt", "aten.mean")) for _, _, op in bwd.records)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_dropout_costs_cudas_fused_kernel_each_way():
    """On meta `F.dropout` decomposes into a mask, a division and a product; CUDA runs one
    kernel each way (the output and a bool mask written; the gradient and the mask read)."""
    n = 4096
    x = torch.randn(n, dtype=torch.bfloat16, device="meta", requires_grad=True)
    fwd, bwd = OpCost("meta"), OpCost("meta")
    with fwd:
        y = F.dropout(x, 0.05, training=True)
    dy = torch.ones_like(y)
    with bwd:
        y.backward(dy)
    assert {k[2]: v for k, v in fwd.records.items()} == {"aten.native_dropout": [1, 0.0, 2 * n + 2 * n + n]}
    assert {k[2]: v for k, v in bwd.records.items()} == {
        "aten.native_dropout_backward (NativeDropoutBackward0)": [1, 0.0, 2 * n + n + 2 * n]}


def test_roofline_suite_with_lora_dropout(tmp_path):
    """`--lora-dropout`: every LoRA input's dropout is one fused kernel (no decomposed mask), and it
    costs time on top of the step without it."""
    from rematch_pl.bench.cli import main

    res = {}
    for p in ("0", "0.05"):
        out = tmp_path / f"roofline_{p}.json"
        main(["--suite", "roofline", "--shape", "tiny", "--batch", "2", "--image-size", "112", "--chunk", "0",
              "--variants", "baseline", "--lora-dropout", p, "--out", str(out)])
        res[p] = json.loads(out.read_text())
    ops = {r["op"] for r in res["0.05"]["runs"]["baseline"]["ops"]}
    assert "aten.native_dropout" in ops and not any("bernoulli" in op for op in ops)
    assert not any("dropout" in r["op"] for r in res["0"]["runs"]["baseline"]["ops"])
    assert res["0.05"]["lora_dropout"] == 0.05
    assert res["0.05"]["runs"]["baseline"]["roofline_ms"] > res["0"]["runs"]["baseline"]["roofline_ms"]


def test_roofline_suite_writes_every_variant(tmp_path, capsys):
    from rematch_pl.bench.cli import main

    out = tmp_path / "roofline.json"
    main(["--suite", "roofline", "--shape", "tiny", "--batch", "4", "--image-size", "112", "--chunk", "0",
          "--top", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    runs = res["runs"]
    assert set(runs) == {"baseline", "rematch", "rematch_feat_feat", "rematch_no_matching"}
    for r in runs.values():
        assert r["roofline_ms"] == pytest.approx(r["matrix_ms"] + r["memory_ms"])
        assert 0 < r["mfu_ceiling"] <= 1 and r["kernels"] > 0 and len(r["top"]) == 3
        assert {"vision", "language model", "backward"} <= set(r["regions"])
        assert r["roofline_ms"] == pytest.approx(sum(g["roofline_ms"] for g in r["regions"].values()))
    assert runs["rematch"]["tflop"] > runs["rematch_feat_feat"]["tflop"] > runs["rematch_no_matching"]["tflop"]
    assert "MFU ceiling" in capsys.readouterr().out
