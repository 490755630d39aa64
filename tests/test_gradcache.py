"""GradCache: loss and every trainable gradient equal the unchunked step (fp32)."""

import pytest
import torch

from tinyutil import DEVICES, make_backbone, on, triple_batch
from rematch_pl.gradcache import gradcache_step, slice_batch
from rematch_pl.model import ReMatchModel


def _model(matching="all", k=4, dropout=0.0):
    from rematch_pl.backbone.model import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("tiny://qwen2vl", lora={"r": 8, "alpha": 16, "dropout": dropout})
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return ReMatchModel(bb, k=k, matching=matching)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _both_steps(model, batch, chunk):
    """(terms, gradients) of the unchunked step and of GradCache's, from the same seed."""
    out = []
    for step in ("unchunked", "gradcache"):
        torch.manual_seed(7)
        model.zero_grad()
        if step == "unchunked":
            terms = model(batch)
            terms["loss"].backward()
        else:
            terms = gradcache_step(model, batch, chunk, backward=lambda t: t.backward())
        out.append(({k: v.detach() for k, v in terms.items()}, _grads(model)))
    return out


def _assert_same(ref, got, names):
    (t_ref, g_ref), (t_got, g_got) = ref, got
    for name in names:
        torch.testing.assert_close(t_got[name], t_ref[name], atol=1e-5, rtol=1e-5)
    assert set(g_got) == set(g_ref) and g_ref
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("n_neg,chunk,matching,k", [(1, 1, "all", 4), (2, 2, "all", 4), (1, 2, "feat_feat", 0),
                                                    (0, 3, "none", 4)])
def test_gradcache_equals_unchunked(n_neg, chunk, matching, k):
    model = _model(matching, k)
    batch = triple_batch(model.backbone.processor, n_neg=n_neg)
    ref, got = _both_steps(model, batch, chunk)
    _assert_same(ref, got, ("loss", "loss_cl", "loss_orth") + (("loss_qdm",) if matching != "none" else ()))


@pytest.mark.parametrize("n_neg,matching,chunk", [(1, "all", 1), (0, "feat_feat", 3), (0, "none", 1)])
def test_gradcache_equals_unchunked_with_false_negatives_masked(n_neg, matching, chunk):
    """Document keys with repeats (queries 0 and 2 share a positive; query 1's hard negative
    repeats it): the masked loss and its gradients are the unchunked ones, and the count of
    false negatives is logged by both. (Without hard negatives the matching pass takes d- from
    the instance's own chunk, so only a whole-batch chunk matches the unchunked step there.)"""
    model = _model(matching, 4)
    model.mask_false_negatives = True
    batch = triple_batch(model.backbone.processor, n_neg=n_neg)
    batch["pos"]["key"] = torch.tensor([11, 12, 11])
    if n_neg:
        batch["neg"]["key"] = torch.tensor([13, 11, 14])
    ref, got = _both_steps(model, batch, chunk)
    assert ref[0]["false_negatives"].item() == pytest.approx((2 + 2 * n_neg) / 3)  # queries 0 and 2: 1 + n_neg each
    _assert_same(ref, got, ("loss", "loss_cl", "false_negatives"))
    model.temperature = 1.0  # every candidate weighs in the denominator (at 0.02 a far one vanishes)
    with torch.no_grad():
        masked = model(batch)["loss_cl"]
        model.mask_false_negatives = False
        plain = model(batch)["loss_cl"]
    assert plain > masked  # unmasked, the repeats count against the positive


@pytest.mark.parametrize("device", DEVICES)
def test_gradcache_replays_lora_dropout(device):
    """With LoRA dropout each chunk's re-forward must draw the dropout masks of its no-grad pass
    (the CPU's and, on a GPU, CUDA's random state replayed): its embeddings are then those whose
    contrastive gradients were cached, bit for bit. (The unchunked step draws its masks in
    another order, so with dropout it is another sample, not a reference.)"""
    model = _model("all", 4, dropout=0.3).to(device)
    batch = on(device, triple_batch(model.backbone.processor, n_neg=1))
    with torch.no_grad():  # dropout is on: two draws give other embeddings
        a, b = (model(batch, mode="embed")["q"] for _ in range(2))
    assert not torch.equal(a, b)
    seen, embed = [], model.embed

    def spy(groups, feats, grids):  # records each embedding pass's fused embeddings
        out = embed(groups, feats, grids)
        seen.append([fused.detach().clone() for fused, _ in out])
        return out

    model.embed = spy
    torch.manual_seed(7)
    terms = gradcache_step(model, batch, 1, backward=lambda t: t.backward())
    n = batch["qry"]["ids"].shape[0]
    assert len(seen) == 2 * n  # each chunk's no-grad pass, then each chunk's re-forward
    for first, again in zip(seen[:n], seen[n:]):
        for x, y in zip(first, again):
            assert torch.equal(x, y)
    assert torch.isfinite(terms["loss"]) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradcache_encodes_each_image_once_with_a_frozen_vision_tower():
    """The frozen tower's features from the no-grad pass are reused by the re-forward: one tower
    call per chunk covering that chunk's images (not two), with the unchunked step's result
    (test above). A trainable tower is run again in the re-forward, under autograd."""
    model = _model("all", 4)
    batch = triple_batch(model.backbone.processor, n_neg=1)
    visual = model.backbone.hf.model.visual
    calls = []
    hook = visual.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        assert model.vision_frozen
        gradcache_step(model, batch, 2, backward=lambda t: t.backward())
        B = batch["qry"]["ids"].shape[0]
        assert calls == [False] * -(-B // 2)  # ceil(B / 2) chunks, each encoded once without autograd
        calls.clear()
        visual.merger.mlp[0].weight.requires_grad_(True)
        assert not model.vision_frozen
        gradcache_step(model, batch, 2, backward=lambda t: t.backward())
        assert calls == [False] * -(-B // 2) + [True] * -(-B // 2)
    finally:
        hook.remove()


def test_slice_batch_reindexes_images():
    bb = make_backbone("qwen2vl")
    batch = triple_batch(bb.processor, n_neg=2)
    sub = slice_batch(batch, [1])
    # instance 1: text query, image positive (image 1), negatives: image 2, image 3 (n_neg=2 layout)
    assert sub["qry"]["image"].tolist() == [-1]
    assert sub["pos"]["image"].tolist() == [0]
    assert sub["neg"]["image"].tolist() == [1, 2]
    assert torch.equal(sub["image_grid_thw"], batch["image_grid_thw"][[1, 2, 3]])
    assert sub["pixel_values"].shape[0] == int(batch["image_grid_thw"][[1, 2, 3]].prod(-1).sum())
