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


def _int(v) -> bool:
    """An integer (a bool is not one here, whatever Python says)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    """A real number: an int or a float, not a bool or a string."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# true/false settings the code reads as truth values: "maybe" or 1 would silently count as true
BOOL_KEYS = ("save_adapter", "train.log_rows", "backbone.compile", "backbone.fused_rms_norm", "backbone.lora.enabled",
             "backbone.lora.fused", "fusion.orthogonality", "loss.mask_false_negatives", "data.homogeneous",
             "trainer.enable_progress_bar", "strategy.hybrid", "strategy.reshard_after_forward",
             "strategy.find_unused_parameters", "strategy.offload_optimizer", "strategy.offload_parameters",
             "strategy.overlap_comm")

_ABSENT = object()  # a key that this config does not have (e.g. another strategy's)

# the attention implementations that honour the matching pass's unified 4-D mask (backbone/model.py)
MASKED_ATTENTION = ("sdpa", "eager")


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
    for key in BOOL_KEYS:
        v = OmegaConf.select(cfg, key, default=_ABSENT)
        _check(v is _ABSENT or isinstance(v, bool), key, v, "true or false")
    _check(_int(cfg.seed), "seed", cfg.seed, "an integer")
    _check(b.dtype in DTYPES, "backbone.dtype", b.dtype, f"one of {sorted(DTYPES)}")
    _check(b.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "backbone.attn_implementation",
           b.attn_implementation, "sdpa | eager | flash_attention_2")
    for key in ("min_pixels", "max_pixels"):
        _check(b[key] is None or (_int(b[key]) and b[key] > 0), f"backbone.{key}", b[key], "null or an integer > 0")
    _check(b.min_pixels is None or b.max_pixels is None or b.min_pixels <= b.max_pixels, "backbone.min_pixels",
           b.min_pixels, f"<= backbone.max_pixels ({b.max_pixels})")
    _check(b.gradient_checkpointing in (True, False, "auto"), "backbone.gradient_checkpointing",
           b.gradient_checkpointing, "true | false | auto (off when the memory plan's worst case fits)")
    _check(_int(b.lora.r) and b.lora.r > 0, "backbone.lora.r", b.lora.r, "a positive integer")
    _check(b.lora.get("compute_dtype", "backbone") in ("backbone", "fp32"), "backbone.lora.compute_dtype",
           b.lora.get("compute_dtype"), "backbone | fp32")
    _check(_int(f.k) and 0 <= f.k <= 64, "fusion.k", f.k, "an integer in 0..64 (0 = last-token pooling)")
    _check(f.sets in ("separate", "shared", "both"), "fusion.sets", f.sets, "separate | shared | both")
    _check(m.views in VIEW_SETS, "matching.views", m.views, f"one of {sorted(VIEW_SETS)}")
    _check(m.views == "none" or b.attn_implementation in MASKED_ATTENTION, "backbone.attn_implementation",
           b.attn_implementation, f"{' | '.join(MASKED_ATTENTION)} while matching runs (matching.views={m.views}): "
           "the matching pass's unified 4-D attention mask is honoured by sdpa and eager only; flash_attention_2 "
           "only with matching=none")
    _check(m.feature in ("fused", "tokens"), "matching.feature", m.feature, "fused | tokens")
    rt = m.get("row_tokens", 1024)  # the default of ReMatchModel
    _check(_int(rt) and rt >= 0, "matching.row_tokens", rt, "an integer >= 0 (0: one instance per matching row)")
    _check(not (m.feature == "tokens" and f.k == 0), "matching.feature", m.feature,
           "'fused' when fusion.k=0 (there are no token states to project)")
    _check(cfg.embedding.template in ("plain", "chat"), "embedding.template", cfg.embedding.template, "plain | chat")
    bpt = cfg.embedding.get("bucket_pass_tokens", 2048)
    _check(_num(bpt) and bpt >= 0, "embedding.bucket_pass_tokens", bpt,
           "a number >= 0 (token equivalents of one more backbone pass)")
    _check(_num(lo.temperature) and lo.temperature > 0, "loss.temperature", lo.temperature, "a number > 0")
    _check(_num(lo.w_orth) and lo.w_orth >= 0, "loss.w_orth", lo.w_orth, "a number >= 0")
    _check(_num(lo.w_qdm) and lo.w_qdm >= 0, "loss.w_qdm", lo.w_qdm, "a number >= 0")
    _check_optimizer(o)
    _check_trainer(t)
    _check_data(OmegaConf.to_container(d, resolve=True))
    mnf = cfg.train.max_nonfinite_steps
    _check(_int(mnf) and mnf >= 1, "train.max_nonfinite_steps", mnf,
           "an integer >= 1 (non-finite losses in a row that stop the run; 1: the first one)")
    gc = cfg.train.gradcache.chunk_size
    _check(gc is None or (_int(gc) and gc >= 1), "train.gradcache.chunk_size", gc, "null or an integer >= 1")
    if gc is not None and d.num_hardneg == 0 and m.views != "none":
        _check_no_chunk_of_one(gc, d.batch_size)
    _check(gc is None or t.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches,
           "1 with GradCache (it already makes the batch as large as you like)")
    sa = cfg.train.get("sync_audit", 0)
    _check(_int(sa) and sa >= 0, "train.sync_audit", sa, "an integer >= 0 (steps to audit)")
    mc = cfg.train.memory_check
    _check(mc.mode in ("auto", "always", "only", "never"), "train.memory_check.mode", mc.mode,
           "auto | always | only | never")
    _check(mc.images in ("as_read", "max_pixels"), "train.memory_check.images", mc.images, "as_read | max_pixels")
    _check(mc.budget_gib is None or (_num(mc.budget_gib) and mc.budget_gib > 0), "train.memory_check.budget_gib",
           mc.budget_gib, "null or > 0")
    _check(_num(mc.reserve_gib) and mc.reserve_gib >= 0 and (mc.budget_gib is None or mc.reserve_gib < mc.budget_gib),
           "train.memory_check.reserve_gib", mc.reserve_gib, ">= 0 and below train.memory_check.budget_gib")
    _check_strategy(cfg.strategy, t)
    _check(cfg.logger.name in ("wandb", "csv", "tensorboard", "none"), "logger.name", cfg.logger.name,
           "wandb | csv | tensorboard | none")
    _check(cfg.resume in (None, "auto") or str(cfg.resume).endswith(".ckpt"), "resume", cfg.resume,
           "null, auto or a path to a .ckpt file")


