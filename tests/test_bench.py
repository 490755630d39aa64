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


def test_flops_suite_prices_the_real_token_layout(tmp_path):
    """2B-shaped FLOPs per step (no device): the matching pass and the K tokens add work in the
    expected order, and the token counts are those of the 448 px layout (256 image tokens per image)."""
    res = main(["--suite", "flops", "--batch", "2", "--chunk", "0", "--out", str(tmp_path / "f.json")])
    r = res["runs"]
    assert r["rematch"]["tflop"] > r["rematch_feat_feat"]["tflop"] > r["rematch_no_matching"]["tflop"] \
        > r["baseline"]["tflop"] > 0
    assert r["baseline"]["match_tokens"] == r["rematch_no_matching"]["match_tokens"] == 0
    assert r["rematch"]["match_tokens"] > r["rematch_feat_feat"]["match_tokens"] > 0
    # 2 queries + 1 image positive, 256 tokens each at 448 px: the embedding passes hold them
    assert r["baseline"]["embed_tokens"] > 3 * 256
    gc = main(["--suite", "flops", "--batch", "2", "--chunk", "1"])["runs"]
    assert gc["rematch"]["tflop"] > r["rematch"]["tflop"]  # GradCache's extra no-grad forward


def test_profile_and_vision_suites_run_on_cpu(tmp_path):
    res = main(["--suite", "profile", "--batch", "2", "--out", str(tmp_path / "p.json")])
    runs = res["runs"]
    assert set(runs["rematch"]["phase_s"]) == {"vision", "embed", "matching"}
    assert "matching" not in runs["baseline"]["phase_s"]
    assert all(r["aten_ops"] > 0 and r["top"] for r in runs.values())
    assert runs["rematch"]["aten_ops"] > runs["rematch_no_matching"]["aten_ops"]
    res = main(["--suite", "vision", "--batch", "3", "--iters", "1"])
    assert res["grouped_s"] > 0 and res["per_image_s"] > 0
