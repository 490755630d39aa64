"""`python tests/deepspeed_cpu.py <overrides>`: `python -m rematch_pl.train` with DeepSpeed on CPU (gloo).

Test harness only. DeepSpeed runs on its CPU accelerator, but Lightning's DeepSpeedStrategy refuses
a non-CUDA accelerator and passes a device index that a CPU device lacks; this lifts exactly those
two checks, everything else (engine, ZeRO partitioning, checkpoints) is the real code path.
"""
import os

import deepspeed
import lightning.pytorch.strategies.deepspeed as lds
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

DeepSpeedStrategy.setup_environment = lambda self: DDPStrategy.setup_environment(self)
lds._validate_device_index_selection = lambda devices: None
_initialize = deepspeed.initialize


def _initialize_on_cpu(args=None, **kwargs):
    if args is not None and getattr(args, "device_rank", 0) is None:  # a CPU device has no index
        args.device_rank = int(os.environ.get("LOCAL_RANK", 0))
    return _initialize(args=args, **kwargs)


deepspeed.initialize = _initialize_on_cpu

from rematch_pl.train import main  # noqa: E402

if __name__ == "__main__":
    main()
