"""Retrieval, then reranking with the same model's matching head.

The matching head (Sec. 3.2.3) answers "is <DOC> relevant to <QUERY>?" with "Yes"/"No". For one
(query, candidate) pair, `match_probs` runs the training-time packed matching pass with the
candidate in both document slots and returns P("Yes") (softmax over the Yes/No logits), averaged
over the model's views (raw and projected-feature views of query and document; both slots give
the same answer by construction of the unified mask).

`rerank_subset` reorders each query's top-N candidates (by embedding score) by P("Yes"); the
candidates below N keep their order. Hit@1 is reported before and after, strictly (a tie in
P("Yes") with the positive is not a hit), with the time the reranking took.
"""

from __future__ import annotations

import time

import torch


def _default_load(image):
    from rematch_pl.data.images import load_image, make_processor_safe

    return None if image is None else make_processor_safe(load_image(image))


@torch.no_grad()
def match_probs(model, queries: list[tuple[str, object]], docs: list[tuple[str, object]],
                max_length: int | None = None, batch_size: int = 8, load=_default_load) -> torch.Tensor:
    """P("Yes") [n] of n (query, document) pairs; each is (content text, image path / PIL image / None)."""
    from rematch_pl.data.collate import EvalCollator

    head = model.matching
    if head is None:
        raise ValueError("this model was trained with matching=none: it has no matching head to rerank with")
    if len(queries) != len(docs):
        raise ValueError(f"{len(queries)} queries but {len(docs)} documents")
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    collate = EvalCollator(model.backbone.processor, max_length, pixel_dtype=dtype)
    out = []
    for s in range(0, len(queries), batch_size):
        q, d = queries[s:s + batch_size], docs[s:s + batch_size]
        n = len(q)
        cache: dict = {}

        def img(x):  # an image shared by several pairs is decoded once
            if x is None:
                return None
            key = x if isinstance(x, str) else id(x)
            if key not in cache:
                cache[key] = load(x)
            return cache[key]

        batch = collate([(i, t, img(im)) for i, (t, im) in enumerate(q + d)])
        grids = batch["image_grid_thw"]
        feats = (model.backbone.encode_images(batch["pixel_values"].to(device, dtype), grids)  # grids: host
                 if grids.numel() else [])
        contents = model.contents(batch["items"])
        q_raw, d_raw = contents[:n], contents[n:]
        (eq, qs), (ed, ds) = model.embed([("qry", q_raw), ("doc", d_raw)], feats, grids)
        if head.uses_features:
            src_q, src_d = (qs, ds) if head.feature == "tokens" else (eq, ed)
            zq, zd = head.projector(src_q), head.projector(src_d)
        else:
            zq = zd = eq.new_zeros(n, 1)
        logits = model.matching_logits(q_raw, d_raw, d_raw, zq, zd, zd, feats, grids)  # [n, V, vocab]
        # integer indices: a list index would be a synchronous copy to the device
        yes_no = torch.stack([logits[..., head.yes_id], logits[..., head.no_id]], -1).float()  # [n, V, 2]
        out.append(yes_no.softmax(-1)[..., 0].mean(-1))  # [n], read back once at the end
    return torch.cat(out).cpu() if out else torch.zeros(0)


def rerank_subset(model, eval_set, scores: torch.Tensor, valid: torch.Tensor, candidates: list[list[int]],
                  top_k: int, max_length: int | None = None, batch_size: int = 8,
                  max_queries: int | None = None) -> dict:
    """Rerank the top `top_k` candidates of each query of an `EvalSet` by P("Yes").

    scores / valid: [Q, C] embedding scores and validity (from `evaluate_subset(return_scores=True)`),
    candidates: per query the item indices of `eval_set` (positive first).
    Returns Hit@1 before/after, the reranking time, how many top-1s changed and each query's top-1
    candidate column before and after.
    """
    from .metrics import positive_rank

    t0 = time.perf_counter()
    Q = scores.shape[0] if max_queries is None else min(max_queries, scores.shape[0])
    masked = scores[:Q].masked_fill(~valid[:Q], -float("inf"))
    k = min(top_k, masked.shape[1])
    top = masked.topk(k, dim=1).indices  # [Q, k] columns, best first (ties: lowest column first)
    pairs, where = [], []
    for qi in range(Q):
        q_item = eval_set.queries[qi]
        for j, col in enumerate(top[qi].tolist()):
            if not bool(valid[qi, col]):
                continue
            c_item = candidates[qi][col]
            pairs.append(((eval_set.items[q_item][0], eval_set.image_file(q_item)),
                          (eval_set.items[c_item][0], eval_set.image_file(c_item))))
            where.append((qi, j, col))
    probs = match_probs(model, [a for a, _ in pairs], [b for _, b in pairs], max_length, batch_size)
    # new score: candidates in the top k ordered by P(yes), all above the rest
    new = masked.clone()
    offset = masked[torch.isfinite(masked)].abs().max().item() + 10.0 if torch.isfinite(masked).any() else 10.0
    for (qi, _, col), p in zip(where, probs.tolist()):
        new[qi, col] = offset + p
    before = positive_rank(scores[:Q], valid[:Q])
    after = positive_rank(new, valid[:Q])
    top1_before = top[:, 0]
    top1_after = new.argmax(dim=1)
    return {
        "rerank_top_k": k,
        "queries": Q,
        "hit@1_before": (before < 1).float().mean().item(),
        "hit@1_after": (after < 1).float().mean().item(),
        "top1_changed": int((top1_before != top1_after).sum()),
        "top1_before": top1_before.tolist(),  # candidate column of each query's top 1
        "top1_after": top1_after.tolist(),
        "pairs_scored": len(pairs),
        "rerank_s": time.perf_counter() - t0,
    }
