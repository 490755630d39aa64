"""Loss terms of ReMatch: contrastive (Eq. 3), orthogonality (Eq. 2), matching (Eq. 4)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def orthogonality_loss(tokens: torch.Tensor) -> torch.Tensor:
    """Soft orthogonality of the K learnable-token embeddings (Eq. 2), mean over the batch.

    tokens: [B, K, D] last-layer states of the K learnable tokens of each sample.
    Returns a scalar: mean_b  2 / (K (K-1)) * sum_{i<j} (e~_i . e~_j)^2, with e~ = e / ||e||.
    0 for orthonormal tokens, 1 for identical ones; 0 when K == 1.
    """
    B, K, _ = tokens.shape
    if K < 2:
        return tokens.sum() * 0.0
    e = F.normalize(tokens.float(), dim=-1)  # [B, K, D]
    gram = e @ e.transpose(1, 2)  # [B, K, K]
    off = gram.pow(2).sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(-1)  # [B] sum over i != j
    return (off / (K * (K - 1))).mean()  # sum_{i!=j} = 2 sum_{i<j}


def info_nce(q: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of cosine similarities over temperature.

    q: [B, D] queries; docs: [M, D] every candidate document; labels: [B] index of each
    query's positive in `docs`; exclude: [B, M] bool, candidates left out of a query's
    denominator (`false_negatives`). Returns the mean over queries.
    """
    logits = F.normalize(q.float(), dim=-1) @ F.normalize(docs.float(), dim=-1).T / temperature  # [B, M]
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, labels)


def contrastive_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, temperature: float,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 on a local batch (no gathering inside).

    q: [B, D] fused query embeddings; pos: [B, D] their positives; neg: [B, N, D] explicit hard
    negatives, or None. Each query is scored against its positive, its own hard negatives and
    every other positive and hard negative of the batch (but those of `exclude` [B, B + B*N]).
    Returns a scalar (mean over queries).
    """
    B = q.shape[0]
    docs = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])  # [B + B*N, D]
    labels = torch.arange(B, device=q.device)
    return info_nce(q, docs, labels, temperature, exclude)


def false_negatives(pos_key: torch.Tensor, neg_key: torch.Tensor | None,
                    gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0) -> torch.Tensor:
    """[B, M] bool: candidate j of local query i is the same document as i's positive (same text
    and image: equal keys) without being that positive: another query's positive or a hard
    negative that repeats it (a class label shared by two queries of a batch, an answer "Yes").
    Columns in the candidate order of `gathered_contrastive_loss` (all positives, then all hard
    negatives, of every rank when `gather` is given).

    pos_key: [B] int64 document keys of the local positives; neg_key: [B*N] or None.
    """
    B = pos_key.shape[0]
    with torch.no_grad():  # integer keys: nothing to differentiate
        keys = [pos_key] + ([neg_key] if neg_key is not None else [])
        if gather is not None:
            keys = [gather(k.contiguous()).reshape(-1) for k in keys]  # [W*B], [W*B*N]
        keys = torch.cat(keys)  # [M]
        labels = rank * B + torch.arange(B, device=keys.device)  # [B]
        same = keys.unsqueeze(0) == keys[labels].unsqueeze(1)  # [B, M]
        same[torch.arange(B, device=keys.device), labels] = False
    return same


def gathered_contrastive_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    temperature: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 3 over the *global* batch: documents of every rank are candidates.

    `gather(x [B, ...]) -> [W, B, ...]` must be autograd-aware (gradients reach the local
    copies, e.g. Lightning's ``all_gather(x, sync_grads=True)``). Candidates are all positives
    of the global batch [W*B] followed by all hard negatives [W*B*N]; the positive of local
    query i is global row rank*B + i. Requires equal local batch sizes on all ranks.
    exclude: [B, M] bool, candidates left out of each query's denominator (`false_negatives`).
    """
    if gather is None:
        return contrastive_loss(q, pos, neg, temperature, exclude)
    B = q.shape[0]
    all_pos = gather(pos.contiguous())  # [W, B, D]
    all_pos = all_pos.reshape(-1, pos.shape[-1])  # [W*B, D]
    docs = all_pos
    if neg is not None:
        all_neg = gather(neg.contiguous()).reshape(-1, neg.shape[-1])  # [W*B*N, D]
        docs = torch.cat([all_pos, all_neg])
    labels = rank * B + torch.arange(B, device=q.device)
    return info_nce(q, docs, labels, temperature, exclude)


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4: cross-entropy of the Yes/No answer token, averaged over views and instances.

    logits: [B, V, vocab] at each view's answer position; labels: [B, V] token id of "Yes"/"No".
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
