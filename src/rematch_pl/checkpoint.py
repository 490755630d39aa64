"""Saving and restoring what training changes: LoRA adapter + ReMatch's own modules (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def trainable_state_dict(model: torch.nn.Module, engine=None) -> dict[str, torch.Tensor]:
    """Names and whole values of every trainable parameter (LoRA, learnable tokens, projector, markers).

    Under FSDP the parameters are sharded DTensors: each is gathered (a collective, so every rank
    must call this, in the same order). Under DeepSpeed ZeRO-3 the partitions are gathered; pass
    the `engine`: ZeRO-3 prefetches parameters along the previous step's module order, and a
    step that called the backbone fewer times than the one before (the number of length buckets
    varies) leaves a prefetched parameter in flight, which a gather cannot take; the engine
    waits for and releases those first.
    """
    from torch.distributed.tensor import DTensor

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "ds_id") for p in params.values()):  # DeepSpeed ZeRO-3: gather the partitions
        import deepspeed

        if hasattr(engine, "empty_partition_cache"):
            engine.empty_partition_cache()
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items() if k in params}


def save_trainable(model: torch.nn.Module, out_dir: str | Path, meta: dict | None = None,
                   is_main: bool = True, engine=None) -> Path:
    """Write the PEFT adapter (`adapter/`), ReMatch modules (`rematch_modules.safetensors`) and `meta.json`.

    Sharded (FSDP, ZeRO-3) models: call it on every rank (the weights are gathered; `engine`: see
    `trainable_state_dict`); `is_main` writes.
    """
    out = Path(out_dir)
    state = trainable_state_dict(model, engine)  # whole tensors on every rank
    if not is_main:
        return out
    out.mkdir(parents=True, exist_ok=True)
    peft_model = model.backbone.model
    prefix = "backbone.model."
    if hasattr(peft_model, "save_pretrained") and hasattr(peft_model, "peft_config"):
        adapter = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "lora_" in k}
        peft_model.save_pretrained(out / "adapter", safe_serialization=True, state_dict=adapter)
    extra = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    save_file(extra, str(out / "rematch_modules.safetensors"))
    full = {k: v for k, v in state.items() if k.startswith("backbone.") and "lora_" not in k}
    if full:  # full fine-tuning without LoRA
        save_file(full, str(out / "backbone_trainable.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))
    return out


MODULES_FILE = "rematch_modules.safetensors"


def missing_modules_error(folder: str | Path, modules: list[str]) -> FileNotFoundError:
    """The error for a checkpoint folder without `MODULES_FILE` although its model has ReMatch modules."""
    shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    return FileNotFoundError(
        f"{MODULES_FILE} is missing from {folder}: it holds this model's trained ReMatch modules ({shown}: "
        f"learnable tokens, projector, <feat_start>/<feat_end> markers), which would otherwise keep their fresh "
        f"initialisation. Copy it back from the run's adapter/ folder (training writes it next to meta.json), "
        f"or export the run again")


def load_trainable(model: torch.nn.Module, in_dir: str | Path) -> None:
    """Restore what `save_trainable` wrote into a model built with the same configuration.

    Every ReMatch module of `model` (its parameters outside the backbone: learnable tokens,
    projector, markers) must be in ``rematch_modules.safetensors``; a missing file or entry is an
    error, never a module left at its fresh initialisation."""
    src = Path(in_dir)
    own = [n for n, _ in model.named_parameters() if not n.startswith("backbone.")]
    if own and not (src / MODULES_FILE).is_file():
        raise missing_modules_error(src, own)
    state = {}
    if (src / "adapter").exists():
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        adapter = load_peft_weights(str(src / "adapter"), device="cpu")
        res = set_peft_model_state_dict(model.backbone.model, adapter)
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"adapter in {src} does not fit this backbone: {res.unexpected_keys[:5]}")
    for name in (MODULES_FILE, "backbone_trainable.safetensors"):
        if (src / name).exists():
            state.update(load_file(str(src / name)))
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{src}: weights {missing[:5]} do not exist in this model (different fusion/matching config?)")
    absent = [n for n in own if n not in state]
    if absent:
        raise ValueError(f"{src / MODULES_FILE}: this model's modules {absent[:5]} are not in it (written by a "
                         f"model with another fusion/matching config?)")
    model.load_state_dict(state, strict=False)
