"""Readers of the zero-shot sets: every public layout and the MMEB-eval layout, on generated fixtures."""

import json

import pytest

from rematch_pl.zeroshot import (SETS, SUGARCREPE_PARTS, ChoiceSet, RetrievalSet, ZeroShotDataError, detect_layout,
                                 load_set, read_karpathy, synthetic_paths, to_mmeb_layout, write_synthetic_zeroshot)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_synthetic_zeroshot(tmp_path_factory.mktemp("zs") / "sets", n_images=8)


def test_each_public_layout_is_read(fixture_root):
    paths = synthetic_paths(fixture_root)
    expected = {"flickr30k": "karpathy", "coco": "lavis", "sharegpt4v": "sharegpt4v", "urban1k": "urban1k",
                "sugarcrepe": "sugarcrepe"}
    for name, kw in paths.items():
        assert detect_layout(kw["path"]) == expected[name]
        data = load_set(name, **dict(kw, layout="auto"))
        if name == "sugarcrepe":
            assert [c.name for c in data] == list(SUGARCREPE_PARTS)
            assert all(isinstance(c, ChoiceSet) and len(c.images) == len(c.positives) == len(c.negatives) == 4
                       for c in data)
            assert all(p != n for c in data for p, n in zip(c.positives, c.negatives))
            continue
        assert isinstance(data, RetrievalSet) and len(data.images) == 8
        per_image = [len(c) for c in data.image_captions()]
        # short-caption sets: 5 captions per image (COCO's 6th dropped); long-caption sets: one
        assert per_image == [5] * 8 if name in ("flickr30k", "coco") else per_image == [1] * 8
    flickr = load_set("flickr30k", **paths["flickr30k"])
    assert "unused.png" not in flickr.images  # only the test split


def test_mmeb_layout_round_trip_gives_the_same_sets(fixture_root, tmp_path):
    public = {n: load_set(n, **kw) for n, kw in synthetic_paths(fixture_root).items()}
    converted = {n: load_set(n, **kw) for n, kw in synthetic_paths(fixture_root, "mmeb").items()}
    for n in SETS:
        a, b = public[n], converted[n]
        if n == "sugarcrepe":
            assert [(c.name, c.images, c.positives, c.negatives) for c in a] == \
                   [(c.name, c.images, c.positives, c.negatives) for c in b]
            continue
        assert (a.images, a.captions, a.caption_image) == (b.images, b.captions, b.caption_image)
        assert [a.image_file(i) for i in range(3)] == [b.image_file(i) for i in range(3)]
    # only the i2t subset: one positive caption per image is all that is known
    only = to_mmeb_layout({"flickr30k": public["flickr30k"]}, tmp_path / "mm", directions=("i2t",))
    rs = load_set("flickr30k", str(only), public["flickr30k"].image_root, layout="mmeb")
    assert rs.images == public["flickr30k"].images and [len(c) for c in rs.image_captions()] == [1] * 8


def test_karpathy_coco_filepath_split_and_limits(tmp_path):
    (tmp_path / "val2014").mkdir()
    for i in range(3):
        (tmp_path / "val2014" / f"{i}.jpg").write_bytes(b"x")
    data = {"images": [{"filepath": "val2014", "filename": f"{i}.jpg", "split": "test" if i < 2 else "restval",
                        "sentences": [{"raw": f"c{i}-{j}"} for j in range(7)]} for i in range(3)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    rs = load_set("coco", str(tmp_path / "dataset_coco.json"), str(tmp_path))
    assert rs.images == ["val2014/0.jpg", "val2014/1.jpg"] and len(rs.captions) == 10
    restval = read_karpathy(str(tmp_path / "dataset_coco.json"), str(tmp_path), split="restval")
    assert restval.images == ["val2014/2.jpg"]
    assert len(load_set("coco", str(tmp_path / "dataset_coco.json"), str(tmp_path), limit=1).images) == 1


def test_bad_data_fails_with_the_reason(fixture_root, tmp_path):
    kw = synthetic_paths(fixture_root)["flickr30k"]
    with pytest.raises(ZeroShotDataError, match="missing image file"):
        load_set("flickr30k", kw["path"], str(tmp_path))
    with pytest.raises(ZeroShotDataError, match="unknown zero-shot set"):
        load_set("flickr8k", kw["path"])
    with pytest.raises(ZeroShotDataError, match="not a retrieval layout"):
        load_set("coco", synthetic_paths(fixture_root)["sugarcrepe"]["path"], layout="sugarcrepe")


def test_a_missing_sugarcrepe_part_is_an_error_unless_left_out(fixture_root, tmp_path):
    """The Replace / Swap / Add columns average their parts: a missing part file stops the run, naming
    it; `parts` (eval.zeroshot.sets.sugarcrepe.parts) runs a chosen subset on purpose."""
    import shutil

    kw = synthetic_paths(fixture_root)["sugarcrepe"]
    data = tmp_path / "sugarcrepe"
    shutil.copytree(kw["path"], data, ignore=shutil.ignore_patterns("*.png"))
    (data / "swap_att.json").unlink()
    (data / "add_obj.json").unlink()
    with pytest.raises(ZeroShotDataError, match=r"missing SugarCrepe part\(s\).*swap_att\.json.*add_obj\.json"):
        load_set("sugarcrepe", str(data), kw["image_root"])
    parts = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "add_att"]
    assert [c.name for c in load_set("sugarcrepe", str(data), kw["image_root"], parts=parts)] == parts
    with pytest.raises(ZeroShotDataError, match="unknown SugarCrepe part"):
        load_set("sugarcrepe", str(data), kw["image_root"], parts=["replace_obj", "swap_everything"])
    with pytest.raises(ZeroShotDataError, match="only for sugarcrepe"):
        load_set("coco", **dict(synthetic_paths(fixture_root)["coco"], parts=["replace_obj"]))
    # the MMEB-eval layout: the same rule for its SugarCrepe_<part> subsets
    mm = to_mmeb_layout({"sugarcrepe": load_set("sugarcrepe", str(data), kw["image_root"], parts=parts)},
                        tmp_path / "mm")
    with pytest.raises(ZeroShotDataError, match=r"missing SugarCrepe part\(s\).*SugarCrepe_swap_att"):
        load_set("sugarcrepe", str(mm), kw["image_root"], layout="mmeb")
    assert len(load_set("sugarcrepe", str(mm), kw["image_root"], layout="mmeb", parts=parts)) == 5
