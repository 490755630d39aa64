"""End to end through the real entry point (`python -m rematch_pl.train`) in a subprocess, on CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rematch_pl.history import read_history
from wandbutil import offline_wandb_runs

ENV = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")


def train(run_dir: Path, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rematch_pl.train", f"hydra.run.dir={run_dir}", *overrides]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=run_dir.parent)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@pytest.mark.slow
def test_main_job_learns_and_writes_summary(tmp_path):
    run = tmp_path / "run"
    res = train(run, "trainer.max_steps=60", "trainer.val_check_interval=60", "trainer.checkpoint_every_n_steps=60",
                "trainer.log_every_n_steps=1",
                "data.eval.max_queries=40", "logger=csv")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60
    val = summary["val"]
    assert val["val/hit@1"] > 2 * val["val/chance@1"], val  # clearly above chance after 60 steps
    for key in ("wall_time_s", "samples_per_s", "peak_memory_gb"):
        assert summary[key] > 0
    assert {"loss", "loss_cl", "loss_orth", "loss_qdm"} <= set(summary["last_loss"])
    hist = [r for r in read_history(run) if "train/loss_cl" in r]
    first = sum(r["train/loss_cl"] for r in hist[:10]) / 10
    last = sum(r["train/loss_cl"] for r in hist[-10:]) / 10
    assert last < 0.85 * first, (first, last)  # per-batch losses are noisy (mixed subsets): 10-step means
    for key in ("train/loss", "train/loss_orth", "train/loss_qdm", "train/acc_qdm", "train/lr", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/host_rss_gb"):
        assert any(key in r for r in hist), key
    assert (run / "adapter" / "rematch_modules.safetensors").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert "val Hit@1" in res.stdout and "chance" in res.stdout


def test_fast_run_with_wandb_offline_logs_nested_config(tmp_path):
    run = tmp_path / "run"
    res = train(run, "debug=fast", "logger=wandb", "train.memory_check.mode=always")
    out = res.stdout + res.stderr
    assert "| LoRA adapters |" in res.stdout and "| total |" in res.stdout  # parameters by ReMatch part
    for noise in ("Epoch 0/-2", "Tip:", "LeafSpec", "anonymous setting"):  # step bar; no library chatter
        assert noise not in out, noise
    planned = [r for r in read_history(run) if "memory/planned_peak_gib" in r]
    summary = json.loads((run / "summary.json").read_text())
    assert planned[0]["memory/planned_peak_gib"] == summary["memory_plan"]["peak_gib"] > 0
    assert any(r.get("perf/host_rss_gb", 0) > 0 for r in read_history(run))  # memory creep is visible
    runs = offline_wandb_runs(run)
    assert len(runs) == 1
    cfg = runs[0]["config"]
    # the resolved config, nested (not "fusion/k" or "fusion.k" flattened keys)
    assert cfg["fusion"]["k"] == 16 and cfg["backbone"]["lora"]["r"] == 32
    params = cfg["parameters"]  # parameter counts by part, next to the config
    assert params["total"] == sum(params[k] for k in ("backbone", "lora", "tokens", "projector", "markers"))
    assert params["trainable"] == params["total"] - params["backbone"] > 0
    assert not any("/" in k or "." in k for k in cfg if not k.startswith("_"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_resumed_run_continues_its_wandb_run_and_logs_each_step_once(tmp_path):
    """resume=auto (a requeued job) continues the first launch's W&B run: one curve per training run."""
    run = tmp_path / "run"
    common = ("debug=fast", "logger=wandb", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=2")
    train(run, *common)
    first = (run / "wandb_run_id").read_text()
    ckpt = run / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    train(run, *common, "trainer.max_steps=6", "resume=auto")
    ids = [r["id"] for r in offline_wandb_runs(run)]
    assert ids == [first, first]  # two launches, one W&B run
    losses = [r["step"] for r in read_history(run) if "train/loss" in r]
    assert losses == sorted(set(losses)) and len(losses) == 6  # steps 0-5, each once
    train(tmp_path / "run2", *common)  # a new training run gets a new W&B run
    assert (tmp_path / "run2" / "wandb_run_id").read_text() != first


def test_host_rss_follows_the_memory_the_process_holds():
    """In a fresh process: in the test process, memory freed by earlier tests can be reused
    (already resident), or released while measuring, so the difference is not the allocation."""
    code = ("import torch\nfrom rematch_pl.module import host_rss_gb\nbefore = host_rss_gb()\n"
            "held = torch.ones(64 * 2**20)  # 256 MiB, written (resident)\nprint(host_rss_gb() - before)")
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) > 0.2


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    res = train(tmp_path / "run", "fusion.k=100", check=False, timeout=120)
    assert res.returncode != 0
    assert "fusion.k" in res.stderr + res.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # two entry-point runs, ~30 s
