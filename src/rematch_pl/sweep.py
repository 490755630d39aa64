"""Hydra multirun support: one job = one run, failures recorded, a summary of all jobs at the end.

``python -m rematch_pl.train --multirun fusion.k=4,8,16,32,64`` (any axis, any number of axes)
runs every job through `run_task`:

* each job is its own logger run (one W&B run per job, ``wandb.finish()`` after it), named
  ``<experiment_name>[<swept overrides>]`` (the keys the sweep varies, read from the sweep's
  ``multirun.yaml``; ``experiment=...`` is already in the name) and grouped by the sweep
  directory's name;
* a job that raises is recorded as failed (``job_status.json`` in its directory, traceback in
  its log) and the sweep goes on with the next job;
* a job that would start processes of its own (``trainer.devices`` > 1, ``trainer.num_nodes`` >
  1: Lightning's DDP launcher re-executes ``sys.argv`` for the other ranks, which in a sweep
  would be the whole sweep again) runs as a separate single-run process
  ``python -m rematch_pl.train <job overrides> hydra.run.dir=<job dir>``; its ranks then
  re-execute that single run only. ``hydra.callbacks.sweep.isolate_jobs`` = auto (that rule) |
  always | never chooses;
* at the end, `SweepCallback.on_multirun_end` prints a table of all jobs, writes
  ``multirun_summary.md`` / ``multirun_summary.json`` to the sweep directory, writes the
  ablation report (``report/``, see `rematch_pl.report`) and exits with status 1 when a job
  failed.

Jobs without their own process share the sweep's process: CUDA peak-memory statistics are
reset before each job, but on CPU ``peak_memory_gb`` (the process's max RSS) is the sweep's
peak so far.

Single runs are unchanged, except that the single-run process of an isolated job takes its
name and group from the environment (`ENV_NAME`, `ENV_GROUP`), and a run started by a W&B sweep
agent (``WANDB_SWEEP_ID`` set) is named by its overrides (``t4_wqdm_01[loss.w_qdm=0.2]``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("rematch_pl.sweep")

STATUS_FILE = "job_status.json"
SUMMARY_JSON = "multirun_summary.json"
SUMMARY_MD = "multirun_summary.md"
JOB_LOG = "job_process.log"
ENV_NAME = "REMATCH_JOB_NAME"
ENV_GROUP = "REMATCH_JOB_GROUP"
ISOLATE = ("auto", "always", "never")
# hydra.* overrides of the sweep that must not reach a job's own process
_SWEEP_ONLY = ("hydra.sweep", "hydra.run", "hydra.mode", "hydra.launcher", "hydra/launcher", "hydra.sweeper",
               "hydra/sweeper", "hydra.job.num", "hydra.job.id", "hydra.output_subdir", "hydra.job.name")
# keys left out of run names (they do not describe the ablation)
_NAME_SKIP = ("experiment", "hydra", "logger", "paths")


# ====================================================================== names
def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def swept_keys(sweep_dir: str | Path) -> set[str] | None:
    """Keys the sweep varies (``fusion.k=4,8`` -> ``fusion.k``), from its ``multirun.yaml``; None if unknown."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.to_container(OmegaConf.load(path).hydra.overrides.task, resolve=False)
        parsed = OverridesParser.create().parse_overrides(list(task))
        return {o.key_or_group for o in parsed if o.is_sweep_override()}
    except Exception as e:  # unreadable: fall back to all overrides
        log.debug("cannot read the swept keys from %s: %s", path, e)
        return None


def describe_overrides(overrides: list[str], keys: set[str] | None = None) -> str:
    """``a=1,b=2`` from the overrides whose key is in `keys` (all when None), naming keys left out."""
    kept = [o for o in overrides if (keys is None or _key(o) in keys) and not _key(o).startswith(_NAME_SKIP)]
    return ",".join(kept)


def job_name(experiment_name: str, overrides: list[str], keys: set[str] | None) -> str:
    """``<experiment_name>[<swept overrides>]`` (just the experiment name when only it is swept)."""
    desc = describe_overrides(overrides, keys)
    return f"{experiment_name}[{desc}]" if desc else experiment_name


# ====================================================================== isolation
def needs_own_process(cfg: DictConfig, isolate: str = "auto") -> bool:
    """Whether a sweep job must run in a process of its own (see the module docstring)."""
    if isolate not in ISOLATE:
        raise ValueError(f"hydra.callbacks.sweep.isolate_jobs={isolate!r}: expected one of {ISOLATE}")
    if isolate != "auto":
        return isolate == "always"
    if os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK"):
        return False  # ranks launched from outside (torchrun, SLURM): the sweep runs on every rank
    t = cfg.trainer
    devices = t.devices
    if isinstance(devices, str):
        devices = devices.strip()
        devices = int(devices) if devices.lstrip("-").isdigit() else devices  # "2" | "0,1" | "auto"
    if isinstance(devices, int):
        many = devices > 1 or devices == -1
    elif isinstance(devices, str):
        many = devices == "auto" or "," in devices
    else:  # a list of device indices
        many = len(list(devices)) > 1
    return bool(many or int(t.get("num_nodes", 1)) > 1)


