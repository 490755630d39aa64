"""Sharded data parallelism (FSDP2) for ReMatch, LoRA-aware.

`strategy=fsdp` is Lightning's `ModelParallelStrategy` with a pure data-parallel mesh: every
decoder layer of the language model is its own FSDP unit and `ReMatchModel` is the root unit (it
owns the embeddings, LM head, vision tower, learnable tokens, projector and markers). Everything
a step computes goes through the root's forward, so every parameter is gathered when it is used
and its gradient reduce-scattered after. All ranks must run the same sequence of layer calls:
the number of length-bucketed embedding passes is agreed across ranks (`max_over_ranks`).

Checkpoints hold only the trainable weights (LoRA, learnable tokens, projector, markers),
gathered from all ranks into one file: the same layout as a DDP checkpoint, so resume, eval and
export read either. The base backbone is never gathered whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .backbone.model import DTYPES


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers: one FSDP unit each.

    The (frozen) vision tower stays in the root unit: a rank whose batch holds no image skips it,
    and a unit some ranks skip would desynchronise the collectives.
    """
    hf = model.backbone.hf
    names = {n for n in getattr(hf, "_no_split_modules", None) or [] if "Vision" not in n}
    if not names:
        raise ValueError(f"{type(hf).__name__} declares no decoder-layer class in _no_split_modules: "
                         "cannot pick FSDP units")
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True, param_dtype: str | None = None,
                reduce_dtype: str | None = None) -> nn.Module:
    """Apply FSDP2 `fully_shard` to each transformer block, then to the whole model (root unit).

    mesh: a 1-D device mesh (FSDP) or a 2-D one (replicate, shard) for hybrid sharding (HSDP).
    param_dtype / reduce_dtype: optional mixed-precision policy (e.g. bf16 compute, fp32 reduce).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):  # configure_model may run more than once
        return model
    model.max_over_ranks = max_over_ranks
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype] if param_dtype else None,
                              reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # the root keeps its parameters gathered between forward and backward (they are small and reused)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def max_over_ranks(n: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def no_gradient_sync(model: nn.Module):
    """Defer the gradient reduce-scatter (GradCache: every chunk but the last)."""
    units = [m for m in model.modules() if is_sharded(m)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


class FSDPStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (FSDP2) whose checkpoints hold the trainable weights only, gathered
    from all ranks (the module's `on_save_checkpoint` writes them; see `checkpoint.trainable_state_dict`)."""

    strategy_name = "rematch_fsdp"

    def __init__(self, hybrid: bool = False, reshard_after_forward: bool = True, param_dtype: str | None = None,
                 reduce_dtype: str | None = None, world_size: int = 1, num_nodes: int = 1, **kwargs):
        if hybrid:  # mesh (replicate across nodes, shard within a node)
            dp, shard = num_nodes, world_size // num_nodes
        else:  # shard over every rank
            dp, shard = world_size, 1
        super().__init__(data_parallel_size=dp, tensor_parallel_size=shard, save_distributed_checkpoint=False, **kwargs)
        self.hybrid = hybrid
        self.shard_kwargs = dict(reshard_after_forward=reshard_after_forward, param_dtype=param_dtype,
                                 reduce_dtype=reduce_dtype)

    def shard_mesh(self):
        """The mesh `fully_shard` gets: 1-D over all ranks, or 2-D (replicate, shard) for HSDP."""
        mesh = self.device_mesh
        return mesh if self.hybrid else mesh["data_parallel"]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # ReMatchModule.on_save_checkpoint gathers the trainable weights (never the frozen base)

    # Optimizer states are saved whole and keyed by position in the optimizer, exactly as a
    # plain `optimizer.state_dict()` (DDP): a checkpoint resumes under either strategy.
    def _param_names(self, optimizer) -> list[str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        full = get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return {}
        index = {n: i for i, n in enumerate(self._param_names(optimizer))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[n]: st for n, st in full["state"].items()}, "param_groups": groups}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            raise ValueError(f"{path}: a sharded (distributed) checkpoint; strategy=fsdp writes and reads one file")
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only))
        whole = StateDictOptions(full_state_dict=True, strict=False)  # every rank holds the whole file
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=whole)
        saved = checkpoint.get("optimizer_states") or []
        for optimizer, state in zip(self.optimizers, saved):
            names = self._param_names(optimizer)
            by_name = {"state": {names[i]: st for i, st in state["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=whole)
        return checkpoint
