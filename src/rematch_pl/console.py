"""What a training run prints: its parameters by ReMatch part, and a step progress bar.

Lightning's own model summary lists one row (the whole `ReMatchModel`) and a FLOPs column
that reads 0 without an example input; its progress bar counts epochs, which a run driven by
``trainer.max_steps`` over a stream does not have ("Epoch 0/-2"). `parameter_table` counts the
parameters of each part of the method instead (frozen backbone, LoRA, learnable tokens,
projector, feature markers), and `StepProgressBar` shows the steps and the loss terms.
`quiet_lightning_tips` drops Lightning's advertisements ("Tip: ... try installing litlogger").
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import nn


def _part(name: str) -> str:
    """The ReMatch part a parameter of `ReMatchModel` belongs to."""
    if "lora_" in name:
        return "LoRA adapters"
    if name.startswith("fusion."):
        return "learnable tokens (fusion)"
    if name.startswith("matching.projector."):
        return "matching projector"
    if name.startswith("matching."):
        return "<feat_start>/<feat_end> markers"
    if name.startswith("backbone."):
        return "backbone"
    return "other"


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{part: (parameters, trainable)} of a ReMatchModel, in the order the parts appear."""
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        c = counts.setdefault(_part(name), [0, 0])
        c[0] += p.numel()
        c[1] += p.numel() if p.requires_grad else 0
    return {k: (n, t) for k, (n, t) in counts.items()}


SLUGS = {"backbone": "backbone", "LoRA adapters": "lora", "learnable tokens (fusion)": "tokens",
         "matching projector": "projector", "<feat_start>/<feat_end> markers": "markers", "other": "other"}


def parameter_record(counts: dict[str, tuple[int, int]]) -> dict[str, int]:
    """`parameter_counts` as flat logger-friendly numbers: each part's parameters, the total and
    the trainable total (``{"lora": ..., "total": ..., "trainable": ...}``)."""
    rec = {SLUGS.get(part, part): n for part, (n, _) in counts.items()}
    rec["total"] = sum(n for n, _ in counts.values())
    rec["trainable"] = sum(t for _, t in counts.values())
    return rec


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def parameter_table(counts: dict[str, tuple[int, int]], title: str) -> str:
    """A markdown table of `parameter_counts`, with a total row."""
    total, trainable = (sum(c[i] for c in counts.values()) for i in (0, 1))
    rows = [f"{title}", "", "| part | parameters | trainable |", "|---|---:|---:|"]
    rows += [f"| {part} | {_human(n)} | {_human(t)} |" for part, (n, t) in counts.items()]
    share = f" ({100 * trainable / total:.2f}%)" if total else ""
    rows.append(f"| total | {_human(total)} | {_human(trainable)}{share} |")
    return "\n".join(rows)


class ParameterSummary(Callback):
    """Prints `parameter_table` once, on global rank 0, when fitting starts. The counts are taken
    when the callback is made (before a sharded strategy splits the weights across ranks)."""

    def __init__(self, model: nn.Module, title: str):
        self.counts = parameter_counts(model)
        self.text = parameter_table(self.counts, title)

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        print(self.text, flush=True)


def step_progress_bar():
    """A Rich progress bar labelled by step, with the logged terms under short names
    (``loss_cl``, not ``train/loss_cl``); None where `rich` is not installed (Lightning's TQDM
    bar is used then)."""
    try:
        from lightning.pytorch.callbacks import RichProgressBar
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
    except ImportError:
        return None
    if not _RICH_AVAILABLE:
        return None

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            # Lightning's label is "Epoch {e}/{max_epochs - 1}": "Epoch 0/-2" under max_steps
            return f"{'train':{len(self.validation_description)}}"

        @property
        def total_train_batches(self):
            # Lightning's total is the steps *left* (max_steps - global_step) while the bar counts
            # the epoch's batch index, which a resumed run continues: "8/3" after resuming at step 5.
            # Training is one endless epoch here, so the total is every batch of the run.
            t = self.trainer
            if t.max_steps is not None and t.max_steps > 0 and t.num_training_batches == float("inf"):
                return t.max_steps * t.accumulate_grad_batches
            return super().total_train_batches

        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)  # the logger's version (W&B run id): the run dir says it
            return {k.removeprefix("train/"): v for k, v in items.items()}

    return StepProgressBar()


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def quiet_lightning_tips() -> None:
    """Lightning logs a product tip on each fit ("try installing litlogger"); drop only those lines."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in lg.filters):
            lg.addFilter(_DropTips())
