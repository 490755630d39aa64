"""Helpers for the analysis notebooks (``notebooks/``): trained runs, embeddings, attention, captions.

* `demo_sweep`: a small multirun through the real entry point (reused when already there), so
  every notebook runs top to bottom on the embedded default;
* `load_run`: rebuild a trained run from its directory (resolved config of ``summary.json`` +
  trainable weights of ``adapter/``);
* `embed_eval` / `plot_tsne`: query and positive-document embeddings of the eval subsets,
  t-SNE per meta-task (paper Fig. 6);
* `token_attention` / `plot_token_attention`: last-layer attention of each learnable token
  over the image patches, averaged over heads, min-max normalised, on the merged patch grid
  and overlaid on the image (paper S8, Fig. 7). The weights are HF's own attention
  probabilities: the run is loaded with ``attn_implementation="eager"`` (sdpa does not return
  them) and the language model is called with ``output_attentions=True`` on exactly the
  embedding row training uses (`ReMatchModel.embedding_row`, explicit M-RoPE positions);
* `caption_retention` / `plot_captions`: greedy captions of the trained model against the base
  model (LoRA adapter disabled) with the chat template, through `rematch_pl.generate` (paper
  S9), plus how far the trained LM moved (token agreement, KL on the base caption).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .report import META_TASKS, load_local_runs, meta_task

# ---------------------------------------------------------------------------- demo runs
DEMO_AXIS = ("fusion=mef,mef_avg",)  # K=16 learnable tokens with / without the orthogonality loss (Fig. 7)
DEMO_OVERRIDES = ("debug=fast", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=4",
                  "trainer.val_check_interval=4", "data.batch_size=4", "data.eval.max_queries=4")
DEMO_ENV = "REMATCH_SWEEP_DIR"
_MARKER = "demo_sweep.json"


def demo_sweep(sweep_dir: str | os.PathLike | None = None, axis: tuple[str, ...] = DEMO_AXIS,
               overrides: tuple[str, ...] = DEMO_OVERRIDES, timeout: float = 1800) -> Path:
    """A small finished multirun for the notebooks: `sweep_dir`, else ``$REMATCH_SWEEP_DIR``, else
    ``./outputs/notebook_demo``. Reused when it is complete; otherwise trained with
    ``python -m rematch_pl.train --multirun <axis> <overrides>`` (a minute or so on CPU)."""
    given = sweep_dir or os.environ.get(DEMO_ENV)
    root = Path(given or Path.cwd() / "outputs" / "notebook_demo").resolve()
    spec = {"axis": list(axis), "overrides": list(overrides)}
    runs = [r for r in load_local_runs(root) if r.ok] if root.exists() else []
    if given and runs:
        return root  # a sweep given by the caller: use it as it is
    marker = root / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec and len(runs) >= _n_jobs(axis):
        return root
    if root.exists() and any(root.iterdir()):
        if not marker.exists():
            raise FileExistsError(f"{root} exists and was not made by demo_sweep: give another sweep_dir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec))
    from .sweep import _quote

    cmd = [sys.executable, "-m", "rematch_pl.train", "--multirun", *axis, *overrides, f"hydra.sweep.dir={_quote(str(root))}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"demo sweep failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return root


def _n_jobs(axis: tuple[str, ...]) -> int:
    n = 1
    for a in axis:
        n *= len(a.split("=", 1)[1].split(","))
    return n


def run_dirs(path: str | os.PathLike) -> dict[str, Path]:
    """{run name: run directory} of the finished runs under `path`, in sweep order."""
    return {r.name: Path(r.source) for r in load_local_runs(path) if r.ok}


def select_run(path: str | os.PathLike, **where) -> Path:
    """The one finished run under `path` whose config matches, e.g. ``select_run(d, fusion__orthogonality=True)``."""
    hits = [r for r in load_local_runs(path) if r.ok
            and all(r.get(k.replace("__", ".")) == v for k, v in where.items())]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} runs under {path} match {where}: {[r.name for r in hits]}")
    return Path(hits[0].source)


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadedRun:
    run_dir: Path
    name: str
    cfg: DictConfig
    model: torch.nn.Module  # ReMatchModel, eval mode
    summary: dict = field(default_factory=dict)

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def processor(self):
        return self.model.backbone.processor


def load_run(run_dir: str | os.PathLike, attn_implementation: str | None = None, device: str = "cpu",
             trained: bool = True) -> LoadedRun:
    """Rebuild the model of a finished run (its resolved config) with its trained weights.

    attn_implementation: e.g. ``"eager"`` for attention maps (default: the run's own).
    trained=False gives the same architecture with the base backbone (fresh LoRA = no change).
    """
    from .build import build_backbone, build_model
    from .checkpoint import load_trainable

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = OmegaConf.create(summary["config"])
    if attn_implementation:
        cfg.backbone.attn_implementation = attn_implementation
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone, gradient_checkpointing=False)  # inference
    model = build_model(cfg, backbone)
    if trained:
        load_trainable(model, run_dir / "adapter")
    model.to(device).eval()
    return LoadedRun(run_dir, summary.get("run_name", run_dir.name), cfg, model, summary)


# ---------------------------------------------------------------------------- eval embeddings
@dataclass
class SubsetEmbeddings:
    subset: str
    meta: str
    query: torch.Tensor  # [Q, d] query-side embeddings of the queries
    doc: torch.Tensor  # [Q, d] document-side embeddings of their positives
    hit1: float  # strict Hit@1 over the full candidate lists (as in validation)


def eval_datamodule(run: LoadedRun, max_queries: int | None = None, subsets: list[str] | None = None):
    from .build import build_datamodule

    cfg = run.cfg.copy()
    if max_queries is not None:
        cfg.data.eval.max_queries = max_queries
    if subsets is not None:
        cfg.data.eval.subsets = list(subsets)
    cfg.data.num_workers = 0
    dm = build_datamodule(cfg, run.processor)
    dm.prepare_data()
    dm.setup("validate")
    return dm


@torch.no_grad()
def embed_eval(run: LoadedRun, max_queries: int | None = None, subsets: list[str] | None = None) -> dict[str, SubsetEmbeddings]:
    """Embeddings of every eval item, computed as `ReMatchModule.validation_step` does."""
    from .evaluation import evaluate_subset

    dm = eval_datamodule(run, max_queries, subsets)
    m = run.model
    dev = next(m.parameters()).device
    Q: dict[int, torch.Tensor] = {}
    D: dict[int, torch.Tensor] = {}
    for batch in dm.val_dataloader():
        grids = batch["image_grid_thw"]  # on the host, where the packing reads it
        feats = m.backbone.encode_images(batch["pixel_values"].to(dev), grids)
        contents = m.contents(batch["items"])
        sides = ["qry", "doc"] if m.fusion.k > 0 and m.fusion.sets != "shared" else ["qry"]
        outs = m.embed([(s, contents) for s in sides], feats, grids)
        for j, i in enumerate(batch["item_index"].tolist()):
            Q[i], D[i] = outs[0][0][j].float().cpu(), outs[-1][0][j].float().cpu()
    n = max(Q) + 1
    Qm, Dm = torch.zeros(n, next(iter(Q.values())).shape[0]), torch.zeros(n, next(iter(D.values())).shape[0])
    for i in Q:
        Qm[i], Dm[i] = Q[i], D[i]
    out = {}
    for subset, layout in dm.eval_layout.items():
        qs = torch.as_tensor(layout["queries"])
        pos = torch.as_tensor([c[0] for c in layout["candidates"]])
        hit1 = evaluate_subset(Qm[qs], Dm, layout["candidates"])["hit@1"]
        out[subset] = SubsetEmbeddings(subset, meta_task(subset), Qm[qs], Dm[pos], hit1)
    return out


def tsne_2d(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn; perplexity capped for small sets). Falls back to PCA without scikit-learn."""
    x = np.asarray(x, dtype=np.float64)
    perp = float(min(perplexity, max(2.0, (len(x) - 1) / 3)))
    try:
        from sklearn.manifold import TSNE
    except ImportError:  # PCA keeps the notebook running; the title says so
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        return xc @ vt[:2].T
    return TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def pair_alignment(e: SubsetEmbeddings) -> float:
    """Mean cosine of matched (query, positive) pairs minus the mean cosine of all (query, document) pairs."""
    q, d = _unit(e.query), _unit(e.doc)
    return float((q * d).sum(-1).mean() - (q @ d.T).mean())


def plot_tsne(embeddings: dict[str, dict[str, SubsetEmbeddings]], perplexity: float = 30.0, seed: int = 0):
    """Fig. 6: per run (rows) and meta-task (columns) t-SNE of queries (red) and documents (blue);
    markers per subset, thin lines join a query to its positive."""
    from matplotlib.figure import Figure

    try:
        import sklearn  # noqa: F401
        method = f"t-SNE (perplexity <= {perplexity:g})"
    except ImportError:
        method = "PCA (scikit-learn not installed)"
    tasks = [t for t in (*META_TASKS, "other") if any(e.meta == t for embs in embeddings.values() for e in embs.values())]
    fig = Figure(figsize=(3.4 * len(tasks), 3.3 * len(embeddings)), layout="constrained")
    axes = fig.subplots(len(embeddings), len(tasks), squeeze=False)
    markers = "os^Dv<>p"
    for r, (label, embs) in enumerate(embeddings.items()):
        for c, task in enumerate(tasks):
            ax = axes[r, c]
            parts = [e for e in embs.values() if e.meta == task]
            x = torch.cat([_unit(torch.cat([e.query, e.doc])) for e in parts]).numpy()
            y = tsne_2d(x, perplexity, seed)
            i = 0
            for j, e in enumerate(parts):
                n = len(e.query)
                yq, yd = y[i:i + n], y[i + n:i + 2 * n]
                i += 2 * n
                for a, b in zip(yq, yd):
                    ax.plot([a[0], b[0]], [a[1], b[1]], color="0.8", lw=0.5, zorder=0)
                m = markers[j % len(markers)]
                ax.scatter(yq[:, 0], yq[:, 1], c="tab:red", marker=m, s=18, label=f"query {e.subset}")
                ax.scatter(yd[:, 0], yd[:, 1], c="tab:blue", marker=m, s=18, label=f"doc {e.subset}")
            align = sum(pair_alignment(e) for e in parts) / len(parts)
            ax.set_title(f"{label}\n{task}: align {align:+.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.legend(fontsize=5, loc="best")
    fig.suptitle(f"{method} of query (red) and positive-document (blue) embeddings", fontsize=9)
    return fig


# ---------------------------------------------------------------------------- eval images
def eval_images(run: LoadedRun, n: int = 3, subset: str | None = None) -> list[tuple[str, Image.Image, str]]:
    """(subset, image, query text) of `n` eval queries that carry an image, taken from the subsets in turn."""
    from .data.images import load_image

    dm = eval_datamodule(run)
    pools = [[(name, es.image_file(q), es.items[q][0]) for q in es.queries if es.image_file(q)]
             for name, es in dm.eval_sets.items() if subset is None or name == subset]
    picked = []
    for i in range(max((len(p) for p in pools), default=0)):
        picked += [p[i] for p in pools if i < len(p)]
    return [(name, load_image(path).convert("RGB"), text) for name, path, text in picked[:n]]


# ---------------------------------------------------------------------------- attention maps
@dataclass
class TokenAttention:
    maps: np.ndarray  # [K, gh, gw] in [0, 1] (min-max per token)
    raw: np.ndarray  # [K, gh, gw] head-averaged attention probabilities
    image: Image.Image  # the image at the size the model saw
    grid: tuple[int, int]  # merged patch grid (gh, gw)
    label: str = ""

    @property
    def diversity(self) -> float:
        """1 - mean pairwise cosine similarity of the K normalised maps (0: all tokens look at the same patches)."""
        k = self.raw.shape[0]
        if k < 2:
            return 0.0
        v = torch.nn.functional.normalize(torch.as_tensor(self.maps.reshape(k, -1)), dim=-1)
        sim = v @ v.T
        return float(1 - (sim.sum() - sim.diag().sum()) / (k * (k - 1)))


def _row_ids(row) -> list[int]:
    """Token ids of an embedding row, -1 where vectors (learnable tokens) are inserted."""
    from .backbone.sequence import Vecs

    ids: list[int] = []
    for seg in row:
        for part in seg.parts:
            ids += [-1] * part.vectors.shape[0] if isinstance(part, Vecs) else [int(t) for t in part.ids]
    return ids


@torch.no_grad()
def token_attention(run: LoadedRun, image: Image.Image, text: str | None = None, side: str = "qry",
                    size: int | None = None) -> TokenAttention:
    """Last-layer attention of each learnable token (the [EOS] token when K=0) over the image patches.

    The row is the embedding row of training (template, learnable tokens); `text` must hold
    one ``<|image_1|>`` (default: the classification query). `size` resizes the image first
    (e.g. 112 gives the tiny backbones a 4x4 merged grid instead of 2x2).
    """
    from .backbone.sequence import Ids, build_inputs
    from .data.images import make_processor_safe

    m = run.model
    bb = m.backbone
    impl = getattr(bb.hf.config, "_attn_implementation", None)
    if impl != "eager":
        raise ValueError(f"attention weights need attn_implementation='eager' (this run is loaded with {impl!r}): "
                         "load_run(run_dir, attn_implementation='eager')")
    proc = bb.processor
    img = image.convert("RGB")
    if size:
        img = img.resize((size, size), Image.BICUBIC)
    img = make_processor_safe(img, proc.patch_size * proc.merge_size)
    ib = proc.process_images([img])
    grid = ib.grid_thw[0]
    text = text or "<|image_1|>\nRepresent the given image for classification.\n"
    ids = proc.encode_content(text, proc.num_image_tokens(grid))
    dev = next(m.parameters()).device
    feats = bb.encode_images(ib.pixel_values.to(dev), ib.grid_thw.to(dev))
    row = m.embedding_row(Ids(ids, 0), side)
    packed = build_inputs([row], bb.embed_tokens, feats, ib.grid_thw, bb.image_token_id, proc.pad_id, bb.merge)
    flat = _row_ids(row)
    L = len(flat)
    img_pos = [i for i, t in enumerate(flat) if t == bb.image_token_id]
    k = max(m.fusion.k, 1)
    offset = m.fusion.k if (m.fusion.sets == "both" and side == "qry") else 0
    tok_pos = [L - offset - k + j for j in range(k)]
    out = bb.hf.model.language_model(inputs_embeds=packed.inputs_embeds, position_ids=packed.position_ids,
                                      attention_mask=torch.ones(1, L, dtype=torch.long, device=dev), use_cache=False,
                                      output_attentions=True)
    att = out.attentions[-1][0].float()  # [heads, L, L], last layer
    a = att[:, tok_pos][:, :, img_pos].mean(0)  # [K, n_img] averaged over heads
    t, h, w = (int(x) for x in grid)
    gh, gw = h // bb.merge, w // bb.merge
    a = a.view(k, t, gh, gw).mean(1).cpu()  # [K, gh, gw]
    lo = a.flatten(1).min(1).values.view(k, 1, 1)
    hi = a.flatten(1).max(1).values.view(k, 1, 1)
    maps = (a - lo) / (hi - lo).clamp_min(1e-12)
    seen = img.resize((w * proc.patch_size, h * proc.patch_size), Image.BICUBIC)
    return TokenAttention(maps.numpy(), a.numpy(), seen, (gh, gw), run.name)


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def plot_token_attention(results: dict[str, TokenAttention], alpha: float = 0.5, cmap: str = "jet"):
    """Fig. 7: per run, the image and each token's map overlaid on it (sqrt(K) x sqrt(K) grid)."""
    from matplotlib.figure import Figure

    n = len(results)
    k = max(r.maps.shape[0] for r in results.values())
    side = math.ceil(math.sqrt(k))
    fig = Figure(figsize=(1.5 * side * n + 0.5, 1.5 * side + 2.2), layout="constrained")
    subs = fig.subfigures(1, n, squeeze=False)[0]
    for sub, (label, r) in zip(subs, results.items()):
        axes = sub.subplots(side + 1, side, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        axes[0, 0].imshow(r.image)
        axes[0, 0].set_title("input", fontsize=7)
        mean = r.maps.mean(0)
        axes[0, 1].imshow(r.image)
        axes[0, 1].imshow(_upsample(mean, r.image.size), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        axes[0, 1].set_title("mean of tokens", fontsize=7)
        for j in range(r.maps.shape[0]):
            ax = axes[1 + j // side, j % side]
            ax.imshow(r.image)
            ax.imshow(_upsample(r.maps[j], r.image.size), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            ax.set_title(f"token {j}", fontsize=6)
        sub.suptitle(f"{label}\n{r.grid[0]}x{r.grid[1]} patches, map diversity {r.diversity:.3f}", fontsize=8)
    return fig


# ---------------------------------------------------------------------------- captions (S9)
# Generation itself is `rematch_pl.generate` (the same code as `python -m rematch_pl.generate`).
CAPTION_PROMPT = "Describe this image in detail."


def _adapter(backbone, enabled: bool):
    """Context in which the backbone is the trained model (enabled) or the base model (LoRA off)."""
    if enabled:
        return nullcontext()
    if not hasattr(backbone.model, "disable_adapter"):
        raise ValueError("this run has no LoRA adapter: compare with load_run(run_dir, trained=False) instead")
    return backbone.model.disable_adapter()


@torch.no_grad()
def _caption_logprobs(run: LoadedRun, image: Image.Image, prompt: str, continuation: list[int], adapter: bool):
    """Next-token log-probabilities [len(continuation), vocab] along `continuation` (teacher forcing)."""
    from .generate import prompt_inputs

    inputs = prompt_inputs(run.model, image, prompt)
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation], device=inputs["input_ids"].device)], dim=1)
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == run.backbone.image_token_id).int())
    with _adapter(run.backbone, adapter):
        logits = run.backbone.hf(**inputs, use_cache=False).logits[0, n - 1:-1].float()
    return torch.log_softmax(logits, -1).cpu()


