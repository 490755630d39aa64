"""Shared fixtures: tiny backbones (made locally on first use) and small collated batches."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tinyutil import KINDS, make_backbone  # noqa: E402


@pytest.fixture(scope="session")
def tiny_paths():
    from rematch_pl.backbone.tiny import resolve_tiny

    return {k: resolve_tiny(k) for k in KINDS}


@pytest.fixture(scope="session")
def backbones(tiny_paths):
    return {k: make_backbone(k) for k in KINDS}
