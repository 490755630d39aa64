"""Memory planning on the meta device (rematch_pl.memory): a step run on meta predicts, byte for
byte, the live-tensor peak of the same step run on real tensors."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from rematch_pl.backbone.model import load_backbone
from rematch_pl.bench import VARIANTS, make_batch
from rematch_pl.gradcache import gradcache_step
from rematch_pl.memory import FusedAttention, FusedDropout, LiveBytes, meta_copy, step_memory, to_meta
from rematch_pl.model import ReMatchModel


def test_live_bytes_counts_storages_once_and_frees_them():
    mode = LiveBytes()
    with mode:
        a = torch.ones(1000)  # 4000 B
        v = a[10:20].view(2, 5)  # a view: same storage, not counted again
        b = a * 2  # 8000 B live
        del b
        c = torch.ones(250, dtype=torch.float64)  # 2000 B: 6000 B live
    assert v.shape == (2, 5)
    assert (mode.peak, mode.now) == (8000, 6000)
    del a, v, c
    assert mode.now == 0


def _step(variant: str, gc: int, meta: bool, backbone: str):
    torch.manual_seed(0)
    bb = load_backbone(f"tiny://{backbone}", dtype="fp32", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       gradient_checkpointing=True)
    batch = make_batch(bb.processor, 6, 112, "cpu")
    model = ReMatchModel(bb, **VARIANTS[variant]).train()
    if meta:
        model, batch = meta_copy(model), to_meta(batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        if gc:
            gradcache_step(model, batch, gc, backward=lambda t: t.backward())
        else:
            model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step_memory(model, batch, step, opt, meta=meta, target="cpu")


@pytest.mark.parametrize("variant,gc,backbone", [
    ("baseline", 0, "qwen2vl"), ("rematch", 0, "qwen2vl"), ("rematch", 2, "qwen2vl"),
    ("rematch_feat_feat", 0, "qwen25vl")])
def test_meta_step_predicts_the_real_step_peak(variant, gc, backbone):
    """Gradient checkpointing on (its recomputation runs in the backward pass), GradCache's
    no-grad pass and re-forward, the unified-mask matching pass, windowed vision attention."""
    real = _step(variant, gc, meta=False, backbone=backbone)
    planned = _step(variant, gc, meta=True, backbone=backbone)
    # equal to the byte without GradCache; with it a few bytes of index bookkeeping differ
    assert planned == {k: pytest.approx(v, rel=1e-5) for k, v in real.items()}
    assert real["transient"] > real["weights"] > 0 and real["optimizer"] > 0


def test_gradcache_lowers_the_planned_peak():
    full, chunked = _step("rematch", 0, True, "qwen2vl"), _step("rematch", 2, True, "qwen2vl")
    assert chunked["transient"] < full["transient"] / 1.5


@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_on_meta_holds_no_score_matrix(masked):
    """On meta, SDPA falls back to the math path ([B, H, L, L] scores, kept for backward); the
    fused kernels a GPU runs keep O(L) per head."""
    L, H = 2048, 4
    q = torch.empty(1, H, L, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    kv = torch.empty(1, 2, L, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)  # grouped KV heads
    k = v = kv.repeat_interleave(2, 1)
    mask = torch.ones(1, 1, L, L, dtype=torch.bool, device="meta").tril() if masked else None
    scores = H * L * L * 2
    peaks = {}
    for fused in (False, True):
        mode = LiveBytes(meta=True)
        with mode, (FusedAttention("cuda") if fused else nullcontext()):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.float().sum().backward()
        assert out.shape == q.shape
        peaks[fused] = mode.peak
    assert peaks[False] > 2 * scores  # the math path: scores and their softmax
    assert peaks[True] < scores + (2 * L * L if masked else 0)  # at most the mask as an additive bias


def test_fused_attention_keeps_grouped_kv_heads_for_flash():
    """Without a mask transformers passes grouped KV heads with `enable_gqa` and CUDA's flash kernel
    reads them as they are: nothing repeated is made or kept for backward. Under a mask (the
    memory-efficient kernel) they are repeated, as that kernel needs."""
    L, H, G, D = 1024, 8, 2, 64
    q = torch.empty(1, H, L, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k = torch.empty(1, G, L, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    v = torch.empty(1, G, L, D, dtype=torch.bfloat16, device="meta", requires_grad=True)
    kv_repeated = 2 * H * L * D * 2
    kept = {}
    for masked in (False, True):
        mask = torch.zeros(1, 1, L, L, dtype=torch.bfloat16, device="meta") if masked else None
        mode = LiveBytes(meta=True)
        with mode, FusedAttention("cuda"):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)
        kept[masked] = mode.now - out.numel() * 2  # what the attention keeps for backward besides its output
        out.float().sum().backward()
        assert out.shape == q.shape and k.grad.shape == k.shape
        k.grad = v.grad = q.grad = None
    assert kept[False] < H * L * 4 + 64  # the log-sum-exp (fp32) and the RNG state only
    assert kept[True] >= kv_repeated  # the repeated k and v


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_fused_dropout_keeps_the_mask_the_target_keeps(target):
    """PEFT's LoRA dropout: on meta (as on the CPU) `F.dropout` keeps a mask in the input's dtype
    for backward; CUDA's fused kernel keeps a bool one. Real tensors, eval mode and p=0 take the
    real function."""
    n = 1 << 16
    x = torch.empty(n, dtype=torch.bfloat16, device="meta", requires_grad=True)
    mode = LiveBytes(meta=True)
    with mode, FusedDropout(target):
        y = F.dropout(x, 0.1, training=True)
    assert y.shape == x.shape and y.grad_fn is not None
    mask_bytes = mode.now - n * 2  # live: the output and what backward keeps
    assert mask_bytes == (n if target == "cuda" else n * 2)
    assert y.grad_fn.name() == ("NativeDropoutBackward0" if target == "cuda" else "MulBackward0")
    name = lambda t: t.grad_fn and t.grad_fn.name()  # noqa: E731
    plain = [name(F.dropout(x, 0.0, training=True)), name(F.dropout(x, 0.5, training=False))]
    real = torch.ones(1000)
    with FusedDropout("cuda"):
        assert [name(F.dropout(x, 0.0, training=True)), name(F.dropout(x, 0.5, training=False))] == plain
        assert torch.equal(F.dropout(real, 0.5, training=False), real)
        kept = F.dropout(real, 0.5, training=True)
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # the real CPU dropout
    assert F.dropout is not None and F.dropout.__name__ == "dropout"  # restored on exit


def test_fused_attention_rejects_unknown_target():
    with pytest.raises(ValueError, match="'tpu'"):
        FusedAttention("tpu")


def _cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from rematch_pl.build import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["data.batch_size=4", "data.shuffle_buffer=8",
                                            f"paths.output_root={tmp_path}", *overrides])


def test_config_plan_equals_the_measured_first_step(tmp_path):
    """train.memory_check plans the configured model (LoRA dropout, K=16, 8 views) on the first
    batch the datamodule yields; the same step on real tensors peaks at the same bytes."""
    from rematch_pl.build import build_backbone, build_model
    from rematch_pl.memory import GiB, _first_batch, check_memory

    cfg = _cfg(tmp_path, "train.memory_check.mode=always")
    plan = check_memory(cfg, target="cpu")
    assert plan["fits"] is None and plan["batch"] == 4  # no device, no budget: a plan without a verdict
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone)
    model = build_model(cfg, backbone).train()
    batch = _first_batch(cfg, backbone.processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    real = step_memory(model, batch, step, opt, meta=False)
    assert plan["peak_gib"] == pytest.approx(real["peak"] / GiB, rel=1e-5)
    assert plan["weights_gib"] == pytest.approx(real["weights"] / GiB, rel=1e-9)


def test_an_over_budget_step_fails_naming_a_chunk_that_fits(tmp_path):
    import re

    from rematch_pl.memory import MemoryPlanError, check_memory

    base = ["train.memory_check.mode=always", "train.memory_check.reserve_gib=0"]
    peak = check_memory(_cfg(tmp_path, *base))["peak_gib"]
    budget = f"train.memory_check.budget_gib={0.8 * peak}"
    with pytest.raises(MemoryPlanError, match=r"train\.gradcache\.chunk_size=\d+") as e:
        check_memory(_cfg(tmp_path, *base, budget))
    assert f"{peak:.1f} GiB" in str(e.value) and "data.batch_size=4" in str(e.value)
    chunk = int(re.search(r"train\.gradcache\.chunk_size=(\d+)", str(e.value)).group(1))
    plan = check_memory(_cfg(tmp_path, *base, budget, f"train.gradcache.chunk_size={chunk}"))
    assert plan["fits"] and plan["peak_gib"] <= 0.8 * peak
    # sharded strategies: the plan is an upper bound, so it warns and goes on
    assert check_memory(_cfg(tmp_path, *base, budget, "strategy=fsdp", "trainer.devices=1"))["fits"] is False
    assert check_memory(_cfg(tmp_path, "train.memory_check.mode=never")) is None
    assert check_memory(_cfg(tmp_path)) is None  # auto: only on a CUDA device


def test_max_pixels_plans_the_same_batch_with_its_largest_images(tmp_path):
    from rematch_pl.backbone.model import load_backbone
    from rematch_pl.memory import _first_batch, check_memory

    cfg = _cfg(tmp_path, "train.memory_check.mode=always")
    read = check_memory(cfg)
    worst = check_memory(_cfg(tmp_path, "train.memory_check.mode=always", "train.memory_check.images=max_pixels"))
    processor = load_backbone(cfg.backbone.path, min_pixels=cfg.backbone.min_pixels,
                              max_pixels=cfg.backbone.max_pixels, meta=True).processor
    grids = _first_batch(cfg, processor, "max_pixels")["image_grid_thw"]
    patch = processor.patch_size
    pixels = grids.prod(-1) * patch * patch  # per image, after the processor's resize
    top = processor.pixel_range[1]
    assert len(grids) > 0 and bool(((pixels <= top) & (pixels >= 0.8 * top)).all())
    assert worst["image_tokens"] == int(grids.prod(-1).sum()) // 4 > read["image_tokens"]
    assert worst["peak_gib"] > read["peak_gib"]


def _encode(meta: bool, backbone: str):
    from PIL import Image

    from rematch_pl.evaluation.engine import collate_units
    from rematch_pl.memory import encode_memory

    torch.manual_seed(0)
    bb = load_backbone(f"tiny://{backbone}", dtype="fp32", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    bb.merge_lora()
    model = ReMatchModel(bb, k=4, matching="none", template="chat").eval()
    model.requires_grad_(False)
    proc = bb.processor
    units = []
    for i, size in enumerate([(112, 84), (56, 56), None]):
        ib = proc.process_images([Image.new("RGB", size, (9 * i, 80, 120))]) if size else None
        n = proc.num_image_tokens(ib.grid_thw[0]) if ib else None
        texts = ["<|image_1|>\nWhat is shown?", "<|image_1|>\nHow many?"] if ib else ["a red circle"]
        units.append(([2 * i, 2 * i + 1][:len(texts)], [proc.encode_content(t, n) for t in texts],
                      ib.pixel_values if ib else None, ib.grid_thw[0] if ib else None))
    batch = collate_units(units, proc)
    sides = [["qry"], ["qry", "doc"], ["doc"], ["qry"], ["doc"]]
    if meta:
        model, batch = meta_copy(model), to_meta(batch)
    return encode_memory(model, batch, sides, meta=meta, target="cpu")


@pytest.mark.parametrize("backbone", ["qwen2vl", "qwen25vl"])
def test_meta_encode_predicts_the_real_eval_forward_peak(backbone):
    """The eval forward (shared images, query and document rows, bucketed passes) planned on meta
    holds the same live bytes as the same forward on real tensors."""
    real, planned = _encode(False, backbone), _encode(True, backbone)
    assert planned == real and real["transient"] > 0 and real["inputs"] > 0


def test_auto_gradient_checkpointing_is_off_only_when_the_worst_case_fits(tmp_path):
    """backbone.gradient_checkpointing=auto: planned without recomputation at the batch's worst
    case (images at max_pixels); off when that fits the budget, on otherwise or with no budget."""
    from rematch_pl.memory import check_memory

    base = ["train.memory_check.mode=always", "train.memory_check.reserve_gib=0", "backbone.gradient_checkpointing=auto"]
    on = check_memory(_cfg(tmp_path, *base[:2], "backbone.gradient_checkpointing=true"))["peak_gib"]
    off = check_memory(_cfg(tmp_path, *base[:2], "backbone.gradient_checkpointing=false"))["peak_gib"]
    worst = check_memory(_cfg(tmp_path, *base[:2], "backbone.gradient_checkpointing=false",
                              "train.memory_check.images=max_pixels"))["peak_gib"]
    assert on < off < worst  # recomputation saves activations; bigger images cost more
    roomy = check_memory(_cfg(tmp_path, *base, f"train.memory_check.budget_gib={1.01 * worst}"))
    assert roomy["gradient_checkpointing"] is False and roomy["no_recompute_worst_case_gib"] == pytest.approx(worst)
    assert roomy["peak_gib"] == pytest.approx(off)  # the reported plan: the batch as read
    tight = check_memory(_cfg(tmp_path, *base, f"train.memory_check.budget_gib={0.99 * worst}"))
    assert tight["gradient_checkpointing"] is True and tight["peak_gib"] == pytest.approx(on)  # even if `off` fits
    unknown = check_memory(_cfg(tmp_path, *base))  # no device, no budget_gib
    assert unknown["gradient_checkpointing"] is True and unknown["no_recompute_worst_case_gib"] is None
    with pytest.raises(ValueError, match="backbone.gradient_checkpointing"):
        from rematch_pl.config import validate

        validate(_cfg(tmp_path, "backbone.gradient_checkpointing=sometimes"))


@pytest.mark.parametrize("budget,expected", [(100, False), (None, True)])
def test_training_runs_with_the_plans_gradient_checkpointing_choice(tmp_path, budget, expected):
    from rematch_pl.train import run

    cfg = _cfg(tmp_path, "debug=fast", "logger=csv", "trainer.max_steps=1", "trainer.limit_val_batches=0",
               "save_adapter=false", "backbone.gradient_checkpointing=auto",
               *(["train.memory_check.mode=always", f"train.memory_check.budget_gib={budget}"] if budget else []))
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 1
    assert summary["config"]["backbone"]["gradient_checkpointing"] is expected  # resolved, as logged
    assert (summary["memory_plan"] or {}).get("gradient_checkpointing", True) is expected


@pytest.mark.parametrize("batch", [2, 5, 8, 9, 16, 17, 128])
def test_suggested_chunks_are_ones_the_config_accepts(batch):
    """Without hard negatives the memory check suggests only chunk sizes that leave no chunk of
    one triple (which start-up would refuse); about halving, largest first."""
    from rematch_pl.config import ConfigError, _check_no_chunk_of_one
    from rematch_pl.memory import _chunk_candidates

    for pairs in (False, True):
        got = _chunk_candidates(batch, batch, pairs)
        assert got == sorted(set(got), reverse=True) and all(1 <= c < batch for c in got)
        assert not got or got[0] >= batch // 2
        if not pairs:
            assert got[-1] == 1
        for c in got if pairs else []:
            try:
                _check_no_chunk_of_one(c, batch)
            except ConfigError:
                pytest.fail(f"suggested chunk {c} of batch {batch} is refused at start-up")
