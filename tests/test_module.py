"""ReMatchModule hooks that need no Trainer."""

import torch

from tinyutil import make_backbone, triple_batch
from rematch_pl.model import ReMatchModel
from rematch_pl.module import HOST_KEYS, ReMatchModule


def test_transfer_moves_pixels_and_keeps_packing_metadata_on_the_host():
    bb = make_backbone("qwen2vl")
    module = ReMatchModule(ReMatchModel(bb, k=2, matching="none"))
    batch = dict(triple_batch(bb.processor), item_index=torch.arange(3))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)  # meta stands for the GPU here
    assert list(moved) == list(batch)
    assert moved["pixel_values"].is_meta and moved["item_index"].is_meta
    for key in HOST_KEYS:
        if key in batch:  # the same host tensors: nothing copied, nothing read back from a device
            leaves = batch[key].values() if isinstance(batch[key], dict) else [batch[key]]
            moved_leaves = moved[key].values() if isinstance(moved[key], dict) else [moved[key]]
            assert all(a is b and a.device.type == "cpu" for a, b in zip(leaves, moved_leaves))
    assert moved["subset"] == batch["subset"]
