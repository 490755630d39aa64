"""`python -m rematch_pl.export ckpt=RUN_DIR out=DIR [merge=true] [eval_dir=EVAL_OUT] [overwrite=true]
[backbone_path=BASE]` (BASE: the base weights' folder or hub id when the run recorded another location;
not for a merged export, whose model/ holds the trained weights)

Writes a folder usable without Hydra (`rematch_pl.Encoder.from_pretrained(DIR)`)::

    DIR/rematch.json                  small config: K, token sets, template, matching views, max_length,
                                      target instructions, pixel range, LoRA settings, merged or not
    DIR/model/                        base weights (or, with merge=true, base + LoRA merged) as safetensors,
                                      config.json, tokenizer and image processor (with the trained pixel range)
    DIR/adapter/                      the PEFT adapter (unmerged exports only)
    DIR/rematch_modules.safetensors   learnable tokens, projector, <feat_start>/<feat_end> embeddings
    DIR/training_config.json          the resolved training config
    DIR/README.md                     model card: usage, settings, training config, validation and eval tables

Merging runs in float32 and the merged weights are cast back to the training dtype (`merge_dtype`
to keep them in float32). In float32 merged and unmerged exports give the same embeddings (tested);
in bf16 they differ at bf16 rounding level (the adapter is applied un-rounded on top of rounded base
weights in one, rounded into the weights in the other).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import MODULES_FILE, missing_modules_error
from .encoder import EXPORT_CONFIG, EXPORT_FORMAT, ModelSpec, model_modules, read_spec
from .hub import hub_kwargs, model_kwargs


def parse_args(argv: list[str], defaults: dict, prog: str, doc: str = "") -> dict:
    """``key=value`` arguments (Hydra style, no Hydra) -> dict; unknown keys are an error."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"{prog}: arguments are key=value, got {bad}")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(argv), resolve=True)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SystemExit(f"{prog}: unknown argument(s) {unknown}; allowed: {sorted(defaults)}")
    out = {**defaults, **given}
    missing = [k for k, v in out.items() if v == "???"]
    if missing:
        raise SystemExit(f"{prog}: missing {', '.join(k + '=...' for k in missing)}")
    return out


def _small_config(spec: ModelSpec, merged: bool) -> dict:
    b = dict(spec.backbone)
    return {
        "format": EXPORT_FORMAT,
        "model_dir": "model",
        "merged": merged,
        "backbone": {"source": b["path"], "revision": b.get("revision"), "dtype": b.get("dtype"),
                     "attn_implementation": b.get("attn_implementation"), "min_pixels": b.get("min_pixels"),
                     "max_pixels": b.get("max_pixels"), "lora": b.get("lora")},
        "fusion": {"k": spec.k, "sets": spec.sets},
        "matching": {"views": spec.matching, "feature": spec.matching_feature, "projector_ratio": spec.projector_ratio},
        "embedding": {"template": spec.template},
        "data": {"max_length": spec.max_length, "target_instruction": spec.target_instruction},
        "source_checkpoint": spec.source,
    }


def _model_card(spec: ModelSpec, small: dict, out: Path, eval_dir: str | None) -> str:
    import yaml

    run_dir = Path(spec.source) if spec.source else None
    lines = [
        f"# ReMatch embedding model ({'merged' if small['merged'] else 'base + LoRA adapter'})", "",
        f"Exported by `rematch_pl.export` from `{spec.source}`. Backbone: `{small['backbone']['source']}`; "
        f"K = {spec.k} learnable tokens ({spec.sets} query/document sets), `{spec.template}` embedding template, "
        f"matching head with `{spec.matching}` views.", "",
        "## Usage", "", "```python", "from rematch_pl import Encoder", "",
        f'enc = Encoder.from_pretrained("{out}")',
        'q = enc.encode(texts=["two red circles"],',
        '               instruction="Find me an everyday image that matches the given caption:")',
        'd = enc.encode(images=["a.png", "b.png"], instruction="Represent the given image.", side="document")',
        "print(q @ d.T)                      # cosine similarities (embeddings are L2-normalised)",
        '# P("Yes") of the matching head, for reranking',
        'print(enc.score(("two red circles", None), [(None, "a.png"), (None, "b.png")]))',
        "```", "",
        "Evaluate it: `python -m rematch_pl.eval ckpt=" + str(out) + " eval=all`.", "",
        "## Settings", "", "```json", json.dumps(small, indent=2, default=str), "```", "",
    ]
    summary = run_dir / "summary.json" if run_dir else None
    if summary is not None and summary.is_file():
        s = json.loads(summary.read_text())
        val = s.get("val", {})
        lines += ["## Training", "", f"{s.get('steps')} steps, wall time {s.get('wall_time_s')} s, "
                  f"{s.get('samples_per_s')} samples/s, peak memory {s.get('peak_memory_gb')} GiB.", ""]
        if val:
            lines += ["Validation at the end of training:", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in val.items() if "/" in k and k.count("/") == 1]
            lines.append("")
    if eval_dir:
        ed = Path(eval_dir)
        found = False
        for name, title in (("table1.md", "MMEB (Table 1 layout)"), ("mmeb_subsets.md", "MMEB per subset"),
                            ("table2.md", "Zero-shot (Table 2 layout)")):
            if (ed / name).is_file():
                if not found:
                    lines += ["## Evaluation", "", f"From `{ed}` (`python -m rematch_pl.eval`).", ""]
                    found = True
                lines += [f"### {title}", "", (ed / name).read_text(), ""]
        if not found:
            raise FileNotFoundError(f"eval_dir={eval_dir}: no table1.md / table2.md (an output dir of rematch_pl.eval)")
    if spec.training_config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(spec.training_config, sort_keys=False).rstrip(),
                  "```", ""]
    return "\n".join(lines)