def caption_retention(run: LoadedRun, images: list[Image.Image], prompt: str = CAPTION_PROMPT,
                      max_new_tokens: int = 32) -> list[dict]:
    """Per image: greedy captions of the base model (adapter off) and the trained model, the share of
    identical greedy tokens, and KL(base || trained) of the next-token distributions along the base
    caption (0 = the language model did not move)."""
    from .generate import generate, generate_base

    rows = []
    for img in images:
        base_text, base_ids = generate_base(run.model, img, prompt, max_new_tokens, return_ids=True)
        trained_text, trained_ids = generate(run.model, img, prompt, max_new_tokens, return_ids=True)
        n = min(len(base_ids), len(trained_ids))
        agree = sum(a == b for a, b in zip(base_ids[:n], trained_ids[:n])) / n if n else 0.0
        kl = float("nan")
        if base_ids:
            lp_base = _caption_logprobs(run, img, prompt, base_ids, adapter=False)
            lp_trained = _caption_logprobs(run, img, prompt, base_ids, adapter=True)
            kl = float((lp_base.exp() * (lp_base - lp_trained)).sum(-1).mean())
        rows.append({"base": base_text, "trained": trained_text, "token_agreement": float(agree),
                     "kl_base_trained": kl})
    return rows


def plot_captions(images: list[Image.Image], rows: list[dict], width: int = 38):
    """Each image with its base-model and trained-model captions (S9, Figs. 8-9)."""
    import textwrap

    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(3.6 * n, 4.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False, height_ratios=[1.2, 1])
    for j, (img, row) in enumerate(zip(images, rows)):
        axes[0, j].imshow(img)
        axes[0, j].axis("off")
        ax = axes[1, j]
        ax.axis("off")
        text = (f"base: {textwrap.fill(repr(row['base'])[1:-1], width)}\n\n"
                f"trained: {textwrap.fill(repr(row['trained'])[1:-1], width)}\n\n"
                f"agreement {row['token_agreement']:.2f}, KL {row['kl_base_trained']:.3g}")
        ax.text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace", wrap=True)
    fig.suptitle("Greedy captions: base model (LoRA off) vs trained model", fontsize=9)
    return fig
