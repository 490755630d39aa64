"""A local, logger-independent record of every logged metric: ``<run_dir>/history.jsonl``.

Whatever `logger=` is chosen (W&B offline/online, CSV, TensorBoard), each run directory also
gets one JSON line per logging step, so reports and notebooks work offline from local runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from .report import read_history  # Lightning-free (reports import it), re-exported here

__all__ = ["JsonlLogger", "read_history"]


class JsonlLogger(Logger):
    def __init__(self, run_dir: str | Path):
        super().__init__()
        self._path = Path(run_dir) / "history.jsonl"

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._path.parent)

    @property
    @rank_zero_experiment
    def experiment(self):
        return None

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")
