"""Helpers shared by the tests: tiny backbones and hand-collated batches."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rematch_pl.bench.common import collate_side

KINDS = ["qwen2vl", "qwen25vl"]

# A test parametrized over DEVICES runs on the CPU everywhere and again on a CUDA device where one
# is present (`pytest -m gpu` runs only the CUDA cases; `scripts/gpu_bench.sh` part `cuda_tests`):
# CUDA takes other kernels (SDPA's flash and memory-efficient attention, cuBLAS, fused dropout)
# and its own random generator.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def on(device: str, batch):
    """A collated batch on `device`, moved as Lightning moves it (every tensor, nested)."""
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(batch, torch.device(device))


def make_backbone(kind: str, lora: bool = True, r: int = 8):
    from rematch_pl.backbone.model import load_backbone

    return load_backbone(f"tiny://{kind}", lora={"enabled": lora, "r": r, "alpha": 2 * r, "dropout": 0.0}
                         if lora else None)


def side_batch(processor, texts, images_idx, grids, max_length=None):
    """Collate contents by hand (independent of the data package)."""
    return collate_side(processor, texts, images_idx, grids, max_length)


def triple_batch(processor, n_neg: int = 1, seed: int = 0):
    """A batch of 3 (query, positive, negative) triples with images on both sides."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    colors = [tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g)) for _ in range(5)]
    sizes = [(64, 96), (80, 56), (56, 56), (112, 56), (60, 70)]
    imgs = [Image.new("RGB", s, c) for s, c in zip(sizes, colors)]
    ib = processor.process_images(imgs)
    qry = side_batch(processor, ["<|image_1|> Represent the given image for classification.",
                                 "Find me an everyday image that matches the given caption: two red circles",
                                 "<|image_1|>\nRepresent the given image with the following question: How many?"],
                     [0, -1, 4], ib.grid_thw)
    pos = side_batch(processor, ["red circle", "<|image_1|> Represent the given image.", "three"], [-1, 1, -1],
                     ib.grid_thw)
    negs_t = ["blue square", "<|image_1|> Represent the given image.", "two"]
    negs_i = [-1, 2, -1]
    if n_neg == 2:
        negs_t = [t for t in negs_t for _ in range(2)]
        negs_i = [i for i in negs_i for _ in range(2)]
        negs_i[3] = 3
        negs_t[3] = "<|image_1|> Represent the given image."
    neg = side_batch(processor, negs_t, negs_i, ib.grid_thw) if n_neg else None
    return {"qry": qry, "pos": pos, "neg": neg, "pixel_values": ib.pixel_values, "image_grid_thw": ib.grid_thw,
            "subset": ["a", "b", "c"], "row_id": ["a:0", "b:0", "c:0"]}


class OpLog(TorchDispatchMode):
    """Records every aten op run under it as (name, number of elements of its output)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, out.numel() if isinstance(out, torch.Tensor) else 0))
        return out
