import math
import random

import pytest
import torch

from rematch_pl.model import ReMatchModel, length_buckets, other_positive
from tinyutil import DEVICES, make_backbone, on, triple_batch


def _cost(lengths, buckets, pass_tokens):
    return sum(len(b) * max(lengths[i] for i in b) + pass_tokens for b in buckets)


def _partitions(items):
    """Every set partition of `items` (a reference for small inputs)."""
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head]] + part
        for k in range(len(part)):
            yield part[:k] + [[head] + part[k]] + part[k + 1:]


@pytest.mark.parametrize("pass_tokens", [0, 5, 40, 300, 10_000])
def test_length_buckets_are_the_cheapest_partition(pass_tokens):
    """Against every set partition of 8 rows: padded tokens + pass_tokens per bucket is minimal."""
    rng = random.Random(pass_tokens)
    for _ in range(5):
        lengths = [rng.choice([9, 10, 12, 150, 270, 290, 300]) + rng.randrange(3) for _ in range(8)]
        buckets = length_buckets(lengths, pass_tokens)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        best = min(_cost(lengths, p, pass_tokens) for p in _partitions(list(range(8))))
        assert _cost(lengths, buckets, pass_tokens) == best
        for b in buckets:  # each bucket longest first
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    lengths = [300, 12, 290, 9, 270, 10, 150, 11]
    assert length_buckets(lengths, math.inf) == [sorted(range(8), key=lambda i: -lengths[i])]
    assert all(len({lengths[i] for i in b}) == 1 for b in length_buckets(lengths, 0))  # no padding at all
    assert length_buckets([], 100) == []


def test_length_buckets_pad_less_than_the_old_greedy_rule_at_the_same_passes():
    """The row lengths of `bench`'s 16-triple batch at the 2B processor's 448 px images (16 image
    queries of 276 tokens, 8 image positives of 265, 24 text documents of 9): the old greedy rule
    (a bucket grows while padded <= 1.25 x real) put 5 text rows in the image bucket and padded
    21%; the cheapest partition pads 1.3% in as many passes."""
    lengths = [276] * 16 + [265] * 8 + [9] * 24
    buckets = length_buckets(lengths, 2048)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    assert len(buckets) == 2 and padded / sum(lengths) == pytest.approx(1 + 8 * 11 / 6752)


def test_length_buckets_split_to_an_agreed_number_of_passes():
    lengths = [300, 12, 290, 9, 270, 10, 150, 11]
    free = length_buckets(lengths, 100)
    for n in range(len(free), len(lengths) + 3):
        got = length_buckets(lengths, 100, min_buckets=n)
        assert len(got) == min(n, len(lengths))
        assert sorted(i for b in got for i in b) == list(range(len(lengths)))
        for b in got:  # still sorted longest first: splitting never adds padding
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_bf16_pixels_give_the_bf16_towers_result_bit_for_bit():
    """Batches carry pixels in the vision tower's dtype (`MMEBDataModule.set_processor`): on a
    bf16 backbone every loss term equals the one from fp32 pixels exactly."""
    from rematch_pl.backbone.model import load_backbone

    bb = load_backbone("tiny://qwen2vl", dtype="bf16", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    torch.manual_seed(0)
    model = ReMatchModel(bb, k=4).eval()
    batch = triple_batch(bb.processor)
    terms = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)  # the matching pass draws the order of its documents
        with torch.no_grad():
            terms[dtype] = model(dict(batch, pixel_values=batch["pixel_values"].to(dtype)))
    assert terms[torch.float32].keys() == terms[torch.bfloat16].keys() and "loss_qdm" in terms[torch.float32]
    for k, v in terms[torch.float32].items():
        assert torch.equal(v, terms[torch.bfloat16][k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_bucketed_embedding_equals_one_padded_pass(device):
    torch.manual_seed(0)
    bb = make_backbone("qwen2vl")
    model = ReMatchModel(bb, k=4, matching="none").eval().to(device)
    batch = on(device, triple_batch(bb.processor))
    feats = bb.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    groups = [("qry", model.contents(batch["qry"])), ("doc", model.contents(batch["pos"])),
              ("doc", model.contents(batch["neg"]))]
    with torch.no_grad():
        bucketed = model.embed(groups, feats, batch["image_grid_thw"])
        model.bucket_pass_tokens = math.inf
        single = model.embed(groups, feats, batch["image_grid_thw"])
    tol = 1e-5 if device == "cpu" else 1e-4  # CUDA: other kernels for other shapes
    for (a, sa), (b, sb) in zip(bucketed, single):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        torch.testing.assert_close(sa, sb, atol=tol, rtol=tol)


def test_d_minus_without_hard_negatives_is_never_the_same_document():
    """Without hard negatives d- is the previous instance's positive (as torch.roll), skipping
    positives that are the instance's own document (equal keys); all equal: the previous one."""
    assert other_positive(4) == [3, 0, 1, 2] == torch.roll(torch.arange(4), 1).tolist()
    assert other_positive(4, torch.tensor([5, 6, 7, 8])) == [3, 0, 1, 2]
    assert other_positive(4, torch.tensor([5, 5, 7, 5])) == [2, 2, 1, 2]
    assert other_positive(3, torch.tensor([9, 9, 9])) == [2, 0, 1]
