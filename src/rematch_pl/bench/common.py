"""Benchmark inputs and helpers: Qwen2-VL-2B/7B-shaped backbones with random weights (no
download), MMEB-like batches, the step variants compared, timing, the card's matrix-product
peak, and how figures are printed and written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..backbone.model import Backbone, load_backbone


SHAPES = {
    # Qwen2-VL-2B / 7B text and vision dimensions (public configs), random weights.
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2), vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4), vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
}


TOKENIZER_ENV = "REMATCH_BENCH_TOKENIZER"
SHAPED_PIXELS = (256 * 28 * 28, 1280 * 28 * 28)  # Qwen2-VL's min/max pixels, as upstream MMEB training uses


def bench_tokenizer(tokenizer: str | None = None) -> str | None:
    """The tokenizer the shaped benchmarks use: `tokenizer`, else ``$REMATCH_BENCH_TOKENIZER``
    (`--tokenizer`), else None: the tiny model's own 640-entry BPE."""
    return tokenizer or os.environ.get(TOKENIZER_ENV) or None


def use_bench_tokenizer(tokenizer: str | None) -> str:
    """A CLI's `--tokenizer`: every shaped backbone of the run takes it (``$REMATCH_BENCH_TOKENIZER``);
    returns what the results record as their tokenizer."""
    if tokenizer:
        os.environ[TOKENIZER_ENV] = tokenizer
    return bench_tokenizer() or "tiny BPE (640 entries)"


def bench_processor(min_pixels: int | None, max_pixels: int | None, tokenizer: str | None = None):
    """The tiny checkpoint's image processor (Qwen2-VL's, resizing into `min_pixels`..`max_pixels`)
    with the tiny BPE, or with the tokenizer of `tokenizer` (a Qwen2-VL checkpoint folder or hub
    id, or the folder `rematch_pl.bench.vocab` writes)."""
    from transformers import AutoTokenizer

    from ..backbone.processor import MultimodalProcessor
    from ..backbone.tiny import resolve_tiny

    proc = MultimodalProcessor.from_pretrained(resolve_tiny("qwen2vl"), min_pixels=min_pixels, max_pixels=max_pixels)
    if tokenizer is None:
        return proc
    if (os.sep in tokenizer or tokenizer.startswith(".")) and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"bench tokenizer {tokenizer!r}: no such folder (make one with `python -m "
                                "rematch_pl.bench.vocab --out DIR`, or pass a Qwen2-VL checkpoint folder or hub id)")
    tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    tok.padding_side = "right"
    return MultimodalProcessor(tok, proc.image_processor)


def shaped_backbone(shape: str, device: str, dtype: str, lora_r: int = 32, lora_compute: str = "backbone",
                    compile: bool = False, lora_fused: bool = True, fused_norm: bool = True,
                    recompute: bool | None = None, lora_dropout: float = 0.0, tokenizer: str | None = None) -> Backbone:
    """A tiny backbone, or a real-size one built from config (random weights, no download).

    `compile`: each decoder layer and vision block through `torch.compile`, as `backbone.compile=true` does.
    `lora_fused`: the LoRA scaling and add in the B product's epilogue (`backbone.lora.fused`).
    `fused_norm`: RMSNorms as one `F.rms_norm` (`backbone.fused_rms_norm`). `recompute`:
    gradient checkpointing (`backbone.gradient_checkpointing`); None: on for 2b/7b, off for tiny.
    `lora_dropout`: PEFT's dropout on every LoRA input (`backbone.lora.dropout`; 0.05 in the
    shipped configs, 0 here by default). `tokenizer` (default `bench_tokenizer()`): the text
    tokenizer (`bench_processor`); the model's vocabulary and special-token ids follow it (the
    tiny shape then gets random weights too: for counting tokens, not for learning)."""
    tokenizer = bench_tokenizer(tokenizer)
    if shape == "tiny" and tokenizer is None:
        bb = load_backbone("tiny://qwen2vl", dtype=dtype,
                           lora={"r": lora_r, "alpha": 2 * lora_r, "dropout": lora_dropout, "compute_dtype": lora_compute,
                                 "fused": lora_fused},
                           compile=compile, fused_rms_norm=fused_norm, gradient_checkpointing=bool(recompute))
        return bb.to(device)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from ..backbone.lora import LLM_LINEAR, lora_in_activation_dtype, lora_target_regex
    from ..backbone.model import DTYPES, compile_backbone, enable_recompute
    from ..backbone.norm import fuse_rms_norms
    from ..backbone.tiny import resolve_tiny

    tiny = resolve_tiny("qwen2vl")
    base = Qwen2VLConfig.from_pretrained(tiny)
    text, vision = base.text_config.to_dict(), base.vision_config.to_dict()
    if shape == "tiny":
        proc = bench_processor(None, None, tokenizer)
    else:
        proc = bench_processor(*SHAPED_PIXELS, tokenizer)
        s = SHAPES[shape]
        head_dim = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
        sec = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        text = dict(text, **s["text"], vocab_size=151936,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec})
        text.pop("layer_types", None)  # the tiny config's per-layer list has the tiny depth: derive it from the new one
        vision = dict(vision, **s["vision"], hidden_size=s["text"]["hidden_size"])
    n_vocab = len(proc.tokenizer)
    text["vocab_size"] = max(text["vocab_size"], n_vocab + (-n_vocab) % 64)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=proc.image_token_id,
                        video_token_id=proc.tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                        vision_start_token_id=proc.vision_start_id, vision_end_token_id=proc.vision_end_id)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=DTYPES[dtype], attn_implementation="sdpa")
    if fused_norm:  # as load_backbone does by default (backbone.fused_rms_norm)
        fuse_rms_norms(model)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout,
                                             target_modules=lora_target_regex(LLM_LINEAR)))
    if lora_compute == "backbone":  # as load_backbone does by default (LoraSettings.compute_dtype)
        lora_in_activation_dtype(model, fused=lora_fused)
    if (shape != "tiny") if recompute is None else recompute:
        enable_recompute(model.get_base_model())
    bb = Backbone(model, proc, name=f"qwen2vl_{shape}_random" + ("" if tokenizer is None else f"+{tokenizer}"))
    if compile:
        compile_backbone(bb)
    return bb


