"""Multiruns (`rematch_pl.sweep`) and the sweep definitions of `sweeps/`.

Fast: every sweep file names only existing config keys / experiment files (each combination is
composed and validated), run names, job isolation rule, the single-run command of a job, the
task wrapper (a failing job is recorded, not raised) and the end-of-sweep summary.
Slow (real entry point, CPU): a 2-job multirun gives 2 offline W&B runs in one group and a
report with both rows; a failing job does not stop the sweep; DDP jobs (2 gloo processes each)
run in their own process without re-launching the sweep.
"""

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from rematch_pl import sweep
from rematch_pl.build import CONF_DIR
from rematch_pl.config import validate
from wandbutil import offline_wandb_runs

REPO = CONF_DIR.parent
SWEEPS = REPO / "sweeps"
EXPERIMENTS = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
# small enough for CPU: 2 steps of 4 triples, validation on 2 queries per subset
SMALL = ["debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4",
         "data.eval.max_queries=2", "trainer.enable_progress_bar=false"]


def _compose(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ============================================================================ sweeps/
def _wandb_args(params: dict) -> list[list[str]]:
    """The `${args_no_hyphens}` argument lists a W&B grid sweep passes, one per run."""
    keys = list(params)
    choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*choices)]


def test_wandb_sweeps_cover_tables_3_to_6_and_call_the_hydra_entry_point():
    files = sorted(SWEEPS.glob("*.yaml"))
    assert {re.match(r"table(\d)", f.name).group(1) for f in files} == {"3", "4", "5", "6"}
    for f in files:
        spec = yaml.safe_load(f.read_text())
        assert spec["method"] in ("grid", "random", "bayes"), f
        assert spec["metric"] == {"name": "val/hit@1", "goal": "maximize"}, f
        cmd = spec["command"]
        assert cmd[cmd.index("-m") + 1] == "rematch_pl.train" and "${args_no_hyphens}" in cmd, f
        assert spec["project"] == _compose([]).logger.project
        for name, p in spec["parameters"].items():
            assert ("value" in p) != ("values" in p), (f, name)


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_wandb_sweep_run_composes_and_validates(path):
    spec = yaml.safe_load(path.read_text())
    runs = _wandb_args(spec["parameters"])
    assert runs
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for args in runs:
            cfg = compose("config", overrides=args)  # an unknown key or option fails here
            validate(cfg)
            exp = dict(a.split("=", 1) for a in args).get("experiment")
            if exp:
                assert exp in EXPERIMENTS and cfg.experiment_name == exp


def _documented_commands() -> list[tuple[str, list[str]]]:
    cmds = []
    for f in sorted(SWEEPS.iterdir()):
        text = re.sub(r"\\\n\s*", " ", f.read_text())  # join continued lines
        for line in text.splitlines():
            line = line.lstrip("#").strip()
            if line.startswith("python -m rematch_pl.train"):
                cmds.append((f.name, shlex.split(line)[3:]))
    return cmds


def _expand(args: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a multirun's arguments (glob() included)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([a for a in args if not a.startswith("-")])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_every_documented_multirun_in_sweeps_composes():
    cmds = _documented_commands()
    assert len(cmds) >= 8
    jobs = sorted({tuple(job) for _, args in cmds for job in _expand(args)})
    assert len(jobs) >= 40
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            validate(compose("config", overrides=list(job)))


# ============================================================================ units
def test_swept_keys_and_run_names(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        "fusion.k=4,8", "debug=fast", "experiment=glob(t6_*)", "loss.w_qdm=range(0.1,0.5,0.1)", "seed=1"]}}}))
    keys = sweep.swept_keys(tmp_path)
    assert keys == {"fusion.k", "experiment", "loss.w_qdm"}
    job = ["fusion.k=4", "debug=fast", "experiment=t6_k16_or", "loss.w_qdm=0.2", "seed=1"]
    assert sweep.job_name("t6_k16_or", job, keys) == "t6_k16_or[fusion.k=4,loss.w_qdm=0.2]"
    assert sweep.job_name("t3_0_baseline", ["experiment=t3_0_baseline", "debug=fast"], {"experiment"}) == "t3_0_baseline"
    # no multirun.yaml: every override but experiment / logger / paths / hydra
    assert sweep.swept_keys(tmp_path / "none") is None
    assert sweep.job_name("rematch", ["fusion.k=4", "logger=csv", "debug=fast"], None) == "rematch[fusion.k=4,debug=fast]"


