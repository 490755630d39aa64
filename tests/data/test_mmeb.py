"""Readers on fixtures in the exact MMEB-train, mmE5 hard-negative and MMEB-eval layouts."""

import pytest
from mmeb_layouts import PH, make_train, save_png, train_row, write_card, write_parquet

from rematch_pl.data.mmeb import (
    DEFAULT_TARGET_INSTRUCTIONS,
    DataError,
    HardNegativeIndex,
    apply_target_instruction,
    in_row_negatives,
    iter_rows,
    list_subsets,
    load_eval_subset,
    parse_str_list,
    resolve_target_instructions,
    row_file,
    select_negatives,
    stream_subset,
    target_instruction_for,
)


# ---------------------------------------------------------------- subsets and streaming
def test_list_subsets_from_card_and_folders(tmp_path):
    root = make_train(tmp_path / "train", {"B_sub": 2, "A_sub": 2})
    assert list_subsets(root) == ["B_sub", "A_sub"]  # card order
    (root / "README.md").unlink()
    assert list_subsets(root) == ["A_sub", "B_sub"]  # folders holding parquet files, images/ excluded


def test_stream_subset_reads_all_shards_in_order(tmp_path):
    root = make_train(tmp_path / "train", {"S": 9}, shards=3)
    rows = list(iter_rows(stream_subset(root, "S", "original"), batch_size=2))
    assert [r["pos_text"] for r in rows[::2]] == [f"label {i}" for i in range(0, 9, 2)]
    assert len(rows) == 9
    assert "original-00001-of-00003.parquet (row 1 of that file)" in row_file(str(root), "S", "original", 4)


def test_missing_subset_and_split(tmp_path):
    root = make_train(tmp_path / "train", {"S": 2, "T": 2})
    with pytest.raises(DataError) as e:
        stream_subset(root, "Nope", "original")
    msg = str(e.value)
    assert str(root) in msg and "'Nope'" in msg and "'original'" in msg and "['S', 'T']" in msg
    with pytest.raises(DataError) as e:
        stream_subset(root, "S", "diverse_instruction")
    assert "'diverse_instruction'" in str(e.value) and "splits of 'S': ['original']" in str(e.value)


def test_a_dataset_that_cannot_be_found_says_what_to_do(monkeypatch, tmp_path):
    import datasets.config

    for read in (lambda p: stream_subset(p, "S", "original"), list_subsets):
        with pytest.raises(DataError, match=r"'/nonexistent/mmeb': no such folder.*data.train.path"):
            read("/nonexistent/mmeb")
    with pytest.raises(DataError, match=r"no subsets .*Is this the dataset's top folder"):
        list_subsets(tmp_path)  # a folder, but not a dataset: never an empty run
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # unreachable hub, no network touched
    for read in (lambda p: stream_subset(p, "S", "original"), list_subsets):
        with pytest.raises(DataError) as e:
            read("no-such-org/mmeb-rematch")
        msg = str(e.value)
        assert "'no-such-org/mmeb-rematch' (a hub id" in msg and "could not be reached" in msg
        assert "hf download no-such-org/mmeb-rematch --repo-type dataset" in msg and "eval.mmeb.path" in msg


def test_missing_column(tmp_path):
    root = tmp_path / "train"
    write_parquet(root, "S", "original", [{"qry": "a", "pos_text": "b"}])
    with pytest.raises(DataError) as e:
        stream_subset(root, "S", "original")
    msg = str(e.value)
    assert "'S'" in msg and "qry_image_path" in msg and "neg_text" in msg


# ---------------------------------------------------------------- hard negatives
def test_parse_str_list():
    assert parse_str_list("['a', 'b\\n<|image_1|>']") == ["a", "b\n<|image_1|>"]
    assert parse_str_list('["x", None]') == ["x", ""]
    assert parse_str_list("") == [] and parse_str_list(None) == [] and parse_str_list(["q"]) == ["q"]
    for bad in ["__import__('os').system('echo hi')", "{'a': 1}", "[1, 2]", "'just a string'", "[", "a, b"]:
        with pytest.raises(DataError):
            parse_str_list(bad, "neg_text")