def collate_side(processor, texts: list[str], image_idx: list[int], grids, max_length: int | None = None) -> dict:
    """One side of a batch collated by hand: {ids [N, L] (right-padded), lengths [N], image [N]}
    (`image`: index into the batch's images, -1 for none; `grids` their [n, 3] grids)."""
    from ..data.collate import pad_ids

    ids, lengths = pad_ids([processor.encode_content(t, None if i < 0 else processor.num_image_tokens(grids[i]),
                                                     max_length) for t, i in zip(texts, image_idx)], processor.pad_id)
    return {"ids": ids, "lengths": lengths, "image": torch.tensor(image_idx)}


def make_batch(processor, B: int, image_size: int, device, seed: int = 0, meta_pixels: bool = False,
               pixel_dtype: torch.dtype = torch.float32) -> dict:
    """B (query, positive, negative) triples, MMEB-like: image+instruction queries, text or image docs.

    `meta_pixels`: the pixels are a meta tensor of the right shape (memory planning: one image is
    processed for its grid, the batch's pixel values are never made). `pixel_dtype`: the
    vision tower's, as the datamodule collates them (`Backbone.pixel_dtype`).
    """
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    n_images = B + B // 2  # the queries' and the odd positives' (a batch holds only the images it uses)
    imgs = [Image.fromarray((torch.rand(image_size, image_size, 3, generator=g) * 255).byte().numpy())
            for _ in range(1 if meta_pixels else n_images)]
    ib = processor.process_images(imgs)
    grids, pixels = ib.grid_thw, ib.pixel_values.to(pixel_dtype)
    if meta_pixels:  # [patches, dim] of one image -> [n_images * patches, dim] on meta
        grids = grids.repeat(n_images, 1)
        pixels = torch.empty(n_images * pixels.shape[0], pixels.shape[1], dtype=pixels.dtype, device="meta")

    def side(texts, image_idx):
        return collate_side(processor, texts, image_idx, grids)

    q = side(["<|image_1|>\nRepresent the given image with the following question: how many red circles are there?"] * B,
             list(range(B)))
    pos = side(["<|image_1|>\nRepresent the given image." if i % 2 else "two red circles and a blue square"
                for i in range(B)], [B + i // 2 if i % 2 else -1 for i in range(B)])
    neg = side(["three blue circles and a red square"] * B, [-1] * B)
    # as `MMEBDataModule.transfer_batch_to_device` leaves a batch: pixels on the device, the packing
    # metadata (ids, lengths, image indices, grids) on the host
    return {"qry": q, "pos": pos, "neg": neg, "pixel_values": pixels if meta_pixels else pixels.to(device),
            "image_grid_thw": grids}


def timeit(fn, device, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def matmul_peak_tflops(device: str) -> float:
    """Measured bf16 matrix-product throughput of the card (8192^3), in TFLOP/s."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timeit(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * 8192**3 / t / 1e12


# The step variants the train benchmarks compare (ReMatchModel keyword arguments).
VARIANTS = {
    "baseline": dict(k=0, matching="none", template="plain"),
    "rematch": dict(k=16, matching="all", template="chat"),
    "rematch_feat_feat": dict(k=16, matching="feat_feat", template="chat"),
    "rematch_no_matching": dict(k=16, matching="none", template="chat"),
}


def pick_variants(variants: list[str] | None) -> dict:
    """The `VARIANTS` named (all of them for None), in their order; an unknown name is an error."""
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {sorted(VARIANTS)}")
    return {k: v for k, v in VARIANTS.items() if not variants or k in variants}


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column figure table under a title."""
    print(f"\n{title}")
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def write_results(res: dict, out: Path | None) -> None:
    """Write a benchmark's figures as JSON (when asked to)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"written {out}")