@pytest.mark.parametrize("devices,nodes,isolate,expected", [
    (1, 1, "auto", False), (2, 1, "auto", True), ("2", 1, "auto", True), (-1, 1, "auto", True), ("auto", 1, "auto", True),
    ([0, 1], 1, "auto", True), ("0,1", 1, "auto", True), ([3], 1, "auto", False), (1, 2, "auto", True),
    (1, 1, "always", True), (2, 1, "never", False)])
def test_which_jobs_get_their_own_process(devices, nodes, isolate, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = OmegaConf.create({"trainer": {"devices": devices, "num_nodes": nodes}})
    assert sweep.needs_own_process(cfg, isolate) is expected
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks launched from outside (torchrun): never re-launched here
    assert sweep.needs_own_process(cfg, "auto") is False


def test_single_run_command_of_a_job_reproduces_its_overrides(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / "0_fusion.k=4,strategy=ddp,it's"
    hc = OmegaConf.create({
        "runtime": {"config_sources": [{"provider": "main", "path": str(CONF_DIR), "schema": "file"},
                                       {"provider": "command-line", "path": "/extra/conf", "schema": "file"}]},
        "job": {"config_name": "config"},
        "overrides": {"task": ["fusion.k=4", "strategy=ddp", "trainer.devices=2"],
                      "hydra": ["hydra.sweep.dir=/s", "hydra.mode=MULTIRUN", "hydra.job.chdir=false",
                                "hydra/launcher=basic", "hydra.verbose=true"]}})
    cmd = sweep.job_command(hc, run_dir)
    assert cmd[:3] == [sys.executable, "-m", "rematch_pl.train"]
    assert cmd[3:5] == ["--config-dir", "/extra/conf"]
    args = cmd[5:]
    assert args[:3] == ["fusion.k=4", "strategy=ddp", "trainer.devices=2"]
    assert "hydra.job.chdir=false" in args and "hydra.verbose=true" in args
    assert not [a for a in args if a.startswith(("hydra.sweep", "hydra.mode", "hydra/launcher", "--multirun"))]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args)}
    assert parsed["hydra.run.dir"] == str(run_dir)  # quoted: '=' and ',' and a quote survive


@pytest.fixture
def hydra_job(tmp_path):
    """Install a composed MULTIRUN job config as Hydra's current config (what @hydra.main does)."""
    from hydra.core.hydra_config import HydraConfig

    def make(overrides=("fusion.k=4",), num=3):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
            cfg.hydra.sweep.dir = str(tmp_path / "sw")
            cfg.hydra.runtime.output_dir = str(tmp_path / "sw" / f"{num}_job")
            cfg.hydra.job.num = num
            cfg.hydra.overrides.task = list(overrides)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_task_records_a_failing_job_instead_of_raising(hydra_job, tmp_path):
    cfg = hydra_job(["fusion.k=4", "debug=fast"], num=3)

    def boom(cfg, run_dir, name, group):
        raise RuntimeError("out of memory (simulated)")

    assert sweep.run_task(cfg, boom) is None
    st = json.loads((tmp_path / "sw" / "3_job" / sweep.STATUS_FILE).read_text())
    assert st["status"] == "failed" and st["job"] == 3 and st["process"] == "sweep"
    assert st["error"] == "RuntimeError: out of memory (simulated)" and "Traceback" in st["traceback"][0]
    assert st["name"] == "rematch[fusion.k=4,debug=fast]" and st["group"] == "sw"  # no multirun.yaml: all overrides


