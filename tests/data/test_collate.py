"""Collators: batch format, image-token counts, truncation, one image-processor call per batch."""

import pytest
import torch
from mmeb_layouts import PH
from PIL import Image

from rematch_pl.data.collate import EvalCollator, TrainCollator
from rematch_pl.data.mmeb import DataError
from rematch_pl.data.stream import ExampleBatch


def img(size=(56, 56), colour=(200, 10, 10)):
    return Image.new("RGB", size, colour)


def example(i, qry_image=None, pos_image=None, negs=(("neg", None),), subset="S"):
    return {"subset": subset, "row_id": f"{subset}:{i}",
            "qry_text": f"{PH}\nRepresent the given image for classification.\n" if qry_image else f"query {i}",
            "qry_image": qry_image,
            "pos_text": f"{PH}\nRepresent the given image." if pos_image else f"label {i}", "pos_image": pos_image,
            "neg_texts": [t for t, _ in negs], "neg_images": [m for _, m in negs]}


def _examples():
    return ExampleBatch([
        example(0, qry_image=img((56, 56)), negs=(("red circle", None), ("blue square", None))),
        example(1, pos_image=img((112, 56)), negs=((PH, img((56, 84))), ("green", None))),
        example(2, qry_image=img((84, 84)), pos_image=img((56, 56)), negs=(("a", None), (PH, img((112, 112))))),
    ], bad_rows=[("S", 7, "missing image"), ("S", 9, "missing image")])


