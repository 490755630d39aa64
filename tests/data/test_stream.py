"""TrainStream: example format, exact sharding, mixing, negatives, bad-row policies."""

from collections import Counter

import pytest
from mmeb_layouts import PH, make_train, save_png, train_row, write_card, write_parquet
from torch.utils.data import DataLoader

from rematch_pl.data.mmeb import DataError
from rematch_pl.data.stream import TrainStream


def ids(batches):
    return [ex["row_id"] for b in batches for ex in b]


@pytest.fixture
def three_subsets(tmp_path):
    return make_train(tmp_path / "train", {"A": 13, "B": 7, "C": 5}, shards=2)


def stream(root, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_hardneg", 1)
    return TrainStream(str(root), **kw)


# ---------------------------------------------------------------- examples
def test_example_format(three_subsets):
    batches = list(stream(three_subsets, subsets=["A"]).one_pass())
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    ex = {e["row_id"]: e for b in batches for e in b}
    img_qry, txt_qry = ex["A:0"], ex["A:1"]
    assert set(img_qry) == {"subset", "row_id", "qry_text", "qry_image", "pos_text", "pos_image", "neg_texts",
                            "neg_images", "pos_key", "neg_keys"}
    assert img_qry["subset"] == "A" and img_qry["qry_image"].mode == "RGB" and img_qry["pos_image"] is None
    assert img_qry["pos_text"] == "label 0" and img_qry["neg_texts"] == ["wrong label 0"]
    assert img_qry["neg_images"] == [None]
    assert txt_qry["qry_image"] is None and txt_qry["pos_image"].size == (40, 40)
    assert txt_qry["neg_texts"] == [f"{PH}\nRepresent the given image.\n"] and txt_qry["neg_images"][0] is not None


def test_document_keys_name_text_and_image_file(three_subsets):
    """A document's key is its text as the model reads it and its image file: two rows with the same
    label text share it, other texts or other files do not (`losses.false_negatives`)."""
    from rematch_pl.data.stream import doc_key

    exs = [e for b in stream(three_subsets, subsets=["A"]).one_pass() for e in b]
    for ex in exs:
        assert isinstance(ex["pos_key"], int) and len(ex["neg_keys"]) == len(ex["neg_texts"])
    text_docs = {ex["pos_text"]: ex["pos_key"] for ex in exs if ex["pos_image"] is None}
    assert len(set(text_docs.values())) == len(text_docs)  # distinct texts, distinct keys
    assert doc_key("label 0", "") == doc_key("label 0", "") != doc_key("label 1", "")
    assert doc_key("<|image_1|>", "/a.jpg") != doc_key("<|image_1|>", "/b.jpg")
    assert doc_key("a", "") != doc_key("", "a")  # text and path kept apart


def test_num_hardneg_zero_gives_no_negatives(three_subsets):
    batches = list(stream(three_subsets, subsets=["B"], num_hardneg=0).one_pass())
    assert all(ex["neg_texts"] == [] and ex["neg_images"] == [] for b in batches for ex in b)


def test_target_instruction_applied_to_documents(three_subsets):
    s = stream(three_subsets, subsets=["A"], target_instruction={"default": {"text": "TXT:", "image": "IMG:"}},
               shuffle_buffer=0)
    ex = {e["row_id"]: e for b in s.one_pass() for e in b}
    assert ex["A:0"]["pos_text"] == "TXT: label 0" and ex["A:0"]["neg_texts"] == ["TXT: wrong label 0"]
    assert ex["A:1"]["pos_text"] == f"{PH}\nIMG: Represent the given image."
    assert ex["A:1"]["qry_text"].startswith("Find me")  # queries untouched


# ---------------------------------------------------------------- sharding and mixing
def test_exact_partition_world2_workers2(three_subsets):
    s = stream(three_subsets, shuffle_buffer=3)
    got = [ids(s.one_pass(rank=r, world_size=2, worker_id=w, num_workers=2)) for r in range(2) for w in range(2)]
    everything = sorted(x for part in got for x in part)
    expected = sorted([f"A:{i}" for i in range(13)] + [f"B:{i}" for i in range(7)] + [f"C:{i}" for i in range(5)])
    assert everything == expected  # each row exactly once
    assert all(len(part) >= 4 for part in got)  # the workers of a rank take its batches in turn
    # rank r keeps global row i with i % 2 == r, whichever worker loads it
    assert all(int(x.split(":")[1]) % 2 == 1 for x in got[2] + got[3])
    # a rank's batches do not depend on its number of workers
    one = [ids([b]) for b in s.one_pass(rank=1, world_size=2, worker_id=0, num_workers=1)]
    two = [[ids([b]) for b in s.one_pass(rank=1, world_size=2, worker_id=w, num_workers=2)] for w in range(2)]
    assert one[0::2] == two[0] and one[1::2] == two[1]


def test_exact_partition_real_dataloader_workers(three_subsets):
    seen = []
    for rank in range(2):
        s = stream(three_subsets, rank=rank, world_size=2, infinite=False)
        loader = DataLoader(s, batch_size=None, num_workers=2, collate_fn=lambda b: [ex["row_id"] for ex in b])
        seen += [x for batch in loader for x in batch]
    assert len(seen) == 25 and len(set(seen)) == 25


def test_caps(three_subsets):
    got = ids(stream(three_subsets, caps={"A": 4, "B": 0}).one_pass())
    assert sorted(x for x in got if x.startswith("A")) == ["A:0", "A:1", "A:2", "A:3"]
    assert not any(x.startswith("B") for x in got) and sum(x.startswith("C") for x in got) == 5
    with pytest.raises(ValueError, match="unknown subset"):
        stream(three_subsets, caps={"Z": 3})


def test_seeded_shuffle(three_subsets):
    a = ids(stream(three_subsets, seed=1, shuffle_buffer=8).one_pass())
    b = ids(stream(three_subsets, seed=1, shuffle_buffer=8).one_pass())
    c = ids(stream(three_subsets, seed=2, shuffle_buffer=8).one_pass())
    assert a == b and a != c and sorted(a) == sorted(c)


def test_homogeneous_batches(three_subsets):
    batches = list(stream(three_subsets, homogeneous=True).one_pass())
    assert all(len({ex["subset"] for ex in b}) == 1 for b in batches)
    assert len(ids(batches)) == 25
    mixed = list(stream(three_subsets, homogeneous=False, seed=3).one_pass())
    assert any(len({ex["subset"] for ex in b}) > 1 for b in mixed)


def test_infinite_stream_full_batches_same_subset_sequence_on_all_ranks(three_subsets):
    def first(rank, n=12):
        it = iter(stream(three_subsets, homogeneous=True, rank=rank, world_size=2))
        return [next(it) for _ in range(n)]

    r0, r1 = first(0), first(1)
    assert all(len(b) == 4 for b in r0 + r1)  # beyond one pass (25 rows / 2 ranks), still full
    assert [b[0]["subset"] for b in r0] == [b[0]["subset"] for b in r1]  # global batch = one subset
    assert not set(ids(r0)) & set(ids(r1))  # ranks never share a row in the first pass
    assert len(ids(r0)) > 13


def test_weights_steer_the_mix(three_subsets):
    def share_of_a(weights):
        it = iter(stream(three_subsets, weights=weights, seed=5))
        counts = Counter(ex["subset"] for _ in range(20) for ex in next(it))
        return counts["A"] / sum(counts.values())

    assert share_of_a({"A": 8, "B": 1, "C": 1}) > 0.65
    assert share_of_a({"A": 1, "B": 8, "C": 8}) < 0.2
    default = stream(three_subsets)
    assert default.weights == {"A": 13.0, "B": 7.0, "C": 5.0}  # proportional to rows
    with pytest.raises(ValueError, match="weights"):
        stream(three_subsets, weights={"A": 0, "B": 1, "C": 1})


# ---------------------------------------------------------------- hard negatives
@pytest.fixture
def with_hardneg(tmp_path):
    train = tmp_path / "train"
    rows = [train_row(f"q{i}", "", f"pos{i}", "", f"inrow{i}", "") for i in range(4)]
    write_parquet(train, "H", "original", rows)
    write_card(train, ["H"], "original")
    hn_root = tmp_path / "hn_images"
    save_png(hn_root, "images/H/neg3a.png")
    save_png(hn_root, "images/H/neg3b.png")
    hard = [
        dict(rows[0], neg_text="['', 'n1', 'n2']", neg_image_path="['', '', '']"),
        dict(rows[1], neg_text="['pos1', 'm1', 'm2', 'm3']", neg_image_path="[]"),  # positive as negative: dropped
        dict(rows[3], neg_text=f"['{PH}', '{PH}']", neg_image_path="['images/H/neg3a.png', 'images/H/neg3b.png']"),
    ]  # row 2 has no entry: its in-row negative is used
    write_parquet(tmp_path / "hardneg", "H", "original", hard[::-1])
    return train, tmp_path / "hardneg", hn_root


def test_hard_negatives_from_source(with_hardneg):
    train, hardneg, hn_root = with_hardneg
    s = stream(train, hardneg_path=str(hardneg), hardneg_image_root=str(hn_root), num_hardneg=2, on_bad_row="skip")
    ex = {e["row_id"]: e for b in s.one_pass() for e in b}
    assert ex["H:0"]["neg_texts"] == ["n1", "n2"]  # empty first entry replaced by the next
    assert ex["H:1"]["neg_texts"] == ["m1", "m2"]
    assert ex["H:3"]["neg_texts"] == [PH, PH] and all(im is not None for im in ex["H:3"]["neg_images"])
    assert "H:2" not in ex and s.bad_rows == {"H": {"missing negatives": 1}}  # in-row gives only 1 of 2
    one = stream(train, hardneg_path=str(hardneg), hardneg_image_root=str(hn_root), num_hardneg=1)
    ex = {e["row_id"]: e for b in one.one_pass() for e in b}
    assert ex["H:2"]["neg_texts"] == ["inrow2"] and ex["H:0"]["neg_texts"] == ["n1"]


def test_without_hardneg_source_in_row_negatives(with_hardneg):
    train, _, _ = with_hardneg
    ex = {e["row_id"]: e for b in stream(train).one_pass() for e in b}
    assert [ex[f"H:{i}"]["neg_texts"] for i in range(4)] == [[f"inrow{i}"] for i in range(4)]


# ---------------------------------------------------------------- bad rows
def _bad_dataset(tmp_path, kind):
    """Subset 'S' of 5 good rows, row 3 bad in the given way. Returns (root, file expected in the message)."""
    root = tmp_path / "train"
    img = save_png(root, "images/S/ok.png")
    rows = [train_row(f"{PH} query {i}", img, f"pos {i}", "", f"neg {i}", "") for i in range(5)]
    file = "original-00000-of-00001.parquet"
    if kind == "missing image":
        rows[3]["qry_image_path"], file = "images/S/gone.png", "images/S/gone.png"
    elif kind == "unreadable image":
        (root / "images/S/broken.png").write_bytes(b"\x89PNG garbage")
        rows[3]["pos_text"], rows[3]["pos_image_path"], file = PH, "images/S/broken.png", "images/S/broken.png"
    elif kind == "empty query":
        rows[3]["qry"], rows[3]["qry_image_path"] = "  ", ""
    elif kind == "empty document":
        rows[3]["pos_text"] = ""
    elif kind == "placeholder mismatch":
        rows[3]["qry_image_path"] = ""  # text keeps its <|image_1|>
    elif kind == "missing negatives":
        rows[3]["neg_text"] = ""
    elif kind == "bad negative list":
        rows[3]["neg_text"], rows[3]["neg_image_path"] = "['a']", "['x.png', "
    write_parquet(root, "S", "original", rows)
    return root, file


BAD_KINDS = ["missing image", "unreadable image", "empty query", "empty document", "placeholder mismatch",
             "missing negatives", "bad negative list"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_raise_names_subset_row_and_file(tmp_path, kind):
    root, file = _bad_dataset(tmp_path, kind)
    with pytest.raises(DataError) as e:
        list(stream(root, on_bad_row="raise").one_pass())
    msg = str(e.value)
    assert "'S'" in msg and "row 3" in msg and kind in msg and file in msg, msg
    assert "on_bad_row='skip'" in msg


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_skip_counts(tmp_path, kind, caplog):
    root, _ = _bad_dataset(tmp_path, kind)
    s = stream(root, on_bad_row="skip", batch_size=2)
    batches = list(s.one_pass())
    if kind == "unreadable image":  # found when its batch loads: a spare row of S takes its place
        assert len(ids(batches)) == 5 and set(ids(batches)) == {"S:0", "S:1", "S:2", "S:4"}
        assert all(len(set(ids([b]))) == len(b) for b in batches)  # never twice in one batch
    else:
        assert sorted(ids(batches)) == ["S:0", "S:1", "S:2", "S:4"]
    assert s.bad_rows == {"S": {kind: 1}}
    attached = [r for b in batches for r in b.bad_rows]
    assert attached == [("S", 3, kind)]  # reaches the main process with the batches
    assert any("row 3" in r.getMessage() and kind in r.getMessage() for r in caplog.records)


def test_bad_row_counted_once_over_passes(tmp_path):
    root, _ = _bad_dataset(tmp_path, "missing image")
    s = stream(root, on_bad_row="skip", batch_size=3)
    it = iter(s)  # infinite: 4 good rows per pass, 8 batches = 6 passes
    seen = [next(it) for _ in range(8)]
    assert all(len(b) == 3 for b in seen) and s.bad_rows == {"S": {"missing image": 1}}
    assert [r for b in seen for r in b.bad_rows] == [("S", 3, "missing image")]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_missing_subset_and_column_raise_under_both_policies(tmp_path, policy):
    root = make_train(tmp_path / "train", {"S": 2})
    with pytest.raises(DataError, match="no subset 'Nope'"):
        stream(root, subsets=["S", "Nope"], on_bad_row=policy)
    write_parquet(root, "Cols", "original", [{"qry": "q", "pos_text": "p"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['qry_image_path'"):
        list(stream(root, subsets=["Cols"], on_bad_row=policy).one_pass())


def test_argument_validation(three_subsets):
    with pytest.raises(ValueError, match="on_bad_row"):
        stream(three_subsets, on_bad_row="ignore")
    with pytest.raises(ValueError, match="num_hardneg"):
        stream(three_subsets, num_hardneg=-1)
    with pytest.raises(ValueError, match="rank"):
        stream(three_subsets, rank=2, world_size=2)


# ---------------------------------------------------------------- found in review
def test_a_negative_that_reads_as_the_positive_is_passed_over(tmp_path):
    """The positive and a negative are compared as the model reads them (normalised text, target
    instruction, full image path; whitespace around the text aside): '' and '<|image_1|>' on the
    same image, 'Yes' and 'Yes ' are the same document; the next negative is taken, or the row is bad."""
    root = tmp_path / "train"
    img = save_png(root, "images/a.png")
    rows = [train_row("is it red?", "", "Yes", "", "['Yes ', 'No']", "[]"),
            train_row("a red square", "", "", img, f"['{PH}', '{PH}']", f"['{img}', '{save_png(root, 'images/b.png')}']"),
            train_row("only itself", "", "", img, PH, img)]
    write_parquet(root, "S", "original", rows)
    for instruction in (None, "default"):
        s = stream(root, target_instruction=instruction, on_bad_row="skip", shuffle_buffer=0)
        ex = {e["row_id"]: e for b in s.one_pass() for e in b}
        assert ex["S:0"]["neg_texts"][0].endswith("No") and ex["S:0"]["neg_keys"][0] != ex["S:0"]["pos_key"]
        assert ex["S:1"]["neg_images"][0].size == (40, 40) and ex["S:1"]["neg_keys"][0] != ex["S:1"]["pos_key"]
        assert "S:2" not in ex and s.bad_rows == {"S": {"missing negatives": 1}}


def test_a_malformed_hard_negative_row_is_a_bad_row_under_skip(tmp_path):
    root = tmp_path / "train"
    rows = [train_row(f"q{i}", "", f"pos{i}", "", f"inrow{i}", "") for i in range(4)]
    write_parquet(root, "H", "original", rows)
    hard = [dict(rows[0], neg_text="['n0']", neg_image_path="[]"),
            dict(rows[1], neg_text="['a', 'b']", neg_image_path="['x.png']"),  # lengths differ
            dict(rows[2], neg_text="not a list", neg_image_path="[]")]
    write_parquet(tmp_path / "hardneg", "H", "original", hard)
    s = stream(root, hardneg_path=str(tmp_path / "hardneg"), on_bad_row="skip")
    ex = {e["row_id"]: e for b in s.one_pass() for e in b}
    assert sorted(ex) == ["H:0", "H:3"] and ex["H:0"]["neg_texts"] == ["n0"] and ex["H:3"]["neg_texts"] == ["inrow3"]
    assert s.bad_rows == {"H": {"bad negative list": 2}}
    with pytest.raises(DataError, match="row [12]: bad negative list"):
        list(stream(root, hardneg_path=str(tmp_path / "hardneg")).one_pass())


@pytest.mark.parametrize("homogeneous", [True, False])
def test_no_batch_holds_a_row_twice_across_passes(tmp_path, homogeneous):
    """Small subsets: batches straddle passes all the time, yet never repeat a row; every pass
    still gives each row once (the rows passed over wait for the next batch)."""
    root = make_train(tmp_path / "train", {"A": 7, "B": 5})
    it = iter(stream(root, batch_size=4, homogeneous=homogeneous, seed=1, shuffle_buffer=4))
    batches = [[e["row_id"] for e in next(it)] for _ in range(40)]
    assert all(len(b) == 4 and len(set(b)) == 4 for b in batches)
    for subset, n in (("A", 7), ("B", 5)):
        seq = [r for b in batches for r in b if r.startswith(subset)]
        full = len(seq) // n
        for p in range(full - 1):  # the rows of a subset cover it once per n drawn (up to the waiting rows)
            assert len(set(seq[p * n:(p + 2) * n])) == n


def test_a_subset_smaller_than_a_batch_repeats_with_a_warning(tmp_path, caplog):
    root = make_train(tmp_path / "train", {"A": 3})
    it = iter(stream(root, batch_size=4, homogeneous=True))
    b = [e["row_id"] for e in next(it)] + [e["row_id"] for e in next(it)]
    assert len(b) == 8 and set(b) == {"A:0", "A:1", "A:2"}
    assert any("fewer than a batch needs" in r.getMessage() for r in caplog.records)


def test_workers_take_turns_in_one_subset_sequence(three_subsets):
    """The DataLoader's batches follow one draw sequence whatever the number of workers (each
    worker used to draw the same sequence, so each subset came num_workers times in a row)."""
    def sequence(workers):
        s = stream(three_subsets, homogeneous=True, seed=4)
        loader = DataLoader(s, batch_size=None, num_workers=workers, collate_fn=lambda b: [e["row_id"] for e in b])
        it = iter(loader)
        return [next(it) for _ in range(12)]

    assert sequence(0) == sequence(3)


def _with_broken_image(tmp_path):
    root = make_train(tmp_path / "train", {"A": 9, "B": 6})
    (root / "images/A/q4.png").write_bytes(b"\x89PNG truncated")  # row A:4's query image
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_past_an_undecodable_image(tmp_path, workers):
    """Skipping n batches (resume) lays them out without decoding; a row whose image does not
    decode is replaced by a spare in its batch, so the resumed stream equals the uninterrupted
    one from batch n on, with any number of workers."""
    root = _with_broken_image(tmp_path)
    ref_it = iter(stream(root, on_bad_row="skip", batch_size=4, seed=2))
    ref = [[e["row_id"] for e in next(ref_it)] for _ in range(14)]
    assert not any("A:4" in b for b in ref) and all(len(set(b)) == 4 for b in ref)
    s = stream(root, on_bad_row="skip", batch_size=4, seed=2)
    s.skip_batches = 5
    loader = DataLoader(s, batch_size=None, num_workers=workers, collate_fn=lambda b: [e["row_id"] for e in b])
    it = iter(loader)
    assert [next(it) for _ in range(9)] == ref[5:]


def _many_bad_rows(tmp_path):
    """Subset 'S' of 24 rows: rows 2 and 13 miss their image, 5 and 17 have no query, 9's image does not decode."""
    root = tmp_path / "train"
    img = save_png(root, "images/S/ok.png")
    (root / "images/S/broken.png").write_bytes(b"\x89PNG garbage")
    rows = [train_row(f"{PH} query {i}", img, f"pos {i}", "", f"neg {i}", "") for i in range(24)]
    for i in (2, 13):
        rows[i]["qry_image_path"] = f"images/S/gone{i}.png"
    for i in (5, 17):
        rows[i]["qry"], rows[i]["qry_image_path"] = " ", ""
    rows[9]["qry_image_path"] = "images/S/broken.png"
    write_parquet(root, "S", "original", rows)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_rows_reported_with_the_batch_that_met_them(tmp_path, workers):
    """A bad row is reported once, with the batch whose layout or loading met it, whatever the
    number of workers; a resumed stream reports exactly the rows of the batches it yields, so the
    checkpoint's counts plus the resumed ones equal the uninterrupted run's."""
    root = _many_bad_rows(tmp_path)
    ref_it = iter(stream(root, on_bad_row="skip", batch_size=4, seed=3))
    ref = [sorted(next(ref_it).bad_rows) for _ in range(12)]  # 12 batches = 2+ passes of 19 good rows
    flat = [r for b in ref for r in b]
    assert sorted(set(flat)) == [("S", 2, "missing image"), ("S", 5, "empty query"), ("S", 9, "unreadable image"),
                                 ("S", 13, "missing image"), ("S", 17, "empty query")]
    # found while laying out: once over the passes; an undecodable image: whenever a batch loads it
    assert flat.count(("S", 9, "unreadable image")) >= 2 and all(flat.count(r) == 1 for r in flat if r[1] != 9)

    def run(skip):
        s = stream(root, on_bad_row="skip", batch_size=4, seed=3)
        s.skip_batches = skip
        loader = DataLoader(s, batch_size=None, num_workers=workers, collate_fn=lambda b: sorted(b.bad_rows))
        it = iter(loader)
        return [next(it) for _ in range(12 - skip)]

    assert run(0) == ref
    first_report = next(j for j, b in enumerate(ref) if b)
    assert run(first_report + 1) == ref[first_report + 1:]  # the reports of the skipped batches are the checkpoint's
