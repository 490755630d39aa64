"""The sync audit finds every kind of host-device synchronisation on the CPU, raises no false
alarm on host work, and shows that no training or embedding step waits for the device (a real
run: once per step, after its backward passes)."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from rematch_pl.backbone.model import load_backbone
from rematch_pl.bench import VARIANTS, make_batch
from rematch_pl.build import CONF_DIR
from rematch_pl.gradcache import gradcache_step
from rematch_pl.model import ReMatchModel
from rematch_pl.sync_audit import SyncAudit


def _ops(audit):
    return [s.op for s in audit.report.syncs]


def test_each_kind_of_sync_is_found_where_it_is():
    lin = torch.nn.Linear(4, 3)
    x, host = torch.randn(5, 4), torch.randn(5, 4)
    with SyncAudit(lin, tracked=[x]) as a:
        y = lin(x)
        y.sum().item()
        y.tolist()
        bool(y.sum() > 0)
        (y > 0).nonzero()
        y[y > 0]
        y[..., [0, 2]]  # a list index is copied to the device from pageable memory
        torch.tensor([1, 2], device=y.device)
        torch.repeat_interleave(y[:, 0].long().abs(), y[:, 1].long().abs())
        y.sum().backward()
        lin.weight.grad.norm().item()  # gradients are device tensors
        lin(host)  # a host input is copied to the device
    assert _ops(a) == ["_local_scalar_dense", "Tensor.tolist", "_local_scalar_dense", "nonzero", "index",
                       "index (host tensor operand: copied to the device)", "torch.tensor(host data, device=...)",
                       "repeat_interleave", "_local_scalar_dense", "addmm (host tensor operand: copied to the device)"]
    lines = [s.where[0] for s in a.report.syncs]
    assert all("test_sync_audit.py" in w for w in lines) and len(set(lines)) == len(lines)  # each at its line


def test_host_work_and_device_work_raise_no_alarm():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with SyncAudit(lin, tracked=[x]) as a:
        lengths = torch.tensor([3, 1, 2])  # host metadata: read freely
        n = int(lengths.max()) + len(lengths.tolist())
        steps = torch.tensor(0.0, device="cpu")  # AdamW's host step count
        steps.item()
        y = lin(x[:n])  # slicing with host ints
        idx = torch.arange(3, device=y.device)  # a device factory
        z = y[idx] * torch.ones(3, 1, device=y.device)
        (z.softmax(-1) ** 2).sum().backward()
    assert _ops(a) == []


def _tiny(backbone="qwen2vl"):
    torch.manual_seed(0)
    bb = load_backbone(f"tiny://{backbone}", dtype="fp32", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       gradient_checkpointing=True)
    return bb, make_batch(bb.processor, 4, 112, "cpu", pixel_dtype=bb.pixel_dtype)


@pytest.mark.parametrize("variant,backbone", [(v, "qwen2vl") for v in VARIANTS] + [("rematch", "qwen25vl")])
def test_a_training_step_never_waits_for_the_device(variant, backbone):
    bb, batch = _tiny(backbone)
    model = ReMatchModel(bb, **VARIANTS[variant]).train()
    with SyncAudit(model, tracked=[batch["pixel_values"]]) as a:
        model(batch)["loss"].backward()
    assert a.report.syncs == [], a.report.summary()


def test_a_gradcache_step_and_adamw_never_wait_for_the_device():
    bb, batch = _tiny()
    model = ReMatchModel(bb, **VARIANTS["rematch"]).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with SyncAudit(model, tracked=[batch["pixel_values"]]) as a:
        for _ in range(2):  # the first step makes the moments inside the audit
            gradcache_step(model, batch, 2, backward=lambda t: t.backward())
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert a.report.syncs == [], a.report.summary()


def test_an_embedding_pass_never_waits_for_the_device():
    bb, batch = _tiny()
    model = ReMatchModel(bb, **VARIANTS["rematch"]).eval()
    with torch.no_grad(), SyncAudit(model, tracked=[batch["pixel_values"]]) as a:
        model.encode(batch["qry"], batch["pixel_values"], batch["image_grid_thw"], side="doc")
    assert a.report.syncs == [], a.report.summary()


@pytest.mark.parametrize("gradcache", [None, 2])
def test_a_training_run_reads_the_device_once_per_step_after_backward(tmp_path, gradcache):
    """`train.sync_audit=N` on a real Lightning run: each step reads one flag (was the loss finite
    on every rank), after its backward passes; before, the automatic-optimisation step read it
    between the forward and backward passes, plus every loss term."""
    from rematch_pl.train import run

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["debug=fast", "logger=csv", "trainer.max_steps=3",
                                           "trainer.limit_val_batches=0", "train.sync_audit=2", "save_adapter=false",
                                           f"train.gradcache.chunk_size={gradcache or 'null'}",
                                           f"paths.output_root={tmp_path}"])
    run(cfg, tmp_path / "run")
    steps = json.loads((tmp_path / "run" / "sync_audit.json").read_text())["steps"]
    assert len(steps) == 2
    for syncs in steps:
        assert len(syncs) == 1 and syncs[0].startswith("_local_scalar_dense at module.py"), syncs
        assert "_all_finite" in syncs[0]
        assert ("on_before_optimizer_step" in syncs[0]) == (gradcache is None), syncs[0]