def _quote(value: str) -> str:
    """A Hydra-grammar quoted string (paths of sweep jobs hold '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(hc, run_dir: str | Path) -> list[str]:
    """The single-run command that reproduces one sweep job in `run_dir` (its own process)."""
    import __main__

    module = getattr(getattr(__main__, "__spec__", None), "name", None) or "rematch_pl.train"
    if module.endswith("__main__") or not module.startswith("rematch_pl"):
        module = "rematch_pl.train"
    cmd = [sys.executable, "-m", module]
    for src in hc.runtime.config_sources:
        if src.provider == "command-line" and src.schema == "file":
            cmd += ["--config-dir", src.path]
    if hc.job.config_name and hc.job.config_name != "config":
        cmd += ["--config-name", hc.job.config_name]
    cmd += list(hc.overrides.task)
    cmd += [o for o in hc.overrides.hydra if not _key(o).startswith(_SWEEP_ONLY)]
    cmd += [f"hydra.run.dir={_quote(str(run_dir))}", "hydra.output_subdir=.hydra/job_process"]
    return cmd


class JobFailed(RuntimeError):
    pass


def run_in_own_process(cmd: list[str], run_dir: Path, name: str, group: str | None, cwd: str | None = None) -> dict:
    """Run `cmd` (a single training run), streaming its output; returns the run's summary.json."""
    env = {**os.environ, ENV_NAME: name}
    if group:
        env[ENV_GROUP] = group
    run_dir.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    log.info("job runs in its own process: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True, bufsize=1)
    try:
        with (run_dir / JOB_LOG).open("a") as f:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
                tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:  # interrupted: take the job's process group (its DDP ranks too) down with us
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    sys.stdout.flush()
    if rc != 0:
        raise JobFailed(f"job process exited with status {rc}; last output:\n" + "\n".join(tail))
    path = run_dir / "summary.json"
    if not path.exists():
        raise JobFailed(f"job process finished but wrote no {path}")
    return json.loads(path.read_text())


# ====================================================================== the task
def _write_status(run_dir: Path, status: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=2, default=str))


