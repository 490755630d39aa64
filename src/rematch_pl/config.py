"""Start-up validation of the composed config: every bad value fails before any model is built."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .backbone.model import DTYPES
from .matching import VIEW_SETS


class ConfigError(ValueError):
    pass


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def validate(cfg: DictConfig) -> None:
    """Check values that Hydra's composition cannot (types, ranges, enumerations)."""
    try:
        missing = {m for m in OmegaConf.missing_keys(cfg) if not m.startswith("hydra")}
    except Exception as e:  # an interpolation to a missing value
        raise ConfigError(f"missing mandatory value (set it on the command line): {e}") from None
    if missing:
        raise ConfigError(f"missing mandatory values (set them on the command line): {sorted(missing)}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # an interpolation that cannot be resolved
        raise ConfigError(f"config does not resolve: {e}") from None
    b, f, m, lo, o, t, d = cfg.backbone, cfg.fusion, cfg.matching, cfg.loss, cfg.optimizer, cfg.trainer, cfg.data
    _check(b.dtype in DTYPES, "backbone.dtype", b.dtype, f"one of {sorted(DTYPES)}")
    _check(b.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "backbone.attn_implementation",
           b.attn_implementation, "sdpa | eager | flash_attention_2")
    _check(b.min_pixels is None or b.max_pixels is None or b.min_pixels <= b.max_pixels, "backbone.min_pixels",
           b.min_pixels, f"<= backbone.max_pixels ({b.max_pixels})")
    _check(isinstance(b.get("compile", False), bool), "backbone.compile", b.get("compile"), "true | false")
    _check(b.gradient_checkpointing in (True, False, "auto"), "backbone.gradient_checkpointing",
           b.gradient_checkpointing, "true | false | auto (off when the memory plan's worst case fits)")
    _check(isinstance(b.get("fused_rms_norm", True), bool), "backbone.fused_rms_norm", b.get("fused_rms_norm"),
           "true | false")
    _check(int(b.lora.r) > 0, "backbone.lora.r", b.lora.r, "a positive integer")
    _check(b.lora.get("compute_dtype", "backbone") in ("backbone", "fp32"), "backbone.lora.compute_dtype",
           b.lora.get("compute_dtype"), "backbone | fp32")
    _check(isinstance(b.lora.get("fused", True), bool), "backbone.lora.fused", b.lora.get("fused"), "true | false")
    _check(isinstance(f.k, int) and 0 <= f.k <= 64, "fusion.k", f.k, "an integer in 0..64 (0 = last-token pooling)")
    _check(f.sets in ("separate", "shared", "both"), "fusion.sets", f.sets, "separate | shared | both")
    _check(m.views in VIEW_SETS, "matching.views", m.views, f"one of {sorted(VIEW_SETS)}")
    _check(m.feature in ("fused", "tokens"), "matching.feature", m.feature, "fused | tokens")
    rt = m.get("row_tokens", 1024)  # the default of ReMatchModel
    _check(isinstance(rt, int) and rt >= 0, "matching.row_tokens", rt, "an integer >= 0 (0: one instance per matching row)")
    _check(not (m.feature == "tokens" and f.k == 0), "matching.feature", m.feature,
           "'fused' when fusion.k=0 (there are no token states to project)")
    _check(cfg.embedding.template in ("plain", "chat"), "embedding.template", cfg.embedding.template, "plain | chat")
    bpt = cfg.embedding.get("bucket_pass_tokens", 2048)
    _check(isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and bpt >= 0, "embedding.bucket_pass_tokens",
           bpt, "a number >= 0 (token equivalents of one more backbone pass)")
    _check(lo.temperature > 0, "loss.temperature", lo.temperature, "> 0")
    _check(lo.w_orth >= 0, "loss.w_orth", lo.w_orth, ">= 0")
    _check(lo.w_qdm >= 0, "loss.w_qdm", lo.w_qdm, ">= 0")
    _check(isinstance(lo.get("mask_false_negatives", False), bool), "loss.mask_false_negatives",
           lo.get("mask_false_negatives"), "true or false")
    _check(o.lr > 0, "optimizer.lr", o.lr, "> 0")
    _check(o.lr_scale > 0, "optimizer.lr_scale", o.lr_scale, "> 0")
    _check(o.scheduler in ("cosine", "linear", "constant"), "optimizer.scheduler", o.scheduler, "cosine | linear | constant")
    _check(t.max_steps > 0, "trainer.max_steps", t.max_steps, "> 0")
    _check(d.batch_size >= 2, "data.batch_size", d.batch_size, ">= 2 (in-batch negatives need at least 2)")
    _check(d.num_hardneg >= 0, "data.num_hardneg", d.num_hardneg, ">= 0")
    _check(d.on_bad_row in ("raise", "skip"), "data.on_bad_row", d.on_bad_row, "raise | skip")
    gc = cfg.train.gradcache.chunk_size
    _check(gc is None or (isinstance(gc, int) and gc >= 1), "train.gradcache.chunk_size", gc, "null or an integer >= 1")
    _check(gc != 1 or d.num_hardneg > 0 or cfg.matching.views == "none", "train.gradcache.chunk_size", gc,
           ">= 2 when matching runs without hard negatives (data.num_hardneg=0): d- is another instance's "
           "positive from the same chunk, and a chunk of 1 has none")
    _check(gc is None or t.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches,
           "1 with GradCache (it already makes the batch as large as you like)")
    sa = cfg.train.get("sync_audit", 0)
    _check(isinstance(sa, int) and not isinstance(sa, bool) and sa >= 0, "train.sync_audit", sa,
           "an integer >= 0 (steps to audit)")
    mc = cfg.train.memory_check
    _check(mc.mode in ("auto", "always", "only", "never"), "train.memory_check.mode", mc.mode,
           "auto | always | only | never")
    _check(mc.images in ("as_read", "max_pixels"), "train.memory_check.images", mc.images, "as_read | max_pixels")
    _check(mc.budget_gib is None or mc.budget_gib > 0, "train.memory_check.budget_gib", mc.budget_gib, "null or > 0")
    _check(mc.reserve_gib >= 0 and (mc.budget_gib is None or mc.reserve_gib < mc.budget_gib),
           "train.memory_check.reserve_gib", mc.reserve_gib, ">= 0 and below train.memory_check.budget_gib")
    _check_strategy(cfg.strategy, t)
    _check(cfg.logger.name in ("wandb", "csv", "tensorboard", "none"), "logger.name", cfg.logger.name,
           "wandb | csv | tensorboard | none")
    _check(cfg.resume in (None, "auto") or str(cfg.resume).endswith(".ckpt"), "resume", cfg.resume,
           "null, auto or a path to a .ckpt file")


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def _check_strategy(s: DictConfig, t: DictConfig) -> None:
    _check(s.name in STRATEGIES, "strategy.name", s.name, " | ".join(STRATEGIES))
    if s.name == "fsdp":
        _check(isinstance(t.devices, int) and t.devices >= 1, "trainer.devices", t.devices,
               "an integer number of devices per node with strategy=fsdp")
        for key in ("param_dtype", "reduce_dtype"):
            _check(s[key] is None or s[key] in DTYPES, f"strategy.{key}", s[key], f"null or one of {sorted(DTYPES)}")
        _check(not s.hybrid or t.num_nodes > 1, "strategy.hybrid", s.hybrid,
               "false on one node (hybrid sharding replicates across nodes)")
    if s.name.startswith("deepspeed"):
        _check(t.accelerator in ("gpu", "cuda", "auto"), "trainer.accelerator", t.accelerator,
               f"gpu with strategy={s.name} (DeepSpeed runs on CUDA only; use strategy=fsdp or ddp on CPU)")
        _check(s.stage == int(s.name[-1]), "strategy.stage", s.stage, f"{s.name[-1]} for strategy={s.name}")
