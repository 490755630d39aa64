"""FLOPs of a training step (hardware FLOPs: LoRA and recomputation included) and `--suite flops`."""

from __future__ import annotations

import torch

from ..backbone.model import Backbone, recompute_enabled
from ..model import ReMatchModel
from .common import VARIANTS, bench_processor, bench_tokenizer, make_batch, print_rows, shaped_backbone


def llm_forward_flops(bb: Backbone, tokens: int, attn_pairs: int) -> float:
    """Forward FLOPs of the language model over `tokens` tokens whose rows have sum(len^2) = `attn_pairs`.

    2 * N_llm per token (matrix products: N_llm counts the weight matrices, LoRA's rank-r ones
    included, the embedding table excluded; norms and biases are not products) + 2 * layers * d * sum(len^2) for attention (QK^T and AV, 2 FLOPs per multiply-add,
    over the len^2 / 2 (query, key) pairs of a causal row).
    """
    hf = bb.hf
    n_llm = sum(p.numel() for n, p in hf.model.language_model.named_parameters()
                if p.dim() >= 2 and "embed_tokens" not in n)
    cfg = hf.config.text_config
    return 2 * n_llm * tokens + 2 * cfg.num_hidden_layers * cfg.hidden_size * attn_pairs


def vision_flops(bb: Backbone, image_patches: list[int]) -> float:
    """Forward FLOPs of the vision tower (and merger) over images of the given patch counts:
    2 * N per patch for the weight matrices of the patch embedding and the blocks, 2 * N_merger-MLP per merged token
    (patches / merge^2: the merger's MLP runs on groups of merge^2 patches), and
    4 * layers * d * patches^2 per image (full attention within the image; an upper bound for
    Qwen2.5-VL, whose windowed layers attend less). Checked against an op-by-op count (`bench.roofline`)."""
    visual = bb.hf.model.visual
    n_vis = sum(p.numel() for p in visual.parameters() if p.dim() >= 2)  # norms and biases are not products
    n_merge = sum(p.numel() for p in visual.merger.mlp.parameters() if p.dim() >= 2)
    v = bb.hf.config.vision_config
    d = getattr(v, "embed_dim", None) or v.hidden_size
    return sum(2 * (n_vis - n_merge) * p + 2 * n_merge * p / bb.merge**2 + 4 * v.depth * d * p * p
               for p in image_patches)


def step_flops(bb: Backbone, counts: dict, image_patches: list[int], gradcache: bool) -> float:
    """FLOPs executed by one training step, from the token counts the model recorded.

    Forward FLOPs of a pass: `llm_forward_flops`. LoRA: frozen weights get no weight gradient,
    so the backward pass costs one more forward (input gradients only); gradient checkpointing
    recomputes one forward; GradCache adds one no-grad forward of the embedding passes. The
    frozen vision tower runs one forward per image (`vision_flops`). Recomputation is included
    (this is hardware FLOP utilisation).
    """
    def fwd(kind):
        return llm_forward_flops(bb, counts.get(kind, 0), counts.get(f"{kind}_attn", 0))

    passes = 2 + (1 if recompute_enabled(bb.hf) else 0)
    total = passes * (fwd("embed") + fwd("match")) + vision_flops(bb, image_patches)
    if gradcache:  # the embed counts hold the no-grad pass and the re-forward (half each): the no-grad
        total -= (passes - 1) * fwd("embed") / 2  # half runs forward only: (1 + passes) / 2 * fwd("embed")
    return total


def suite_flops(shape: str, B: int, image_size: int, chunk: int = 0, recompute: bool | None = None) -> dict:
    """FLOPs per training step of each variant in `VARIANTS` for a 2B/7B shape, no device needed.

    The token layout (template, K tokens, the matching pass's segments, image tokens) does not
    depend on the model's width: the tiny model is run on the inputs the real-size processor makes
    (MMEB-like 448 px images), its token counts are then priced with the real shape's parameter
    counts (`step_flops`, a parameter-free copy on the meta device, gradient checkpointing as
    `recompute` says: on by default).
    """
    torch.manual_seed(0)
    big = shaped_backbone(shape, "meta", "bf16", recompute=recompute)  # parameter counts only
    tiny = shaped_backbone("tiny", "cpu", "fp32")
    lo, hi = big.processor.pixel_range
    tiny.processor = bench_processor(lo, hi, bench_tokenizer())
    batch = make_batch(tiny.processor, B, image_size, "cpu")
    patches = batch["image_grid_thw"].prod(-1).tolist()
    res = {"shape": shape, "batch": B, "image_size": image_size, "gradcache_chunk": chunk or None,
           "recompute": recompute_enabled(big.hf), "runs": {}}
    for name, kw in VARIANTS.items():
        model = ReMatchModel(tiny, **kw).eval()
        model.reset_counts()
        with torch.no_grad():
            model(batch)
        counts = model.reset_counts()
        if chunk:  # GradCache: a no-grad pass plus the re-forward of the embedding passes
            counts = dict(counts, embed=2 * counts["embed"], embed_attn=2 * counts["embed_attn"])
        res["runs"][name] = {"tflop": step_flops(big, counts, patches, bool(chunk)) / 1e12,
                             "embed_tokens": counts["embed"] // (2 if chunk else 1), "match_tokens": counts.get("match", 0),
                             # token positions the passes compute, padding included (not in the TFLOP figure)
                             "padded_over_real": (counts["embed_padded"] * (2 if chunk else 1) + counts.get("match_padded", 0))
                             / max(counts["embed"] + counts.get("match", 0), 1)}
    base = res["runs"]["baseline"]["tflop"]
    nm = res["runs"]["rematch_no_matching"]["tflop"]
    rows = []
    for name, r in res["runs"].items():
        r["ratio_to_baseline"] = r["tflop"] / base
        r["ratio_to_no_matching"] = r["tflop"] / nm
        rows.append((name, f"{r['tflop']:8.1f} TFLOP  x{r['ratio_to_baseline']:.2f} baseline  "
                           f"x{r['ratio_to_no_matching']:.2f} K=16 no matching  "
                           f"({r['embed_tokens']} embedding + {r['match_tokens']} matching tokens, "
                           f"+{(r['padded_over_real'] - 1) * 100:.0f}% padding)"))
    print_rows(f"bench flops: Qwen2-VL-{shape} shape, batch {B} triples, {image_size} px images, "
               f"gradient checkpointing {'on' if res['recompute'] else 'off'}{', GradCache' if chunk else ''}", rows)
    return res
