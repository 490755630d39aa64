"""Builders from a composed config: backbone, model, datamodule, logger, trainer.

Kept apart from the entry point so that tests, notebooks and benchmarks build exactly what
`python -m rematch_pl.train` builds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from .backbone.model import Backbone, load_backbone
from .console import ParameterSummary, step_progress_bar
from .model import ReMatchModel
from .module import ReMatchModule

CONF_DIR = Path(__file__).resolve().parent / "conf"
if not CONF_DIR.exists():  # source checkout: conf/ at the top level
    CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def build_backbone(b: DictConfig, meta: bool = False, gradient_checkpointing: bool | None = None) -> Backbone:
    """The configured backbone; `meta`: built from its config on the meta device (memory planning).
    `gradient_checkpointing` overrides `b.gradient_checkpointing` (which must be a bool by now:
    `auto` is resolved by `memory.check_memory`, see `train.run`)."""
    recompute = b.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    if not isinstance(recompute, bool):
        raise ValueError(f"backbone.gradient_checkpointing={recompute!r}: expected true or false here "
                         "(auto is resolved by the memory plan before the backbone is built)")
    return load_backbone(
        path=b.path, dtype=b.dtype, attn_implementation=b.attn_implementation,
        gradient_checkpointing=recompute, min_pixels=b.min_pixels, max_pixels=b.max_pixels,
        lora=OmegaConf.to_container(b.lora, resolve=True), revision=b.get("revision"),
        compile=b.get("compile", False) and not meta, meta=meta, fused_rms_norm=b.get("fused_rms_norm", True),
    )


def build_model(cfg: DictConfig, backbone: Backbone) -> ReMatchModel:
    return ReMatchModel(
        backbone, k=cfg.fusion.k, token_sets=cfg.fusion.sets, matching=cfg.matching.views,
        matching_feature=cfg.matching.feature, projector_ratio=cfg.matching.projector_ratio,
        matching_row_tokens=cfg.matching.get("row_tokens", 1024),
        bucket_pass_tokens=cfg.embedding.get("bucket_pass_tokens", 2048),
        template=cfg.embedding.template, temperature=cfg.loss.temperature, w_orth=cfg.loss.w_orth,
        w_qdm=cfg.loss.w_qdm, orthogonality=cfg.fusion.orthogonality,
        mask_false_negatives=bool(cfg.loss.get("mask_false_negatives", False)),
    )


def build_module(cfg: DictConfig, model: ReMatchModel, run_dir: Path | None = None) -> ReMatchModule:
    rows_log = str(run_dir / "rows_rank{rank}.jsonl") if (run_dir is not None and cfg.train.log_rows) else None
    o = cfg.optimizer
    return ReMatchModule(model, lr=o.lr * o.get("lr_scale", 1.0), weight_decay=o.weight_decay, betas=tuple(o.betas),
                         warmup_steps=o.warmup_steps, scheduler=o.scheduler, max_steps=cfg.trainer.max_steps,
                         min_lr_ratio=o.min_lr_ratio, gradcache_chunk=cfg.train.gradcache.chunk_size,
                         gradient_clip_val=cfg.trainer.gradient_clip_val,
                         max_nonfinite_steps=cfg.train.max_nonfinite_steps, seed=cfg.seed,
                         rows_log=rows_log)


def build_datamodule(cfg: DictConfig, processor):
    from hydra.utils import instantiate

    from .backbone.model import DTYPES

    dm = instantiate(cfg.data, _convert_="all")
    dm.set_processor(processor, pixel_dtype=DTYPES[cfg.backbone.dtype])  # the vision tower's dtype
    return dm


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key (or WANDB_MODE) is set, else offline (no network needed)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str, group: str | None = None,
                 resuming: bool = False) -> list:
    """The chosen logger plus the local history.jsonl writer (always on). `resuming`: this launch
    continues the run in `run_dir` from a checkpoint (its W&B run is continued too)."""
    from .history import JsonlLogger

    chosen = _chosen_logger(cfg, run_dir, run_name, group, resuming)
    return [JsonlLogger(run_dir)] + ([chosen] if chosen else [])


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """One W&B run per training run: the first launch writes its W&B id into the run directory and a
    resumed launch (resume=auto after a requeue, a crash) continues that W&B run, so the dashboard
    shows one curve, not one per launch. A fresh launch gets a new id."""
    from lightning.pytorch.utilities import rank_zero_only

    f = run_dir / WANDB_ID_FILE
    if resuming and f.is_file():
        return f.read_text().strip()
    import secrets
    import string

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    if rank_zero_only.rank == 0:  # the only rank whose logger writes
        f.write_text(run_id)
    return run_id


def _chosen_logger(cfg: DictConfig, run_dir: Path, run_name: str, group: str | None, resuming: bool = False):
    name = cfg.logger.name
    if name == "none":
        return None
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg.logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    lg = WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, name=run_name, save_dir=str(run_dir),
        group=cfg.logger.group or group, tags=list(cfg.logger.tags), mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),  # nested, not flattened
        id=wandb_run_id(run_dir, resuming),  # resume="allow" (Lightning's default): continued when it exists
    )
    # Lightning always passes anonymous=None to wandb.init, which W&B answers with a deprecation
    # warning on every run ("The anonymous setting has no effect"); None is W&B's default anyway
    init = getattr(lg, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", "set") is None:
        del init["anonymous"]
    return lg


def build_strategy(cfg: DictConfig):
    s, t = cfg.strategy, cfg.trainer
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=s.get("find_unused_parameters", False))
    if s.name == "fsdp":
        from .sharding import FSDPStrategy

        return FSDPStrategy(hybrid=s.hybrid, reshard_after_forward=s.reshard_after_forward,
                            param_dtype=s.param_dtype, reduce_dtype=s.reduce_dtype,
                            world_size=int(t.devices) * int(t.num_nodes), num_nodes=int(t.num_nodes))
    if s.name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"strategy={s.name} needs DeepSpeed: pip install 'rematch_pl[deepspeed]' "
                               f"(on a CUDA machine). Cause: {e}") from e
        ds = atomic_deepspeed_strategy()(stage=s.stage, offload_optimizer=s.offload_optimizer,
                               offload_parameters=s.offload_parameters, overlap_comm=s.overlap_comm,
                               allgather_bucket_size=s.bucket_size, reduce_bucket_size=s.bucket_size,
                               exclude_frozen_parameters=True,
                               # the stream yields whole batches: DeepSpeed cannot read a batch size from it
                               logging_batch_size_per_gpu=int(cfg.data.batch_size))
        if s.stage == 3:
            ds.config["zero_optimization"]["stage3_param_persistence_threshold"] = int(s.param_persistence_threshold)
        # DeepSpeed clips inside its step, with and without GradCache (Lightning's manual
        # optimisation would otherwise drop trainer.gradient_clip_val)
        ds.config["gradient_clipping"] = float(t.gradient_clip_val or 0.0)
        if cfg.train.gradcache.chunk_size is not None:
            # GradCache backpropagates once per chunk before one optimizer step: DeepSpeed must only
            # accumulate in backward and reduce in step (its own micro-step bookkeeping is off)
            ds.config["managed_gradient_accumulation"] = False
        return ds
    return s.name


def atomic_deepspeed_strategy():
    """Lightning's DeepSpeedStrategy whose checkpoints a kill never corrupts.

    DeepSpeed writes a checkpoint folder in place (Lightning's `CheckpointIO` plugins are not
    used), under one fixed tag ``checkpoint``, so a kill while saving would leave a half-written
    `last.ckpt`. Here each save writes a new tag beside the old one; then rank 0 makes
    ``checkpoint`` a symbolic link to it (a link renamed over the old one: atomic) and only then
    removes the older tag. Until the new tag is complete and linked, loading reads the old one;
    Lightning and DeepSpeed (``latest`` = ``checkpoint``) read the folder as before.
    """
    import uuid

    from lightning.pytorch.strategies import DeepSpeedStrategy

    class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
        _saves = 0
        _launch = None

        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            if storage_options is not None:
                raise TypeError("DeepSpeed checkpoints take no storage_options")
            filepath = Path(self.broadcast(str(filepath)))
            if self._launch is None:  # tags of this launch never meet those of an earlier one
                self._launch = self.broadcast(uuid.uuid4().hex[:8])
            self._saves += 1
            tag = f"step{int(checkpoint.get('global_step', 0))}-{self._launch}-{self._saves}"
            client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            self.deepspeed_engine.save_checkpoint(str(filepath), client_state=client, tag=tag, save_latest=False,
                                                  exclude_frozen_parameters=self.exclude_frozen_parameters)
            self.barrier()
            if self.is_global_zero:
                commit_deepspeed_tag(filepath, tag)
            self.barrier()

    return AtomicDeepSpeedStrategy


def commit_deepspeed_tag(folder: Path, tag: str) -> None:
    """Link ``folder/checkpoint`` to the complete tag `tag` (atomically), then remove other tags."""
    import shutil

    link = folder / "checkpoint"
    if link.is_dir() and not link.is_symlink():  # a folder written by DeepSpeed itself (earlier code)
        os.replace(link, folder / f"checkpoint-before-{tag}")
    tmp = folder / f".checkpoint.tmp{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(tag, tmp)  # relative: the folder may move
    os.replace(tmp, link)
    latest = folder / "latest"
    if not latest.exists() or latest.read_text() != "checkpoint":
        tmp = folder / f".latest.tmp{os.getpid()}"
        tmp.write_text("checkpoint")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, latest)
    for old in folder.iterdir():
        if old.is_dir() and not old.is_symlink() and old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed: a kill while saving never
    leaves a corrupt checkpoint (the previous one stays intact)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks=()):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = cfg.trainer
    manual = cfg.train.gradcache.chunk_size is not None  # GradCache: the module clips and steps itself
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=t.checkpoint_every_n_steps,
                           save_last=True, save_top_k=1, monitor=None)
    callbacks = [ckpt, *callbacks]
    bar = step_progress_bar() if t.enable_progress_bar else None
    if bar is not None:
        callbacks.append(bar)
    ours = any(isinstance(c, ParameterSummary) for c in callbacks)  # replaces Lightning's one-row summary
    return L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        precision=t.precision, gradient_clip_val=None if manual else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar, logger=logger, callbacks=callbacks, enable_model_summary=not ours,
        strategy=build_strategy(cfg), default_root_dir=str(run_dir), num_sanity_val_steps=0,
        use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
    )