def test_task_names_and_groups_a_finished_job(hydra_job, tmp_path):
    cfg = hydra_job(["fusion.k=8"], num=0)
    seen = {}

    def ok(cfg, run_dir, name, group):
        seen.update(run_dir=run_dir, name=name, group=group)
        return {"val": {"val/hit@1": 0.25}, "steps": 2}

    assert sweep.run_task(cfg, ok) == 0.25
    assert seen == {"run_dir": tmp_path / "sw" / "0_job", "name": "rematch[fusion.k=8]", "group": "sw"}
    assert json.loads((seen["run_dir"] / sweep.STATUS_FILE).read_text())["status"] == "ok"


def test_end_of_sweep_summary_table_files_report_and_exit_status(tmp_path, capsys):
    for num, name, status in [(0, "rematch[fusion.k=2]", "ok"), (1, "rematch[fusion.k=99]", "failed"),
                              (2, "rematch[fusion.k=4]", "running")]:
        d = tmp_path / f"{num}_{name}"
        d.mkdir()
        st = {"job": num, "name": name, "status": status, "run_dir": str(d)}
        if status == "failed":
            st.update(error="ConfigError: fusion.k=99 is invalid", traceback=["Traceback ...", "ConfigError: ..."])
        (d / sweep.STATUS_FILE).write_text(json.dumps(st))
        if status == "ok":
            (d / "summary.json").write_text(json.dumps({"run_name": name, "steps": 2, "config": {"fusion": {"k": 2}},
                                                        "val": {"val/hit@1": 0.5, "val/chance@1": 0.1}}))
    cb = sweep.SweepCallback()
    with pytest.raises(SystemExit) as e:
        cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert e.value.code == 1
    out = capsys.readouterr()
    assert "| 0 | rematch[fusion.k=2] | ok | 50.0 | 10.0 | 2 |" in out.out
    assert "| 1 | rematch[fusion.k=99] | failed |" in out.out and "ConfigError: fusion.k=99 is invalid" in out.out
    assert "| 2 | rematch[fusion.k=4] | incomplete |" in out.out
    assert "2 of 3 sweep jobs did not finish" in out.err
    data = json.loads((tmp_path / sweep.SUMMARY_JSON).read_text())
    assert data["counts"] == {"ok": 1, "failed": 1, "incomplete": 1}
    assert "Traceback ..." in (tmp_path / sweep.SUMMARY_MD).read_text()
    assert "rematch[fusion.k=2]" in (tmp_path / "report" / "report.md").read_text()
    sweep.SweepCallback(fail_on_error=False, report=False).on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))  # no exit


