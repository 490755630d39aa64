"""`rematch_pl.Encoder`: a trained ReMatch model as a plain embedding model and reranker, no Hydra.

    from rematch_pl import Encoder
    enc = Encoder.from_pretrained("runs/r1")            # a run directory, its adapter/ folder,
                                                        # or a folder written by rematch_pl.export
    q = enc.encode(texts=["two red circles"], instruction="Find me an everyday image that matches the given caption:")
    d = enc.encode(images=["a.png", "b.png"], instruction="Represent the given image.", side="doc")
    scores = q @ d.T                                    # embeddings are L2-normalised
    p_yes = enc.score(("two red circles", None), [("", "a.png"), ("", "b.png")])   # matching head, P("Yes")

Where a model comes from (`read_spec`):

* a **run directory** (``adapter/meta.json`` holds the resolved training config,
  ``adapter/adapter`` the PEFT adapter, ``adapter/rematch_modules.safetensors`` the learnable
  tokens, projector and marker embeddings), or that ``adapter/`` folder itself;
* an **exported folder** (``rematch.json``; see `rematch_pl.export`): base or merged weights and
  processor in ``model/``, the adapter (unmerged only) and the ReMatch modules beside it;
* nothing: the **base backbone** built from a config (`spec_from_config` with no weights): the
  model training starts from (LoRA B = 0, freshly initialised learnable tokens).

A model with learnable tokens (K > 0) or a matching head with a projector needs its
``rematch_modules.safetensors``: a checkpoint without it is an error (`checkpoint.load_trainable`),
never a model with freshly initialised modules. ``backbone_path`` points a checkpoint at base
weights that moved since it was written; a *merged* export refuses it (its ``model/`` holds the
trained weights, which the base would silently replace).

Loading runs no code from a checkpoint: configs come from JSON, ``trust_remote_code=False``
everywhere, and weights from safetensors files, which is all that `rematch_pl` writes. A folder
written by other tools may hold pickled weights only (a PEFT ``adapter_model.bin``, a base model's
``pytorch_model.bin``): PEFT and transformers then read them with ``torch.load(weights_only=True)``,
which restores tensors and plain containers and runs no pickled code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

EXPORT_CONFIG = "rematch.json"
EXPORT_FORMAT = "rematch_pl.export/1"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a ReMatch model for inference."""

    backbone: dict  # path, revision, dtype, attn_implementation, min_pixels, max_pixels, lora
    k: int = 16
    sets: str = "separate"
    matching: str = "all"
    matching_feature: str = "fused"
    projector_ratio: float = 1.0
    template: str = "chat"
    max_length: int | None = 1024
    target_instruction: object = None
    weights_dir: str | None = None  # adapter/ + rematch_modules.safetensors (+ backbone_trainable.safetensors)
    merged: bool = False
    kind: str = "base"  # run | adapter | export | base
    source: str | None = None
    training_config: dict | None = field(default=None, repr=False)

    def settings(self) -> dict:
        """The fields that define the embedding function (fingerprint input)."""
        d = asdict(self)
        for k in ("training_config", "weights_dir", "source", "kind", "matching", "matching_feature",
                  "projector_ratio", "target_instruction"):
            d.pop(k)
        return d


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg)


def spec_from_config(cfg, weights_dir: str | None = None, kind: str = "base", source: str | None = None) -> ModelSpec:
    """A (resolved) training config, or any mapping with backbone/fusion/matching/embedding groups."""
    cfg = _plain(cfg)
    b, f, m = cfg["backbone"], cfg.get("fusion", {}), cfg.get("matching", {})
    data = cfg.get("data") or {}
    return ModelSpec(
        backbone={key: b.get(key) for key in ("path", "revision", "dtype", "attn_implementation", "min_pixels",
                                             "max_pixels", "lora")},
        k=int(f.get("k", 16)), sets=f.get("sets", "separate"), matching=m.get("views", "all"),
        matching_feature=m.get("feature", "fused"), projector_ratio=float(m.get("projector_ratio", 1.0)),
        template=(cfg.get("embedding") or {}).get("template", "chat"), max_length=data.get("max_length", 1024),
        target_instruction=data.get("target_instruction"), weights_dir=weights_dir, kind=kind, source=source,
        training_config=cfg if kind != "base" else None,
    )


