"""build_once: a generated folder is made once, atomically, and reused only when made the same way."""

import pytest

from rematch_pl.folders import build_once


def test_build_once_builds_reuses_and_refuses(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "data.txt").write_text("x")

    out = build_once(tmp_path / "f", "done.json", {"v": 1}, build)
    assert (out / "data.txt").read_text() == "x" and len(calls) == 1
    assert build_once(tmp_path / "f", "done.json", {"v": 1}, build) == out and len(calls) == 1  # reused
    with pytest.raises(KeyError, match="made with"):
        build_once(tmp_path / "f", "done.json", {"v": 2}, build, error=KeyError)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "stray").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        build_once(tmp_path / "g", "done.json", {"v": 1}, build)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    def broken(d):
        (d / "half").write_text("")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "f", "done.json", {}, broken)
    assert list(tmp_path.iterdir()) == []
    assert (build_once(tmp_path / "f", "done.json", {}, lambda d: None) / "done.json").exists()  # retried cleanly
