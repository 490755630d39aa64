"""`REMATCH_NAN=RANK:B1,B2 python tests/nan_on_rank.py <overrides>`: `python -m rematch_pl.train`
with every float the model returns made NaN on one rank in the given training batches (0-based).

Test harness only (the non-finite skip under DDP and DeepSpeed). `REMATCH_NAN_DEEPSPEED=1` also
applies `deepspeed_cpu.py`'s patches (DeepSpeed on CPU).
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("REMATCH_NAN_DEEPSPEED"):
    importlib.import_module("deepspeed_cpu")  # its patches, not its main

import torch  # noqa: E402

from rematch_pl.model import ReMatchModel  # noqa: E402
from rematch_pl.module import ReMatchModule  # noqa: E402
from rematch_pl.train import main  # noqa: E402

_rank, _batches = os.environ["REMATCH_NAN"].split(":")
BAD = {int(b) for b in _batches.split(",")}
state = {"batch": -1, "poison": False}
_step, _forward = ReMatchModule.training_step, ReMatchModel.forward


def training_step(self, batch, batch_idx):
    state["batch"] += 1
    state["poison"] = self.global_rank == int(_rank) and state["batch"] in BAD
    try:
        return _step(self, batch, batch_idx)
    finally:
        state["poison"] = False


def forward(self, *a, **kw):
    out = _forward(self, *a, **kw)
    if state["poison"]:
        out = {k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    return out


ReMatchModule.training_step, ReMatchModel.forward = training_step, forward

if __name__ == "__main__":
    main()
