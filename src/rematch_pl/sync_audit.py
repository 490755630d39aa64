"""Where a step would make the host wait for the GPU, found on the CPU.

On a GPU, reading a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``, an
``if`` on a tensor) or an operator whose output size depends on device values (``nonzero``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``unique``) blocks the host
until the device has run everything queued before it. The device then idles while the host
enqueues what follows: one such point in a step costs a pipeline drain, and torch.profiler can
count them (``bench --suite profile``) but not say where they are.

`SyncAudit` says where, on any machine. It tracks which tensors would live on the device: the
model's parameters and buffers, the tensors passed to `track` (the batch's pixels), and every
tensor computed from one of those (a `TorchDispatchMode` sees each operator, forward and
backward). Host tensors (ids, lengths, grids, index arrays built with numpy) stay untracked, so
reading them is free, as it is on a GPU. Each operator that would synchronise on a tracked
input is recorded with the innermost frames of the Python stack that issued it.

A tensor made by a factory given a device (``torch.arange(n, device=x.device)``) is taken for a
device tensor, one made without a device for a host tensor. A host tensor with elements used as
an operand of a device operator (an index list, ``logits[..., [yes, no]]``) would be copied to
the device from pageable memory, which waits for the device too; so would
``torch.tensor(data, device=...)``. A factory given the literal ``device="cpu"`` makes a host
tensor (AdamW's step counts). Both are recorded. What the audit cannot see: a factory given
``device=x.device`` for a host `x` counts as a device tensor (a false alarm if it is read); code
that works on host tensors by design is named in `HOST_FUNCTIONS` (the audit ignores what runs
inside it).
"""

from __future__ import annotations

import json
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Operators that wait for the device on CUDA: a device value read on the host, or an output
# whose size depends on device values.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
}
_BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                   aten._index_put_impl_.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
# Factories: with a device given, their output is a device tensor; `tensor`/`as_tensor` with a
# device also copy host data to it (synchronously from pageable memory).
_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "eye", "rand", "randn", "randint", "randperm",
              "linspace", "tril_indices", "triu_indices")
_HOST_DATA = ("tensor", "as_tensor")


# Functions that compute on host tensors by design (their `device=` is the host grid's): what
# runs inside them is not audited.
HOST_FUNCTIONS = ("vision_geometry", "slice_batch")


@dataclass
class Sync:
    op: str  # the operator (or Tensor method) that would wait for the device
    where: list[str]  # innermost Python frames outside torch: "file:line in function"

    def __str__(self) -> str:
        return f"{self.op} at " + " <- ".join(self.where)


@dataclass
class SyncReport:
    syncs: list[Sync] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.syncs)

    def summary(self) -> list[tuple[str, int]]:
        """Distinct sync points (op and innermost frame) with how often each ran, most frequent first."""
        return Counter(f"{s.op} at {s.where[0] if s.where else '?'}" for s in self.syncs).most_common()


def _frames(depth: int, stack=None) -> list[str]:
    """The innermost `depth` frames of the current stack outside torch and this module."""
    out = []
    for fr in reversed(stack or traceback.extract_stack()):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or f.endswith("/rematch_pl/sync_audit.py") or "/contextlib.py" in f:
            continue
        out.append(f"{_short(f)}:{fr.lineno} in {fr.name}")
        if len(out) == depth:
            break
    return out


def _short(path: str) -> str:
    for key in ("/rematch_pl/", "/site-packages/", "/tests/"):
        if key in path:
            return path.split(key, 1)[1] if key != "/tests/" else "tests/" + path.split(key, 1)[1]
    return path


