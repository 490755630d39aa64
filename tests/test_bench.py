"""The benchmark entry points run on CPU and write their figures (the figures themselves are not tested)."""

import json

import pytest

from rematch_pl.bench import largest_batch, main


@pytest.mark.parametrize("capacity", [0, 1, 7, 8, 9, 100, 511, 512, 1000])
def test_largest_batch_search(capacity):
    tried = []

    def fits(B):
        tried.append(B)
        return B <= capacity

    best, capped = largest_batch(fits, start=8, limit=512)
    assert best <= capacity and fits(best) or best == 0
    assert capped == (capacity >= 512)
    if capacity >= 512:
        assert best == 512
    else:  # within 1/8 of the true capacity
        assert capacity - best <= max(1, best // 8)
    assert len(tried) < 25


def test_train_and_max_batch_suites_write_json(tmp_path):
    res = main(["--suite", "train", "--batches", "4", "--chunk", "2", "--iters", "1", "--out", str(tmp_path / "t.json")])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"]))
    got = {(r["variant"], r["gradcache_chunk"]) for r in saved["runs"]}
    assert {("baseline", None), ("rematch", None), ("baseline", 2), ("rematch", 2)} <= got
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in saved["runs"])
    assert any("ratio_to_baseline" in r for r in saved["runs"] if r["variant"] == "rematch")
    res = main(["--suite", "max_batch", "--start", "2", "--limit", "4", "--chunk", "2", "--out", str(tmp_path / "m.json")])
    assert [(r["variant"], r["gradcache_chunk"], r["max_batch"]) for r in res["runs"]] == [
        ("baseline", None, 4), ("baseline", 2, 4), ("rematch", None, 4), ("rematch", 2, 4)]  # CPU: bounded by --limit


def test_gpu_suite_refuses_a_cpu_clearly():
    with pytest.raises(SystemExit, match="CUDA"):
        main(["--suite", "gpu", "--device", "cpu"])
