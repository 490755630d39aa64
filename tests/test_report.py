"""`rematch_pl.report`: paper-style tables (delta to the baseline, meta-tasks, Tables 4-6 layouts) and plots,
from local run directories (no training here: the run files are written by hand in the formats of train.py)."""

import json
from pathlib import Path

import pytest

from rematch_pl import report

SUBSETS = ["Syn_CLS", "Syn_VQA", "Syn_T2I", "Syn_I2T", "Syn_VG"]


def make_run(root: Path, job: int, name: str, scores: dict[str, float], config: dict | None = None,
             status: str = "ok", steps: int = 3) -> Path:
    """A run directory as a sweep job leaves it: summary.json, history.jsonl, job_status.json."""
    d = root / f"{job}_{name}"
    d.mkdir(parents=True)
    cfg = {"experiment_name": name, "fusion": {"k": 16, "orthogonality": True, "name": "mef"},
           "matching": {"views": "all"}, "loss": {"w_orth": 0.5, "w_qdm": 0.1}, "paths": {"output_root": str(root)}}
    for key, value in (config or {}).items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    st = {"job": job, "name": name, "status": status, "run_dir": str(d)}
    if status == "ok":
        val = {f"val/hit@1/{s}": v for s, v in scores.items()}
        val.update({f"val/chance@1/{s}": 0.1 for s in scores})
        val["val/hit@1"] = sum(scores.values()) / len(scores)
        val["val/chance@1"] = 0.1
        (d / "summary.json").write_text(json.dumps({"run_name": name, "run_dir": str(d), "steps": steps, "val": val,
                                                    "last_loss": {"loss": 1.0}, "wall_time_s": 1.0, "config": cfg}))
        rows = [{"step": i, "train/loss": 3.0 - i, "train/loss_cl": 2.0 - i, "train/loss_orth": 0.5,
                 "train/loss_qdm": 0.7} for i in range(steps)]
        (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        st["error"] = "RuntimeError: boom"
    (d / "job_status.json").write_text(json.dumps(st))
    return d


def uniform(x: float) -> dict[str, float]:
    return {s: x for s in SUBSETS}


@pytest.fixture
def table3(tmp_path):
    make_run(tmp_path, 0, "t3_0_baseline", uniform(0.50), {"fusion.k": 0, "matching.views": "none"})
    make_run(tmp_path, 1, "t3_3_hard_negative", {"Syn_CLS": 0.6, "Syn_VQA": 0.5, "Syn_T2I": 0.7, "Syn_I2T": 0.5,
                                                 "Syn_VG": 0.7}, {"fusion.k": 0, "matching.views": "none"})
    make_run(tmp_path, 2, "t3_7_rematch", uniform(0.40))
    make_run(tmp_path, 3, "t3_9_broken", {}, status="failed")
    return tmp_path


def test_meta_tasks_of_mmeb_and_synthetic_subsets():
    assert [report.meta_task(s) for s in ("ImageNet-1K", "ImageNet_1K", "OK-VQA", "MSCOCO_t2i", "MSCOCO",
                                          "Visual7W-Pointing", "Syn_I2T", "Syn_VG", "Syn_VQA")] == \
        ["CLS", "CLS", "QA", "RET", "VG", "VG", "RET", "VG", "QA"]
    assert report.meta_task("something else") == "other"


def test_table_has_every_run_deltas_to_the_baseline_and_meta_task_means(table3):
    runs = report.load_local_runs(table3)
    assert [r.name for r in runs] == ["t3_0_baseline", "t3_3_hard_negative", "t3_7_rematch", "t3_9_broken"]
    rows = report.ablation_rows(runs)
    assert rows[0]["baseline"] and rows[0]["delta"] is None
    assert rows[1]["delta"] == pytest.approx(0.6 - 0.5) and rows[2]["delta"] == pytest.approx(-0.1)
    assert rows[1]["meta"]["RET"] == pytest.approx(0.6)  # mean of T2I and I2T
    assert rows[3]["status"] == "failed"
    md = report.markdown_table(rows)
    lines = md.splitlines()
    assert lines[0] == "| Exp | Configuration | Overall | Δ | CLS | QA | RET | VG | chance |"
    assert "| 0 | t3_0_baseline (baseline) | 50.0 |  | 50.0 | 50.0 | 50.0 | 50.0 | 10.0 |" in lines
    assert "| 1 | t3_3_hard_negative | 60.0 | +10.0 ↑ | 60.0 | 50.0 | 60.0 | 70.0 | 10.0 |" in lines
    assert "| 2 | t3_7_rematch | 40.0 | -10.0 ↓ | 40.0 | 40.0 | 40.0 | 40.0 | 10.0 |" in lines
    assert any(line.startswith("| 3 | t3_9_broken | failed") for line in lines)


def test_baseline_choice_and_delta_to_the_previous_row(table3):
    runs = report.load_local_runs(table3)
    rows = report.ablation_rows(runs, baseline="t3_7")
    assert rows[2]["baseline"] and rows[0]["delta"] == pytest.approx(0.1)
    prev = report.ablation_rows(runs, delta="previous")
    assert prev[1]["delta"] == pytest.approx(0.1) and prev[2]["delta"] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="matches 3"):
        report.ablation_rows(runs, baseline="t3_")


