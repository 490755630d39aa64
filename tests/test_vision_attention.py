"""Grouped vision attention == transformers' per-image loop, with one SDPA call per equal-length run."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinyutil import KINDS
from rematch_pl.backbone.vision_attention import runs_of, set_grouped_vision_attention, vision_geometry


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _pixels(bb, grids: list[list[int]], seed: int = 0):
    """Random patch inputs for the given (t, h, w) grids, bigger than the tiny processor makes:
    Qwen2.5-VL's windows then include partial ones at the image edges."""
    v = bb.hf.config.vision_config
    dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    grid = torch.tensor(grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), dim, generator=g), grid


# equal-size runs, sizes that differ, a wide one spanning several (and partial) windows
GRIDS = [[1, 8, 8], [1, 8, 8], [1, 8, 8], [1, 6, 4], [1, 12, 20], [1, 4, 6], [1, 4, 6], [1, 8, 8]]


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_vision_attention_equals_per_image_attention(backbones, kind):
    bb = backbones[kind]
    assert bb.grouped_vision_layers == len(bb.hf.model.visual.blocks)
    pv, grid = _pixels(bb, GRIDS)
    try:
        with torch.no_grad():
            grouped = bb.encode_images(pv, grid)
            assert set_grouped_vision_attention(bb.hf, False) == 0
            reference = bb.encode_images(pv, grid)  # transformers' own forward
    finally:
        set_grouped_vision_attention(bb.hf, True)
    assert [x.shape for x in grouped] == [x.shape for x in reference]
    for a, b in zip(grouped, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_host_geometry_equals_the_towers_own(backbones, kind):
    """Position ids, segments and (Qwen2.5-VL) windows computed on the host and passed in give
    the tower's output from the grid alone, bit for bit, with and without grouped attention."""
    bb = backbones[kind]
    visual = bb.hf.model.visual
    pv, grid = _pixels(bb, GRIDS)
    geometry = vision_geometry(visual, grid, pv.device)
    expected = {"position_ids", "cu_seqlens", "max_seqlen"} | (
        {"window_index", "cu_window_seqlens", "max_window_seqlen"} if kind == "qwen25vl" else set())
    assert set(geometry) == expected
    try:
        for grouped in (True, False):
            set_grouped_vision_attention(bb.hf, grouped)
            with torch.no_grad():
                own = visual(pv, grid_thw=grid).pooler_output
                given = visual(pv, grid_thw=grid, **vision_geometry(visual, grid, pv.device)).pooler_output
            assert torch.equal(own, given)
    finally:
        set_grouped_vision_attention(bb.hf, True)


def test_one_sdpa_call_per_run_of_equal_images(backbones):
    bb = backbones["qwen2vl"]  # full attention on every layer: one segment per image
    layers = len(bb.hf.model.visual.blocks)
    pv, grid = _pixels(bb, [[1, 8, 8]] * 6 + [[1, 4, 6]] * 2)
    with torch.no_grad(), _CountOps() as grouped:
        bb.encode_images(pv, grid)
    try:
        set_grouped_vision_attention(bb.hf, False)
        with torch.no_grad(), _CountOps() as per_image:
            bb.encode_images(pv, grid)
    finally:
        set_grouped_vision_attention(bb.hf, True)
    sdpa = lambda c: sum(n for op, n in c.ops.items() if "attention" in op)  # noqa: E731
    assert sdpa(grouped) == 2 * layers  # runs: 6 images of 8x8, 2 of 4x6
    assert sdpa(per_image) == 8 * layers


def test_runs_of_reads_each_cu_seqlens_once():
    cu = torch.tensor([0, 4, 8, 8, 12, 18, 24, 26], dtype=torch.int32)
    runs = runs_of(cu)
    assert runs == [(0, 3, 4), (12, 2, 6), (24, 1, 2)]  # the empty segment is skipped
    assert runs_of(cu) is runs  # same tensor object (every layer of one forward): no new read
    assert runs_of(cu.clone()) == runs and runs_of(cu.clone()) is not runs


def test_eager_vision_attention_keeps_transformers_forward(tiny_paths):
    from rematch_pl.backbone.model import load_backbone

    bb = load_backbone(tiny_paths["qwen2vl"], attn_implementation="eager")
    assert bb.grouped_vision_layers == 0
    assert all("forward" not in blk.attn.__dict__ for blk in bb.hf.model.visual.blocks)


@pytest.mark.slow  # ~15 s: compiles the tiny towers
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_vision_blocks_equal_eager_across_image_layouts(kind, tiny_paths):
    """backbone.compile compiles each vision block around the eager grouped attention: three
    batches of different image sizes give the eager tower's features (dynamic shapes)."""
    import torch._dynamo

    from rematch_pl.backbone.model import compile_backbone, load_backbone

    bb = load_backbone(f"tiny://{kind}")
    layouts = [GRIDS, [[1, 12, 20], [1, 4, 4]], [[1, 6, 8]]]
    with torch.no_grad():
        eager = [bb.encode_images(*_pixels(bb, grids)) for grids in layouts]
        compile_backbone(bb)
        torch._dynamo.reset()
        compiled = [bb.encode_images(*_pixels(bb, grids)) for grids in layouts]
    for ref, got in zip(eager, compiled):
        assert [x.shape for x in got] == [x.shape for x in ref]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
