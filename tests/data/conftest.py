"""Fixtures for the data tests: the tiny processor and a small synthetic dataset.

Writers of fixtures in the exact MMEB layouts are in `mmeb_layouts`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def processor():
    from rematch_pl.backbone.processor import MultimodalProcessor
    from rematch_pl.backbone.tiny import resolve_tiny

    return MultimodalProcessor.from_pretrained(resolve_tiny("qwen2vl"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from rematch_pl.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", seed=0, n_train_per_subset=40,
                              n_eval_queries=10, n_candidates=8)