def _check_optimizer(o: DictConfig) -> None:
    _check(_num(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "a number > 0")
    _check(_num(o.lr_scale) and o.lr_scale > 0, "optimizer.lr_scale", o.lr_scale, "a number > 0")
    _check(_num(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    betas = OmegaConf.to_container(o.betas) if OmegaConf.is_list(o.betas) else o.betas
    _check(isinstance(betas, list) and len(betas) == 2 and all(_num(x) and 0 <= x < 1 for x in betas),
           "optimizer.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    _check(o.scheduler in ("cosine", "linear", "constant"), "optimizer.scheduler", o.scheduler, "cosine | linear | constant")
    _check(_int(o.warmup_steps) and o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps,
           "an integer >= 0 (steps of linear warm-up)")
    _check(_num(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio,
           "a number in [0, 1] (the lr at the end of the schedule, as a fraction of the peak lr)")


def _check_trainer(t: DictConfig) -> None:
    _check(_int(t.max_steps) and t.max_steps >= 1, "trainer.max_steps", t.max_steps, "an integer >= 1")
    _check(_int(t.val_check_interval) and t.val_check_interval >= 1, "trainer.val_check_interval",
           t.val_check_interval, "an integer >= 1 (training steps between validations)")
    _check(_int(t.checkpoint_every_n_steps) and t.checkpoint_every_n_steps >= 1, "trainer.checkpoint_every_n_steps",
           t.checkpoint_every_n_steps, "an integer >= 1 (training steps between checkpoints; there is no 'off': "
           "resume=auto continues from the last of them; set it to trainer.max_steps for one at the end only)")
    _check(t.gradient_clip_val is None or (_num(t.gradient_clip_val) and t.gradient_clip_val >= 0),
           "trainer.gradient_clip_val", t.gradient_clip_val,
           "null or a number >= 0 (bound on the gradient norm; null or 0: no clipping)")
    _check(_int(t.accumulate_grad_batches) and t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
           t.accumulate_grad_batches, "an integer >= 1")
    lvb = t.limit_val_batches
    _check((_int(lvb) and lvb >= 0) or (isinstance(lvb, float) and lvb in (0.0, 1.0)), "trainer.limit_val_batches", lvb,
           "an integer >= 0 (validation batches per rank; 0: no validation) or 1.0 (all of them): the validation "
           "items are streamed without a length, so Lightning takes no other fraction")
    _check(_int(t.log_every_n_steps) and t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps,
           "an integer >= 1")


def _check_no_chunk_of_one(chunk: int, batch: int) -> None:
    """GradCache cuts each rank's batch of `batch` instances into chunks of `chunk`, the last one
    holding the rest (``range(0, batch, chunk)`` in `gradcache.gradcache_step`). Without hard
    negatives matching takes d- from another instance's positive of the same chunk, so no chunk
    may hold a single instance: ``chunk >= 2`` and ``batch % chunk != 1`` (chunk is no divisor of
    batch - 1)."""
    sizes = [min(chunk, batch - s) for s in range(0, batch, chunk)]
    if min(sizes) >= 2:
        return
    works = [c for c in range(2, batch) if batch % c != 1]  # and every c >= batch: one chunk
    bad = [c for c in range(2, batch) if batch % c == 1]
    if not works:
        options = f">= {batch} (one chunk)"
    elif len(works) <= 12:
        options = f"{', '.join(map(str, works))} or >= {batch}"
    else:
        options = "any integer >= 2" + (f" except {', '.join(map(str, bad))}" if bad else "")
    split = ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]}"
    _check(False, "train.gradcache.chunk_size", chunk,
           "chunks of at least 2 instances when matching runs without hard negatives (data.num_hardneg=0): d- is "
           "another instance's positive from the same chunk, and a chunk of one has none; "
           f"data.batch_size={batch} (per rank) splits into chunks of {split}. Sizes that work: {options} "
           "(not 1 and no divisor of data.batch_size - 1)")


def _check_data(d: dict) -> None:
    """data.* from the config alone, at start-up: the datamodule is built after the backbone loads.
    Subset names (in subsets, caps and weights) are checked against the dataset when it is read."""
    for key, lo in (("batch_size", 2), ("num_hardneg", 0), ("eval_batch_size", 1), ("num_workers", 0),
                    ("prefetch_factor", 1), ("shuffle_buffer", 0)):
        v = d.get(key)
        why = " (per rank; in-batch negatives need at least 2)" if key == "batch_size" else ""
        _check(_int(v) and v >= lo, f"data.{key}", v, f"an integer >= {lo}{why}")
    _check(d.get("on_bad_row") in ("raise", "skip"), "data.on_bad_row", d.get("on_bad_row"), "raise | skip")
    ml = d.get("max_length")
    _check(ml is None or (_int(ml) and ml >= 1), "data.max_length", ml, "null or an integer >= 1")
    _check(_int(d.get("seed", 0)), "data.seed", d.get("seed"), "an integer")
    for name in ("train", "hardneg", "eval"):
        sec = d.get(name)
        _check(sec is None or isinstance(sec, dict), f"data.{name}", sec, "a mapping")
        sec = sec or {}
        _check(isinstance(sec.get("split", ""), str), f"data.{name}.split", sec.get("split"), "a split name (a string)")
        sub = sec.get("subsets")
        _check(sub is None or (isinstance(sub, list) and all(isinstance(x, str) for x in sub)), f"data.{name}.subsets",
               sub, "null or a list of subset names, e.g. [ImageNet_1K,N24News]")
    mq = (d.get("eval") or {}).get("max_queries")
    _check(mq is None or (_int(mq) and mq >= 1), "data.eval.max_queries", mq, "null or an integer >= 1")
    train = d.get("train") or {}
    for key, what, ok, expected in (
            ("caps", "maximum rows", lambda v: _int(v) and v >= 0, "an integer >= 0 (rows read at most)"),
            ("weights", "sampling weight", lambda v: _num(v) and v > 0, "a number > 0 (sampling weight)")):
        table = train.get(key)
        _check(table is None or isinstance(table, dict), f"data.train.{key}", table,
               f"null or a mapping subset -> {what}, e.g. {{ImageNet_1K: 100}}")
        for k, v in (table or {}).items():
            _check(isinstance(k, str), f"data.train.{key}", table, "subset names (strings) as keys")
            _check(ok(v), f"data.train.{key}.{k}", v, expected)
    _check_target_instruction(d.get("target_instruction"))
    syn = d.get("synthetic")
    if syn is not None:
        import inspect

        from .data.synthetic import generate_synthetic

        allowed = set(inspect.signature(generate_synthetic).parameters)
        _check(isinstance(syn, dict) and "out_dir" in syn and not set(syn) - allowed, "data.synthetic", syn,
               f"null or a mapping with out_dir and keys among {sorted(allowed)}")


def _check_target_instruction(ti) -> None:
    """As `data.mmeb.resolve_target_instructions` reads it: null/false (off), true/default (the
    built-in table), or {Subset or default: instruction | {image: ..., text: ...}}."""
    _check(ti is None or isinstance(ti, bool) or ti == "default" or isinstance(ti, dict), "data.target_instruction",
           ti, "null, default or a mapping subset -> instruction (or -> {image: ..., text: ...})")
    for k, v in (ti.items() if isinstance(ti, dict) else ()):
        ok = v is None or isinstance(v, str) or (isinstance(v, dict) and set(v) <= {"image", "text"}
                                                 and all(x is None or isinstance(x, str) for x in v.values()))
        _check(ok, f"data.target_instruction.{k}", v, "an instruction string, null, or {image: ..., text: ...}")


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