def test_table6_layout_k_by_fusion_method_and_plots(tmp_path):
    make_run(tmp_path, 0, "t6_eos", uniform(0.30), {"fusion.k": 0, "fusion.orthogonality": False})
    for j, (k, orth, x) in enumerate([(4, False, 0.4), (16, False, 0.45), (4, True, 0.5), (16, True, 0.6)]):
        make_run(tmp_path, j + 1, f"t6_k{k}_{'or' if orth else 'avg'}", uniform(x),
                 {"fusion.k": k, "fusion.orthogonality": orth})
    runs = report.load_local_runs(tmp_path)
    assert report.varying_keys(runs) == ["fusion.k", "fusion.orthogonality"]
    table = report.k_table(runs).splitlines()
    assert table[0] == "| MT fuse method \\ K | [EOS] | 4 | 16 |"
    assert table[2:] == ["| w/o MT ([EOS]) | 30.0 |  |  |", "| Avg |  | 40.0 | 45.0 |", "| Avg + OR |  | 50.0 | 60.0 |"]
    out = report.write_report(tmp_path, tmp_path / "rep")
    text = out.read_text()
    assert "Number of tokens K and fusion method (Table 6)" in text and "Matching views" not in text
    for png in ("overall.png", "metric_vs_k.png", "loss_curves.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000, png
    assert not (tmp_path / "rep" / "views.png").exists()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["baseline"] == "t6_eos" and len(data["rows"]) == 5 and "metric_vs_k.png" in data["plots"]


def test_table5_views_and_table4_wqdm(tmp_path):
    for j, (v, x) in enumerate([("all", 0.6), ("feat_feat", 0.5), ("raw_raw", 0.55)]):
        make_run(tmp_path / "t5", j, f"t5_views_{v}", uniform(x), {"matching.views": v})
    runs = report.load_local_runs(tmp_path / "t5")
    t5 = report.axis_table(runs, "matching.views", labels=report.VIEW_LABELS, title="Matching View",
                           baseline=runs[0]).splitlines()
    assert t5[2:] == ["| Raw/Feat ↔ Raw/Feat | 60.0 | +0.0 = |", "| Feat ↔ Feat | 50.0 | -10.0 ↓ |",
                      "| Raw ↔ Raw | 55.0 | -5.0 ↓ |"]
    report.write_report(tmp_path / "t5")
    assert (tmp_path / "t5" / "report" / "views.png").exists()
    for j, (w, x) in enumerate([(0.1, 0.5), (0.8, 0.4)]):
        make_run(tmp_path / "t4", j, f"t4_wqdm_{w}", uniform(x), {"loss.w_qdm": w})
    text = report.write_report(tmp_path / "t4").read_text()
    assert "Matching-loss weight (Table 4)" in text and "| 0.8 | 40.0 | -10.0 ↓ |" in text
    assert (tmp_path / "t4" / "report" / "metric_vs_wqdm.png").exists()


def test_cli_writes_report_and_lists_failed_jobs(table3, capsys):
    assert report.main([str(table3), "--out", str(table3 / "out")]) == 0
    printed = capsys.readouterr().out
    assert "t3_3_hard_negative" in printed and "Failed or incomplete runs" in printed
    assert "- 3 `t3_9_broken`: failed: RuntimeError: boom" in printed
    assert (table3 / "out" / "report.md").exists() and (table3 / "out" / "loss_curves.png").exists()
    assert report.main([str(table3 / "nope")]) == 2


def test_equal_run_names_are_told_apart(tmp_path):
    make_run(tmp_path / "a", 0, "rematch", uniform(0.1))
    make_run(tmp_path / "b", 0, "rematch", uniform(0.2))
    names = [r.name for r in report.load_local_runs(tmp_path)]
    assert len(set(names)) == 2 and all(n.startswith("rematch (") for n in names)


class _FakeRun:
    def __init__(self, i, name, hit, k, state="finished"):
        self.id, self.name, self.state, self.created_at = f"id{i}", name, state, f"2026-01-0{i + 1}"
        self.summary = {"val/hit@1": hit, "val/hit@1/Syn_CLS": hit, "val/chance@1": 0.1, "train/loss": 1.5,
                        "trainer/global_step": 9, "_runtime": 12.0, "note": "text"}
        self.config = {"fusion": {"k": k, "orthogonality": True}, "loss": {"w_orth": 0.5}, "_wandb": {"x": 1}}

    def scan_history(self):
        return [{"_step": i, "trainer/global_step": i, "train/loss": 2.0 - 0.1 * i} for i in range(10)]


class _FakeApi:
    def __init__(self):
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [_FakeRun(1, "t6_k16_or", 0.6, 16), _FakeRun(0, "t6_k4_or", 0.5, 4), _FakeRun(2, "t6_k8_or", 0.0, 8, "crashed")]


def test_wandb_runs_become_the_same_records(tmp_path):
    api = _FakeApi()
    runs = report.load_wandb_runs("me/rematch_pl", group="g1", api=api)
    assert api.calls == [("me/rematch_pl", {"group": "g1"})]
    assert [(r.name, r.status, r.job) for r in runs] == [("t6_k4_or", "ok", 0), ("t6_k16_or", "ok", 1),
                                                        ("t6_k8_or", "crashed", 2)]
    assert runs[0].val["val/hit@1"] == 0.5 and runs[0].steps == 10 and runs[0].get("fusion.k") == 4
    assert len(runs[0].history()) == 10 and "_wandb" not in runs[0].config
    out = report.write_report("me/rematch_pl", tmp_path / "wb", runs=runs)
    assert (tmp_path / "wb" / "loss_curves.png").exists() and (tmp_path / "wb" / "metric_vs_k.png").exists()
    text = out.read_text()
    assert "| 1 | t6_k16_or | 60.0 | +10.0 ↑ |" in text and "t6_k8_or`: crashed" in text
    assert report.is_wandb_path("me/rematch_pl") and report.is_wandb_path("wandb:me/p")
    assert not report.is_wandb_path(str(tmp_path))


def test_history_of_a_resumed_run_holds_each_step_once(tmp_path):
    """Rows a resumed launch logs again (the steps after the killed launch's last checkpoint) replace
    the earlier ones in place; a step's train and val rows (other metric names) both stay."""
    import json

    rows = [{"step": 0, "train/loss": 3.0}, {"step": 1, "train/loss": 2.5}, {"step": 1, "val/hit@1": 0.2},
            {"step": 2, "train/loss": 2.25},  # killed here; the checkpoint holds step 1
            {"step": 1, "val/hit@1": 0.2}, {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 1.5}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = report.read_history(tmp_path)
    assert got == [{"step": 0, "train/loss": 3.0}, {"step": 1, "train/loss": 2.5}, {"step": 1, "val/hit@1": 0.2},
                   {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 1.5}]
    from rematch_pl.history import read_history

    assert read_history(tmp_path) == got  # one reader for the logger side too