def _read_json(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def read_spec(path: str | os.PathLike, backbone_path: str | None = None) -> ModelSpec:
    """The spec of a run directory, its adapter folder, or an exported folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ckpt={path}: no such directory")
    if (p / EXPORT_CONFIG).is_file():
        c = _read_json(p / EXPORT_CONFIG)
        if c.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{p / EXPORT_CONFIG}: unknown format {c.get('format')!r} (expected {EXPORT_FORMAT})")
        b = dict(c["backbone"], path=str(p / c.get("model_dir", "model")), revision=None)
        if c.get("merged") and backbone_path:
            raise ValueError(
                f"backbone_path={backbone_path!r} given for {p}, a merged export: its {c.get('model_dir', 'model')}/ "
                f"holds the trained weights (base + LoRA merged), which another base model would replace. "
                f"Drop backbone_path (a merged export needs no base model), or export the run unmerged "
                f"(merge=false) to relocate its base weights")
        if c.get("merged"):
            b["lora"] = dict(b.get("lora") or {}, enabled=False)
        tc = _read_json(p / "training_config.json") if (p / "training_config.json").is_file() else None
        spec = ModelSpec(backbone=b, k=c["fusion"]["k"], sets=c["fusion"]["sets"], matching=c["matching"]["views"],
                         matching_feature=c["matching"]["feature"], projector_ratio=c["matching"]["projector_ratio"],
                         template=c["embedding"]["template"], max_length=c["data"]["max_length"],
                         target_instruction=c["data"].get("target_instruction"), weights_dir=str(p),
                         merged=bool(c.get("merged")), kind="export", source=str(p), training_config=tc)
    else:
        if (p / "adapter" / "meta.json").is_file():
            wdir, kind = p / "adapter", "run"
        elif (p / "meta.json").is_file() and any((p / n).exists() for n in (
                "rematch_modules.safetensors", "adapter", "backbone_trainable.safetensors")):
            wdir, kind = p, "adapter"  # a missing rematch_modules.safetensors: load_trainable names it
        else:
            raise FileNotFoundError(
                f"ckpt={path}: neither a run directory (adapter/meta.json), an adapter folder (meta.json + "
                f"rematch_modules.safetensors) nor an exported folder ({EXPORT_CONFIG})")
        meta = _read_json(wdir / "meta.json")
        if "config" not in meta:
            raise ValueError(f"{wdir / 'meta.json'} holds no training config")
        spec = spec_from_config(meta["config"], weights_dir=str(wdir), kind=kind, source=str(p))
    if backbone_path:
        spec.backbone["path"] = backbone_path
    return spec


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, spec: ModelSpec, device: torch.device) -> str:
    """``auto``: bf16 on a GPU, the checkpoint's own dtype elsewhere."""
    if dtype in (None, "auto"):
        return "bf16" if device.type == "cuda" else (spec.backbone.get("dtype") or "fp32")
    return dtype


def lora_pending(spec: ModelSpec) -> bool:
    """The model has LoRA factors beside its base weights (trained with LoRA, not a merged export)."""
    return bool((spec.backbone.get("lora") or {}).get("enabled", False)) and not spec.merged


def model_modules(spec: ModelSpec) -> list[str]:
    """The ReMatch modules (outside the backbone) of the model `spec` describes, which its
    ``rematch_modules.safetensors`` must hold: the learnable tokens (K > 0) and, with matching views
    that read the fused features, the projector and the <feat_start>/<feat_end> markers."""
    from .matching import reads_features

    out = ["fusion.tokens"] if spec.k > 0 else []
    if reads_features(spec.matching):
        out += ["matching.projector", "matching.markers"]
    return out


def load_model(spec: ModelSpec, device: str | torch.device | None = None, dtype: str | None = None,
               merge_lora: bool = False, compile: bool = False):
    """Build the ReMatch model of `spec` for inference (eval mode, no gradients) on `device`.

    `merge_lora`: fold the LoRA factors into the base weights after loading them (in the factors'
    float32, before the cast to `dtype`: one rounding), so each adapted projection is one matmul.
    Same function as the unmerged model up to that rounding (tested); the base model can then no
    longer be recovered (`generate` keeps the adapter separate for its base comparison).
    `compile`: `torch.compile` the decoder layers and vision blocks (`compile_backbone`)
    once loaded and merged; the first batches compile."""
    from .backbone.model import DTYPES, compile_backbone, load_backbone
    from .checkpoint import load_trainable
    from .model import ReMatchModel

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, spec, dev)
    b = spec.backbone
    lora = dict(b.get("lora") or {})
    lora = lora if lora_pending(spec) else None
    if lora is not None:
        lora["dropout"] = 0.0
    bb = load_backbone(path=b["path"], dtype=dt, attn_implementation=b.get("attn_implementation") or "sdpa",
                       gradient_checkpointing=False, min_pixels=b.get("min_pixels"), max_pixels=b.get("max_pixels"),
                       lora=lora, revision=b.get("revision"), fused_rms_norm=b.get("fused_rms_norm", True))
    model = ReMatchModel(bb, k=spec.k, token_sets=spec.sets, matching=spec.matching,
                         matching_feature=spec.matching_feature, projector_ratio=spec.projector_ratio,
                         template=spec.template)
    if spec.weights_dir:
        load_trainable(model, spec.weights_dir)
    if merge_lora:
        bb.merge_lora()
    if compile:
        compile_backbone(bb)
    model.requires_grad_(False)
    model.eval()
    return model.to(dev, DTYPES[dt])


