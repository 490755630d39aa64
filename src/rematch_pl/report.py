"""`python -m rematch_pl.report PATH`: paper-style ablation tables and plots from finished runs.

PATH is a multirun directory (or any folder holding run directories, or one run directory),
read offline from each run's ``summary.json`` / ``history.jsonl`` / ``job_status.json``; or a
W&B project ``entity/project`` (``wandb:entity/project``; online, with ``--group`` /
``--sweep`` to pick the runs).

Written to ``--out`` (default ``PATH/report``):

* ``report.md``: the ablation table as in the paper's Table 3 (Overall = mean Hit@1 over the
  eval subsets, the meta-task columns CLS / QA / RET / VG, and the delta of Overall to the
  baseline row: ``--baseline NAME``, default the first run of the sweep; ``--delta previous``
  compares each row with the one above), the per-subset table, and when the runs vary along
  an axis of Tables 4-6 the table of that axis (``loss.w_qdm``; ``matching.views``;
  ``fusion.k`` x fusion method [EOS] / Avg / Avg + OR); failed jobs are listed;
* ``report.json``: the same rows as data;
* PNGs: ``overall.png`` (bars per run, chance level), ``metric_vs_k.png``, ``views.png``,
  ``metric_vs_wqdm.png`` (when that axis varies) and ``loss_curves.png`` (one panel per loss
  term, one line per run).

Numbers in the tables are percentages, as in the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------- meta-tasks
META_TASKS = ("CLS", "QA", "RET", "VG")
_MMEB = {
    "CLS": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A", "ImageNet-R",
            "ObjectNet", "Country211", "Syn_CLS"],
    "QA": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
           "TextVQA", "Syn_VQA"],
    "RET": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
            "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS", "Syn_T2I", "Syn_I2T"],
    "VG": ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing", "Syn_VG"],
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_META_OF = {_norm(s): task for task, subsets in _MMEB.items() for s in subsets}


def meta_task(subset: str) -> str:
    """MMEB meta-task of an eval subset (CLS, QA, RET, VG; 'other' when unknown)."""
    if _norm(subset) in _META_OF:
        return _META_OF[_norm(subset)]
    up = subset.upper()
    for key, task in (("VQA", "QA"), ("QA", "QA"), ("CLS", "CLS"), ("T2I", "RET"), ("I2T", "RET"), ("RET", "RET"),
                      ("VG", "VG"), ("GROUND", "VG")):
        if key in up:
            return task
    return "other"


# ---------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """One finished (or failed) run, from a local run directory or a W&B run."""

    name: str
    source: str  # run directory or W&B path
    status: str = "ok"  # ok | failed | incomplete | crashed | ...
    job: int | None = None
    config: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    last_loss: dict = field(default_factory=dict)
    steps: int | None = None
    wall_time_s: float | None = None
    samples_per_s: float | None = None
    error: str | None = None
    _history: Callable[[], list[dict]] | None = field(default=None, repr=False)
    _history_cache: list[dict] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def history(self) -> list[dict]:
        """Logged rows (step, train/loss, ...); empty when unknown."""
        if self._history_cache is None:
            self._history_cache = self._history() if self._history else []
        return self._history_cache

    def get(self, dotted: str, default=None):
        """A config value by dotted key (``fusion.k``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


_SKIP_DIRS = {"wandb", "checkpoints", "adapter", ".hydra", "report", "csv", "tb"}


def read_history(run_dir: str | Path) -> list[dict]:
    """The rows of a run's history.jsonl (empty when there is none), each logged step once.

    A resumed launch logs again the steps its killed predecessor logged after the last checkpoint;
    the later row for a (step, metric names) pair replaces the earlier one, in its place.
    """
    path = Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    latest: dict[tuple, dict] = {}  # insertion order: where each row first stood
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[(row.get("step"), tuple(sorted(row)))] = row
    return list(latest.values())


def _local_run(run_dir: Path) -> RunRecord:
    s = json.loads((run_dir / "summary.json").read_text())
    status_path = run_dir / "job_status.json"
    st = json.loads(status_path.read_text()) if status_path.exists() else {}
    return RunRecord(
        name=s.get("run_name") or st.get("name") or run_dir.name, source=str(run_dir), status="ok",
        job=st.get("job"), config=s.get("config") or {}, val=s.get("val") or {}, last_loss=s.get("last_loss") or {},
        steps=s.get("steps"), wall_time_s=s.get("wall_time_s"), samples_per_s=s.get("samples_per_s"),
        _history=lambda d=run_dir: read_history(d))


def load_local_runs(path: str | Path) -> list[RunRecord]:
    """Every run under `path` (a run directory, a multirun directory or any folder of them)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    runs, seen = [], set()
    for summary in sorted(root.rglob("summary.json")):
        rel = summary.relative_to(root).parts[:-1]
        if _SKIP_DIRS.intersection(rel):
            continue
        runs.append(_local_run(summary.parent))
        seen.add(summary.parent.resolve())
    for status in sorted(root.rglob("job_status.json")):
        if status.parent.resolve() in seen:
            continue
        st = json.loads(status.read_text())
        state = st.get("status", "unknown")
        runs.append(RunRecord(name=st.get("name") or status.parent.name, source=str(status.parent),
                              status="incomplete" if state in ("running", "ok") else state, job=st.get("job"),
                              error=st.get("error"), wall_time_s=st.get("wall_time_s")))
    return _finish(runs)


def load_wandb_runs(project: str, group: str | None = None, sweep: str | None = None, api=None) -> list[RunRecord]:
    """The runs of a W&B project (``entity/project``), optionally of one group or sweep (needs network)."""
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if sweep:
        filters["sweep"] = sweep
    runs = []
    for r in api.runs(project, filters=filters or None):
        raw = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        summary = {k: v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        state = getattr(r, "state", "finished")
        runs.append(RunRecord(
            name=r.name, source=f"wandb:{project}/{r.id}", status="ok" if state == "finished" else state,
            config={k: v for k, v in dict(r.config).items() if not k.startswith("_")}, val={k: float(v) for k, v in summary.items() if k.startswith("val/")},
            last_loss={k[len("train/"):]: float(v) for k, v in summary.items() if k.startswith("train/")},
            steps=int(summary["trainer/global_step"]) + 1 if "trainer/global_step" in summary else summary.get("_step"),
            wall_time_s=summary.get("_runtime"), samples_per_s=summary.get("perf/samples_per_s"),
            _history=lambda r=r: [dict(row) for row in r.scan_history()],
            job=None))
        runs[-1]._created = str(getattr(r, "created_at", ""))  # type: ignore[attr-defined]
    runs.sort(key=lambda x: getattr(x, "_created", ""))
    for i, r in enumerate(runs):
        r.job = i
    return _finish(runs)


def _finish(runs: list[RunRecord]) -> list[RunRecord]:
    runs.sort(key=lambda r: (r.job if r.job is not None else 1 << 30, r.source))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for name in [n for n, c in counts.items() if c > 1]:  # equal names (repeated runs): add the shortest path tail
        same = [r for r in runs if r.name == name]
        for depth in range(1, 64):
            tails = ["/".join(Path(r.source).parts[-depth:]) for r in same]
            if len(set(tails)) == len(tails) or depth >= max(len(Path(r.source).parts) for r in same):
                break
        for r, tail in zip(same, tails):
            r.name = f"{name} ({tail})"
    return runs


def is_wandb_path(path: str) -> bool:
    if path.startswith("wandb:"):
        return True
    return not Path(path).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None


def load_runs(path: str | Path, group: str | None = None, sweep: str | None = None) -> list[RunRecord]:
    """Local run directories or (``entity/project``, ``wandb:entity/project``) a W&B project."""
    p = str(path)
    if is_wandb_path(p):
        return load_wandb_runs(p[len("wandb:"):] if p.startswith("wandb:") else p, group=group, sweep=sweep)
    return load_local_runs(p)


# ---------------------------------------------------------------------------- tables
def subsets_of(runs: list[RunRecord], metric: str = "val/hit@1") -> list[str]:
    out: list[str] = []
    for r in runs:
        for k in r.val:
            if k.startswith(metric + "/") and k[len(metric) + 1:] not in out:
                out.append(k[len(metric) + 1:])
    return out


def meta_scores(run: RunRecord, metric: str = "val/hit@1") -> dict[str, float]:
    """Mean of `metric` over the subsets of each meta-task."""
    groups: dict[str, list[float]] = {}
    for k, v in run.val.items():
        if k.startswith(metric + "/"):
            groups.setdefault(meta_task(k[len(metric) + 1:]), []).append(float(v))
    return {t: sum(v) / len(v) for t, v in groups.items()}


_IGNORE = ("paths.", "logger.", "hydra.", "experiment_name", "save_adapter", "resume", "data.synthetic.out_dir",
           "run_dir")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v
    return out


def varying_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between the (finished) runs."""
    flat = [_flatten(r.config) for r in runs if r.ok and r.config]
    if len(flat) < 2:
        return []
    keys = sorted(set().union(*flat))
    return [k for k in keys if not k.startswith(_IGNORE) and len({repr(f.get(k)) for f in flat}) > 1]


def pick_baseline(runs: list[RunRecord], baseline: str | None = None, metric: str = "val/hit@1") -> RunRecord | None:
    """The run named `baseline` (exact, else the only name containing it); default the first finished run."""
    ok = [r for r in runs if r.ok and metric in r.val]
    if not ok:
        return None
    if baseline is None:
        return ok[0]
    exact = [r for r in ok if r.name == baseline]
    if exact:
        return exact[0]
    partial = [r for r in ok if baseline in r.name]
    if len(partial) == 1:
        return partial[0]
    raise ValueError(f"--baseline {baseline!r} matches {len(partial)} finished runs; runs: {[r.name for r in ok]}")


def ablation_rows(runs: list[RunRecord], metric: str = "val/hit@1", baseline: str | None = None,
                  delta: str = "baseline") -> list[dict]:
    """One row per run: Overall, delta, meta-task means, per-subset scores, chance (fractions, not %)."""
    if delta not in ("baseline", "previous"):
        raise ValueError(f"delta={delta!r}: expected baseline or previous")
    base = pick_baseline(runs, baseline, metric)
    rows, prev = [], None
    for i, r in enumerate(runs):
        row = {"exp": r.job if r.job is not None else i, "name": r.name, "status": r.status, "source": r.source,
               "overall": r.val.get(metric), "chance": r.val.get(metric.replace("hit@1", "chance@1")),
               "meta": meta_scores(r, metric), "subsets": {s: r.val.get(f"{metric}/{s}") for s in subsets_of([r], metric)},
               "steps": r.steps, "wall_time_s": r.wall_time_s, "error": r.error, "baseline": r is base, "delta": None}
        ref = base if delta == "baseline" else prev
        if row["overall"] is not None and ref is not None and ref is not r and metric in ref.val:
            row["delta"] = row["overall"] - ref.val[metric]
        if r.ok and row["overall"] is not None:
            prev = r
        rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _delta(x: float | None) -> str:
    if x is None:
        return ""
    d = 100 * x
    return f"{d:+.1f} {'↑' if d > 0 else ('↓' if d < 0 else '=')}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in esc])


def markdown_table(rows: list[dict]) -> str:
    """Table 3 layout: Exp | Configuration | Overall | delta | CLS | QA | RET | VG | chance."""
    metas = [t for t in (*META_TASKS, "other") if any(t in r["meta"] for r in rows)]
    header = ["Exp", "Configuration", "Overall", "Δ", *metas, "chance"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([str(r["exp"]), r["name"], r["status"], "", *[""] * len(metas), ""])
            continue
        body.append([str(r["exp"]), r["name"] + (" (baseline)" if r["baseline"] else ""), _pct(r["overall"]),
                     _delta(r["delta"]), *[_pct(r["meta"].get(t)) for t in metas], _pct(r["chance"])])
    return _md(header, body)


def subset_table(rows: list[dict]) -> str:
    subsets: list[str] = []
    for r in rows:
        subsets += [s for s in r["subsets"] if s not in subsets]
    body = [[r["name"], *[_pct(r["subsets"].get(s)) for s in subsets]] for r in rows if r["status"] == "ok"]
    return _md(["Configuration", *subsets], body)


def fusion_method(run: RunRecord) -> str:
    """Table 6 row label: w/o MT ([EOS]) | Avg | Avg + OR."""
    k = run.get("fusion.k", 0) or 0
    if k == 0:
        return "w/o MT ([EOS])"
    orth = bool(run.get("fusion.orthogonality", False)) and float(run.get("loss.w_orth", 0) or 0) > 0
    return "Avg + OR" if orth and k > 1 else "Avg"


VIEW_LABELS = {"all": "Raw/Feat ↔ Raw/Feat", "feat_feat": "Feat ↔ Feat", "raw_raw": "Raw ↔ Raw",
               "raw_feat": "Raw ↔ Feat", "feat_raw": "Feat ↔ Raw", "none": "none (contrastive only)"}


def _cell(values: list[float]) -> str:
    return " / ".join(_pct(v) for v in values) if values else ""


def k_table(runs: list[RunRecord], metric: str = "val/hit@1") -> str | None:
    """Table 6 layout (rows: fusion method, columns: number of tokens K) when fusion.k varies."""
    ok = [r for r in runs if r.ok and metric in r.val]
    ks = sorted({int(r.get("fusion.k", 0) or 0) for r in ok})
    if len(ks) < 2:
        return None
    methods = [m for m in ("w/o MT ([EOS])", "Avg", "Avg + OR") if any(fusion_method(r) == m for r in ok)]
    body = []
    for m in methods:
        cells = [_cell([r.val[metric] for r in ok if fusion_method(r) == m and (r.get("fusion.k", 0) or 0) == k])
                 for k in ks]
        body.append([m, *cells])
    return _md(["MT fuse method \\ K", *[("[EOS]" if k == 0 else str(k)) for k in ks]], body)


def axis_table(runs: list[RunRecord], key: str, metric: str = "val/hit@1", labels: dict | None = None,
               title: str | None = None, baseline: RunRecord | None = None) -> str | None:
    """Overall per value of `key` (Tables 4 and 5) when `key` varies."""
    ok = [r for r in runs if r.ok and metric in r.val]
    values = []
    for r in ok:
        if r.get(key) not in values:
            values.append(r.get(key))
    if len(values) < 2:
        return None
    body = []
    for v in values:
        scores = [r.val[metric] for r in ok if r.get(key) == v]
        mean = sum(scores) / len(scores)
        d = _delta(mean - baseline.val[metric]) if baseline is not None else ""
        body.append([str((labels or {}).get(v, v)), _cell(scores), d])
    return _md([title or key, "Overall", "Δ"], body)


# ---------------------------------------------------------------------------- plots
def _figure(w: float = 6.0, h: float = 4.0, nrows: int = 1, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_overall(runs: list[RunRecord], metric: str = "val/hit@1", baseline: str | None = None):
    ok = [r for r in runs if r.ok and metric in r.val]
    fig, ax = _figure(7, 0.8 + 0.45 * max(len(ok), 1))
    ax = ax[0, 0]
    names = [r.name for r in ok]
    vals = [100 * r.val[metric] for r in ok]
    ax.barh(range(len(ok)), vals, color="tab:blue")
    ax.set_yticks(range(len(ok)), names, fontsize=8)
    ax.invert_yaxis()
    chance = [r.val.get(metric.replace("hit@1", "chance@1")) for r in ok]
    if any(c is not None for c in chance):
        ax.axvline(100 * max(c for c in chance if c is not None), color="gray", ls=":", label="chance")
    base = pick_baseline(runs, baseline, metric)
    if base is not None:
        ax.axvline(100 * base.val[metric], color="tab:red", ls="--", label=f"baseline ({base.name})")
    ax.set_xlabel(f"{metric} (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Overall per run")
    return fig


def plot_metric_vs_k(runs: list[RunRecord], metric: str = "val/hit@1"):
    """Metric against the number of learnable tokens K, one line per fusion method (Table 6)."""
    ok = [r for r in runs if r.ok and metric in r.val]
    if len({r.get("fusion.k", 0) for r in ok}) < 2:
        return None
    fig, ax = _figure()
    ax = ax[0, 0]
    for m, style in (("Avg", "o-"), ("Avg + OR", "s-")):
        pts = sorted((r.get("fusion.k"), 100 * r.val[metric]) for r in ok if fusion_method(r) == m)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m)
    eos = [100 * r.val[metric] for r in ok if fusion_method(r) == "w/o MT ([EOS])"]
    if eos:
        ax.axhline(sum(eos) / len(eos), color="gray", ls="--", label="w/o MT ([EOS])")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of learnable tokens K")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    ax.set_title("Metric against K")
    return fig


def plot_views(runs: list[RunRecord], metric: str = "val/hit@1"):
    """Bars per matching view (Table 5)."""
    ok = [r for r in runs if r.ok and metric in r.val]
    views = []
    for r in ok:
        if r.get("matching.views") not in views:
            views.append(r.get("matching.views"))
    if len(views) < 2:
        return None
    fig, ax = _figure()
    ax = ax[0, 0]
    means = []
    for v in views:
        s = [100 * r.val[metric] for r in ok if r.get("matching.views") == v]
        means.append(sum(s) / len(s))
    ax.bar(range(len(views)), means, color="tab:green")
    ax.set_xticks(range(len(views)), [VIEW_LABELS.get(v, str(v)) for v in views], rotation=20, fontsize=8, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Matching views")
    return fig


def plot_metric_vs_wqdm(runs: list[RunRecord], metric: str = "val/hit@1"):
    """Metric against the matching-loss weight w_qdm (Table 4)."""
    ok = [r for r in runs if r.ok and metric in r.val]
    if len({r.get("loss.w_qdm") for r in ok}) < 2:
        return None
    fig, ax = _figure()
    ax = ax[0, 0]
    pts = sorted((float(r.get("loss.w_qdm")), 100 * r.val[metric]) for r in ok)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xlabel("w_qdm")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Metric against w_qdm")
    return fig


def _step(row: dict, default: int) -> int:
    """Training step of a logged row (history.jsonl: step; W&B: trainer/global_step or _step)."""
    for key in ("step", "trainer/global_step", "_step"):
        if row.get(key) is not None:
            return int(row[key])
    return default


LOSS_TERMS = ("train/loss", "train/loss_cl", "train/loss_orth", "train/loss_qdm")


def plot_loss_curves(runs: list[RunRecord], terms: tuple[str, ...] = LOSS_TERMS, smooth: int = 1):
    """One panel per loss term, one line per run (moving average over `smooth` steps)."""
    hist = {r.name: r.history() for r in runs if r.ok}
    present = [t for t in terms if any(t in row for rows in hist.values() for row in rows)]
    if not present:
        return None
    ncols = 2 if len(present) > 1 else 1
    nrows = math.ceil(len(present) / ncols)
    fig, axes = _figure(5 * ncols, 3.2 * nrows, nrows, ncols)
    for i, term in enumerate(present):
        ax = axes[i // ncols, i % ncols]
        for name, rows in hist.items():
            pts = [(_step(row, j), row[term]) for j, row in enumerate(rows) if term in row and row[term] is not None]
            if not pts:
                continue
            ys = [p[1] for p in pts]
            if smooth > 1:
                ys = [sum(ys[max(0, j - smooth + 1):j + 1]) / len(ys[max(0, j - smooth + 1):j + 1]) for j in range(len(ys))]
            ax.plot([p[0] for p in pts], ys, label=name, lw=1.2)
        ax.set_title(term)
        ax.set_xlabel("step")
    for j in range(len(present), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    axes[0, 0].legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------- report
def build_report(runs: list[RunRecord], metric: str = "val/hit@1", baseline: str | None = None,
                 delta: str = "baseline", title: str = "Ablation report") -> tuple[str, dict]:
    """The markdown report and its data (no files)."""
    rows = ablation_rows(runs, metric, baseline, delta)
    base = pick_baseline(runs, baseline, metric)
    keys = varying_keys(runs)
    md = [f"# {title}", "",
          f"{sum(r.ok for r in runs)} finished runs, {sum(not r.ok for r in runs)} failed or incomplete. "
          f"Metric: `{metric}` in %, Overall = mean over the eval subsets; "
          + (f"Δ = Overall minus the baseline `{base.name}`." if delta == "baseline" and base else
             "Δ = Overall minus the row above."), ""]
    if keys:
        md += ["Varying config keys: " + ", ".join(f"`{k}`" for k in keys), ""]
    md += ["## Ablation table", "", markdown_table(rows), ""]
    tables = {}
    t6 = k_table(runs, metric)
    if t6:
        tables["k"] = t6
        md += ["## Number of tokens K and fusion method (Table 6)", "", t6, ""]
    t5 = axis_table(runs, "matching.views", metric, VIEW_LABELS, "Matching View", base)
    if t5:
        tables["views"] = t5
        md += ["## Matching views (Table 5)", "", t5, ""]
    t4 = axis_table(runs, "loss.w_qdm", metric, None, "w_qdm", base)
    if t4:
        tables["w_qdm"] = t4
        md += ["## Matching-loss weight (Table 4)", "", t4, ""]
    if any(r["subsets"] for r in rows):
        md += ["## Per subset", "", subset_table(rows), ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += ["## Failed or incomplete runs", ""]
        md += [f"- {r['exp']} `{r['name']}`: {r['status']}" + (f": {r['error']}" if r["error"] else "") for r in failed]
        md += [""]
    data = {"metric": metric, "baseline": base.name if base else None, "delta": delta, "varying_keys": keys,
            "rows": rows, "tables": tables}
    return "\n".join(md), data


def write_report(path: str | Path, out_dir: str | Path | None = None, metric: str = "val/hit@1",
                 baseline: str | None = None, delta: str = "baseline", plots: bool = True,
                 group: str | None = None, sweep: str | None = None, runs: list[RunRecord] | None = None) -> Path:
    """Load the runs of `path`, write report.md, report.json and the PNGs to `out_dir`; returns report.md."""
    runs = load_runs(path, group=group, sweep=sweep) if runs is None else runs
    if not runs:
        raise ValueError(f"{path}: no runs found (no summary.json / job_status.json below it)")
    if out_dir is None:
        out_dir = Path(path) / "report" if not is_wandb_path(str(path)) else Path("report_" + re.sub(r"\W", "_", str(path)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, data = build_report(runs, metric, baseline, delta, title=f"Ablation report: {path}")
    written = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            md += "\n(plots skipped: matplotlib is not installed)\n"
        else:
            figs = {"overall.png": plot_overall(runs, metric, baseline), "metric_vs_k.png": plot_metric_vs_k(runs, metric),
                    "views.png": plot_views(runs, metric), "metric_vs_wqdm.png": plot_metric_vs_wqdm(runs, metric),
                    "loss_curves.png": plot_loss_curves(runs)}
            for fname, fig in figs.items():
                if fig is not None:
                    fig.savefig(out / fname, dpi=110)
                    written.append(fname)
            if written:
                md += "\n## Plots\n\n" + "\n".join(f"![{f}]({f})" for f in written) + "\n"
    data["plots"] = written
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rematch_pl.report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="multirun / run directory, or a W&B project entity/project (wandb:entity/project)")
    p.add_argument("--out", default=None, help="output folder (default PATH/report)")
    p.add_argument("--metric", default="val/hit@1", help="summary metric of the tables (default val/hit@1)")
    p.add_argument("--baseline", default=None, help="name (or unique part of it) of the baseline row; default: first run")
    p.add_argument("--delta", choices=("baseline", "previous"), default="baseline")
    p.add_argument("--group", default=None, help="W&B: only runs of this group")
    p.add_argument("--sweep", default=None, help="W&B: only runs of this sweep id")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        path = write_report(a.path, a.out, a.metric, a.baseline, a.delta, not a.no_plots, a.group, a.sweep)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path.parent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
