"""ReMatchModule on a real Lightning run: a step with a non-finite loss changes no weight and no
optimizer state and is logged; too many in a row stop the run with a message that says what to do."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from rematch_pl.build import CONF_DIR, build_backbone, build_datamodule, build_model, build_module, build_trainer
from rematch_pl.config import validate


class PoisonSteps(Callback):
    """Makes every float the model returns NaN in the given batches (the loss of any mode, the
    embeddings of GradCache's first pass), and records what each batch did to the weights.
    Batches, not steps: a skipped GradCache step does not advance Lightning's global step."""

    def __init__(self, batches):
        self.batches = set(batches)
        self.batch = -1
        self.changed, self.skipped_run, self.opt_steps = {}, {}, {}

    def on_train_start(self, trainer, pl_module):
        model, orig = pl_module.model, pl_module.model.forward
        nan = float("nan")

        def forward(*a, **kw):
            out = orig(*a, **kw)
            if self.batch in self.batches:
                out = {k: v * nan if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
            return out

        model.forward = forward

    def _trainable(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def _adam_steps(self, trainer):
        return sorted({float(s["step"]) for s in trainer.optimizers[0].state.values()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._trainable(pl_module)
        self.batch += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = self._trainable(pl_module)
        self.changed[self.batch] = sum(not torch.equal(after[n], v) for n, v in self._before.items())
        self.skipped_run[self.batch] = pl_module._nonfinite_run
        self.opt_steps[self.batch] = self._adam_steps(trainer)


def _fit(tmp_path, poison, max_steps, *overrides):
    """Trainer, module, datamodule and the `PoisonSteps` callback of a tiny run."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["debug=fast", "logger=csv", f"trainer.max_steps={max_steps}",
                                           "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                                           "train.max_nonfinite_steps=3", "optimizer.warmup_steps=0",
                                           f"paths.output_root={tmp_path}", *overrides])
    validate(cfg)
    bb = build_backbone(cfg.backbone)
    module = build_module(cfg, build_model(cfg, bb), tmp_path)
    cb = PoisonSteps(poison)
    trainer = build_trainer(cfg, tmp_path, [], callbacks=[cb])
    return trainer, module, build_datamodule(cfg, bb.processor), cb


@pytest.mark.parametrize("gradcache", [None, 2])
def test_a_nonfinite_step_changes_nothing_and_is_counted(tmp_path, gradcache):
    trainer, module, dm, cb = _fit(tmp_path, {2, 3}, 6 - 2 * bool(gradcache),
                                   f"train.gradcache.chunk_size={gradcache or 'null'}")
    trainer.fit(module, datamodule=dm)  # without GradCache a skipped step counts towards max_steps
    assert len(cb.changed) == 6
    for b in range(6):
        if b in (2, 3):  # skipped: not one weight, not one Adam step count moved
            assert cb.changed[b] == 0, b
            assert cb.opt_steps[b] == cb.opt_steps[b - 1], b
        else:  # learning: weights move (LoRA's A only once B is non-zero), Adam counts the step
            assert cb.changed[b] > 0, b
            assert cb.opt_steps[b] == [float(b + 1 - (2 if b > 3 else 0))], (b, cb.opt_steps)
    assert [cb.skipped_run[s] for s in range(6)] == [0, 0, 1, 2, 0, 0]
    logged = trainer.logged_metrics
    assert "train/nonfinite_skipped" in logged or any(
        "nonfinite" in k for k in trainer.callback_metrics), sorted(logged)
    assert math.isfinite(float(module.last_terms["loss"]))


@pytest.mark.parametrize("gradcache", [None, 2])
def test_consecutive_nonfinite_steps_stop_the_run_with_advice(tmp_path, gradcache):
    trainer, module, dm, cb = _fit(tmp_path, set(range(1, 10)), 10, f"train.gradcache.chunk_size={gradcache or 'null'}")
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite losses .*lower optimizer.lr"):
        trainer.fit(module, datamodule=dm)
    assert cb.changed[0] > 0 and all(cb.changed[s] == 0 for s in (1, 2))


def _train_with_nan(run_dir, nan: str, *overrides, deepspeed: bool = False):
    """The entry point on 2 CPU processes with the model's outputs poisoned on one rank
    (tests/nan_on_rank.py); returns the finished process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", REMATCH_NAN=nan,
               **({"REMATCH_NAN_DEEPSPEED": "1"} if deepspeed else {}))
    cmd = [sys.executable, str(Path(__file__).parent / "nan_on_rank.py"), f"hydra.run.dir={run_dir}", "debug=fast",
           "logger=csv", "data.batch_size=4", "trainer.devices=2", "trainer.log_every_n_steps=1",
           "trainer.limit_val_batches=0", "trainer.max_steps=4", "optimizer.scheduler=constant",
           "trainer.accelerator=auto" if deepspeed else "trainer.accelerator=cpu", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(run_dir).parent)


@pytest.mark.slow
@pytest.mark.parametrize("gradcache", [None, 2])
def test_ddp_ranks_skip_together_when_one_rank_is_not_finite(tmp_path, gradcache):
    """Rank 1's loss is NaN in its third batch: rank 0 skips that step too (it logs the skip; its
    own loss is finite without GradCache, while GradCache's loss is over the gathered embeddings),
    the ranks stay in step (the run ends, no hang) and AdamW counts one step fewer than the
    batches trained."""
    from rematch_pl.history import read_history

    run = tmp_path / "run"
    res = _train_with_nan(run, "1:2", "strategy=ddp", f"train.gradcache.chunk_size={gradcache or 'null'}")
    assert res.returncode == 0, res.stderr[-4000:]
    rows = read_history(run)
    skipped = [r["train/nonfinite_skipped"] for r in rows if "train/nonfinite_skipped" in r]
    assert sorted(skipped) == [0.0] * (len(skipped) - 1) + [1.0], skipped  # by rank 0, whose loss was finite
    finite = [math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r]  # rank 0's
    assert finite.count(False) == (1 if gradcache else 0), finite
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    adam = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    batches = 4 + (1 if gradcache else 0)  # a skipped GradCache step does not count towards max_steps
    assert adam == {float(batches - 1)}, adam


@pytest.mark.slow
def test_deepspeed_stops_on_a_nonfinite_loss_with_advice(tmp_path):
    """Lightning cannot skip DeepSpeed's backward pass in automatic optimisation: the run stops at
    once, saying to use GradCache (which skips the step, on DeepSpeed too)."""
    pytest.importorskip("deepspeed")
    res = _train_with_nan(tmp_path / "ds", "0:1", "strategy=deepspeed_zero2", deepspeed=True)
    assert res.returncode != 0
    assert "non-finite loss at step 1 under DeepSpeedStrategy" in res.stderr + res.stdout
    assert "train.gradcache.chunk_size" in res.stderr + res.stdout
    gc = _train_with_nan(tmp_path / "ds_gc", "0:1", "strategy=deepspeed_zero2", "train.gradcache.chunk_size=2",
                         deepspeed=True)
    assert gc.returncode == 0, gc.stderr[-4000:]


class RngAtForward(Callback):
    """Records the global RNG state each time the model's forward starts."""

    def __init__(self):
        self.states = []

    def on_train_start(self, trainer, pl_module):
        model, orig = pl_module.model, pl_module.model.forward

        def forward(*a, **kw):
            self.states.append(torch.get_rng_state().clone())
            return orig(*a, **kw)

        model.forward = forward


def test_accumulated_micro_batches_draw_their_own_randomness(tmp_path):
    """With trainer.accumulate_grad_batches=2 the two micro-batches of a step draw different d+
    slots and dropout masks (the seed holds the micro-batch index), and each step differs."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["debug=fast", "logger=csv", "trainer.max_steps=2",
                                           "trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=0",
                                           "optimizer.warmup_steps=0", f"paths.output_root={tmp_path}"])
    validate(cfg)
    bb = build_backbone(cfg.backbone)
    module = build_module(cfg, build_model(cfg, bb), tmp_path)
    cb = RngAtForward()
    trainer = build_trainer(cfg, tmp_path, [], callbacks=[cb])
    trainer.fit(module, datamodule=build_datamodule(cfg, bb.processor))
    assert len(cb.states) == 4  # 2 steps x 2 micro-batches
    for i in range(4):
        for j in range(i):
            assert not torch.equal(cb.states[i], cb.states[j]), (i, j)
