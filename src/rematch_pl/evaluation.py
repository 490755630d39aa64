"""Retrieval metrics with a strict tie rule: a tie between the positive and another candidate is NOT a hit.

Upstream MMEB code takes `argmax`, which returns the first maximum, so a collapsed model (all
scores equal) scores 100%. Here the rank of the positive counts every other candidate whose
score is >= the positive's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_rank(scores: torch.Tensor) -> torch.Tensor:
    """scores: [Q, C] with the positive at column 0 -> [Q] rank (0 = strictly best)."""
    return (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


def retrieval_metrics(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Hit@k and MRR of a [Q, C] score matrix (positive at column 0)."""
    rank = positive_rank(scores).float()  # [Q]
    out = {f"hit@{k}": (rank < k).float().mean().item() for k in ks}
    out["mrr"] = (1.0 / (rank + 1)).mean().item()
    return out


def score_candidates(q: torch.Tensor, docs: torch.Tensor, candidates: list[list[int]]) -> list[torch.Tensor]:
    """Cosine score of each query against its own candidate list.

    q: [Q, D] query embeddings; docs: [M, D] every item's document embedding; candidates: per
    query the item indices (positive first). Returns one [C_q] tensor per query.
    """
    qn, dn = F.normalize(q.float(), dim=-1), F.normalize(docs.float(), dim=-1)
    return [dn[torch.as_tensor(c, device=dn.device)] @ qn[i] for i, c in enumerate(candidates)]


def evaluate_subset(q: torch.Tensor, docs: torch.Tensor, candidates: list[list[int]]) -> dict[str, float]:
    """Hit@1/Hit@5/MRR and the Hit@1 chance level (mean 1/C) of one eval subset."""
    scores = score_candidates(q, docs, candidates)
    sizes = {len(c) for c in candidates}
    if len(sizes) == 1:
        m = retrieval_metrics(torch.stack(scores))
    else:  # ragged candidate lists
        ranks = torch.stack([positive_rank(s.view(1, -1))[0] for s in scores]).float()
        m = {"hit@1": (ranks < 1).float().mean().item(), "hit@5": (ranks < 5).float().mean().item(),
             "mrr": (1.0 / (ranks + 1)).mean().item()}
    m["chance@1"] = sum(1.0 / len(c) for c in candidates) / len(candidates)
    return m