class SyncAudit(TorchDispatchMode):
    """Context manager recording would-be host-device synchronisations (see the module docstring).

    >>> with SyncAudit(model, tracked=[pixels]) as audit:
    ...     model(batch)["loss"].backward()
    >>> audit.report.summary()
    """

    def __init__(self, *modules: torch.nn.Module, tracked=(), optimizers=(), depth: int = 3,
                 host_functions=HOST_FUNCTIONS):
        super().__init__()
        # id -> tensor, held: a tensor saved for backward keeps its identity only while its
        # Python object lives (autograd hands out a new one once it is gone)
        self.device: dict[int, torch.Tensor] = {}
        # made by a factory inside an operator (a backward formula's zeros): on the device of
        # the operator's inputs, unknown here; never taken for a host operand
        self.neutral: dict[int, torch.Tensor] = {}
        self._python_factory = 0  # inside a torch.<factory> call made from Python
        self.report = SyncReport()
        self.depth = depth
        self.host_functions = set(host_functions)
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                self.track(t)
                if isinstance(t, torch.nn.Parameter) and t.grad is not None:  # accumulated into
                    self.track(t.grad)
        for t in tracked:
            self.track(t)
        for opt in optimizers:  # moments live on the device; a non-capturable step count on the host
            for state in opt.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        self.track(v)
        self._patched = {}

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Treat `t` (and what is computed from it) as a device tensor."""
        self.device[id(t)] = t
        return t

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self.device.get(id(t)) is t

    def _in_host_code(self, stack) -> bool:
        return any(fr.name in self.host_functions for fr in stack)

    def _record(self, op: str) -> None:
        stack = traceback.extract_stack()
        if not self._in_host_code(stack):
            self.report.syncs.append(Sync(op, _frames(self.depth, stack)))

    # Tensor methods that read memory on the host without dispatching an operator.
    _HOST_READS = ("tolist", "numpy", "__array__")

    def _copy_to_device(self, t: torch.Tensor, device) -> torch.Tensor:
        """`to_device` under the audit: a tracked copy (on the CPU the copy would be `t` itself)."""
        return self.track(t.clone()) if not self.on_device(t) else t

    def __enter__(self):
        from .backbone import sequence

        audit = self
        self._hook, sequence.copy_hook = sequence.copy_hook, self._copy_to_device
        for name in self._HOST_READS:
            orig = getattr(torch.Tensor, name)

            def read(t, *a, _orig=orig, _name=name, **kw):
                if audit.on_device(t):
                    audit._record(f"Tensor.{_name}")
                return _orig(t, *a, **kw)

            self._patched[("Tensor", name)] = orig
            setattr(torch.Tensor, name, read)
        for name in _FACTORIES + _HOST_DATA:
            orig = getattr(torch, name)

            def make(*a, _orig=orig, _name=name, **kw):
                audit._python_factory += 1
                try:
                    out = _orig(*a, **kw)
                finally:
                    audit._python_factory -= 1
                dev = kw.get("device")
                if dev is not None and dev != "cpu" and not audit._in_host_code(traceback.extract_stack()):
                    if _name in _HOST_DATA and not (isinstance(a[0], torch.Tensor) and audit.on_device(a[0])):
                        audit._record(f"torch.{_name}(host data, device=...)")
                    audit.track(out)
                return out

            self._patched[("torch", name)] = orig
            setattr(torch, name, make)
        return super().__enter__()

    def __exit__(self, *exc):
        from .backbone import sequence

        sequence.copy_hook = self._hook
        for (owner, name), orig in self._patched.items():
            setattr(torch.Tensor if owner == "Tensor" else torch, name, orig)
        self._patched = {}
        return super().__exit__(*exc)

    def _syncs(self, func, args, kwargs, flat) -> bool:
        if func in SYNC_OPS:
            return any(self.on_device(t) for t in flat)
        if func in _BOOL_INDEX_OPS:  # a boolean mask as an index: nonzero on the device
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and
                       (self.on_device(i) or self.on_device(args[0])) for i in indices if i is not None)
        if func in _REPEAT_INTERLEAVE:  # output size read from the device unless given
            return kwargs.get("output_size") is None and any(self.on_device(t) for t in flat)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if self._syncs(func, args, kwargs, flat):
            self._record(str(func.overloadpacket.__name__))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_dev = [self.on_device(t) for t in tensors]
        if any(on_dev) and any(not d and t.dim() > 0 and self.neutral.get(id(t)) is not t
                               for t, d in zip(tensors, on_dev)):
            self._record(f"{func.overloadpacket.__name__} (host tensor operand: copied to the device)")
        out = func(*args, **kwargs)
        if not tensors and not self._python_factory:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.neutral[id(t)] = t
        if any(on_dev):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
        return out


def suite_syncs(backbone: str = "qwen2vl", batch_size: int = 4, image_size: int = 112, chunk: int = 2,
                depth: int = 4) -> dict:
    """`bench --suite syncs`: would-be synchronisations of one training step of each variant
    (`bench.VARIANTS`, plus a GradCache step with the AdamW update) and of an embedding pass,
    on the tiny backbone on the CPU. Prints each sync point; returns {run: [sync, ...]}."""
    from .backbone.model import load_backbone
    from .bench import VARIANTS, make_batch
    from .memory import training_step
    from .model import ReMatchModel

    torch.manual_seed(0)
    bb = load_backbone(f"tiny://{backbone}", dtype="fp32", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       gradient_checkpointing=True)
    batch = make_batch(bb.processor, batch_size, image_size, "cpu", pixel_dtype=bb.pixel_dtype)
    runs: dict[str, list[str]] = {}

    def audit(name, model, step, optimizers=()):
        step()  # warm-up: lazily made state (optimizer moments) exists before the audit
        with SyncAudit(model, tracked=[batch["pixel_values"]], optimizers=optimizers, depth=depth) as a:
            step()
        runs[name] = [str(s) for s in a.report.syncs]
        sites = a.report.summary()
        print(f"  {name:32s} {len(a.report):3d} sync(s)" + "".join(f"\n      {n}x {k}" for k, n in sites), flush=True)

    print(f"bench syncs: tiny {backbone}, batch {batch_size}, images {image_size}px, CPU (see sync_audit.py)")
    for name, kw in VARIANTS.items():
        model = ReMatchModel(bb, **kw).train()
        audit(f"step {name}", model, lambda m=model: m(batch)["loss"].backward())
    model = ReMatchModel(bb, **VARIANTS["rematch"]).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    audit(f"GradCache step (chunk {chunk}) + AdamW", model, training_step(model, batch, chunk, opt), optimizers=[opt])
    model.eval()

    def encode():
        with torch.no_grad():
            model.encode(batch["qry"], batch["pixel_values"], batch["image_grid_thw"])

    audit("embedding pass (inference)", model, encode)
    return {"backbone": f"tiny {backbone}", "batch": batch_size, "image_size": image_size, "runs": runs}


class SyncAuditCallback(Callback):
    """`train.sync_audit=N`: audit the first N training steps of a real run (Lightning hooks from
    batch start to batch end: forward, backward, optimizer step, logging) and write the sync
    points to ``sync_audit.json`` in the run directory. A diagnostic: the audit slows steps down."""

    def __init__(self, steps: int, out=None):
        self.steps, self.out = steps, out
        self.audit, self.reports = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.reports) < self.steps:
            self.audit = SyncAudit(pl_module, tracked=[batch["pixel_values"]],
                                   optimizers=trainer.optimizers).__enter__()

    def _close(self):
        if self.audit is not None:
            self.audit.__exit__(None, None, None)
            self.reports.append(self.audit.report)
            self.audit = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.audit is None:
            return
        self._close()
        if len(self.reports) == self.steps and self.out is not None and trainer.is_global_zero:
            self.write()

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def write(self) -> None:
        steps = [[str(s) for s in r.syncs] for r in self.reports]
        Path(self.out).write_text(json.dumps({"steps": steps}, indent=2))
        print(f"sync audit: {sum(map(len, steps))} would-be synchronisation(s) in {len(steps)} step(s), "
              f"written {self.out}", flush=True)
        for k, n in SyncReport([s for r in self.reports for s in r.syncs]).summary():
            print(f"  {n}x {k}", flush=True)
