import pytest
import torch

from tinyutil import DEVICES, KINDS, make_backbone, on, triple_batch
from rematch_pl.backbone.sequence import n_tokens
from rematch_pl.matching import VIEW_SETS, allowed_tags, unified_mask, views_for
from rematch_pl.model import ReMatchModel


def _setup(kind, views="all", feature="fused", seed=0, device="cpu"):
    torch.manual_seed(seed)
    bb = make_backbone(kind)
    # move LoRA away from zero so that the adapter takes part in the computation
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = ReMatchModel(bb, k=4, matching=views, matching_feature=feature).eval().to(device)
    batch = on(device, triple_batch(bb.processor))
    feats = bb.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    q, p, n = (model.contents(batch[s]) for s in ("qry", "pos", "neg"))
    (eq, qs), (ep, ps), (en, ns) = model.embed([("qry", q), ("doc", p), ("doc", n)], feats, batch["image_grid_thw"])
    mi = model.matching_inputs(q, p, n, eq, ep, en, qs, ps, ns)
    return model, batch, feats, mi


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature", ["fused", "tokens"])
def test_packed_equals_isolated_for_every_view(kind, feature, device):
    model, batch, feats, mi = _setup(kind, feature=feature, device=device)
    grids = batch["image_grid_thw"]
    assert any(len(x.ids) > 0 and x.image is not None for x in mi[0])  # raw views hold images
    with torch.no_grad():
        packed = model.matching_logits(*mi[:-1], feats, grids)  # [B, 8, vocab]
        for v in range(8):
            iso = model.matching_logits(*mi[:-1], feats, grids, isolate=v)  # [B, 1, vocab]
            torch.testing.assert_close(iso[:, 0], packed[:, v], atol=1e-5 if device == "cpu" else 1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_answers_do_not_see_the_other_slots_length(kind):
    """Lengthening d2's raw document (text only, so its feature stays) leaves every d1 answer
    unchanged: no position of a d1 answer depends on d2 (a shared answer start after the longest
    document would move them, a label shortcut when d+ and d- differ in length)."""
    model, batch, feats, mi = _setup(kind)
    q_raw, d1_raw, d2_raw, zq, zd1, zd2, labels = mi
    grids = batch["image_grid_thw"]
    filler = model.backbone.processor.tokenize(" and some more words to make the document longer")
    longer = [type(d)(torch.as_tensor(d.ids).tolist() + filler, d.image) for d in d2_raw]
    with torch.no_grad():
        base = model.matching_logits(q_raw, d1_raw, d2_raw, zq, zd1, zd2, feats, grids)
        moved = model.matching_logits(q_raw, d1_raw, longer, zq, zd1, zd2, feats, grids)
    for v, view in enumerate(model.matching.views):
        if view.slot == 1:
            torch.testing.assert_close(moved[:, v], base[:, v], atol=1e-5, rtol=0)
        elif view.doc == "raw":
            assert not torch.allclose(moved[:, v], base[:, v], atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_unpaired_segments_do_not_leak(kind):
    """Changing D2 (raw and feature) leaves the answers of the d1 views unchanged, and vice versa."""
    model, batch, feats, mi = _setup(kind)
    q_raw, d1_raw, d2_raw, zq, zd1, zd2, labels = mi
    grids = batch["image_grid_thw"]
    views = model.matching.views
    with torch.no_grad():
        base = model.matching_logits(q_raw, d1_raw, d2_raw, zq, zd1, zd2, feats, grids)
        swapped = model.matching_logits(q_raw, d1_raw, list(reversed(d2_raw)), zq, zd1, zd2.flip(0) + 1.0, feats, grids)
        qfeat_changed = model.matching_logits(q_raw, d1_raw, d2_raw, zq + 1.0, zd1, zd2, feats, grids)
    for v, view in enumerate(views):
        if view.slot == 1:
            torch.testing.assert_close(swapped[:, v], base[:, v], atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(swapped[:, v], base[:, v], atol=1e-3)
        if view.query == "raw":
            torch.testing.assert_close(qfeat_changed[:, v], base[:, v], atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(qfeat_changed[:, v], base[:, v], atol=1e-3)


def test_mask_rule():
    views = views_for("all")
    allow = allowed_tags(views)
    # answer of view (qraw, d1, raw) sees P, Qr, D1r and itself only
    a = 7 + views.index(next(v for v in views if v.query == "raw" and v.slot == 1 and v.doc == "raw"))
    assert set(torch.nonzero(allow[a]).flatten().tolist()) == {0, 1, 3, a}
    # content segments see P and themselves only
    for tag in range(1, 7):
        assert set(torch.nonzero(allow[tag]).flatten().tolist()) == {0, tag}
    seg = torch.tensor([[0, 0, 1, 1, 3, 7, -1]])
    mask = unified_mask(seg, views, torch.float32)[0, 0]
    ok = mask == 0
    assert ok[1, 0] and not ok[0, 1]  # causal inside P
    assert not ok[4, 2]  # doc does not see query
    assert ok[5, 2] and ok[5, 4] and ok[5, 0]  # answer sees its query, its doc, P
    assert ok[6].tolist() == [False] * 6 + [True]  # padding sees itself only


def test_view_sets():
    assert len(views_for("all")) == 8
    for name in ("feat_feat", "raw_raw", "raw_feat", "feat_raw"):
        assert len(views_for(name)) == 2
    assert views_for("none") == []
    assert set(VIEW_SETS) == {"all", "feat_feat", "raw_raw", "raw_feat", "feat_raw", "none"}


def test_positive_slot_is_uniform():
    model, batch, feats, mi = _setup("qwen2vl")
    q, p, n = (model.contents(batch[s]) for s in ("qry", "pos", "neg"))
    d = torch.zeros(3, model.backbone.hidden_size)
    firsts = []
    torch.manual_seed(123)
    for _ in range(400):
        *_, labels = model.matching_inputs(q, p, n, d, d + 1, d + 2, None, None, None)
        firsts += (labels[:, 0] == model.matching.yes_id).tolist()  # view 0 is a d1 view
    frac = sum(firsts) / len(firsts)
    assert 0.45 < frac < 0.55  # 1200 draws: 5 sigma ~ 0.07


@pytest.mark.parametrize("hard_negative", [True, False])
def test_labels_say_yes_exactly_where_the_slot_holds_the_positive(hard_negative):
    """Each view's label is "Yes" iff its document slot holds the positive, as raw content and as
    feature alike (a label/slot mismatch would make the matching loss unlearnable, silently)."""
    model, batch, feats, mi = _setup("qwen2vl")
    q, p, n = (model.contents(batch[s]) for s in ("qry", "pos", "neg"))
    B, d = len(q), model.backbone.hidden_size
    ep, en = torch.randn(B, d), torch.randn(B, d)
    torch.manual_seed(5)
    with torch.no_grad():
        q_raw, d1, d2, zq, zd1, zd2, labels = model.matching_inputs(
            q, p, n if hard_negative else None, torch.randn(B, d), ep, en if hard_negative else None, None, None, None)
        zp = model.matching.projector(ep)
    slots = {1: (d1, zd1), 2: (d2, zd2)}
    assert {bool(labels[b, 0] == model.matching.yes_id) for b in range(B)} == {True, False}  # both slots drawn
    for b in range(B):
        for v, view in enumerate(model.matching.views):
            raw, z = slots[view.slot]
            holds_positive = raw[b].ids == p[b].ids and raw[b].image == p[b].image
            assert torch.equal(z[b], zp[b]) == holds_positive  # the feature goes with its raw content
            assert (labels[b, v] == model.matching.yes_id) == holds_positive, (b, view.name)


@pytest.mark.parametrize("term", ["loss_cl", "loss_orth", "loss_qdm"])
def test_each_loss_term_reaches_lora_tokens_projector(term):
    torch.manual_seed(0)
    bb = make_backbone("qwen2vl")
    model = ReMatchModel(bb, k=4, matching="all")
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = model(triple_batch(bb.processor))
    out[term].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    nonzero = lambda key: any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if key in n)  # noqa: E731
    assert nonzero("lora_"), term
    assert nonzero("fusion.tokens"), term
    if term == "loss_qdm":
        assert nonzero("projector") and nonzero("markers")
    else:  # the contrastive and orthogonality terms do not involve the matching head
        assert not nonzero("projector")


def _qdm_step(model, batch) -> dict:
    """The matching loss of one step (fixed slot draws), its token counts and every gradient."""
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    model.reset_counts()
    terms = model(batch)
    terms["loss_qdm"].backward()
    return {"loss": terms["loss_qdm"].detach(), "counts": model.reset_counts(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("views", ["all", "feat_feat", "raw_raw"])
def test_shared_prefix_rows_equal_one_instance_per_row(views):
    """Instances sharing one P per row give the logits and the gradients of rows of their own."""
    model, batch, _, _ = _setup("qwen2vl", views=views)
    model.train()
    model.matching_row_tokens = 4096
    shared = _qdm_step(model, batch)
    model.matching_row_tokens = 0
    alone = _qdm_step(model, batch)
    torch.testing.assert_close(shared["loss"], alone["loss"], atol=1e-6, rtol=1e-6)
    assert shared["grads"].keys() == alone["grads"].keys() and shared["grads"]
    for n, g in alone["grads"].items():
        torch.testing.assert_close(shared["grads"][n], g, atol=1e-6, rtol=1e-4, msg=n)
    # P (the system turn and S7 instruction) is computed once instead of 3 times
    P = len(model.matching.prefix_ids)
    assert alone["counts"]["match"] - shared["counts"]["match"] == 2 * P


def test_share_prefix_respects_the_row_budget():
    model, batch, feats, mi = _setup("qwen2vl", views="feat_feat")
    head, bb = model.matching, model.backbone
    q_raw, d1, d2, zq, zd1, zd2, _ = mi

    def instances():
        return [head.instance_segments(q_raw[b], zq[b], {1: d1[b], 2: d2[b]}, {1: zd1[b], 2: zd2[b]},
                                       bb.image_token_id, batch["image_grid_thw"], bb.merge) for b in range(3)]

    P = len(head.prefix_ids)
    rest = sum(n_tokens(s.parts) for s in instances()[0][1:])
    for budget, n_rows in ((0, 3), (P + rest, 3), (P + 2 * rest, 2), (P + 3 * rest, 1)):
        rows, owners = head.share_prefix(instances(), budget)
        assert len(rows) == n_rows, budget
        assert [r for r, _ in owners] == sorted(r for r, _ in owners)
        assert all(sum(1 for s in row if s.tag == 0) == 1 for row in rows)  # one P per row


def test_negative_row_budget_is_refused():
    bb = make_backbone("qwen2vl")
    with pytest.raises(ValueError, match="matching.row_tokens"):
        ReMatchModel(bb, k=4, matching="all", matching_row_tokens=-1)


@pytest.mark.parametrize("views", ["all", "feat_feat"])
def test_length_bucketed_matching_rows_equal_one_padded_pass(views):
    """Matching rows run in buckets of similar length (`embedding.bucket_pass_tokens`): the loss
    and every gradient equal one pass over all rows padded to the longest, with less padding."""
    model, batch, _, _ = _setup("qwen2vl", views=views)
    model.train()
    model.matching_row_tokens = 0  # one instance per row: rows of different lengths
    out = {}
    for pass_tokens in (0, float("inf")):
        model.bucket_pass_tokens = pass_tokens
        r = _qdm_step(model, batch)
        out[pass_tokens] = (r["loss"], r["counts"], r["grads"])
    (lb, cb, gb), (l1, c1, g1) = out[0], out[float("inf")]
    torch.testing.assert_close(lb, l1, atol=1e-6, rtol=1e-6)
    assert gb.keys() == g1.keys() and gb
    for n, g in g1.items():
        torch.testing.assert_close(gb[n], g, atol=1e-6, rtol=1e-4, msg=n)
    assert cb["match"] == c1["match"] and cb["match_padded"] == cb["match"]  # pass_tokens=0: no padding
    if views == "all":  # raw documents: image and text rows of different lengths
        assert cb["match_padded"] < c1["match_padded"]


def test_the_matching_pass_refuses_an_attention_that_ignores_its_mask():
    """Reranking at eval time or `Encoder.score` may load a backbone with flash-attention (fine for
    embedding passes); the matching pass then stops with advice instead of misreading its mask."""
    model, batch, feats, mi = _setup("qwen2vl")
    model.backbone.hf.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation=sdpa"):
        model.matching_logits(*mi[:-1], feats, batch["image_grid_thw"])
