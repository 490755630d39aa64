"""`python -m rematch_pl.train [overrides]`: train ReMatch (or any ablation of it) with Hydra configs.

The run directory (``hydra.run.dir``) receives checkpoints, the adapter, logs and
``summary.json``; the printed summary ends with validation Hit@1 against chance.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .build import CONF_DIR, build_backbone, build_datamodule, build_logger, build_model, build_module, build_trainer
from .checkpoint import save_trainable
from .config import validate
from .console import ParameterSummary, parameter_record, quiet_lightning_tips
from .memory import check_memory

log = logging.getLogger("rematch_pl.train")


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():  # the first launch of a requeued job: nothing to continue yet
            log.info("resume=auto: no checkpoint in %s, starting the run from step 0", last.parent)
            return None
        return str(last)
    if not Path(cfg.resume).exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    return str(cfg.resume)


def run(cfg: DictConfig, run_dir: Path, run_name: str = "rematch", group: str | None = None) -> dict:
    """Train with a composed config; returns (and writes) the run summary."""
    import lightning as L

    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = check_memory(cfg)  # before any weight is read: an over-budget step fails here, not at step N
    if plan is not None:
        (run_dir / "memory_plan.json").write_text(json.dumps(plan, indent=2))
    if cfg.backbone.gradient_checkpointing == "auto":  # the plan's choice; with no plan, recompute
        cfg.backbone.gradient_checkpointing = bool(plan["gradient_checkpointing"]) if plan else True
        log.info(f"backbone.gradient_checkpointing=auto -> {cfg.backbone.gradient_checkpointing}"
                 + ("" if plan else " (no memory plan: train.memory_check plans on a CUDA device)"))
    if cfg.train.memory_check.mode == "only":
        print_plan(plan, run_dir)
        return {"run_name": run_name, "run_dir": str(run_dir), "steps": 0, "val": {}, "memory_plan": plan}
    # Lightning's stream flattening builds torch's deprecated LeafSpec once per fit (harmless)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    quiet_lightning_tips()
    L.seed_everything(cfg.seed, workers=True)
    backbone = build_backbone(cfg.backbone)
    model = build_model(cfg, backbone)
    module = build_module(cfg, model, run_dir)
    dm = build_datamodule(cfg, backbone.processor)
    ckpt_path = resume_path(cfg, run_dir)
    logger = build_logger(cfg, run_dir, run_name, group, resuming=ckpt_path is not None)
    if plan is not None:  # next to perf/peak_mem_gb (measured) on the dashboards
        for lg in logger:
            lg.log_metrics({f"memory/planned_{k}": plan[k] for k in
                            ("peak_gib", "weights_gib", "optimizer_gib", "transient_gib")}, step=0)
    params = ParameterSummary(model, f"ReMatch model: backbone {cfg.backbone.name}, fusion {cfg.fusion.name} "
                                     f"(K={cfg.fusion.k}), matching {cfg.matching.views}")
    for lg in logger:  # the runs' parameter counts side by side on the dashboards (config "parameters")
        lg.log_hyperparams({"parameters": parameter_record(params.counts)})
    callbacks = [params]
    if cfg.train.get("sync_audit", 0):
        from .sync_audit import SyncAuditCallback

        callbacks.append(SyncAuditCallback(cfg.train.sync_audit, run_dir / "sync_audit.json"))
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        wall = time.perf_counter() - t0
        summary = {
            "run_name": run_name,
            "run_dir": str(run_dir),
            "steps": int(trainer.global_step),
            "wall_time_s": round(wall, 2),
            "train_time_s": round(module.train_time_s, 2),
            "samples_per_s": round(module.train_samples / max(module.train_time_s, 1e-9), 2),
            "peak_memory_gb": round(peak_memory_gb(), 3),
            "memory_plan": plan,
            "val": {k: round(float(v), 4) for k, v in module.last_val.items()},
            "last_loss": {k: round(float(v), 4) for k, v in module.last_terms.items()},  # host reads, once
            "bad_rows": dm.all_bad_rows(),  # every rank's (a collective)
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if cfg.save_adapter:  # every rank: a sharded model's weights are gathered
            save_trainable(model, run_dir / "adapter", meta={"config": summary["config"]},
                           is_main=trainer.is_global_zero, engine=trainer.strategy.model)
        if trainer.is_global_zero:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print_summary(summary)
        return summary
    finally:
        if cfg.logger.name == "wandb":
            import wandb

            wandb.finish()


def print_summary(s: dict) -> None:
    v = s["val"]
    val = [f"val Hit@1      {v['val/hit@1']:.4f}   (chance {v.get('val/chance@1', float('nan')):.4f})",
           f"val Hit@5/MRR  {v.get('val/hit@5', float('nan')):.4f} / {v.get('val/mrr', float('nan')):.4f}"] \
        if "val/hit@1" in v else ["val            none (no validation ran: data.eval.path or trainer.limit_val_batches)"]
    bad = sum(n for counts in s.get("bad_rows", {}).values() for n in counts.values())
    lines = [
        "",
        f"== rematch_pl summary: {s['run_name']} ({s['steps']} steps) ==",
        *val,
        "last losses    " + ", ".join(f"{k}={x:.4f}" for k, x in s["last_loss"].items() if k.startswith("loss")),
        f"wall time      {s['wall_time_s']:.1f} s (training {s['train_time_s']:.1f} s)",
        f"throughput     {s['samples_per_s']:.1f} samples/s",
        f"peak memory    {s['peak_memory_gb']:.2f} GiB",
        *([f"bad rows       {bad} left out (per subset and reason in summary.json)"] if bad else []),
        f"run dir        {s['run_dir']}",
    ]
    print("\n".join(lines), flush=True)


def print_plan(p: dict, run_dir: Path) -> None:
    verdict = "" if p["fits"] is None else (f" of {p['budget_gib']:.1f} GiB: "
                                            + ("fits" if p["fits"] else "DOES NOT FIT"))
    print(f"\n== rematch_pl memory plan: batch {p['batch']}, GradCache chunk {p['gradcache_chunk']} ==\n"
          f"weights {p['weights_gib']:.2f} GiB, optimizer {p['optimizer_gib']:.2f} GiB, activations and gradients "
          f"{p['transient_gib']:.2f} GiB\npeak    {p['peak_gib']:.2f} GiB{verdict}\nwritten {run_dir / 'memory_plan.json'}",
          flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    # Run name/group; in a multirun: failures recorded (the sweep goes on), DDP jobs in their own process.
    from .sweep import run_task

    return run_task(cfg, run)


if __name__ == "__main__":
    sys.exit(main())
