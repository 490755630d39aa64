"""Packing (`backbone.sequence`) against a token-by-token reference of the M-RoPE rule."""

import pytest
import torch

from rematch_pl.backbone.sequence import Ids, Segment, Vecs, build_inputs, segment_positions, segment_span

IMG, PAD, MERGE = 99, 0, 2
D = 6
# grids (t, h, w) in patches; merged: (1, 2, 3) -> 6 tokens, (1, 4, 2) -> 8 tokens, (1, 1, 2) -> 2 tokens
GRIDS = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 4]])


def reference(rows, feats):
    """Per token: (id or None for a vector, position triple, segment tag, embedding source)."""
    out = []
    for row in rows:
        toks = []
        for seg in row:
            cur = seg.start
            for part in seg.parts:
                if isinstance(part, Vecs):
                    for v in part.vectors:
                        toks.append((None, (cur, cur, cur), seg.tag, v))
                        cur += 1
                    continue
                ids = list(part.ids)
                j, n_img = 0, 0
                while j < len(ids):
                    if ids[j] == IMG and part.image is not None and n_img == 0:
                        t, h, w = (int(x) for x in GRIDS[part.image])
                        gh, gw = h // MERGE, w // MERGE
                        f = iter(feats[part.image])
                        for a in range(t):
                            for b in range(gh):
                                for c in range(gw):
                                    toks.append((IMG, (cur + a, cur + b, cur + c), seg.tag, next(f)))
                        j += t * gh * gw
                        cur += max(gh, gw)
                        n_img = 1
                        continue
                    toks.append((ids[j], (cur, cur, cur), seg.tag, None))
                    cur += 1
                    j += 1
        out.append(toks)
    return out


def rows_and_feats():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, D, generator=g) for n in (6, 8, 2)]
    vec = lambda n: torch.randn(n, D, generator=g)  # noqa: E731
    rows = [
        [Segment([Ids([5, 6] + [IMG] * 6 + [7], image=0), Vecs(vec(3))], start=0, tag=0),
         Segment([Ids([8, 9]), Ids([IMG] * 8 + [4], image=1)], start=4, tag=3)],
        [Segment([Ids(torch.tensor([11, 12, 13]))], start=0, tag=1),
         Segment([Vecs(vec(2)), Ids([IMG] * 2, image=2), Ids([14])], start=7, tag=2)],
        [Segment([Vecs(vec(1))], start=2, tag=5)],
    ]
    return rows, feats


def test_build_inputs_equals_token_by_token_reference():
    rows, feats = rows_and_feats()
    emb = torch.nn.Embedding(128, D)
    packed = build_inputs(rows, emb, feats, GRIDS, IMG, PAD, MERGE)
    ref = reference(rows, feats)
    B, L = len(rows), max(len(r) for r in ref)
    assert packed.inputs_embeds.shape == (B, L, D) and packed.position_ids.shape == (3, B, L)
    assert packed.host_lengths == [len(r) for r in ref] and packed.lengths.tolist() == packed.host_lengths
    for b, toks in enumerate(ref):
        for i, (tid, pos, tag, src) in enumerate(toks):
            assert tuple(packed.position_ids[:, b, i].tolist()) == pos, (b, i)
            assert int(packed.segment_ids[b, i]) == tag
            want = src if src is not None else emb.weight[tid]
            torch.testing.assert_close(packed.inputs_embeds[b, i], want, rtol=0, atol=0)
        n = len(toks)
        assert (packed.segment_ids[b, n:] == -1).all()
        if n < L:  # padding continues the positions after the row's largest one
            last = int(packed.position_ids[:, b, :n].max())
            assert packed.position_ids[:, b, n:].tolist() == [list(range(last + 1, last + 1 + L - n))] * 3
    # spans of the segments (vector_index) in token indices
    assert packed.vector_index[0] == [(0, 12), (12, 23)]


def test_gradients_reach_vectors_and_image_features():
    rows, feats = rows_and_feats()
    feats = [f.requires_grad_() for f in feats]
    vecs = [p.vectors.requires_grad_() for row in rows for seg in row for p in seg.parts if isinstance(p, Vecs)]
    packed = build_inputs(rows, torch.nn.Embedding(128, D), feats, GRIDS, IMG, PAD, MERGE)
    w = torch.randn_like(packed.inputs_embeds)
    (packed.inputs_embeds * w).sum().backward()
    ref = reference(rows, feats)
    # each vector / feature row's gradient is the weight at the token it was placed on
    for t in feats + vecs:
        for r in range(t.shape[0]):
            (b, i), = [(b, i) for b, toks in enumerate(ref) for i, x in enumerate(toks)
                       if x[3] is not None and x[3].data_ptr() == t[r].data_ptr()]
            torch.testing.assert_close(t.grad[r], w[b, i])


def test_segment_span_is_the_next_free_position():
    rows, _ = rows_and_feats()
    for row in rows:
        for seg in row:
            shifted = Segment(seg.parts, start=0, tag=seg.tag)
            assert segment_span(seg, IMG, GRIDS, MERGE) == segment_positions(shifted, IMG, GRIDS, MERGE)[1]
            assert segment_span(seg, IMG, GRIDS.tolist(), MERGE) == segment_span(seg, IMG, GRIDS, MERGE)


@pytest.mark.parametrize("ids", [[IMG] * 5, [IMG] * 3 + [1] + [IMG] * 3])
def test_image_block_that_does_not_fit_its_grid_is_an_error(ids):
    seg = Segment([Ids(ids, image=0)])
    with pytest.raises(ValueError, match="grid 1x4x6 needs 6 consecutive image tokens"):
        build_inputs([[seg]], torch.nn.Embedding(128, D), [torch.zeros(6, D)], GRIDS, IMG, PAD, MERGE)