def fingerprint_settings(spec: ModelSpec, dtype: str, merge_lora: bool = False, max_length: int | None = None,
                         compile: bool = False) -> dict:
    """The settings part of the cache fingerprint: the spec's, with the eval-time ones that change an
    embedding. `max_length`: the truncation length used (eval.max_length; None: the spec's own, the
    same key). A LoRA merged at load time (`merge_lora`) and compiled kernels (`compile`) round
    differently from the separate branch and from eager kernels, so each is part of the key (only
    when on: the key of the plain model stays as it was)."""
    settings = dict(spec.settings(), compute_dtype=dtype, base=spec.backbone["path"])
    if max_length is not None:
        settings["max_length"] = max_length
    if merge_lora and lora_pending(spec):
        settings["lora_merged_at_load"] = True
    if compile:
        settings["compiled"] = True
    return settings


def fingerprint(spec: ModelSpec, dtype: str, merge_lora: bool = False, max_length: int | None = None,
                compile: bool = False) -> str:
    """Cache fingerprint of a loaded model (see `evaluation.cache`): its files and
    `fingerprint_settings`. Batch composition (eval.batch_size, eval.max_tokens) is not part of it:
    the batch an item is padded into moves its embedding by float rounding only."""
    from .backbone.model import resolve_path
    from .evaluation.cache import model_fingerprint

    base = resolve_path(spec.backbone["path"])
    settings = fingerprint_settings(spec, dtype, merge_lora, max_length, compile)
    return model_fingerprint(settings, [base], [spec.weights_dir] if spec.weights_dir else [])


