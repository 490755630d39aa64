"""Retrieval metrics with a strict tie rule: a tie between the positive and another candidate is NOT a hit.

Upstream MMEB code takes `argmax`, which returns the first maximum, so a collapsed model (all
scores equal) scores 100%. Here the rank of the positive counts every other candidate whose
score is >= the positive's; a NaN competitor counts against the positive, and a NaN positive
has no rank at all (`NO_RANK`: a miss at every k, 0 towards MRR, competitors or not). A
candidate that is the very same item as the positive (a duplicate in the candidate list) is not
a competitor: it has the same embedding by construction; a negative listed twice competes once.

Scoring is by matrix products on the embeddings' device, in query blocks:

* `candidate_scores` - each query against its own candidate list (MMEB): either one product
  with every document and a gather (when the documents are few) or a batched gather-and-dot;
* `pool_ranks` - each query against one large pool with one or several positives per query
  (Flickr30K / COCO style): the pool is streamed in chunks (it can live on the CPU while the
  products run on the GPU), so it never needs to fit in device memory; or FAISS (`backend=
  "faiss"`, optional import): an exact flat inner-product index on the CPU, which holds a
  normalised copy of the whole pool in host memory, exact below `max_k`. Either way the pool's
  embeddings are in host memory (the engine returns them there): FAISS is another scorer, not a
  way to score pools larger than memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ====================================================================== ranks
NO_RANK = torch.iinfo(torch.int64).max  # the rank of a NaN positive: a miss at every k, 0 towards MRR


def positive_rank(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """scores: [Q, C] with the positive at column 0 -> [Q] rank (0 = strictly best).

    valid: optional [Q, C] bool, False for padding / later copies of a listed item (not counted).
    A NaN positive gets `NO_RANK`, whatever its competitors.
    """
    pos = scores[:, :1]  # [Q, 1]
    others = scores[:, 1:]  # [Q, C-1]
    beat = (others >= pos) | torch.isnan(others)  # ties and NaNs count against the positive
    if valid is not None:
        beat = beat & valid[:, 1:]
    return beat.sum(dim=1).masked_fill(torch.isnan(pos[:, 0]), NO_RANK)


def metrics_from_ranks(rank: torch.Tensor, ks: tuple[int, ...] = (1, 5), mrr: bool = True) -> dict[str, float]:
    none = rank == NO_RANK
    rank = rank.float()
    out = {f"hit@{k}": ((rank < k) & ~none).float().mean().item() for k in ks}
    if mrr:
        out["mrr"] = (1.0 / (rank + 1)).masked_fill(none, 0.0).mean().item()
    return out


def retrieval_metrics(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5), valid: torch.Tensor | None = None
                      ) -> dict[str, float]:
    """Hit@k and MRR of a [Q, C] score matrix (positive at column 0)."""
    return metrics_from_ranks(positive_rank(scores, valid), ks)


# ====================================================================== per-query candidate lists
def pad_candidates(candidates: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged candidate lists -> ``idx [Q, C]`` (padding 0) and ``valid [Q, C]`` (False on padding and on
    later copies of an item already listed: the positive listed again is not a competitor, and a
    negative listed twice competes once, for Hit@5 and MRR as for Hit@1)."""
    Q = len(candidates)
    C = max(len(c) for c in candidates)
    idx = torch.zeros(Q, C, dtype=torch.long)
    valid = torch.zeros(Q, C, dtype=torch.bool)
    for i, c in enumerate(candidates):
        idx[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
        seen = set()
        valid[i, : len(c)] = torch.tensor([not (x in seen or seen.add(x)) for x in c], dtype=torch.bool)
    return idx, valid


@torch.no_grad()
def candidate_scores(q: torch.Tensor, docs: torch.Tensor, idx: torch.Tensor, block: int = 256,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Cosine scores [Q, C] of each query against its own candidates ``docs[idx[q]]``.

    q: [Q, D]; docs: [M, D] (every item's document embedding); idx: [Q, C]. Runs on `device`
    (default: q's) in blocks of `block` queries; returns float32 scores on the CPU.
    """
    device = torch.device(device) if device is not None else q.device
    qn = F.normalize(q.float(), dim=-1).to(device)  # [Q, D]
    dn = F.normalize(docs.float(), dim=-1).to(device)  # [M, D]
    idx = idx.to(device)
    Q, C = idx.shape
    out = torch.empty(Q, C, dtype=torch.float32)
    full = dn.shape[0] <= 4 * C  # few documents: one product with all of them, then gather
    for s in range(0, Q, block):
        qb, ib = qn[s:s + block], idx[s:s + block]  # [b, D], [b, C]
        if full:
            sb = (qb @ dn.T).gather(1, ib)  # [b, M] -> [b, C]
        else:
            sb = torch.einsum("bd,bcd->bc", qb, dn[ib])  # [b, C, D] gathered
        out[s:s + block] = sb.cpu()
    return out


def score_candidates(q: torch.Tensor, docs: torch.Tensor, candidates: list[list[int]]) -> list[torch.Tensor]:
    """Cosine score of each query against its own candidate list (one [C_q] tensor per query)."""
    idx, _ = pad_candidates(candidates)
    scores = candidate_scores(q, docs, idx)
    return [scores[i, : len(c)] for i, c in enumerate(candidates)]


def evaluate_subset(q: torch.Tensor, docs: torch.Tensor, candidates: list[list[int]],
                    ks: tuple[int, ...] = (1, 5), return_scores: bool = False, device=None):
    """Hit@1/Hit@5/MRR and the Hit@1 chance level (mean 1/C) of one eval subset.

    q: [Q, D] query embeddings; docs: [M, D] every item's document embedding; candidates: per
    query the item indices (positive first). With `return_scores`, also the [Q, C] scores and
    validity mask. `device`: where the products run (default: the embeddings').
    """
    idx, valid = pad_candidates(candidates)
    scores = candidate_scores(q, docs, idx, device=device)
    m = metrics_from_ranks(positive_rank(scores, valid), ks)
    m["chance@1"] = (1.0 / valid.sum(1).float()).mean().item()
    return (m, scores, valid) if return_scores else m


# ====================================================================== one pool, several positives
def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "eval.scoring=faiss needs the optional `faiss` package, which is not installed "
            "(pip install faiss-cpu, or faiss-gpu-cu12 on CUDA machines). eval.scoring=torch is exact too and "
            "streams the candidate pool through the device in chunks (eval.pool_chunk)."
        ) from e
    return faiss


def _pad_positives(positives: list[list[int]]) -> torch.Tensor:
    P = max(len(p) for p in positives)
    out = torch.full((len(positives), P), -1, dtype=torch.long)
    for i, p in enumerate(positives):
        if not p:
            raise ValueError(f"query {i} has no positive")
        out[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    return out


@torch.no_grad()
def pool_ranks(q: torch.Tensor, pool: torch.Tensor, positives: list[list[int]], backend: str = "torch",
               device: torch.device | str | None = None, chunk: int = 65536, block: int = 1024,
               max_k: int = 10) -> torch.Tensor:
    """Strict rank [Q] of each query's best positive in one candidate pool.

    rank = number of non-positive pool entries whose cosine score is >= the best positive's (a NaN
    entry counts; a NaN best positive: `NO_RANK`). With ``backend="torch"`` it is exact for every
    rank (the pool is streamed in `chunk` rows, from wherever it lives to `device`); with
    ``backend="faiss"`` (exact inner-product index, the whole pool in host memory) it is exact below
    `max_k` and reported as `max_k` above (enough for Recall@k, k <= max_k; a NaN best positive
    too, which is a miss for those k).
    """
    P = _pad_positives(positives)  # [Q, Pmax]
    if backend == "faiss":
        return _faiss_ranks(q, pool, P, max_k)
    if backend != "torch":
        raise ValueError(f"eval.scoring={backend!r}: expected torch or faiss")
    device = torch.device(device) if device is not None else q.device
    qn = F.normalize(q.float(), dim=-1)
    pn = F.normalize(pool.float(), dim=-1)
    Q = qn.shape[0]
    ranks = torch.empty(Q, dtype=torch.long)
    for s in range(0, Q, block):
        qb = qn[s:s + block].to(device)  # [b, D]
        pb = P[s:s + block].to(device)  # [b, Pmax]
        ok = pb >= 0
        pos_vec = pn[pb.clamp(min=0).cpu()].to(device)  # [b, Pmax, D]
        pos_s = torch.einsum("bd,bpd->bp", qb, pos_vec).masked_fill(~ok, -math.inf)  # [b, Pmax]
        best = pos_s.max(dim=1).values  # [b]
        count = torch.zeros(qb.shape[0], dtype=torch.long, device=device)
        for c0 in range(0, pn.shape[0], chunk):
            pc = pn[c0:c0 + chunk].to(device)  # [c, D]
            sc = qb @ pc.T  # [b, c]
            beat = (sc >= best[:, None]) | torch.isnan(sc)
            inside = ok & (pb >= c0) & (pb < c0 + pc.shape[0])  # positives in this chunk are not competitors
            if inside.any():
                r, j = inside.nonzero(as_tuple=True)
                beat[r, pb[r, j] - c0] = False
            count += beat.sum(dim=1)
        ranks[s:s + block] = count.masked_fill(torch.isnan(best), NO_RANK).cpu()
    return ranks


def _faiss_ranks(q: torch.Tensor, pool: torch.Tensor, P: torch.Tensor, max_k: int) -> torch.Tensor:
    faiss = _import_faiss()
    qn = F.normalize(q.float(), dim=-1).cpu().contiguous().numpy()
    pn = F.normalize(pool.float(), dim=-1).cpu().contiguous().numpy()
    index = faiss.IndexFlatIP(pn.shape[1])
    for c0 in range(0, pn.shape[0], 65536):  # added in chunks
        index.add(pn[c0:c0 + 65536])
    n_ret = min(max_k + P.shape[1], pn.shape[0])
    scores, ids = index.search(qn, n_ret)  # [Q, n_ret] best first
    scores, ids = torch.from_numpy(scores), torch.from_numpy(ids).long()
    is_pos = (ids[:, :, None] == P[:, None, :]).any(-1) & (ids >= 0)  # [Q, n_ret]
    pos_s = scores.masked_fill(~is_pos, -math.inf)
    best = pos_s.max(dim=1).values  # -inf when no positive was returned
    neg_beat = (~is_pos) & (ids >= 0) & (scores >= best[:, None])
    count = neg_beat.sum(dim=1)
    # the returned negatives are the best ones: a positive outside the list, or a count that
    # reaches max_k, means a rank >= max_k; below it the count is exact (see module docstring)
    found = torch.isfinite(best)
    return torch.where(found & (count < max_k), count, torch.full_like(count, max_k))


def recall_from_ranks(rank: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent."""
    return {f"R@{k}": 100.0 * (rank < k).float().mean().item() for k in ks}
