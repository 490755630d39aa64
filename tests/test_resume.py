"""Exact resume: a run killed mid-training and resumed with resume=auto repeats the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rematch_pl.build import AtomicCheckpointIO
from rematch_pl.history import read_history

ENV = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")
COMMON = ["debug=fast", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1", "trainer.limit_val_batches=0",
          "trainer.log_every_n_steps=1", "logger=csv", "train.log_rows=true", "data.batch_size=4",
          "optimizer.warmup_steps=2", "backbone.lora.dropout=0.1"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "rematch_pl.train", f"hydra.run.dir={run_dir}", *COMMON, *extra]


def _losses(run_dir):
    out = {}
    for r in read_history(run_dir):  # later lines (the resumed run) overwrite earlier ones
        if "train/loss" in r:
            out[r["step"]] = (r["train/loss"], r["train/loss_cl"], r["train/loss_qdm"])
    return out


def _rows(run_dir):
    out = {}
    for line in (Path(run_dir) / "rows_rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["rows"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_exactly(tmp_path, workers):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    extra = [f"data.num_workers={workers}"]
    subprocess.run(_cmd(ref_dir, *extra), env=ENV, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(run_dir, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = [int(p.stem.split("step=")[1]) for p in ckpts.glob("epoch=*-step=*.ckpt")] if ckpts.exists() else []
        if steps and max(steps) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a hard kill, wherever it is
    proc.wait()
    killed_at = max(int(p.stem.split("step=")[1]) for p in ckpts.glob("epoch=*-step=*.ckpt"))
    assert killed_at < 8
    subprocess.run(_cmd(run_dir, *extra, "resume=auto"), env=ENV, check=True, capture_output=True, timeout=600)
    ref, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(ref) == list(range(8))
    # the step whose update the checkpoint holds may not have been logged before the kill
    assert set(range(8)) - set(got) <= {killed_at - 1}
    for step in got:
        for a, b in zip(ref[step], got[step]):
            assert abs(a - b) <= 1e-6, (step, ref[step], got[step])
    ref_rows, got_rows = _rows(ref_dir), _rows(run_dir)
    assert ref_rows == got_rows  # the same rows at every step: none repeated, none skipped
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_atomic_checkpoint_survives_a_failed_save(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial garbage")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_deepspeed_checkpoint_survives_a_failed_save(tmp_path):
    """DeepSpeed writes checkpoint folders itself (no CheckpointIO): each save goes to a new tag
    and `latest` moves to it only when it is complete, so a save killed half-way leaves the
    previous checkpoint loadable; a completed save removes the older tags. The engine here
    stands in for DeepSpeed's writer (a real DeepSpeed resume: tests/test_sharding.py); loading
    follows `latest` as DeepSpeed does."""
    from rematch_pl.build import atomic_deepspeed_strategy

    class Engine:
        fail = False

        def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
            assert save_latest is False and exclude_frozen_parameters is True
            (Path(save_dir) / tag).mkdir(parents=True)
            torch.save(client_state, Path(save_dir) / tag / "state.pt")
            if self.fail:
                (Path(save_dir) / tag / "optim.pt").write_bytes(b"partial")
                raise KeyboardInterrupt("killed while saving")

    class OneProcess(atomic_deepspeed_strategy()):
        is_global_zero = True
        deepspeed_engine = None

        def __init__(self):
            self.deepspeed_engine, self.exclude_frozen_parameters = Engine(), True

        def broadcast(self, obj, src=0):
            return obj

        def barrier(self, name=None):
            pass

    def load(folder):
        tag = (folder / "latest").read_text()
        return torch.load(folder / tag / "state.pt", weights_only=True)

    s, folder = OneProcess(), tmp_path / "last.ckpt"
    s.save_checkpoint({"global_step": 1, "state_dict": {}}, folder)
    assert load(folder) == {"global_step": 1}
    s.deepspeed_engine.fail = True
    with pytest.raises(KeyboardInterrupt):
        s.save_checkpoint({"global_step": 2}, folder)
    assert load(folder) == {"global_step": 1}  # the half-written tag is not named
    s.deepspeed_engine.fail = False
    s.save_checkpoint({"global_step": 3}, folder)
    assert load(folder) == {"global_step": 3}
    tag = os.readlink(folder / "checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["latest", "checkpoint", tag])