def _hardneg_rows(tmp_path):
    img = save_png(tmp_path / "train", "images/H/q0.png")
    base = train_row("q0", img, "pos0", "")
    rows = [
        dict(base, neg_text="['', 'n1', 'n2', 'n3']", neg_image_path="['', '', '', '']"),  # empty first entry
        dict(train_row("q1", "", "pos1", ""), neg_text="['m1']", neg_image_path="[]"),
        dict(train_row("q2", "", f"{PH}", "images/H/p2.png"), neg_text=f"['{PH}', '{PH}']",
             neg_image_path="['images/H/a.png', 'images/H/b.png']"),
        dict(train_row("q1", "", "pos1", ""), neg_text="['duplicate']", neg_image_path="['']"),
    ]
    write_parquet(tmp_path / "hardneg", "H", "original", rows)
    return base


def test_hard_negative_index_joins_by_key(tmp_path):
    base = _hardneg_rows(tmp_path)
    index = HardNegativeIndex.load(tmp_path / "hardneg", "H", "original")
    assert len(index) == 3 and index.duplicates == 1
    negs = index.get(base)
    assert negs == [("", ""), ("n1", ""), ("n2", ""), ("n3", "")]
    # the empty first negative is replaced by the next non-empty one; taken from the front
    assert select_negatives(negs, 1) == [("n1", "")]
    assert select_negatives(negs, 2) == [("n1", ""), ("n2", "")]
    assert index.get(train_row("q1", "", "pos1", "")) == [("m1", "")]  # first row of a duplicate key wins
    assert index.get(train_row("q2", "", PH, "images/H/p2.png")) == [(PH, "images/H/a.png"), (PH, "images/H/b.png")]
    assert index.get(train_row("unknown", "", "pos1", "")) is None


def test_hard_negative_length_mismatch(tmp_path):
    """A malformed entry does not stop the loading: its own row gets the error (the stream's
    on_bad_row decides), the other rows their negatives."""
    rows = [dict(train_row("q", "", "p", ""), neg_text="['a', 'b']", neg_image_path="['x.png']"),
            dict(train_row("q2", "", "p2", ""), neg_text="['c']", neg_image_path="[]")]
    write_parquet(tmp_path / "hn", "H", "original", rows)
    index = HardNegativeIndex.load(tmp_path / "hn", "H", "original")
    assert index.malformed == 1 and index.get(rows[1]) == [("c", "")]
    with pytest.raises(DataError, match="2 entries but neg_image_path has 1"):
        index.get(rows[0])


def test_select_negatives_never_returns_the_positive():
    negs = [("pos", ""), ("", ""), ("a", ""), ("b", "")]
    assert select_negatives(negs, 2, positive=("pos", "")) == [("a", ""), ("b", "")]
    assert select_negatives(negs, 5, positive=("pos", "")) == [("a", ""), ("b", "")]  # fewer: caller decides


def test_in_row_negatives():
    assert in_row_negatives(train_row("q", "", "p", "", "neg", "")) == [("neg", "")]
    assert in_row_negatives(train_row("q", "", "p", "", "", "")) == []
    assert in_row_negatives(train_row("q", "", "p", "", f"{PH}", "n.png")) == [(PH, "n.png")]
    assert in_row_negatives(train_row("q", "", "p", "", "['a', 'b']", "")) == [("a", ""), ("b", "")]
    assert in_row_negatives(train_row("q", "", "p", "", "[sic] text", "")) == [("[sic] text", "")]


# ---------------------------------------------------------------- target instructions
def test_target_instructions():
    table = resolve_target_instructions("default")
    assert table == DEFAULT_TARGET_INSTRUCTIONS and resolve_target_instructions(None) is None
    label = target_instruction_for(table, "ImageNet-1K", False)  # eval spelling of ImageNet_1K
    assert label == "Represent the class label: "
    assert apply_target_instruction("golden retriever", False, label) == "Represent the class label: golden retriever"
    img = target_instruction_for(table, "MSCOCO_t2i", True)
    assert apply_target_instruction(PH, True, img) == f"{PH}\nRepresent the given image."
    # already carrying the instruction (MMEB image documents do): unchanged
    doc = f"{PH}\nRepresent the given image.\n"
    assert apply_target_instruction(doc, True, img) == doc
    # the placeholder stays at the front
    assert apply_target_instruction(f"{PH} page text", True, "Represent it:") == f"{PH}\nRepresent it: page text"
    custom = {"default": {"image": "IMG:", "text": "TXT:"}, "S": "only S:"}
    assert target_instruction_for(custom, "other", True) == "IMG:"
    assert target_instruction_for(custom, "other", False) == "TXT:"
    assert target_instruction_for(custom, "s", False) == "only S:"
    assert target_instruction_for({"X": "x"}, "other", False) is None
    with pytest.raises(DataError):
        resolve_target_instructions(3)
    assert all(s in DEFAULT_TARGET_INSTRUCTIONS for s in ("ImageNet_1K", "ChartQA", "MSCOCO_i2t", "MSCOCO", "WebQA"))


