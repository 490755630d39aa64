"""The encoding engine (`rematch_pl.evaluation.engine`) against items encoded one at a time:
units that share an image, batching, DataLoader workers."""

import pytest
import torch
from PIL import Image

from rematch_pl.evaluation.engine import Engine, Request, embed_batch, image_units, make_batches
from rematch_pl.model import ReMatchModel


def test_image_units_group_shared_images_and_keep_the_length_order():
    items = [("a", "x.png"), ("b", None), ("c", "x.png"), ("d", "y.png"), ("e", "x.png"), ("f", None)]
    lengths = [50, 10, 60, 40, 55, 12]
    rows = [1, 1, 2, 1, 1, 1]  # item c is needed as query and document
    units = image_units(items, lengths, rows, max_rows=3)
    assert sorted(i for u in units for i in u) == list(range(6))  # every item once
    assert units == [[2, 4], [0], [3], [5], [1]]  # x.png: c + e fill 3 rows, a starts its own unit
    # nothing shared: the items in length order, ties first-seen first
    assert image_units(items, lengths, rows, max_rows=8, max_tokens=130) == [[2], [4, 0], [3], [5], [1]]
    plain = [("a", "p.png"), ("b", None), ("c", "q.png"), ("d", None)]
    assert image_units(plain, [5, 9, 9, 1], [1, 1, 1, 1], 8) == [[1], [2], [0], [3]]


@pytest.fixture(scope="module")
def model():
    from tinyutil import make_backbone

    torch.manual_seed(0)
    bb = make_backbone("qwen2vl")
    for n, p in bb.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn_like(p) * 0.05
    m = ReMatchModel(bb, k=4, matching="none", template="chat").eval()
    m.requires_grad_(False)
    return m


@pytest.mark.parametrize("workers", [0, 2])
def test_shared_images_are_encoded_once_and_give_the_isolated_embeddings(model, tmp_path, workers):
    """Several questions on one picture: one image load and one vision pass per picture, and every
    embedding equals the item encoded on its own (no batch or unit effect)."""
    from rematch_pl.data.collate import EvalCollator

    paths = []
    for i, (size, color) in enumerate([((96, 64), (200, 30, 30)), ((56, 84), (20, 160, 40)), ((70, 70), (0, 0, 0))]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", size, color).save(paths[-1])
    reqs = [Request(f"<|image_1|>\\nRepresent the given image with the following question: {q}", p, side)
            for p in paths[:2] for q, side in (("What color?", "qry"), ("How many?", "qry"), ("Which shape?", "doc"))]
    reqs += [Request("<|image_1|>\\nRepresent the given image.", paths[2], "qry"), Request("red circle", None, "doc"),
             Request("<|image_1|>\\nRepresent the given image with the following question: What color?", paths[0],
                     "doc")]  # the first item again, as a document: same unit, two rows
    passes = []
    encode_images = model.backbone.encode_images

    def counting(pv, grids):
        passes.append(len(grids))
        return encode_images(pv, grids)

    model.backbone.encode_images = counting
    try:
        engine = Engine(model, None, None, batch_size=4, num_workers=workers, max_length=512, progress=False)
        got = engine.encode(reqs)
    finally:
        del model.backbone.encode_images
    # images 0 and 1: 3 items each (4 rows: one item is also a document) -> one unit, one pass each
    assert sum(passes) == 3 and engine.stats["image_reuses"] == 4
    collate = EvalCollator(model.backbone.processor, 512)
    for i, r in enumerate(reqs):
        batch = collate([(0, r.text, Image.open(r.image).convert("RGB") if r.image else None)])
        ((_, _, ref),) = embed_batch(model, batch, [[r.side]], torch.device("cpu"), torch.float32)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])  # different questions on one image: different embeddings


def test_make_batches_never_splits_a_unit():
    units_rows = [3, 1, 2, 2]
    b = make_batches([90, 80, 50, 40], units_rows, batch_size=4, max_tokens=None)
    assert b == [[0, 1], [2, 3]]