# ====================================================================== the Encoder
def _as_list(x, n: int | None = None) -> list:
    if x is None:
        return [None] * (n or 0)
    if isinstance(x, (str, os.PathLike)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def _load_pil(image):
    from PIL import Image

    from .data.images import load_image, make_processor_safe

    if image is None:
        return None
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return make_processor_safe(image)


def content_text(text: str | None, has_image: bool, instruction: str | None = None) -> str:
    """(text, image?, instruction) -> the MMEB-style content string with the image placeholder.

    ``content_text("a cat", True, "Represent the given image with the following question:")``
    -> ``"<|image_1|>\\nRepresent the given image with the following question: a cat"``.
    """
    from .backbone.processor import MMEB_IMAGE_PLACEHOLDER, VISION_BLOCK

    text = text or ""
    body = " ".join(x for x in ((instruction or "").strip(), text.strip()) if x) if instruction else text
    if has_image and MMEB_IMAGE_PLACEHOLDER not in body and VISION_BLOCK not in body:
        body = MMEB_IMAGE_PLACEHOLDER + ("\n" + body if body else "")
    return body


class Encoder:
    """Embeddings (L2-normalised) and matching-head scores of a trained ReMatch model."""

    def __init__(self, model, spec: ModelSpec):
        self.model = model
        self.spec = spec
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                        backbone_path: str | None = None, base_config=None, merge_lora: bool = True,
                        compile: bool = False) -> "Encoder":
        """A run directory, its adapter folder or an exported folder; ``path=None`` with `base_config`
        (a mapping with backbone/fusion/matching/embedding groups) gives the base backbone.
        `backbone_path`: where the base weights are now, when they moved since the checkpoint was
        written (refused for a merged export: its weights are the trained ones).
        `merge_lora`: fold a LoRA adapter into the base weights at load (faster; see `load_model`).
        `compile`: `torch.compile` the decoder layers and vision blocks (as `eval.compile=true`)."""
        if path is None:
            if base_config is None:
                raise ValueError("Encoder.from_pretrained(None) needs base_config (the base backbone's config)")
            spec = spec_from_config(base_config)
        else:
            spec = read_spec(path, backbone_path)
        return cls(load_model(spec, device, dtype, merge_lora=merge_lora, compile=compile), spec)

    @property
    def processor(self):
        return self.model.backbone.processor

    @property
    def dim(self) -> int:
        return self.model.backbone.hidden_size

    def _contents(self, texts, images, instruction) -> list[tuple[str, object]]:
        texts_l = _as_list(texts)
        images_l = _as_list(images)
        n = max(len(texts_l), len(images_l))
        if not n:
            raise ValueError("encode() needs texts and/or images")
        texts_l = texts_l or [None] * n
        images_l = images_l or [None] * n
        if len(texts_l) != len(images_l):
            raise ValueError(f"{len(texts_l)} texts but {len(images_l)} images: give one of each per item "
                             "(None for none)")
        return [(content_text(t, im is not None, instruction), im) for t, im in zip(texts_l, images_l)]

    @torch.no_grad()
    def encode(self, texts=None, images=None, instruction: str | None = None, side: str = "query",
               batch_size: int | None = None, normalize: bool = True, max_tokens: int | None = 32768,
               num_workers: int = 0, progress: bool = False) -> torch.Tensor:
        """Embeddings [N, d] (float32, CPU) of N items, in input order.

        texts: a string or a list (None entries for image-only items); images: a PIL image, a path,
        or a list of them (None entries for text-only items); instruction: put before each text
        (MMEB style); side: "query" (the query token set) or "document" / "doc".

        Items with image files (or no image) run through the evaluation engine
        (`evaluation.engine`), as `rematch_pl.eval` encodes: sorted by length into batches of at
        most `batch_size` rows (default 256) and `max_tokens` padded tokens, images decoded in
        `num_workers` DataLoader workers, an image file shared by several items encoded once,
        repeated items encoded once. With in-memory PIL images the items are encoded in input
        order, `batch_size` (default 16) at a time.
        """
        from .evaluation.engine import Engine, Request, embed_batch, model_side

        s = {"query": "qry", "qry": "qry", "document": "doc", "doc": "doc"}.get(side)
        if s is None:
            raise ValueError(f"side={side!r}: expected 'query' or 'document'")
        contents = self._contents(texts, images, instruction)
        if all(im is None or isinstance(im, (str, os.PathLike)) for _, im in contents):
            engine = Engine(self.model, None, None, batch_size=batch_size or 256, max_tokens=max_tokens,
                            num_workers=num_workers, max_length=self.spec.max_length, progress=progress)
            emb = engine.encode([Request(t, None if im is None else os.fspath(im), s) for t, im in contents],
                                desc="encode")
            return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
        from .data.collate import EvalCollator

        s = model_side(self.model, s)
        batch_size = batch_size or 16
        collate = EvalCollator(self.processor, self.spec.max_length, pixel_dtype=self.dtype)
        out = []
        for b0 in range(0, len(contents), batch_size):
            chunk = contents[b0:b0 + batch_size]
            batch = collate([(i, t, _load_pil(im)) for i, (t, im) in enumerate(chunk)])
            rows = embed_batch(self.model, batch, [[s]] * len(chunk), self.device, self.dtype)
            out.append(torch.stack([e for _, _, e in sorted(rows, key=lambda r: r[0])]))
        emb = torch.cat(out)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def score(self, query, candidates, batch_size: int = 8) -> torch.Tensor:
        """P("Yes") [C] of the matching head for (query, candidate) pairs, the mean over its views.

        query / each candidate: a text, or a (text, image) pair (image: PIL, path or None). Texts
        are used as given (put an instruction in them if the model was trained with one).
        """
        from .evaluation.rerank import match_probs

        def item(x):
            if isinstance(x, (tuple, list)):
                t, im = x
            elif isinstance(x, dict):
                t, im = x.get("text"), x.get("image")
            else:
                t, im = x, None
            return content_text(t, im is not None), im

        q = item(query)
        cands = [item(c) for c in candidates]
        return match_probs(self.model, [q] * len(cands), cands, max_length=self.spec.max_length,
                           batch_size=batch_size, load=_load_pil)
