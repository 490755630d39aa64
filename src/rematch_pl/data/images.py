"""Loading images and making them safe for the Qwen-VL image processor.

The Qwen2-VL / Qwen2.5-VL processors want RGB images whose short side is at least one
merged patch (28 px) and whose aspect ratio is at most 200 (``smart_resize`` raises
"absolute aspect ratio must be smaller than 200" otherwise). Real data holds all sorts
of images: grayscale scans, CMYK JPEGs, palette GIFs, transparent PNGs, 1-px-high
banners. `make_processor_safe` turns any of them into an image the processor accepts:

1. mode -> RGB (transparent images are composited on white, 16-bit/float grayscale is
   rescaled to 8 bits);
2. aspect ratio > ``max_ratio``: resized (not cropped) so that it fits, by stretching
   the short side to ``ceil(long / max_ratio)``; the upstream VLM2Vec code also
   resizes rather than crops or pads, so the whole content stays visible;
3. short side < ``patch``: upsized, keeping the aspect ratio, so the short side is
   ``patch`` pixels.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

_WHITE = (255, 255, 255)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file.

    Raises FileNotFoundError when the file does not exist and OSError (PIL's
    ``UnidentifiedImageError`` is one) when it cannot be decoded; the decoding happens
    here, not lazily later, so a truncated file fails at load time.
    """
    img = Image.open(path)
    img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on a white background."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("P", "PA"):  # palette: may carry a transparent colour
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
        mode = "L"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...


def fit_aspect_ratio(img: Image.Image, max_ratio: float = 200) -> Image.Image:
    """Stretch the short side so that ``long / short <= max_ratio`` (no-op when it already fits)."""
    w, h = img.size
    long_side, short_side = max(w, h), min(w, h)
    if short_side * max_ratio >= long_side:
        return img
    new_short = math.ceil(long_side / max_ratio)
    size = (long_side, new_short) if w >= h else (new_short, long_side)
    return img.resize(size, Image.Resampling.BICUBIC)


def ensure_min_side(img: Image.Image, patch: int = 28) -> Image.Image:
    """Upsize (keeping the aspect ratio) so that the short side is at least ``patch`` px."""
    w, h = img.size
    short_side = min(w, h)
    if short_side >= patch:
        return img
    scale = patch / short_side
    size = (max(patch, round(w * scale)), max(patch, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def make_processor_safe(img: Image.Image, patch: int = 28, max_ratio: float = 200) -> Image.Image:
    """An RGB image with short side >= ``patch`` and aspect ratio <= ``max_ratio``.

    The ratio is fixed before upsizing; upsizing keeps the short side at exactly
    ``patch`` and rounds the long side, so the ratio stays within ``max_ratio``.
    """
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image has no pixels (size {img.size})")
    img = to_rgb(img)
    img = fit_aspect_ratio(img, max_ratio)
    return ensure_min_side(img, patch)
