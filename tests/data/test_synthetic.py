"""The synthetic dataset: exact layouts, read back through the real readers, real hard negatives."""

import json
import time

import pyarrow.parquet as pq
import pytest

from rematch_pl.data.mmeb import (
    EVAL_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    HardNegativeIndex,
    iter_rows,
    list_subsets,
    load_eval_subset,
    stream_subset,
)
from rematch_pl.data.stream import TrainStream
from rematch_pl.data.synthetic import SUBSETS, generate_synthetic


def test_layout_and_counts(synthetic_dir):
    train, hardneg, evald = synthetic_dir / "train", synthetic_dir / "hardneg", synthetic_dir / "eval"
    assert list_subsets(train) == list(SUBSETS) == list_subsets(evald)
    assert (train / "README.md").read_text().startswith("---\nconfigs:\n- config_name: Syn_CLS")
    for subset in SUBSETS:
        file = train / subset / "original-00000-of-00001.parquet"
        assert pq.read_schema(file).names == list(TRAIN_COLUMNS)
        assert pq.read_schema(evald / subset / "test-00000-of-00001.parquet").names == list(EVAL_COLUMNS)
        rows = list(iter_rows(stream_subset(train, subset, "original")))
        assert len(rows) == 40
        index = HardNegativeIndex.load(hardneg, subset, "original")
        assert len(index) == 40
        for row in rows:
            for col in ("qry_image_path", "pos_image_path", "neg_image_path"):
                assert row[col] == "" or ((train / row[col]).is_file() and row[col].startswith(f"images/{subset}/"))
            assert ("<|image_1|>" in row["qry"]) == bool(row["qry_image_path"])
            assert ("<|image_1|>" in row["pos_text"]) == bool(row["pos_image_path"])
            negs = index.get(row)  # every training row joins its hard negatives
            real = [n for n in negs if n != ("", "")]
            assert 1 <= len(real) <= 3 and (row["neg_text"], row["neg_image_path"]) == real[0]
            assert (row["pos_text"], row["pos_image_path"]) not in real  # never the positive
            assert all((train / p).is_file() for _, p in real if p)
        es = load_eval_subset(evald, evald, subset)  # checks that every image file exists
        assert es.num_queries == 10
        expected = {"Syn_CLS": 12, "Syn_VQA": 8}.get(subset, 8)
        assert all(len(c) == expected and len(set(c)) == expected for c in es.candidates)


def test_hard_negatives_are_hard(synthetic_dir):
    rows = {s: list(iter_rows(stream_subset(synthetic_dir / "train", s, "original"))) for s in SUBSETS}
    for row in rows["Syn_CLS"]:  # same shape or same colour as the label
        (c, s), (nc, ns) = row["pos_text"].split(), row["neg_text"].split()
        assert (c == nc) != (s == ns)
    for row in rows["Syn_I2T"]:  # one edit: count (and plural), colour, or shape
        a, b = row["pos_text"].split(), row["neg_text"].split()
        assert a != b and (a[1] == b[1] or a[0] == b[0])
    counts = [r for r in rows["Syn_VQA"] if "How many" in r["qry"]]
    assert counts and all(r["neg_text"] in {"one", "two", "three"} for r in counts)
    assert all(r["neg_image_path"].endswith("_crop.png") or r["neg_image_path"].endswith("_neg.png")
               for r in rows["Syn_VG"])


def test_classification_candidates_are_all_labels(synthetic_dir):
    es = load_eval_subset(synthetic_dir / "eval", synthetic_dir / "eval", "Syn_CLS")
    labels = {es.items[i][0] for i in es.candidates[0]}
    assert len(labels) == 12 and all(len(t.split()) == 2 for t in labels)


def test_reads_through_the_stream(synthetic_dir):
    s = TrainStream(str(synthetic_dir / "train"), hardneg_path=str(synthetic_dir / "hardneg"),
                    hardneg_image_root=str(synthetic_dir / "train"), num_hardneg=1, batch_size=16,
                    target_instruction="default")
    examples = [ex for b in s.one_pass() for ex in b]
    assert len(examples) == 5 * 40 and s.bad_rows == {}
    cls = next(ex for ex in examples if ex["subset"] == "Syn_CLS")
    assert cls["pos_text"].startswith("Represent the class label: ") and cls["qry_image"].size == (64, 64)


def test_deterministic_idempotent_and_guarded(tmp_path, synthetic_dir):
    kw = dict(seed=0, n_train_per_subset=40, n_eval_queries=10, n_candidates=8)
    again = generate_synthetic(tmp_path / "again", **kw)
    for part in ("train/Syn_VQA/original-00000-of-00001.parquet", "hardneg/Syn_T2I/original-00000-of-00001.parquet",
                 "eval/Syn_VG/test-00000-of-00001.parquet", "train/images/Syn_VG/00003_crop.png"):
        assert (again / part).read_bytes() == (synthetic_dir / part).read_bytes()
    stamp = (again / "synthetic.json").stat().st_mtime_ns
    assert generate_synthetic(again, **kw) == again and (again / "synthetic.json").stat().st_mtime_ns == stamp
    assert json.loads((again / "synthetic.json").read_text())["n_train_per_subset"] == 40
    with pytest.raises(DataError, match="made with"):
        generate_synthetic(again, **dict(kw, seed=1))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_synthetic(tmp_path / "busy")


def test_default_size_is_fast(tmp_path):
    t = time.perf_counter()
    out = generate_synthetic(tmp_path / "full")
    assert time.perf_counter() - t < 20
    assert pq.ParquetFile(out / "train/Syn_T2I/original-00000-of-00001.parquet").metadata.num_rows == 400
    assert pq.ParquetFile(out / "eval/Syn_CLS/test-00000-of-00001.parquet").metadata.num_rows == 100