def test_memory_plan_only_plans_and_an_over_budget_run_stops_before_training(tmp_path):
    res = train(tmp_path / "plan", "train.memory_check.mode=only", timeout=300)
    plan = json.loads((tmp_path / "plan" / "memory_plan.json").read_text())
    assert plan["peak_gib"] > plan["weights_gib"] > 0 and plan["batch"] == 16
    assert "memory plan" in res.stdout and not (tmp_path / "plan" / "checkpoints").exists()
    res = train(tmp_path / "over", "train.memory_check.mode=always", "train.memory_check.budget_gib=0.05",
                "train.memory_check.reserve_gib=0", check=False, timeout=300)
    assert res.returncode != 0 and "MemoryPlanError" in res.stderr + res.stdout
    assert re.search(r"train\.gradcache\.chunk_size=\d+ \(planned", res.stderr + res.stdout)
    assert not (tmp_path / "over" / "checkpoints").exists()


def test_cfg_job_prints_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rematch_pl.train", "--cfg", "job", "fusion.k=8"], env=ENV,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "k: 8" in res.stdout


@pytest.mark.slow
def test_two_process_ddp_trains(tmp_path):
    """strategy=ddp with 2 CPU processes (gloo): runs through the entry point, documents gathered across ranks."""
    run = tmp_path / "run"
    train(run, "debug=fast", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=csv",
          "data.batch_size=4", "train.log_rows=true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    rows = {}
    for rank in (0, 1):
        lines = (run / f"rows_rank{rank}.jsonl").read_text().splitlines()
        rows[rank] = [r for line in lines for r in json.loads(line)["rows"]]
        assert len(rows[rank]) == 4 * 4 and len(set(rows[rank])) == 16
    assert not set(rows[0]) & set(rows[1])  # each rank reads its own rows
    assert 0.0 <= summary["val"]["val/hit@1"] <= 1.0


def _loss_curve(run_dir):
    out = {}
    for r in read_history(run_dir):
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True])
def test_gradcache_training_equals_unchunked(tmp_path, ddp):
    """Through the real entry point: the loss curve (which depends on every update) is the same with
    GradCache in chunks of 2 as without, on one process and on 2-process DDP (gloo)."""
    common = ["debug=fast", "trainer.max_steps=3", "trainer.limit_val_batches=0", "logger=csv", "data.batch_size=4",
              "trainer.log_every_n_steps=1"]
    if ddp:
        common += ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    train(tmp_path / "plain", *common)
    train(tmp_path / "gc", *common, "train.gradcache.chunk_size=2")
    plain, gc = _loss_curve(tmp_path / "plain"), _loss_curve(tmp_path / "gc")
    assert sorted(plain) == sorted(gc) == [0, 1, 2]
    for step in plain:
        assert gc[step] == pytest.approx(plain[step], abs=1e-5), (step, plain, gc)


def test_summary_says_when_no_validation_ran_and_counts_bad_rows(capsys):
    from rematch_pl.train import print_summary

    s = {"run_name": "r", "steps": 3, "val": {}, "last_loss": {"loss": 1.0}, "wall_time_s": 2.0, "train_time_s": 1.0,
         "samples_per_s": 4.0, "peak_memory_gb": 0.5, "run_dir": "/tmp/r",
         "bad_rows": {"A": {"missing image": 2}, "B": {"empty query": 1}}}
    print_summary(s)
    out = capsys.readouterr().out
    assert "nan" not in out and "none (no validation ran" in out and "bad rows       3 left out" in out
    print_summary(dict(s, val={"val/hit@1": 0.5, "val/chance@1": 0.1, "val/hit@5": 0.9, "val/mrr": 0.7}, bad_rows={}))
    out = capsys.readouterr().out
    assert "val Hit@1      0.5000   (chance 0.1000)" in out and "bad rows" not in out
