import math

import torch

from rematch_pl.model import ReMatchModel, length_buckets
from tinyutil import make_backbone, triple_batch


def test_length_buckets_partition_and_bound_padding():
    lengths = [300, 12, 290, 9, 270, 10, 150, 11]
    buckets = length_buckets(lengths, 0.25)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 1.25 * sum(lengths[i] for i in b)
    assert length_buckets(lengths, math.inf) == [sorted(range(8), key=lambda i: -lengths[i])]


def test_length_buckets_split_to_an_agreed_number_of_passes():
    lengths = [300, 12, 290, 9, 270, 10, 150, 11]
    free = length_buckets(lengths, 0.25)
    for n in range(len(free), len(lengths) + 3):
        got = length_buckets(lengths, 0.25, min_buckets=n)
        assert len(got) == min(n, len(lengths))
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        for b in got:  # still sorted longest first: splitting never adds padding
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_bucketed_embedding_equals_one_padded_pass():
    torch.manual_seed(0)
    bb = make_backbone("qwen2vl")
    model = ReMatchModel(bb, k=4, matching="none").eval()
    batch = triple_batch(bb.processor)
    feats = bb.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    groups = [("qry", model.contents(batch["qry"])), ("doc", model.contents(batch["pos"])),
              ("doc", model.contents(batch["neg"]))]
    with torch.no_grad():
        bucketed = model.embed(groups, feats, batch["image_grid_thw"])
        model.max_padding = math.inf
        single = model.embed(groups, feats, batch["image_grid_thw"])
    for (a, sa), (b, sb) in zip(bucketed, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