def _fresh_device_stats() -> None:
    """Jobs share the sweep's process: free what the last job left and restart the peak-memory count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sweep_settings(hc) -> dict:
    cb = hc.get("callbacks") or {}
    for c in cb.values():
        if str(c.get("_target_", "")).endswith("sweep.SweepCallback"):
            return dict(c)
    return {}


def run_task(cfg: DictConfig, run_fn: Callable[..., dict]) -> float | None:
    """The body of the Hydra task function (`rematch_pl.train.main`).

    ``run_fn(cfg, run_dir, name, group) -> summary`` trains one run. Single runs call it and let
    errors propagate; sweep jobs are named, grouped, possibly isolated, and their failures
    recorded instead of raised.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode != RunMode.MULTIRUN:
        name = os.environ.get(ENV_NAME) or cfg.experiment_name
        if os.environ.get("WANDB_SWEEP_ID") and not os.environ.get(ENV_NAME):  # a W&B sweep agent's run
            name = job_name(cfg.experiment_name, list(hc.overrides.task), None)
        summary = run_fn(cfg, run_dir, name, os.environ.get(ENV_GROUP) or None)
        return summary["val"].get("val/hit@1")

    name = job_name(cfg.experiment_name, list(hc.overrides.task), swept_keys(hc.sweep.dir))
    group = Path(str(hc.sweep.dir)).name
    isolate = needs_own_process(cfg, _sweep_settings(hc).get("isolate_jobs", "auto"))
    status = {"job": int(hc.job.num), "name": name, "group": group, "overrides": list(hc.overrides.task),
              "run_dir": str(run_dir), "process": "own" if isolate else "sweep", "status": "running",
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_status(run_dir, status)
    t0 = time.perf_counter()
    try:
        if isolate:
            from hydra.utils import get_original_cwd

            summary = run_in_own_process(job_command(hc, run_dir), run_dir, name, group, cwd=get_original_cwd())
        else:
            _fresh_device_stats()
            summary = run_fn(cfg, run_dir, name, group)
    except Exception as e:
        log.error("sweep job #%s %s FAILED: %s: %s\n%s", hc.job.num, name, type(e).__name__, e,
                  traceback.format_exc())
        status.update(status="failed", error=f"{type(e).__name__}: {e}", wall_time_s=round(time.perf_counter() - t0, 2),
                      traceback=traceback.format_exc().splitlines()[-30:])
        _write_status(run_dir, status)
        return None
    metric = summary.get("val", {}).get("val/hit@1")
    status.update(status="ok", wall_time_s=round(time.perf_counter() - t0, 2), val=summary.get("val", {}),
                  steps=summary.get("steps"))
    _write_status(run_dir, status)
    return metric


# ====================================================================== the summary
def collect_jobs(sweep_dir: str | Path) -> list[dict]:
    """One record per job of a sweep directory (from each job's job_status.json and summary.json)."""
    jobs = []
    root = Path(sweep_dir)
    for path in root.rglob(STATUS_FILE):
        try:
            job = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            job = {"status": "unknown", "error": f"unreadable {path.name}: {e}", "run_dir": str(path.parent)}
        summary_path = path.parent / "summary.json"
        if job.get("status") == "ok" and summary_path.exists():
            s = json.loads(summary_path.read_text())
            job.setdefault("val", s.get("val", {}))
            job.setdefault("steps", s.get("steps"))
        elif job.get("status") == "running":
            job["status"] = "incomplete"  # the process ended without finishing the job
        job["run_dir"] = str(path.parent)
        jobs.append(job)
    jobs.sort(key=lambda j: (j.get("job", 1 << 30), j["run_dir"]))
    return jobs


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else f"{x:.1f}"
    return str(x)


def summary_table(jobs: list[dict]) -> str:
    """Markdown table of the jobs (Hit@1 and chance in %)."""
    head = "| # | job | status | val Hit@1 | chance@1 | steps | wall s | error |\n|---|---|---|---|---|---|---|---|"
    rows = []
    for j in jobs:
        v = j.get("val") or {}
        err = (j.get("error") or "").splitlines()[0][:120] if j.get("error") else ""
        rows.append(f"| {j.get('job', '?')} | {j.get('name', Path(j['run_dir']).name)} | {j['status']} | "
                    f"{_fmt(v.get('val/hit@1'))} | {_fmt(v.get('val/chance@1'))} | {_fmt(j.get('steps'))} | "
                    f"{_fmt(j.get('wall_time_s'), pct=False)} | {err.replace('|', '/')} |")
    return "\n".join([head, *rows])


def write_summary(sweep_dir: str | Path, jobs: list[dict] | None = None) -> tuple[Path, Path]:
    """Write ``multirun_summary.md`` and ``multirun_summary.json`` to the sweep directory."""
    root = Path(sweep_dir)
    jobs = collect_jobs(root) if jobs is None else jobs
    counts = collections.Counter(j["status"] for j in jobs)
    data = {"sweep_dir": str(root), "n_jobs": len(jobs), "counts": dict(counts), "jobs": jobs}
    (root / SUMMARY_JSON).write_text(json.dumps(data, indent=2, default=str))
    text = [f"# Sweep {root.name}", "", f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            "", summary_table(jobs), ""]
    failed = [j for j in jobs if j["status"] != "ok"]
    for j in failed:
        text += [f"## job {j.get('job', '?')} {j.get('name', '')}: {j['status']}", "", "```",
                 *(j.get("traceback") or [j.get("error") or "no error recorded"]), "```", ""]
    (root / SUMMARY_MD).write_text("\n".join(text))
    return root / SUMMARY_MD, root / SUMMARY_JSON


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep`` in conf/config.yaml): the end-of-sweep summary.

    isolate_jobs: auto | always | never, read by `run_task` (whether a job runs in its own process);
    report: also write the ablation report (tables and plots) to ``<sweep dir>/report``;
    fail_on_error: exit with status 1 after the summary when a job failed.
    """

    def __init__(self, isolate_jobs: str = "auto", report: bool = True, fail_on_error: bool = True,
                 metric: str = "val/hit@1"):
        if isolate_jobs not in ISOLATE:
            raise ValueError(f"hydra.callbacks.sweep.isolate_jobs={isolate_jobs!r}: expected one of {ISOLATE}")
        self.isolate_jobs, self.report, self.fail_on_error, self.metric = isolate_jobs, report, fail_on_error, metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.exists():
            return
        jobs = collect_jobs(sweep_dir)
        md, js = write_summary(sweep_dir, jobs)
        lines = ["", f"== sweep summary: {len(jobs)} jobs in {sweep_dir} ==", summary_table(jobs),
                 f"written: {md}, {js}"]
        if self.report and any(j["status"] == "ok" for j in jobs):
            try:
                from .report import write_report

                lines.append(f"report: {write_report(sweep_dir, sweep_dir / 'report', metric=self.metric)}")
            except Exception as e:  # the summary must not depend on plotting
                lines.append(f"report not written: {type(e).__name__}: {e}")
        print("\n".join(lines), flush=True)
        failed = [j for j in jobs if j["status"] != "ok"]
        if failed and self.fail_on_error:
            print(f"{len(failed)} of {len(jobs)} sweep jobs did not finish: "
                  + ", ".join(f"#{j.get('job', '?')} {j.get('name', '')}" for j in failed), file=sys.stderr, flush=True)
            raise SystemExit(1)