def test_pixels_collated_in_the_vision_towers_dtype(processor):
    """The tower's own cast, made in the collator: the same values, half the bytes in bf16."""
    fp32 = TrainCollator(processor, 256)(_examples())
    bf16 = TrainCollator(processor, 256, torch.bfloat16)(_examples())
    assert fp32["pixel_values"].dtype == torch.float32 and bf16["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(bf16["pixel_values"], fp32["pixel_values"].to(torch.bfloat16))
    items = [(0, PH, img()), (1, "text", None)]
    assert EvalCollator(processor, 64, torch.bfloat16)(items)["pixel_values"].dtype == torch.bfloat16


def test_train_batch_format(processor):
    batch = TrainCollator(processor, max_length=256)(_examples())
    assert set(batch) == {"qry", "pos", "neg", "pixel_values", "image_grid_thw", "subset", "row_id", "bad_rows"}
    for side, rows in (("qry", 3), ("pos", 3), ("neg", 6)):
        part = batch[side]
        assert part["ids"].dtype == torch.long and part["ids"].shape[0] == rows
        assert part["lengths"].shape == (rows,) and part["image"].shape == (rows,)
        assert int(part["lengths"].max()) == part["ids"].shape[1]
        for r in range(rows):  # right padding with pad_id
            assert (part["ids"][r, part["lengths"][r]:] == processor.pad_id).all()
    # images: queries first, then positives, then negatives (instance-major)
    assert batch["qry"]["image"].tolist() == [0, -1, 1]
    assert batch["pos"]["image"].tolist() == [-1, 2, 3]
    assert batch["neg"]["image"].tolist() == [-1, -1, 4, -1, -1, 5]
    grid = batch["image_grid_thw"]
    assert grid.dtype == torch.long and grid.shape == (6, 3)
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert grid[2].tolist() == [1, 4, 8]  # the 112x56 positive of example 1
    assert batch["subset"] == ["S"] * 3 and batch["row_id"] == ["S:0", "S:1", "S:2"]
    assert batch["bad_rows"] == [("S", 7, "missing image"), ("S", 9, "missing image")]
    # negatives instance-major: example 1's negatives are rows 2 and 3
    neg1 = batch["neg"]["ids"][3, : batch["neg"]["lengths"][3]].tolist()
    assert neg1 == processor.tokenize("green")
    assert "key" not in batch["pos"]  # examples without document keys (e.g. hand-made ones)


def test_document_keys_collated_per_side(processor):
    exs = _examples()
    for i, ex in enumerate(exs):
        ex["pos_key"], ex["neg_keys"] = 10 + i % 2, [20 + i, 10]
    batch = TrainCollator(processor, max_length=256)(exs)
    assert batch["pos"]["key"].tolist() == [10, 11, 10]
    assert batch["neg"]["key"].tolist() == [20, 10, 21, 10, 22, 10]  # instance-major, as the rows
    assert batch["pos"]["key"].dtype == torch.long


def test_image_token_counts(processor):
    batch = TrainCollator(processor, max_length=256)(_examples())
    grid = batch["image_grid_thw"]
    for side in ("qry", "pos", "neg"):
        part = batch[side]
        for r in range(part["ids"].shape[0]):
            ids = part["ids"][r, : part["lengths"][r]]
            n = int((ids == processor.image_token_id).sum())
            k = int(part["image"][r])
            assert n == (int(grid[k].prod()) // 4 if k >= 0 else 0)


def test_one_process_images_call_per_batch(processor, monkeypatch):
    calls = []
    original = processor.process_images
    monkeypatch.setattr(processor, "process_images", lambda images: calls.append(len(images)) or original(images))
    TrainCollator(processor, 256)(_examples())
    assert calls == [6]


def test_truncation_never_cuts_image_tokens(processor):
    long_text = f"{PH}\n" + "Represent the given image with the following question: " * 20
    ex = example(0, qry_image=img((112, 112)), negs=())
    ex["qry_text"] = long_text
    batch = TrainCollator(processor, max_length=30)([ex])
    ids = batch["qry"]["ids"][0, : batch["qry"]["lengths"][0]]
    assert len(ids) == 30
    assert int((ids == processor.image_token_id).sum()) == int(batch["image_grid_thw"][0].prod()) // 4 == 16
    assert processor.vision_start_id in ids.tolist() and processor.vision_end_id in ids.tolist()
    with pytest.raises(DataError, match="the image alone needs"):
        TrainCollator(processor, max_length=10)([ex])  # 18 image-block tokens cannot fit


def test_no_negatives_gives_none(processor):
    batch = TrainCollator(processor, 64)([example(0, negs=()), example(1, negs=())])
    assert batch["neg"] is None and batch["pixel_values"].shape[0] == 0 and batch["image_grid_thw"].shape == (0, 3)


def test_placeholder_mismatch_caught_with_subset_and_row(processor):
    bad = example(7, qry_image=img(), subset="ChartQA")
    bad["qry_text"] = "no placeholder here"
    with pytest.raises(DataError) as e:
        TrainCollator(processor, 64)([example(0), bad])
    assert "'ChartQA'" in str(e.value) and "ChartQA:7" in str(e.value) and "qry" in str(e.value)
    neg_bad = example(3, negs=((PH, None),))
    with pytest.raises(DataError, match="S:3 .neg negative 0.*no image"):
        TrainCollator(processor, 64)([neg_bad])


def test_inconsistent_negative_counts(processor):
    with pytest.raises(DataError, match="expected 1"):
        TrainCollator(processor, 64)([example(0), example(1, negs=(("a", None), ("b", None)))])


def test_eval_collator(processor):
    items = [(10, "red circle", None), (3, PH, img((56, 112))), (7, f"{PH}\nRepresent the given image.", img())]
    batch = EvalCollator(processor, 64)(items)
    assert set(batch) == {"items", "pixel_values", "image_grid_thw", "item_index"}
    assert batch["item_index"].tolist() == [10, 3, 7]
    assert batch["items"]["image"].tolist() == [-1, 0, 1]
    grid = batch["image_grid_thw"]
    assert grid.shape == (2, 3) and batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    ids = batch["items"]["ids"][1, : batch["items"]["lengths"][1]]
    assert int((ids == processor.image_token_id).sum()) == int(grid[0].prod()) // 4
    with pytest.raises(DataError, match="eval item 5"):
        EvalCollator(processor, 64)([(5, PH, None)])