def export(ckpt: str, out: str, merge: bool = False, eval_dir: str | None = None, overwrite: bool = False,
           merge_dtype: str | None = None, backbone_path: str | None = None) -> Path:
    """Export `ckpt` (run dir, adapter folder or an export) to `out`; returns `out`. `backbone_path`:
    where the base weights are now (a run trained on another machine records that machine's path;
    refused for a merged export, whose weights are the trained ones). A checkpoint without the
    ``rematch_modules.safetensors`` its config calls for is an error, before `out` is touched."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .backbone.model import DTYPES, explain_load_errors, resolve_path
    from .backbone.processor import MultimodalProcessor
    from .encoder import load_model

    spec = read_spec(ckpt, backbone_path)
    wdir = Path(spec.weights_dir) if spec.weights_dir else None
    if wdir is not None and not (wdir / MODULES_FILE).is_file() and model_modules(spec):
        raise missing_modules_error(wdir, model_modules(spec))  # before anything is written or replaced
    dst = Path(out)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out={out} exists and is not empty (overwrite=true to replace it)")
        shutil.rmtree(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    b = spec.backbone
    dtype = b.get("dtype") or "fp32"
    base = resolve_path(b["path"])
    lora_on = bool((b.get("lora") or {}).get("enabled")) and not spec.merged
    hub = hub_kwargs(base, b.get("revision"))  # revision; a hub id without a reachable hub: the cache only
    with explain_load_errors(b["path"]):
        proc = MultimodalProcessor.from_pretrained(base, min_pixels=b.get("min_pixels"), max_pixels=b.get("max_pixels"),
                                                   **hub)
    proc.tokenizer.save_pretrained(tmp / "model")
    proc.image_processor.save_pretrained(tmp / "model")
    full_ft = wdir is not None and (wdir / "backbone_trainable.safetensors").is_file()
    if merge and (lora_on or full_ft):
        model = load_model(spec, "cpu", "fp32", merge_lora=True)
        hf = model.backbone.model.to(DTYPES[merge_dtype or dtype])
        hf.save_pretrained(tmp / "model", safe_serialization=True)
        merged = True
    else:
        with explain_load_errors(b["path"]):
            hf = AutoModelForImageTextToText.from_pretrained(base, dtype=DTYPES[dtype], trust_remote_code=False,
                                                             **model_kwargs(base, b.get("revision")))
        hf.save_pretrained(tmp / "model", safe_serialization=True)
        del hf
        merged = spec.merged
        if wdir is not None and lora_on:
            shutil.copytree(wdir / "adapter", tmp / "adapter")
        if full_ft:
            shutil.copy2(wdir / "backbone_trainable.safetensors", tmp / "backbone_trainable.safetensors")
    if wdir is not None and (wdir / MODULES_FILE).is_file():
        shutil.copy2(wdir / MODULES_FILE, tmp / MODULES_FILE)
    small = _small_config(spec, merged)
    if merged:
        small["backbone"]["dtype"] = merge_dtype or dtype
    (tmp / EXPORT_CONFIG).write_text(json.dumps(small, indent=2, default=str))
    if spec.training_config:
        (tmp / "training_config.json").write_text(json.dumps(spec.training_config, indent=2, default=str))
    (tmp / "README.md").write_text(_model_card(spec, small, dst, eval_dir))
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(sys.argv[1:] if argv is None else argv,
                   {"ckpt": "???", "out": "???", "merge": False, "eval_dir": None, "overwrite": False,
                    "merge_dtype": None, "backbone_path": None}, "python -m rematch_pl.export", __doc__)
    dst = export(str(a["ckpt"]), str(a["out"]), bool(a["merge"]), a["eval_dir"], bool(a["overwrite"]), a["merge_dtype"],
                 a["backbone_path"])
    print(f"exported {a['ckpt']} -> {dst} ({'merged' if a['merge'] else 'base + adapter'})")
    return dst


if __name__ == "__main__":
    main()
