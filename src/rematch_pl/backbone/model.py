"""The MLLM backbone: a Qwen2-VL / Qwen2.5-VL checkpoint with LoRA on its language model.

Tiny and real checkpoints load through the same `from_pretrained` path; ``tiny://qwen2vl`` and
``tiny://qwen25vl`` name the locally made tiny checkpoints (see `backbone.tiny`).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..hub import hub_kwargs, looks_local, model_kwargs, unreachable_note
from .lora import LoraSettings, lora_in_activation_dtype, lora_target_regex
from .norm import fuse_rms_norms
from .patch_embed import set_linear_patch_embed
from .processor import MultimodalProcessor
from .sequence import Packed, to_device
from .tiny import resolve_tiny
from .vision_attention import set_grouped_vision_attention, vision_geometry
from .vision_mlp import set_folded_vision_mlp

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def enable_recompute(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer of an HF model;
    transformers 5 calls it `activation_checkpointing_enable` (the old name warns), older ones
    only `gradient_checkpointing_enable`."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def recompute_enabled(model: nn.Module) -> bool:
    """Whether `enable_recompute` is on (the flag's name follows the method's, see there)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def resolve_path(path: str) -> str:
    if path.startswith("tiny://"):
        return resolve_tiny(path[len("tiny://"):])
    return path


@contextmanager
def explain_load_errors(path: str, key: str = "backbone.path"):
    """Re-raise a failed hub or folder load (transformers' `OSError`: no such folder, no network,
    unknown or gated repo, missing files; its `ValueError`: a folder without a model config) as the
    same type, naming the setting and what to do."""
    try:
        yield
    except (OSError, ValueError) as err:
        folder = os.path.expanduser(path)
        if isinstance(err, ValueError) and not (os.path.isdir(folder) and not os.path.isfile(f"{folder}/config.json")):
            raise  # a ValueError about the settings, not about where the model is
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = unreachable_note(path) or first  # the probe found no hub: transformers' text says less
        local = looks_local(path)
        if local and not os.path.isdir(folder):
            first = f"no such folder ({os.path.abspath(folder)})"
        if local:
            what = (f"  - {path!r} reads as a local folder: check that it exists and holds config.json, the "
                    "weights (*.safetensors) and the tokenizer and preprocessor files")
        else:
            what = (f"  - {path!r} reads as a hub id: check its spelling and the network; on an offline "
                    f"machine download it elsewhere (`hf download {path} --local-dir DIR`) and pass "
                    f"{key}=DIR, or copy a Hugging Face cache that holds it to HF_HOME; for a gated repo log in "
                    "first (`hf auth login`)")
        raise (OSError if isinstance(err, OSError) else ValueError)(
            f"{key}={path!r} could not be loaded: {first}\n{what}\n"
            "  - a checkpoint trained on another machine records that machine's location: give the base weights' "
            "location here with eval.backbone_path=, export's backbone_path=, generate's backbone= or "
            "Encoder.from_pretrained(..., backbone_path=)\n"
            "  - to run without any weights: backbone=qwen2vl_tiny or backbone=qwen25vl_tiny (the embedded tiny models)"
        ) from err