# ============================================================================ end to end
def train(args: list[str], cwd: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run([sys.executable, "-m", "rematch_pl.train", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def _jobs(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / sweep.SUMMARY_JSON).read_text())["jobs"]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.rglob(sweep.STATUS_FILE))


@pytest.mark.slow
def test_two_job_multirun_gives_two_wandb_runs_in_one_group_and_a_report(tmp_path, capsys):
    sw = tmp_path / "sweep"
    p = train(["--multirun", "fusion.k=2,4", *SMALL, f"hydra.sweep.dir={sw}"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [(j["job"], j["name"], j["status"], j["process"]) for j in _jobs(sw)] == [
        (0, "rematch[fusion.k=2]", "ok", "sweep"), (1, "rematch[fusion.k=4]", "ok", "sweep")]
    dirs = _job_dirs(sw)
    assert len(dirs) == 2
    wb = [offline_wandb_runs(d) for d in dirs]
    assert [len(w) for w in wb] == [1, 1]  # one W&B run per job, finished before the next
    assert [w[0]["name"] for w in wb] == ["rematch[fusion.k=2]", "rematch[fusion.k=4]"]
    assert {w[0]["group"] for w in wb} == {"sweep"} and wb[0][0]["id"] != wb[1][0]["id"]
    for d, k in zip(dirs, (2, 4)):
        s = json.loads((d / "summary.json").read_text())
        assert s["config"]["fusion"]["k"] == k and "val/hit@1" in s["val"] and s["steps"] == 2
    assert "== sweep summary: 2 jobs" in p.stdout
    table = (sw / "report" / "report.md").read_text()
    assert re.search(r"\| 0 \| rematch\[fusion\.k=2\] \(baseline\) \| \d+\.\d \|", table)
    assert re.search(r"\| 1 \| rematch\[fusion\.k=4\] \| \d+\.\d \| [+-]\d+\.\d [↑↓=] \|", table)
    assert (sw / "report" / "metric_vs_k.png").exists() and (sw / "report" / "loss_curves.png").exists()
    # the report command on the finished sweep, offline
    from rematch_pl import report

    assert report.main([str(sw), "--out", str(tmp_path / "rep")]) == 0
    assert "rematch[fusion.k=4]" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()  # nothing ran outside the sweep directory


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_sweep_goes_on(tmp_path):
    sw = tmp_path / "sweep"
    # job 0 fails at start-up (after the model is built): no such checkpoint; job 1 trains
    p = train(["--multirun", "resume=missing.ckpt,null", *SMALL, "matching=none", "logger=csv",
               f"hydra.sweep.dir={sw}"], cwd=tmp_path)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    jobs = _jobs(sw)
    assert [(j["job"], j["status"]) for j in jobs] == [(0, "failed"), (1, "ok")]
    assert jobs[0]["error"].startswith("FileNotFoundError: resume=missing.ckpt")
    dirs = _job_dirs(sw)
    assert not (dirs[0] / "summary.json").exists() and (dirs[1] / "summary.json").exists()
    assert re.search(r"\| 0 \| rematch\[resume=missing\.ckpt\] \| failed \|", p.stdout)
    assert re.search(r"\| 1 \| rematch\[resume=null\] \| ok \|", p.stdout)
    assert "1 of 2 sweep jobs did not finish: #0 rematch[resume=missing.ckpt]" in p.stderr
    assert "FileNotFoundError" in (sw / sweep.SUMMARY_MD).read_text()
    assert "`rematch[resume=missing.ckpt]`: failed" in (sw / "report" / "report.md").read_text()


@pytest.mark.slow
def test_ddp_jobs_run_in_their_own_process_without_relaunching_the_sweep(tmp_path):
    sw = tmp_path / "sweep"
    p = train(["--multirun", "fusion.k=2,4", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *SMALL,
               "matching=none", f"hydra.sweep.dir={sw}"], cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert [(j["name"], j["status"], j["process"]) for j in _jobs(sw)] == [
        ("rematch[fusion.k=2]", "ok", "own"), ("rematch[fusion.k=4]", "ok", "own")]
    launched = (p.stdout + p.stderr).count("Launching 2 jobs locally")
    assert launched == 1, "a child rank re-launched the sweep"  # without isolation rank 1 re-runs sys.argv
    dirs = _job_dirs(sw)
    assert len(dirs) == 2  # rank 1 re-ran the job's single run, not the sweep
    assert not (tmp_path / "outputs").exists() and len([d for d in sw.iterdir() if d.is_dir()]) == 3  # + report/
    for d, k in zip(dirs, (2, 4)):
        assert (d / "train_ddp_process_1.log").exists()  # Lightning's rank-1 process ran in this job's dir
        s = json.loads((d / "summary.json").read_text())
        assert s["config"]["trainer"]["devices"] == 2 and s["config"]["fusion"]["k"] == k and "val/hit@1" in s["val"]
        assert [w["name"] for w in offline_wandb_runs(d)] == [f"rematch[fusion.k={k}]"]  # rank 0 only
        assert offline_wandb_runs(d)[0]["group"] == "sweep"


@pytest.mark.slow
def test_a_failing_job_in_its_own_process_is_reported_with_its_output(tmp_path):
    sw = tmp_path / "sweep"
    p = train(["--multirun", "resume=missing.ckpt", *SMALL, "logger=csv", "hydra.callbacks.sweep.isolate_jobs=always",
               f"hydra.sweep.dir={sw}"], cwd=tmp_path)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    (job,) = _jobs(sw)
    assert (job["status"], job["process"]) == ("failed", "own")
    assert job["error"].startswith("JobFailed: job process exited with status 1")
    assert "FileNotFoundError: resume=missing.ckpt: no such checkpoint" in job["error"]  # the job's last output
    assert "FileNotFoundError" in (_job_dirs(sw)[0] / sweep.JOB_LOG).read_text()
