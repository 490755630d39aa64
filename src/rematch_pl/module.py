"""LightningModule: optimisation, logging of every loss term and throughput, validation Hit@1."""

from __future__ import annotations

import logging
import os
import time

import lightning as L
import torch

from .checkpoint import trainable_state_dict
from .evaluation import evaluate_subset
from .model import ReMatchModel

log = logging.getLogger(__name__)


def host_rss_gb() -> float | None:
    """This process's resident memory now (GiB; Linux `/proc`), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


class ReMatchModule(L.LightningModule):
    def __init__(self, model: ReMatchModel, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0, scheduler: str = "cosine",
                 max_steps: int = 1000, min_lr_ratio: float = 0.0, gradcache_chunk: int | None = None,
                 gradient_clip_val: float | None = None, max_nonfinite_steps: int = 10, seed: int = 0,
                 rows_log: str | None = None):
        super().__init__()
        self.seed = seed
        self.rows_log = rows_log
        self.gradcache_chunk = gradcache_chunk
        self.automatic_optimization = gradcache_chunk is None  # GradCache runs its own backward passes
        self.clip_val = gradient_clip_val
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_run = 0
        self._nonfinite_pending: torch.Tensor | None = None  # micro-batches with a non-finite loss (device)
        if scheduler not in ("cosine", "constant", "linear"):
            raise ValueError(f"optimizer.scheduler={scheduler!r}: expected cosine, constant or linear")
        self.model = model
        self.model.train()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.scheduler_name, self.max_steps = warmup_steps, scheduler, max_steps
        self.min_lr_ratio = min_lr_ratio
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self._t_step = None
        self._val_items: dict[str, list] = {}
        self.last_val: dict[str, float] = {}
        self.last_terms: dict[str, torch.Tensor] = {}  # the last step's terms, detached (read at the end)
        self.train_time_s = 0.0
        self.train_samples = 0

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "fusion" in name or "markers" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        warm, total, floor, kind = self.warmup_steps, max(self.max_steps, 1), self.min_lr_ratio, self.scheduler_name

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / max(warm, 1)
            if kind == "constant":
                return 1.0
            progress = min((step - warm) / max(total - warm, 1), 1.0)
            if kind == "linear":
                return floor + (1 - floor) * (1 - progress)
            return floor + (1 - floor) * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather(x, sync_grads=True)

    def on_train_batch_start(self, batch, batch_idx):
        # Every step's randomness (slot of d+, dropout) is a function of (seed, step, micro-batch,
        # rank) alone, so a resumed run repeats the uninterrupted one exactly, whatever ran in
        # between; the micro-batches of one step (trainer.accumulate_grad_batches) draw apart.
        micro = batch_idx % max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        torch.manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank + micro * 7_919_713)
        if self.rows_log:
            import json
            from pathlib import Path

            path = Path(self.rows_log.format(rank=self.global_rank))
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"step": self.global_step, "rows": list(batch.get("row_id", []))}) + "\n")
        self._t_step = time.perf_counter()

    @staticmethod
    def _nonfinite(loss: torch.Tensor) -> torch.Tensor:
        return (~torch.isfinite(loss.detach())).float()  # [] on the device: no host read

    def _all_finite(self, bad: torch.Tensor) -> bool:
        """True when no rank counted a non-finite loss in `bad` (all ranks skip a step together).
        The step's one read of a device value on the host. Logs ``train/nonfinite_skipped`` every
        step: the skipped steps in a row up to this one (0: this step's update was applied)."""
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        finite = float(bad) == 0
        self._nonfinite_run = 0 if finite else self._nonfinite_run + 1
        # made on the device (a fill): a Python float would be copied there by `self.log`
        self.log("train/nonfinite_skipped", bad.new_full((), float(self._nonfinite_run)), batch_size=1)
        if finite:
            return True
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.global_step, self._nonfinite_run)
        if self._nonfinite_run >= self.max_nonfinite_steps:
            raise RuntimeError(f"{self._nonfinite_run} consecutive non-finite losses (last at step {self.global_step}): "
                               "lower optimizer.lr, use trainer.precision=bf16-mixed instead of fp16, or check the data")
        return False

    def configure_model(self):
        """Under strategy=fsdp: shard the backbone's blocks and make ReMatchModel the root unit.
        Under ZeRO-3 (parameters gathered at each module call): ranks agree on their passes."""
        from .sharding import FSDPStrategy, max_over_ranks, shard_model

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            shard_model(self.model, strategy.shard_mesh(), **strategy.shard_kwargs)
        elif getattr(strategy, "zero_stage_3", False):
            self.model.max_over_ranks = max_over_ranks

    def _no_sync(self):
        """A context that defers the gradient reduction (DDP all-reduce, FSDP reduce-scatter), or None."""
        from torch.nn.parallel import DistributedDataParallel

        from .sharding import is_sharded, no_gradient_sync

        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync
        if is_sharded(self.model):
            return lambda: no_gradient_sync(self.model)
        return None

    def _gradcache_step(self, batch):
        from .gradcache import gradcache_step

        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        no_sync = self._no_sync()
        distributed = self.trainer.world_size > 1
        # DeepSpeed's ZeRO optimizers start a micro-step at each engine forward and overwrite the
        # gradients of the first backward after it; GradCache re-forwards its chunks inside one
        # engine forward, so each chunk starts a micro-step of its own.
        zero = getattr(self.trainer.strategy.model, "optimizer", None)
        new_micro_step = getattr(zero, "clear_backward_seen_flag", None)
        terms = gradcache_step(self.model, batch, self.gradcache_chunk, backward=self.manual_backward,
                               gather=self._gather if distributed else None, rank=self.global_rank, no_sync=no_sync,
                               new_micro_step=new_micro_step)
        if not self._all_finite(self._nonfinite(terms["loss"])):  # after every backward pass
            opt.zero_grad()
            return terms
        if self.clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        return terms

    def training_step(self, batch, batch_idx):
        distributed = self.trainer.world_size > 1
        if self.gradcache_chunk is not None:
            terms = self._gradcache_step(batch)
        else:
            terms = self.model(batch, gather=self._gather if distributed else None, rank=self.global_rank)
        B = batch["qry"]["ids"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name in ("loss", "loss_cl", "loss_orth", "loss_qdm"),
                     batch_size=B, sync_dist=False)
        self.last_terms = {k: v.detach() for k, v in terms.items()}  # read on the host at the end of the run
        counts = self.model.reset_counts()  # tokens of every pass of this step (embedding + matching)
        self._tokens = counts.get("embed", 0) + counts.get("match", 0)
        if self.gradcache_chunk is not None:
            return None
        if self._engine_owns_gradients():
            # DeepSpeed's engine steps whatever gradients it holds and Lightning cannot skip its
            # backward pass: decide here (a host read mid-step, on this strategy only)
            if not self._all_finite(self._nonfinite(terms["loss"])):
                raise RuntimeError(f"non-finite loss at step {self.global_step} under DeepSpeedStrategy: in "
                                   "automatic optimisation its engine "
                                   "cannot skip a step; set train.gradcache.chunk_size (GradCache skips such steps "
                                   "on every strategy), lower optimizer.lr, or check the data")
            return terms["loss"]
        # Otherwise the decision waits until every backward pass of the step is queued
        # (`on_before_optimizer_step`): reading the flag here would stall the host until the
        # device finished the forward pass, with the backward pass not yet enqueued.
        bad = self._nonfinite(terms["loss"])
        self._nonfinite_pending = bad if self._nonfinite_pending is None else self._nonfinite_pending + bad
        return terms["loss"]

    def _engine_owns_gradients(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def on_before_optimizer_step(self, optimizer):
        """Skip the update of a step whose loss was not finite on some rank, in some accumulated
        micro-batch: its gradients are dropped, so the optimizer leaves every weight and moment
        as it was (parameters without a gradient are not updated)."""
        bad, self._nonfinite_pending = self._nonfinite_pending, None
        if bad is None or self._all_finite(bad):
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._t_step is None:
            return
        dt = max(time.perf_counter() - self._t_step, 1e-9)
        B = batch["qry"]["ids"].shape[0] * self.trainer.world_size
        self.train_time_s += dt
        self.train_samples += B
        self.log("perf/samples_per_s", B / dt, batch_size=1)
        self.log("perf/tokens_per_s", self._tokens * self.trainer.world_size / dt, batch_size=1)
        self.log("perf/step_time_s", dt, batch_size=1)
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], batch_size=1)
        # Memory after each step: a rise from step to step (not the run's peak) is a leak or
        # fragmentation creeping towards an out-of-memory error.
        if torch.cuda.is_available():
            self.log("perf/peak_mem_gb", torch.cuda.max_memory_allocated() / 2**30, batch_size=1)  # run's peak
            self.log("perf/mem_allocated_gb", torch.cuda.memory_allocated() / 2**30, batch_size=1)  # held between steps
            self.log("perf/mem_reserved_gb", torch.cuda.memory_reserved() / 2**30, batch_size=1)  # allocator's cache
        rss = host_rss_gb()
        if rss is not None:
            self.log("perf/host_rss_gb", rss, batch_size=1)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "bad_row_count"):  # rows the stream left out so far (this rank)
            self.log("data/bad_rows", float(dm.bad_row_count), batch_size=1)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        self._val_items = {"index": [], "qry": [], "doc": []}

    def validation_step(self, batch, batch_idx):
        m = self.model
        sides = ("qry", "doc") if m.fusion.k > 0 and m.fusion.sets != "shared" else ("qry",)
        emb = m(batch, mode="encode", sides=sides)  # through the root forward (FSDP gathers there)
        self._val_items["index"].append(batch["item_index"])
        self._val_items["qry"].append(emb[sides[0]].float())
        self._val_items["doc"].append(emb[sides[-1]].float())

    def on_validation_epoch_end(self):
        dm = self.trainer.datamodule
        if not self._val_items["index"]:
            return
        idx = torch.cat(self._val_items["index"])
        q = torch.cat(self._val_items["qry"])
        d = torch.cat(self._val_items["doc"])
        if self.trainer.world_size > 1:
            idx = self.all_gather(idx).reshape(-1)
            q = self.all_gather(q).reshape(-1, q.shape[-1])
            d = self.all_gather(d).reshape(-1, d.shape[-1])
        n_items = int(idx.max()) + 1
        Q = q.new_zeros(n_items, q.shape[-1])
        D = d.new_zeros(n_items, d.shape[-1])
        Q[idx], D[idx] = q, d  # duplicates from padded shards carry identical values
        results = {}
        for subset, layout in dm.eval_layout.items():
            qs = torch.as_tensor(layout["queries"], device=Q.device)
            results[subset] = evaluate_subset(Q[qs], D, layout["candidates"])
        metrics = {}
        for subset, r in results.items():
            for k, v in r.items():
                metrics[f"val/{k}/{subset}"] = v
        for k in ("hit@1", "hit@5", "mrr", "chance@1"):
            metrics[f"val/{k}"] = sum(r[k] for r in results.values()) / len(results)
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        self.last_val = metrics

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        # Only trainable weights (LoRA, learnable tokens, projector, markers): the base
        # backbone is reloaded from backbone.path.
        engine = self.trainer.strategy.model if self._trainer is not None else None  # DeepSpeed's engine
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in trainable_state_dict(self.model, engine).items()}
        checkpoint["rematch_manual_optimization"] = not self.automatic_optimization

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("rematch_manual_optimization")
        if saved is not None and saved != (not self.automatic_optimization):
            raise ValueError("the checkpoint was written with train.gradcache.chunk_size "
                             f"{'set' if saved else 'null'}; resume with it {'set' if saved else 'null'} as well "
                             "(Lightning counts steps differently with and without GradCache; any chunk size "
                             "gives the same gradient)")
