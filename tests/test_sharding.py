"""Sharded strategies on 2 CPU processes (gloo) through the real entry point: strategy=fsdp (FSDP2
through Lightning's ModelParallelStrategy) and DeepSpeed ZeRO-2/3 train exactly as DDP does, with and
without GradCache, save the same trainable weights from all ranks, and resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rematch_pl.history import read_history
from rematch_pl.model import ReMatchModel
from rematch_pl.module import ReMatchModule
from rematch_pl.sharding import shard_units
from test_train import ENV, train
from tinyutil import KINDS, make_backbone

COMMON = ["debug=fast", "logger=csv", "data.batch_size=4", "trainer.devices=2", "trainer.accelerator=cpu",
          "optimizer.scheduler=constant", "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_units_are_the_decoder_layers(kind):
    model = ReMatchModel(make_backbone(kind), k=4, matching="all")
    units = shard_units(model)
    layers = model.backbone.hf.model.language_model.layers
    assert units == list(layers)  # the vision tower stays in the root unit (ranks may skip it)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_without_images_still_calls_the_vision_tower_when_ranks_agree(kind):
    """Sharded training: if another rank has images, a text-only rank runs the tower on a blank image."""
    model = ReMatchModel(make_backbone(kind), k=2, matching="none")
    calls = []
    model.backbone.hf.model.visual.register_forward_hook(lambda *a: calls.append(1))
    none = torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    assert model.image_features(*none) == [] and calls == []  # alone: nothing to run
    model.max_over_ranks = lambda n: 1  # another rank has images
    assert model.image_features(*none) == [] and calls == [1]
    model.max_over_ranks = lambda n: n  # no rank has images: nobody runs it
    assert model.image_features(*none) == [] and calls == [1]


def test_resume_refuses_a_different_optimisation_mode():
    module = ReMatchModule(ReMatchModel(make_backbone("qwen2vl"), k=2, matching="none"))  # automatic
    module.on_load_checkpoint({"rematch_manual_optimization": False})  # same mode: fine
    with pytest.raises(ValueError, match="gradcache.chunk_size"):
        module.on_load_checkpoint({"rematch_manual_optimization": True})


def _curve(run_dir):
    return {r["step"]: r["train/loss"] for r in read_history(run_dir) if "train/loss" in r}


def _val(run_dir):
    return [r["val/hit@1"] for r in read_history(run_dir) if "val/hit@1" in r]


def _weights(run_dir):
    out = {}
    for name in ("adapter/adapter_model.safetensors", "rematch_modules.safetensors"):
        out.update(load_file(str(run_dir / "adapter" / name)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    out = {}
    for name, extra in {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"],
                        "fsdp_gc": ["strategy=fsdp", "train.gradcache.chunk_size=2"]}.items():
        out[name] = root / name
        train(out[name], *COMMON, *extra)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fsdp", "fsdp_gc"])
def test_fsdp_trains_exactly_as_ddp(runs, variant):
    ref, got = _curve(runs["ddp"]), _curve(runs[variant])
    assert sorted(ref) == sorted(got) == [0, 1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, ref, got)
    assert len(_val(runs["ddp"])) == 1 and _val(runs[variant]) == pytest.approx(_val(runs["ddp"]), abs=1e-6)
    a, b = _weights(runs["ddp"]), _weights(runs[variant])  # gathered from both ranks into whole tensors
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    ckpt = torch.load(runs[variant] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(type(p) is torch.Tensor for p in ckpt["state_dict"].values())  # whole tensors, no DTensor
    assert len(ckpt["state_dict"]) == len(ckpt["optimizer_states"][0]["state"])  # trainable weights only


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp(runs, tmp_path):
    """2 steps under DDP, then resume=auto under FSDP: the loss curve of an uninterrupted FSDP run."""
    run = tmp_path / "run"
    train(run, *COMMON, "strategy=ddp", "train.gradcache.chunk_size=2", "trainer.max_steps=2")
    train(run, *COMMON, "strategy=fsdp", "train.gradcache.chunk_size=2", "resume=auto")
    ref, got = _curve(runs["fsdp_gc"]), _curve(run)
    assert sorted(got) == [0, 1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, ref, got)


def train_deepspeed(run_dir, *overrides):
    """The entry point under DeepSpeed on CPU (see tests/deepspeed_cpu.py)."""
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, str(Path(__file__).parent / "deepspeed_cpu.py"), f"hydra.run.dir={run_dir}", *overrides,
           "trainer.accelerator=auto"]  # (config validation refuses DeepSpeed with accelerator=cpu)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=run_dir.parent)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


DEEPSPEED = {
    "zero2": ["strategy=deepspeed_zero2"],
    # every parameter partitioned (the default keeps parameters under 1e5 elements whole, i.e. all of
    # the tiny model's LoRA): learnable tokens and LoRA are gathered when used and when saved
    "zero3_gc": ["strategy=deepspeed_zero3", "strategy.param_persistence_threshold=0", "train.gradcache.chunk_size=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(DEEPSPEED))
def test_deepspeed_trains_exactly_as_ddp(runs, variant, tmp_path):
    run = tmp_path / variant
    train_deepspeed(run, *COMMON, *DEEPSPEED[variant])
    ref, got = _curve(runs["ddp"]), _curve(run)
    assert sorted(got) == [0, 1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, ref, got)
    assert _val(run) == pytest.approx(_val(runs["ddp"]), abs=1e-6)
    a, b = _weights(runs["ddp"]), _weights(run)
    assert a.keys() == b.keys()
    # AdamW moves every weight by about lr (1e-3) per step whatever its gradient's size, so a
    # weight whose gradient is near zero turns the engines' different reduction order into up
    # to a few 1e-5 (seen: 1.3e-5 after 4 steps); a wrong gradient moves weights by ~lr
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_zero3_gradcache_resumes(runs, tmp_path):
    """ZeRO-3 + GradCache, 2 steps then resume=auto from DeepSpeed's checkpoint directory: DDP's curve."""
    run = tmp_path / "run"
    train_deepspeed(run, *COMMON, *DEEPSPEED["zero3_gc"], "trainer.max_steps=2")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # DeepSpeed's own layout, frozen base excluded
    tags = [p.name for p in last.iterdir() if p.is_dir() and not p.is_symlink()]  # one complete tag, linked
    assert tags == [os.readlink(last / "checkpoint")] and tags[0].startswith("step2-")
    train_deepspeed(run, *COMMON, *DEEPSPEED["zero3_gc"], "resume=auto")
    ref, got = _curve(runs["ddp"]), _curve(run)
    assert sorted(got) == [0, 1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, ref, got)
