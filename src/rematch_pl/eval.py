"""`python -m rematch_pl.eval [ckpt=DIR] [eval=mmeb|zeroshot|all] [overrides]`: the paper's tables.

The output directory (``hydra.run.dir``, default ``outputs/eval/<time>``) receives::

    mmeb/<Subset>.json        Hit@1 / Hit@5 / MRR / chance, counts, timings (and reranking) per subset
    mmeb_subsets.md           one line per subset
    zeroshot/<set>.json       Recall@1/5/10 both directions, or SugarCrepe accuracies
    table1.md, table1.json    Table 1 layout: CLS, VQA, RET, VG, IND, OOD, Overall (Hit@1, %)
    table2.md, table2.json    Table 2 layout: Flickr30K, COCO, ShareGPT4V, Urban1K (t->i, i->t R@1), SugarCrepe
    results.json              everything above + model, cache and timing information

Embeddings are cached by model fingerprint (weights and every setting that changes an embedding,
``eval.max_length`` included) and item under ``eval.cache_dir``: a second run encodes nothing, an
interrupted run resumes. See `rematch_pl.evaluation` for the pieces.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .build import CONF_DIR
from .config import ConfigError, _check

log = logging.getLogger("rematch_pl.eval")

SUITES = ("mmeb", "zeroshot")
EvalConfigError = ConfigError  # an invalid value of conf/eval.yaml


def validate(cfg: DictConfig) -> None:
    e = cfg.eval
    _check(all(s in SUITES for s in e.suites) and len(e.suites) > 0, "eval.suites", list(e.suites),
           f"a non-empty list of {SUITES} (eval=mmeb|zeroshot|all)")
    _check(isinstance(e.devices, int) and e.devices >= 1, "eval.devices", e.devices, "an integer >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
    _check(e.num_workers == "auto" or (isinstance(e.num_workers, int) and e.num_workers >= 0), "eval.num_workers",
           e.num_workers, "auto or an integer >= 0")
    _check(e.scoring in ("torch", "faiss"), "eval.scoring", e.scoring, "torch | faiss")
    _check(e.dtype in ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"), "eval.dtype", e.dtype,
           "auto | fp32 | bf16 | fp16")
    _check(isinstance(e.rerank_top_k, int) and e.rerank_top_k >= 0, "eval.rerank_top_k", e.rerank_top_k,
           "an integer >= 0 (0: no reranking)")
    _check(e.max_tokens is None or e.max_tokens >= 1, "eval.max_tokens", e.max_tokens, "null or >= 1")
    _check(e.flush_every >= 1, "eval.flush_every", e.flush_every, ">= 1")
    _check(isinstance(e.merge_lora, bool), "eval.merge_lora", e.merge_lora, "true | false")
    _check(isinstance(e.get("compile", False), bool), "eval.compile", e.get("compile"), "true | false")
    if e.subsets is not None:
        _check(isinstance(e.subsets, (list, tuple)) or OmegaConf.is_list(e.subsets), "eval.subsets", e.subsets,
               "a list of subset / set names, e.g. eval.subsets=[ImageNet-1K,flickr30k]")


# ====================================================================== model
def model_spec(cfg: DictConfig):
    """The model to evaluate: the checkpoint's spec, or the base backbone from this config's groups."""
    from .encoder import read_spec, spec_from_config

    if cfg.ckpt:
        return read_spec(str(cfg.ckpt), cfg.eval.backbone_path)
    c = OmegaConf.to_container(cfg, resolve=True)
    c["data"] = {"max_length": cfg.eval.max_length or 1024, "target_instruction": None}
    spec = spec_from_config(c)
    if cfg.eval.backbone_path:
        spec.backbone["path"] = cfg.eval.backbone_path
    return spec


def make_fabric(cfg: DictConfig):
    from lightning.fabric import Fabric

    e = cfg.eval
    strategy = "ddp" if e.devices > 1 else "auto"
    fabric = Fabric(accelerator=e.accelerator, devices=e.devices, strategy=strategy, precision="32-true")
    if e.devices > 1:
        fabric.launch()
    return fabric


# ====================================================================== suites
def mmeb_subsets(cfg: DictConfig) -> tuple[str, str, list[str], list[str]]:
    """(dataset path, image root, subsets to run, subsets available)."""
    from .data.mmeb import image_root_problem, list_subsets
    from .data.synthetic import generate_synthetic, synthetic_paths
    from .evaluation.tables import norm

    m = cfg.eval.mmeb
    path, root = m.path, m.image_root
    problem = path is not None and image_root_problem("eval.mmeb", path, root)
    if problem:  # at start-up, not at the first image
        raise EvalConfigError(problem)
    if path is None:
        s = OmegaConf.to_container(m.synthetic, resolve=True)
        generate_synthetic(**s)
        paths = synthetic_paths(s["out_dir"])
        path, root = paths["eval"], root or paths["eval_images"]
    available = list_subsets(path)
    wanted = cfg.eval.subsets
    if wanted is None:
        return path, root, available, available
    by_norm = {norm(s): s for s in available}
    return path, root, [by_norm[norm(w)] for w in wanted if norm(w) in by_norm], available


def zeroshot_sets(cfg: DictConfig) -> dict[str, dict]:
    """{set: loader kwargs} of the zero-shot sets to run."""
    from .evaluation.tables import norm
    from .zeroshot import SETS, synthetic_paths, write_synthetic_zeroshot

    z = cfg.eval.zeroshot
    if z.root is None:
        root = write_synthetic_zeroshot(Path(cfg.paths.data_dir) / "synthetic_zeroshot_v1")
        sets = synthetic_paths(root, z.synthetic_layout)
    else:
        sets = {}
        for name, s in OmegaConf.to_container(z.sets, resolve=True).items():
            if name not in SETS:
                raise EvalConfigError(f"eval.zeroshot.sets.{name}: unknown set (expected {SETS})")
            s = dict(s)
            s["path"] = str(Path(z.root) / s["path"])
            if s.get("image_root") is not None:
                s["image_root"] = str(Path(z.root) / s["image_root"])
            sets[name] = s
    wanted = cfg.eval.subsets
    if wanted is not None:  # names compare as in _check_subset_names (case and punctuation aside)
        sets = {k: v for k, v in sets.items() if norm(k) in {norm(w) for w in wanted}}
    missing = {k: v["path"] for k, v in sets.items() if not Path(v["path"]).exists()}
    if missing:
        have = [k for k in sets if k not in missing]
        hint = (f"or run the sets that are there: eval.subsets=[{','.join(have)}] (MMEB subset names may be added)"
                if have else "is eval.zeroshot.root the folder that holds the sets?")
        raise EvalConfigError(
            f"eval.zeroshot: no such file or folder for {missing} (eval.zeroshot.root={z.root!r} joined to "
            f"eval.zeroshot.sets.<set>.path). Fix those paths, {hint}")
    return sets


def _check_subset_names(cfg: DictConfig, mmeb_available: list[str]) -> None:
    if cfg.eval.subsets is None:
        return
    from .evaluation.tables import norm
    from .zeroshot import SETS

    zs = list(SETS) if "zeroshot" in cfg.eval.suites else []
    known = {norm(s) for s in list(mmeb_available) + zs}
    unknown = [w for w in cfg.eval.subsets if norm(w) not in known]
    if unknown:
        off = [w for w in unknown if norm(w) in {norm(s) for s in SETS}] if not zs else []
        hint = (f" ({off}: zero-shot sets, which eval.suites={list(cfg.eval.suites)} does not run: add eval=all)"
                if off else "")
        raise EvalConfigError(f"eval.subsets: unknown name(s) {list(unknown)}; MMEB subsets here: {mmeb_available}; "
                              f"zero-shot sets: {zs}{hint}")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


# ====================================================================== main
def run(cfg: DictConfig, out_dir: str | Path, model=None, spec=None, fabric=None) -> dict | None:
    """Evaluate; returns (and writes, on rank 0) the results. `model` / `spec`: an already built model
    (its embeddings are then cached in memory only). ``eval.threads`` holds for the run only."""
    threads = torch.get_num_threads()
    try:
        if cfg.eval.threads:
            torch.set_num_threads(int(cfg.eval.threads))
        return _run(cfg, out_dir, model, spec, fabric)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, out_dir: str | Path, model, spec, fabric) -> dict | None:
    from .encoder import fingerprint, fingerprint_settings, load_model, lora_pending, resolve_dtype
    from .evaluation.cache import EmbeddingCache
    from .evaluation.engine import Engine, default_num_workers
    from .evaluation.suites import eval_choices, eval_mmeb_subset, eval_retrieval
    from .evaluation.tables import TABLE1_COLUMNS, TABLE2_COLUMNS, markdown, per_subset_markdown, table1, table2
    from .zeroshot import load_set

    validate(cfg)
    e = cfg.eval
    # the datasets first: a wrong path or name fails before minutes of model loading
    mmeb = mmeb_subsets(cfg) if "mmeb" in e.suites else None
    _check_subset_names(cfg, mmeb[3] if mmeb else [])
    zeroshot = zeroshot_sets(cfg) if "zeroshot" in e.suites else {}
    out = Path(out_dir)
    t_start = time.perf_counter()
    fabric = fabric or make_fabric(cfg)
    rank0 = fabric.global_rank == 0
    spec = spec or model_spec(cfg)
    dtype = resolve_dtype(e.dtype, spec, fabric.device)
    max_length = e.max_length or spec.max_length  # items are truncated to it: part of the cache key
    compiled = bool(e.get("compile", False))
    t_load = time.perf_counter()
    if model is None:
        model = load_model(spec, fabric.device, dtype, merge_lora=e.merge_lora, compile=compiled)
        fp = fingerprint(spec, dtype, merge_lora=e.merge_lora, max_length=max_length, compile=compiled)
    else:
        fp = None
    load_s = time.perf_counter() - t_load
    ti = spec.target_instruction if e.target_instruction == "checkpoint" else e.target_instruction
    if OmegaConf.is_config(ti):
        ti = OmegaConf.to_container(ti, resolve=True)
    cache_meta = {"source": spec.source, "kind": spec.kind, "dtype": dtype,
                  "settings": fingerprint_settings(spec, dtype, e.merge_lora, max_length, compiled)}
    cache = EmbeddingCache(e.cache_dir if (e.cache and fp) else None, fp or "memory", cache_meta, fabric.global_rank)
    workers = e.num_workers
    if workers == "auto":  # on CPU the model's own threads need the cores (workers beside them thrash)
        workers = default_num_workers(fabric.world_size) if fabric.device.type == "cuda" else 0
    engine = Engine(model, fabric, cache, batch_size=e.batch_size, max_tokens=e.max_tokens,
                    num_workers=workers, max_length=max_length, flush_every=e.flush_every, progress=e.progress)
    model_info = {"ckpt": str(cfg.ckpt) if cfg.ckpt else None, "kind": spec.kind, "backbone": spec.backbone["path"],
                  "k": spec.k, "sets": spec.sets, "template": spec.template, "dtype": dtype, "max_length": max_length,
                  "fingerprint": fp, "device": str(fabric.device), "world_size": fabric.world_size,
                  "lora": "none" if not lora_pending(spec) else ("separate" if model.backbone.has_lora else "merged")}
    results: dict = {"model": model_info, "mmeb": {}, "zeroshot": {}}
    extra = OmegaConf.to_container(e.meta_tasks, resolve=True) if e.meta_tasks else None

    if mmeb is not None:
        from .data.mmeb import load_eval_subset

        path, root, mmeb_names, _ = mmeb
        for subset in mmeb_names:
            es = load_eval_subset(path, root, subset, max_queries=e.mmeb.max_queries, split=e.mmeb.split,
                                  target_instruction=ti)
            r = eval_mmeb_subset(engine, es, e.rerank_top_k, e.rerank_batch_size, e.rerank_max_queries,
                                 device=fabric.device)
            if r is not None:
                results["mmeb"][subset] = r
                _write_json(out / "mmeb" / f"{subset}.json", {**r, "model": model_info})
                msg = f"{subset}: Hit@1 {100 * r['hit@1']:.1f} (chance {100 * r['chance@1']:.1f}), " \
                      f"{r['queries']} queries, {r['encoded']} encoded"
                if "rerank" in r:
                    rr = r["rerank"]
                    msg += (f"; rerank top-{rr['rerank_top_k']}: Hit@1 {100 * rr['hit@1_before']:.1f} -> "
                            f"{100 * rr['hit@1_after']:.1f} (+{rr['rerank_s']:.1f} s)")
                log.info(msg)

    if "zeroshot" in e.suites:
        z = e.zeroshot
        prompts = OmegaConf.to_container(z.prompts, resolve=True)
        isubs = OmegaConf.to_container(z.instruction_subsets, resolve=True)
        for name, kw in zeroshot.items():
            kw = dict(kw)
            if z.limit and name != "sugarcrepe":
                kw["limit"] = min(kw["limit"], z.limit) if kw.get("limit") else z.limit
            data = load_set(name, **kw)
            if name == "sugarcrepe":
                r = eval_choices(engine, data, prompts, ti, isubs)
            else:
                r = eval_retrieval(engine, data, prompts, ti, isubs, backend=e.scoring, device=fabric.device,
                                   chunk=e.pool_chunk)
            if r is not None:
                results["zeroshot"][name] = r
                _write_json(out / "zeroshot" / f"{name}.json", {**r, "model": model_info})

    if not rank0:
        return None
    name = Path(str(cfg.ckpt)).name if cfg.ckpt else f"base {spec.backbone['path']}"
    if results["mmeb"]:
        t1 = table1({k: v["hit@1"] for k, v in results["mmeb"].items()}, extra)
        results["table1"] = t1
        (out / "table1.md").write_text(markdown([(name, t1)], list(TABLE1_COLUMNS), "MMEB Hit@1 (%), Table 1 layout"))
        (out / "mmeb_subsets.md").write_text(per_subset_markdown(results["mmeb"], extra))
        _write_json(out / "table1.json", {"model": model_info, "row": t1})
    if results["zeroshot"]:
        t2 = table2(results["zeroshot"])
        results["table2"] = t2
        (out / "table2.md").write_text(markdown([(name, t2)], [c for _, _, c in TABLE2_COLUMNS],
                                                "Zero-shot Recall@1 / accuracy (%), Table 2 layout"))
        _write_json(out / "table2.json", {"model": model_info, "row": t2})
    timing = ("encode_s", "data_wait_s", "model_s")
    results["timing"] = {"load_s": round(load_s, 2), "total_s": round(time.perf_counter() - t_start, 2),
                         **{k: round(engine.stats[k], 2) for k in timing}}
    results["cache"] = {k: v for k, v in engine.stats.items() if k not in timing}
    results["cache"]["dir"] = str(cache.dir) if cache.dir else None
    _write_json(out / "results.json", results)
    if cfg.logger.name == "wandb":
        _log_wandb(cfg, results, out)
    _print_summary(out, results)
    return results


def _log_wandb(cfg: DictConfig, results: dict, out: Path) -> None:
    import os

    import wandb

    from .build import wandb_mode
    from .evaluation.tables import TABLE1_COLUMNS, TABLE2_COLUMNS

    os.environ.setdefault("WANDB_SILENT", "true")
    name = f"eval:{Path(str(cfg.ckpt)).name}" if cfg.ckpt else "eval:base"
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=name, group=cfg.logger.group,
                     tags=list(cfg.logger.tags) + ["eval"], mode=wandb_mode(cfg.logger.mode), job_type="eval",
                     config=OmegaConf.to_container(cfg, resolve=True), dir=str(out.absolute()),
                     reinit="finish_previous")
    try:
        payload = {}
        if "table1" in results:
            t1 = results["table1"]
            payload["eval/table1"] = wandb.Table(columns=["model", *TABLE1_COLUMNS],
                                                 data=[[name, *[t1.get(c) for c in TABLE1_COLUMNS]]])
            payload["eval/mmeb_subsets"] = wandb.Table(
                columns=["subset", "hit@1", "hit@5", "mrr", "chance@1", "queries"],
                data=[[k, v["hit@1"], v["hit@5"], v["mrr"], v["chance@1"], v["queries"]]
                      for k, v in results["mmeb"].items()])
            payload.update({f"eval/hit@1/{k}": v["hit@1"] for k, v in results["mmeb"].items()})
        if "table2" in results:
            t2 = results["table2"]
            cols = [c for _, _, c in TABLE2_COLUMNS]
            payload["eval/table2"] = wandb.Table(columns=["model", *cols], data=[[name, *[t2.get(c) for c in cols]]])
        run.log(payload)
    finally:
        run.finish()


def _print_summary(out: Path, results: dict) -> None:
    lines = [f"\n== rematch_pl eval: {results['model']['ckpt'] or 'base backbone'} =="]
    for f in ("mmeb_subsets.md", "table1.md", "table2.md"):
        if (out / f).exists():
            lines.append((out / f).read_text())
    c, t = results["cache"], results["timing"]
    lines.append(f"encoded {c['encoded']} of {c['unique']} unique items ({c['cache_hits']} from the cache, "
                 f"{c['image_reuses']} image reuses) in {t['encode_s']:.1f} s (model {t['model_s']:.1f} s, waiting for "
                 f"inputs {t['data_wait_s']:.1f} s: more eval.num_workers if large); total {t['total_s']:.1f} s")
    lines.append(f"output dir {out}")
    print("\n".join(lines), flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    sys.exit(main())