def test_an_instruction_already_there_without_its_final_punctuation_is_not_added_again():
    """MMEB's visual-grounding documents read "<|image_1|>\\nRepresent the given cropped image of the
    object" (no period): the default instruction (with one) is there already. Only the instruction as
    a whole counts: a longer instruction that starts with the same words is not it."""
    crop = target_instruction_for(DEFAULT_TARGET_INSTRUCTIONS, "RefCOCO", True)
    assert crop.endswith(".")
    for doc in (f"{PH}\nRepresent the given cropped image of the object", f"{PH}\nRepresent the given cropped "
                "image of the object.\n", f"{PH}\nRepresent the given cropped image of the object\nred ball"):
        assert apply_target_instruction(doc, True, crop) == doc
    label = "Represent the class label: "
    assert apply_target_instruction("Represent the class label: cat", False, label) == "Represent the class label: cat"
    img = target_instruction_for(DEFAULT_TARGET_INSTRUCTIONS, "MSCOCO_t2i", True)
    longer = f"{PH}\nRepresent the given image with related text information: a page"
    assert apply_target_instruction(longer, True, img) == \
        f"{PH}\nRepresent the given image. Represent the given image with related text information: a page"


# ---------------------------------------------------------------- eval
def _eval_fixture(tmp_path):
    root = tmp_path / "eval"
    for name in ("a.png", "b.png", "c.png"):
        save_png(root, f"images/E/{name}")
    rows = [
        dict(qry_text=f"{PH}\nRepresent the given image for classification.\n", qry_img_path="images/E/a.png",
             tgt_text=["cat", "dog", "bird"], tgt_img_path=["", "", ""]),
        dict(qry_text=f"{PH}\nRepresent the given image for classification.\n", qry_img_path="images/E/b.png",
             tgt_text=["dog", "cat", "bird"], tgt_img_path=["", "", ""]),
        dict(qry_text="Find me an everyday image that matches the given caption: a cat.", qry_img_path="",
             tgt_text=[PH, PH], tgt_img_path=["images/E/c.png", "images/E/a.png"]),
    ]
    write_parquet(root, "E", "test", rows)
    write_card(root, ["E"], "test")
    return root


def test_eval_reader_deduplicates_items(tmp_path):
    root = _eval_fixture(tmp_path)
    es = load_eval_subset(root, root, "E")
    assert es.num_queries == 3 and len(es.candidates) == 3
    texts = [es.items[i] for i in es.candidates[1]]
    assert texts == [("dog", ""), ("cat", ""), ("bird", "")]  # positive first
    assert es.candidates[0][:2] == es.candidates[1][1::-1]  # 'cat' and 'dog' are one item each
    # 2 query images + 3 labels + 1 text query + 2 image candidates
    assert len(es.items) == 8 and len(set(es.items)) == 8
    assert es.items[es.candidates[2][1]] == (PH, "images/E/a.png")
    assert es.image_file(es.queries[0]) == str(root / "images/E/a.png")
    assert load_eval_subset(root, root, "E", max_queries=1).num_queries == 1


def test_eval_reader_target_instruction(tmp_path):
    root = _eval_fixture(tmp_path)
    es = load_eval_subset(root, root, "E", target_instruction={"E": "Represent the class label: "})
    assert es.items[es.candidates[0][0]] == ("Represent the class label: cat", "")
    assert es.items[es.queries[2]][0].startswith("Find me")  # queries untouched


def test_eval_reader_errors(tmp_path):
    root = _eval_fixture(tmp_path)
    (root / "images/E/c.png").unlink()
    with pytest.raises(DataError) as e:
        load_eval_subset(root, root, "E")
    assert "'E'" in str(e.value) and "row 2" in str(e.value) and "c.png" in str(e.value)
    with pytest.raises(DataError, match="no subset 'F'"):
        load_eval_subset(root, root, "F")
    bad = tmp_path / "bad"
    write_parquet(bad, "E", "test", [dict(qry_text="q", qry_img_path="", tgt_text=[f"{PH} x"], tgt_img_path=[""])])
    with pytest.raises(DataError, match="row 0 .candidate 0.: text has 1 image placeholder"):
        load_eval_subset(bad, bad, "E")
    train_layout = make_train(tmp_path / "t", {"E": 1})  # train columns, not eval ones
    with pytest.raises(DataError, match="missing column"):
        load_eval_subset(train_layout, None, "E", split="original")
