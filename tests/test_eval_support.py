"""Shared by the evaluation / export / encoder tests (no tests here): one trained tiny run per session,
made with the real entry point, and the eval config composed as ``python -m rematch_pl.eval`` composes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 40 steps of the embedded default with the cheap matching view set: well above chance on MMEB-style
# synthetic subsets, a matching head to rerank with, a few tens of seconds on 2 CPU cores.
TRAIN_OVERRIDES = ["debug=fast", "trainer.max_steps=40", "trainer.val_check_interval=40",
                   "trainer.checkpoint_every_n_steps=40", "logger=csv", "matching=feat_feat",
                   "data.eval.max_queries=8", "trainer.enable_progress_bar=false"]


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), e.get("PYTHONPATH", "")])
    return e


def trained_run_dir(tmp_path_factory) -> Path:
    """The session's trained run (trained on first use)."""
    run = tmp_path_factory.getbasetemp() / "rematch_eval_run"
    if not (run / "adapter" / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "rematch_pl.train", f"hydra.run.dir={run}", *TRAIN_OVERRIDES],
                       check=True, env=env(), cwd=str(tmp_path_factory.getbasetemp()),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return run


def eval_cfg(*overrides: str, cache_dir=None):
    """The composed eval config with test-sized defaults (CPU, no workers, no progress bars)."""
    from hydra import compose, initialize_config_dir

    from rematch_pl.build import CONF_DIR

    base = ["logger=csv", "eval.accelerator=cpu", "eval.num_workers=0", "eval.progress=false", "eval.threads=1",
            "eval.mmeb.max_queries=24", "eval.zeroshot.limit=12"]
    if cache_dir is not None:
        base.append(f"eval.cache_dir={cache_dir}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=base + list(overrides))


def metrics_only(results: dict) -> dict:
    """The scores of a results dict (no timings, counts of encoded items or paths)."""
    keep = ("hit@1", "hit@5", "mrr", "chance@1", "t2i", "i2t", "parts", "replace", "swap", "add")
    return {suite: {name: {k: v for k, v in r.items() if k in keep} for name, r in results[suite].items()}
            for suite in ("mmeb", "zeroshot")}


@pytest.fixture(autouse=False)
def one_thread():
    """One torch thread for the test (2 shared cores: a second thread only spins while others run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
