"""Turns (text, image) contents into backbone token ids, the way the Qwen-VL processor does.

The MMEB texts carry the Phi-3 placeholder ``<|image_1|>``; here it becomes
``<|vision_start|><|image_pad|>*n<|vision_end|>`` where ``n = grid_thw.prod() // merge**2``
is the number of merged patches of that image. Truncation drops text tokens only, never
image tokens (cutting inside them breaks the model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from PIL import Image

MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


class ContentError(ValueError):
    """A content (query or document) that cannot be turned into model inputs."""


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # [sum of patches, C * T * P * P]
    grid_thw: torch.Tensor  # [n_images, 3]


class MultimodalProcessor:
    """Tokenizer + image processor of a Qwen2-VL / Qwen2.5-VL checkpoint (local folder or hub id)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.patch_size = int(getattr(image_processor, "patch_size", 14))
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids("<|image_pad|>")
        self.vision_start_id = ids("<|vision_start|>")
        self.vision_end_id = ids("<|vision_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids("<|endoftext|>")
        self.eos_id = ids("<|endoftext|>")
        unk = tokenizer.unk_token_id
        for name, i in [("<|image_pad|>", self.image_token_id), ("<|vision_start|>", self.vision_start_id),
                        ("<|vision_end|>", self.vision_end_id)]:
            if i is None or (unk is not None and i == unk):
                raise ValueError(f"tokenizer has no {name} token: is this a Qwen2-VL / Qwen2.5-VL checkpoint?")

    @classmethod
    def from_pretrained(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                        **kwargs) -> "MultimodalProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
        extra = {}
        if min_pixels is not None:
            extra["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            extra["max_pixels"] = int(max_pixels)
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=False, **extra, **kwargs)
        size = getattr(image_processor, "size", None) or {}
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if key in extra and size.get(edge, extra[key]) != extra[key]:
                raise ValueError(f"backbone.{key}={extra[key]} was not applied by {type(image_processor).__name__}")
        tokenizer.padding_side = "right"
        if tokenizer.chat_template is None:  # some folders keep it for the processor only
            tokenizer.chat_template = _processor_chat_template(path, kwargs.get("revision"),
                                                               kwargs.get("local_files_only", False))
        return cls(tokenizer, image_processor)

    # ---------------------------------------------------------------- images
    def process_images(self, images: list[Image.Image]) -> ImageBatch:
        """Pixel patches and grids of RGB images (already made processor-safe, see data.images)."""
        if not images:
            return ImageBatch(torch.zeros(0, 3 * 2 * self.patch_size**2), torch.zeros(0, 3, dtype=torch.long))
        out = self.image_processor(images=images, return_tensors="pt")
        return ImageBatch(out["pixel_values"], out["image_grid_thw"].long())

    @property
    def pixel_range(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) the image processor resizes into."""
        size = self.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def num_image_tokens(self, grid_thw: torch.Tensor) -> int:
        return int(grid_thw.prod().item()) // self.merge_size**2

    # ---------------------------------------------------------------- text
    def chat_turn_ids(self, system: str = "You are a helpful assistant.") -> tuple[list[int], list[int]]:
        """Ids before and after a user message in the backbone's own chat template.

        (system turn + opening of the user turn, closing of the user turn + open assistant turn).
        """
        if self.tokenizer.chat_template is None:
            raise ValueError("the backbone's tokenizer has no chat template (none in tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json), which embedding=chat and the matching "
                             "head need: add the template of the model family to the folder, or train with "
                             "embedding=plain matching=none")
        chat = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": "\x00"}],
            tokenize=False, add_generation_prompt=True)
        before, after = chat.split("\x00")
        return self.tokenize(before), self.tokenize(after)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_content(self, text: str, n_image_tokens: int | None, max_length: int | None = None) -> list[int]:
        """Token ids of one content; `n_image_tokens` is None when the content has no image.

        Raises ContentError on an empty content or a placeholder/image mismatch.
        """
        text = text or ""
        n_placeholders = text.count(MMEB_IMAGE_PLACEHOLDER) + text.count(VISION_BLOCK)
        if n_image_tokens is None and n_placeholders:
            raise ContentError(f"text has {n_placeholders} image placeholder(s) but no image")
        if n_image_tokens is not None and n_placeholders > 1:
            raise ContentError(f"text has {n_placeholders} image placeholders for 1 image")
        if n_image_tokens is not None and n_placeholders == 0:
            raise ContentError("an image is given but the text has no <|image_1|> placeholder")
        if not text.strip() and n_image_tokens is None:
            raise ContentError("empty content: no text and no image")
        text = text.replace(MMEB_IMAGE_PLACEHOLDER, VISION_BLOCK)
        if n_image_tokens is None:
            ids = self.tokenize(text)
        else:
            before, after = text.split(VISION_BLOCK)
            ids = (self.tokenize(before) + [self.vision_start_id] + [self.image_token_id] * n_image_tokens
                   + [self.vision_end_id] + self.tokenize(after))
        if max_length is not None and len(ids) > max_length:
            ids = truncate_keeping_image(ids, max_length, self.image_token_id, self.vision_start_id,
                                         self.vision_end_id)
        return ids


def _processor_chat_template(path: str, revision: str | None = None, local_files_only: bool = False) -> str | None:
    """The chat template a checkpoint keeps for its processor only (`chat_template.json`, as older
    transformers saved it), read as a file: loading the processor itself needs torchvision."""
    if os.path.isdir(path):
        f = os.path.join(path, "chat_template.json")
        if not os.path.isfile(f):
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            f = hf_hub_download(path, "chat_template.json", revision=revision, local_files_only=local_files_only)
        except Exception:  # not in the repo, or the hub is unreachable: no template
            return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh).get("chat_template")


def truncate_keeping_image(ids: list[int], max_length: int, image_id: int, start_id: int, end_id: int) -> list[int]:
    """Drop text tokens (from the end, then from before the image) until `len <= max_length`.

    The image block (<|vision_start|> pads <|vision_end|>) is never cut.
    """
    if image_id not in ids:
        return ids[:max_length]
    s = ids.index(start_id) if start_id in ids else ids.index(image_id)
    e = len(ids) - ids[::-1].index(end_id) if end_id in ids else len(ids) - ids[::-1].index(image_id)
    block = e - s
    if block > max_length:
        raise ContentError(
            f"the image alone needs {block} tokens, more than max_length={max_length}: lower "
            "backbone.max_pixels or raise data.max_length"
        )
    budget = max_length - block
    before, after = ids[:s], ids[e:]
    keep_before = min(len(before), budget)  # right truncation: the end goes first
    keep_after = budget - keep_before
    return before[:keep_before] + ids[s:e] + after[:keep_after]
