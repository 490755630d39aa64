"""The host/device contract of a step, checked without a GPU: the model and pixels on PyTorch's
`meta` device stand for the accelerator, the batch's packing metadata stays on the CPU (as
`MMEBDataModule.transfer_batch_to_device` leaves it). Meta tensors have no values, so any read of
a device tensor by the host (`.item()`, `.tolist()`, `int()`, `bool()`: a synchronisation on a
GPU) fails, and `StrictDevices` fails any op that mixes host and device tensors (a device
mismatch, or a hidden blocking copy, on a GPU). No part is exempt: transformers' vision tower
takes its position ids and segments computed on the host (`vision_attention.vision_geometry`)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rematch_pl.backbone.model import load_backbone
from rematch_pl.bench import VARIANTS, make_batch
from rematch_pl.gradcache import gradcache_step
from rematch_pl.memory import meta_copy, to_meta
from rematch_pl.model import ReMatchModel


class StrictDevices(TorchDispatchMode):
    """Fails an op whose tensor operands (beyond 0-d scalars) sit on more than one device."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        flat = [x for a in (*args, *kwargs.values()) for x in (a if isinstance(a, (list, tuple)) else (a,))
                if isinstance(x, torch.Tensor) and x.dim() > 0]
        devices = {x.device.type for x in flat}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes tensors on {sorted(devices)}")
        return func(*args, **kwargs)


def _model(variant: str, backbone: str = "qwen2vl", **kw):
    torch.manual_seed(0)
    bb = load_backbone(f"tiny://{backbone}", dtype="fp32", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       gradient_checkpointing=True)
    batch = make_batch(bb.processor, 4, 112, "cpu")
    model = meta_copy(ReMatchModel(bb, **{**VARIANTS[variant], **kw}).train())
    return model, to_meta(batch)


@pytest.mark.parametrize("variant,chunk,backbone", [
    ("baseline", 0, "qwen2vl"), ("rematch", 0, "qwen2vl"), ("rematch", 2, "qwen2vl"),
    ("rematch_feat_feat", 0, "qwen25vl")])
def test_training_step_never_reads_the_device_nor_mixes_devices(variant, chunk, backbone):
    model, batch = _model(variant, backbone)
    assert batch["pixel_values"].is_meta and batch["qry"]["ids"].device.type == "cpu"
    mode = StrictDevices()
    with mode:
        if chunk:
            terms = gradcache_step(model, batch, chunk, backward=lambda t: t.backward())
        else:
            terms = model(batch)
            terms["loss"].backward()
    assert mode.ops > 1000 and terms["loss"].is_meta
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)


def test_eval_forward_never_reads_the_device_nor_mixes_devices():
    from rematch_pl.evaluation.engine import embed_batch

    model, batch = _model("rematch_no_matching")
    model.eval()
    items = {"items": batch["qry"], "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    with torch.no_grad(), StrictDevices():
        out = embed_batch(model, items, [["qry", "doc"]] * 4, torch.device("meta"), torch.float32,
                          out_device="meta")
    assert len(out) == 8 and all(e.is_meta for _, _, e in out)


def test_the_check_catches_a_host_read_and_a_mixed_op():
    """The two failures the tests above rely on do happen on meta."""
    model, batch = _model("baseline")
    batch["qry"] = {k: v.to("meta") for k, v in batch["qry"].items()}  # metadata on the device
    with pytest.raises(Exception, match="meta"), StrictDevices():
        model(batch)
    with pytest.raises(AssertionError, match="mixes tensors"), StrictDevices():
        torch.ones(2, device="meta") + torch.ones(2)
