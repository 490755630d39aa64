"""Multi Embedding Fusion (Sec. 3.2.1): K learnable tokens appended after each input.

Their last-layer hidden states [B, K, d] are the multi-vector representation ME; the
orthogonality loss acts on them and the fused embedding is their plain mean. ``k=0``
(``fusion=eos``) is the single last-token baseline: an end-of-sequence token is appended and
its last-layer state is the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

SETS = ("separate", "shared", "both")


class MultiTokenFusion(nn.Module):
    """Learnable token sets L_q, L_d (each [K, d]) and the pooling of their states.

    sets: "separate" (queries get L_q, documents L_d: the default reading of the paper),
    "shared" (one set for both), "both" (the literal z = [m; L_q; L_d], states read at the
    side's own set).
    """

    def __init__(self, k: int, hidden_size: int, sets: str = "separate", init_std: float | None = None,
                 init_from: torch.Tensor | None = None):
        super().__init__()
        if not 0 <= k <= 64:
            raise ValueError(f"fusion.k={k}: expected 0 (last-token pooling) or 1..64 learnable tokens")
        if sets not in SETS:
            raise ValueError(f"fusion.sets={sets!r}: expected one of {SETS}")
        self.k, self.sets = k, sets
        if k == 0:
            return
        n_sets = 1 if sets == "shared" else 2
        if init_from is not None and not init_from.is_meta:  # start near the input distribution: random
            # rows of the vocabulary (a model on meta, for memory planning, has no rows to copy)
            g = torch.Generator().manual_seed(0)
            rows = torch.randint(0, init_from.shape[0], (n_sets, k), generator=g)
            init = init_from.detach().float().cpu()[rows].clone()  # [n_sets, K, d]
        else:
            init = torch.randn(n_sets, k, hidden_size) * (init_std or 0.02)
        self.tokens = nn.Parameter(init)  # [n_sets, K, d]

    @property
    def pooling(self) -> str:
        return "eos" if self.k == 0 else "tokens"

    def appended(self, side: str) -> torch.Tensor:
        """The vectors appended after an input of `side` ('qry' | 'doc'): [K or 2K, d]."""
        if self.sets == "shared":
            return self.tokens[0]
        if self.sets == "both":
            return torch.cat([self.tokens[0], self.tokens[1]])
        return self.tokens[0 if side == "qry" else 1]

    def token_states(self, hidden: torch.Tensor, lengths: torch.Tensor, side: str,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """Gather the states of this side's learnable tokens.

        hidden: [B, L, d] right-padded; lengths: [B]; rows: [n] the rows of `hidden` to read
        (default: all). Returns [n, K, d] (K = 1 for eos pooling), in one indexing op.
        """
        k = max(self.k, 1)
        offset = 0  # tokens are the last K (or 2K) positions of each row
        if self.sets == "both" and side == "qry":
            offset = self.k  # L_q sits before L_d
        if rows is None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
        ar = torch.arange(k, device=hidden.device)  # [K]
        pos = lengths[rows].view(-1, 1) - offset - k + ar.view(1, -1)  # [n, K]
        return hidden[rows.view(-1, 1), pos]  # [n, K, d]

    @staticmethod
    def fuse(states: torch.Tensor) -> torch.Tensor:
        """Plain mean of the K token states: [B, K, d] -> [B, d]."""
        return states.mean(dim=1)
