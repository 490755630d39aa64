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
