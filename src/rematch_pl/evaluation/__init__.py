"""Evaluation: strict metrics (`metrics`), the embedding cache (`cache`), the encoding engine
(`engine`), the MMEB and zero-shot suites (`suites`), reranking (`rerank`) and the paper's
tables (`tables`). ``python -m rematch_pl.eval`` is the entry point.

Importing this package stays light: only the metrics are imported here.
"""

from .metrics import (
    candidate_scores,
    evaluate_subset,
    metrics_from_ranks,
    pad_candidates,
    pool_ranks,
    positive_rank,
    recall_from_ranks,
    retrieval_metrics,
    score_candidates,
)

__all__ = [
    "candidate_scores", "evaluate_subset", "metrics_from_ranks", "pad_candidates", "pool_ranks", "positive_rank",
    "recall_from_ranks", "retrieval_metrics", "score_candidates",
]