class Backbone(nn.Module):
    """Wraps the HF model; exposes the pieces ReMatch packs its own sequences with."""

    def __init__(self, model: nn.Module, processor: MultimodalProcessor, name: str = ""):
        super().__init__()
        self.model = model  # PeftModel or the bare HF model
        self.processor = processor
        self.name = name
        hf = self.hf
        self.image_token_id = int(hf.config.image_token_id)
        self.merge = int(hf.config.vision_config.spatial_merge_size)
        self.hidden_size = int(hf.config.text_config.hidden_size)
        # one SDPA call per run of equal-size images instead of one per image (same arithmetic)
        self.grouped_vision_layers = set_grouped_vision_attention(hf)
        # Qwen2-VL: QuickGELU's scalings inside the MLP's two products, one SiLU kernel left
        self.folded_vision_mlps = set_folded_vision_mlp(hf)
        # the patch-embedding Conv3d (kernel == stride) as the GEMM it is: cuDNN's 3-D kernels can be far slower
        self.linear_patch_embed = set_linear_patch_embed(hf)

    @property
    def hf(self) -> nn.Module:
        """The *ForConditionalGeneration module (under PEFT's wrappers when LoRA is on)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def has_lora(self) -> bool:
        """LoRA factors still beside the base weights (not merged)."""
        return hasattr(self.model, "merge_and_unload")

    def merge_lora(self) -> bool:
        """Fold every LoRA branch into its base weight, W <- W + (alpha/r)·B·A, and drop PEFT's wrappers
        (inference: one matmul per projection instead of three plus a scale and an add). PEFT adds
        the delta (computed in the factors' dtype) in place, so a bf16 weight is rounded once. Returns
        whether anything was merged; training after this would train the merged weights, not LoRA."""
        if not self.has_lora:
            return False
        self.model = self.model.merge_and_unload()
        return True

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.hf.model.language_model.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    @property
    def pixel_dtype(self) -> torch.dtype:
        """The vision tower's dtype: pixels are cast to it (batches are collated in it)."""
        return self.hf.model.visual.dtype

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower + merger: one [n_tokens_i, d] tensor per image.

        `grid_thw` [n, 3] is best passed on the host: the tower's position ids and segments are
        computed from it there (`vision_geometry`) and the split into images is read from it
        (transformers' `get_image_features` reads the grid from the device at the tower's start
        and after it, which waits for the device before the host can build the step's other inputs).
        """
        if grid_thw is None or grid_thw.numel() == 0:
            return []
        visual = self.hf.model.visual
        dev = pixel_values.device
        geometry = vision_geometry(visual, grid_thw, dev)  # positions and segments from the host grid
        grid = grid_thw if geometry or dev.type == "meta" else to_device(grid_thw, dev)
        # A frozen tower (LoRA sits in the LLM) runs without autograd: with gradient checkpointing
        # on, transformers makes the patch embeddings require grad, and the backward pass would
        # recompute and differentiate the whole tower for no trainable weight.
        frozen = not any(p.requires_grad for p in visual.parameters())
        with torch.no_grad() if frozen else nullcontext():
            out = visual(pixel_values.type(self.pixel_dtype), grid_thw=grid, **geometry)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out  # [n_tokens, d]
        sizes = (grid_thw.cpu().prod(-1) // self.merge**2).tolist()  # no device read for a host grid
        return list(torch.split(merged, sizes))

    def blank_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the vision tower takes (one merged token): (pixel_values, grid_thw)."""
        v = self.hf.config.vision_config
        m = self.merge
        w = self.embed_tokens.weight
        pixels = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size**2, device=w.device,
                             dtype=w.dtype)
        return pixels, torch.tensor([[1, m, m]])  # grid on the host, like a batch's

    def causal_mask(self, packed: Packed) -> torch.Tensor | None:
        """Attention mask of right-padded rows (an embedding pass). SDPA and flash-attention: None,
        the kernel's own causal mask. Every row is right-padded, so a real token's keys (itself and
        those before it) are all real: causality alone gives its exact attention, and the padding
        positions' outputs are never read (nor differentiated). That keeps SDPA on its flash kernel
        (a [B, 1, L, L] mask forces the memory-efficient or math kernel, and converting a bool mask
        costs two passes over it in every layer) and flash-attention off its unpadding path, which
        reads the [B, L] mask back from the device. Eager attention applies no causal mask of its
        own: it gets [B, 1, L, L] additive, causal over each row's tokens, made on the device
        without reading it back (None when no row is padded)."""
        impl = self.hf.config._attn_implementation
        seg = packed.segment_ids  # [B, L], -1 on padding
        L = seg.shape[1]
        if impl in ("sdpa", "flash_attention_2") or all(n == L for n in packed.host_lengths):
            return None
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()  # [L, L]
        allowed = causal & (seg >= 0)[:, None, None, :]  # [B, 1, L, L]
        dtype = packed.inputs_embeds.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, packed: Packed, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Last-layer hidden states [B, L, d] of packed inputs.

        `attention_mask`: None (causal, no padding), [B, L] (1 = token, causal mask built by HF),
        or [B, 1, L, L] (bool: True = attend; or additive float: 0 = attend, -inf = blocked) used
        as it is (`causal_mask`, `matching.unified_mask`). Positions are always the explicit 3-D
        M-RoPE ids of `packed` (never HF's 1-D fallback).
        """
        out = self.hf.model.language_model(
            inputs_embeds=packed.inputs_embeds,
            position_ids=packed.position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        return out.last_hidden_state


def load_backbone(
    path: str,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    lora: dict | LoraSettings | None = None,
    revision: str | None = None,
    compile: bool = False,
    meta: bool = False,
    fused_rms_norm: bool = True,
) -> Backbone:
    """Load model and processor by hub id or local folder, with LoRA restricted to the LLM.

    compile: `torch.compile` each decoder layer of the language model (regional compilation,
    dynamic shapes): names and parameters stay as they are, so LoRA, FSDP and checkpoints are
    unaffected; the first steps pay the compilation.
    meta: build the model from its config on the meta device, no weights read (memory planning,
    `rematch_pl.memory`); everything else (processor, LoRA, checkpointing) as for a real load.
    fused_rms_norm: every RMSNorm as one `F.rms_norm` (`backbone.norm`; one kernel each way on CUDA).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"backbone.attn_implementation={attn_implementation!r}: expected sdpa, eager or "
                         "flash_attention_2 (the packed matching pass needs a custom 4-D mask: sdpa or eager)")
    local = resolve_path(path)
    extra = hub_kwargs(local, revision)  # a hub id without a reachable hub: the local cache only, at once
    with explain_load_errors(path):
        if meta:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(
                    AutoConfig.from_pretrained(local, trust_remote_code=False, **extra), dtype=DTYPES[dtype],
                    attn_implementation=attn_implementation)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                local, dtype=DTYPES[dtype], attn_implementation=attn_implementation, trust_remote_code=False,
                **model_kwargs(local, revision))
    if getattr(model.config, "model_type", "") not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"backbone.path={path!r} is a {model.config.model_type!r} model; "
                         "rematch_pl supports qwen2_vl and qwen2_5_vl")
    with explain_load_errors(path):
        processor = MultimodalProcessor.from_pretrained(local, min_pixels=min_pixels, max_pixels=max_pixels, **extra)
    if fused_rms_norm:
        fuse_rms_norms(model)
    model.config.use_cache = False
    lora = LoraSettings(**lora) if isinstance(lora, dict) else (lora or LoraSettings(enabled=False))
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora_target_regex(list(lora.targets)), bias="none")
        with warnings.catch_warnings():  # PEFT reads transformers' old flag name, which warns on every load
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            model = get_peft_model(model, cfg)
        if lora.compute_dtype not in ("backbone", "fp32"):
            raise ValueError(f"backbone.lora.compute_dtype={lora.compute_dtype!r}: expected backbone or fp32")
        if lora.compute_dtype == "backbone":
            lora_in_activation_dtype(model, fused=lora.fused)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        enable_recompute(base)
    backbone = Backbone(model, processor, name=path)
    if compile:
        compile_backbone(backbone)
    return backbone


def compile_backbone(backbone: Backbone) -> None:
    """`torch.compile` each decoder layer of the language model and each block of the vision tower
    in place (regional compilation, dynamic shapes; the vision blocks' grouped attention runs
    eagerly between their compiled parts, see `vision_attention._attend`); parameter names and
    values are unchanged (`backbone.compile`)."""
    for layer in backbone.hf.model.language_model.layers:
        layer.compile(dynamic=True)
    for block in backbone.hf.model.visual.blocks:
        block.compile(dynamic=True)
