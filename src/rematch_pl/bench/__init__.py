"""Benchmarks: figures, not tests (`python -m rematch_pl.bench --help`; the suites are listed in
`bench/cli.py`). One module per kind of figure:

- `common`: Qwen2-VL-2B/7B-shaped backbones with random weights, MMEB-like batches, the step
  variants compared, timing, printing and writing results;
- `train`: training steps (`--suite matching | train | max_batch`);
- `flops`: the FLOPs of a step from its real token layout (`--suite flops`, MFU);
- `plan`: the planned peak memory of a step (`--suite memory`);
- `profile`: a step under torch.profiler (`--suite profile`);
- `kernels`: the vision tower's and the LoRA branch's fast paths (`--suite vision | lora`);
- `cli`: the command line; `--suite syncs` lives in `rematch_pl.sync_audit`.
"""

from .cli import main
from .common import (SHAPES, VARIANTS, make_batch, matmul_peak_tflops, pick_variants, print_rows, shaped_backbone,
                     timeit, write_results)
from .flops import llm_forward_flops, step_flops, suite_flops, vision_flops
from .kernels import suite_lora, suite_vision
from .plan import suite_memory
from .profile import PHASES, device_busy_s, profile_step, suite_profile
from .train import largest_batch, print_table, suite_matching, suite_max_batch, suite_train

__all__ = ["SHAPES", "VARIANTS", "PHASES", "main", "make_batch", "matmul_peak_tflops", "pick_variants", "print_rows",
           "shaped_backbone", "timeit", "write_results", "llm_forward_flops", "step_flops", "suite_flops",
           "vision_flops", "suite_lora", "suite_vision", "suite_memory", "device_busy_s", "profile_step",
           "suite_profile", "largest_batch", "print_table", "suite_matching", "suite_max_batch", "suite_train"]
