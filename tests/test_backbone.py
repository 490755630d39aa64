import pytest
import torch

from tinyutil import KINDS, make_backbone, triple_batch
from rematch_pl.backbone.model import load_backbone
from rematch_pl.backbone.sequence import Ids, Segment, build_inputs
from rematch_pl.checkpoint import load_trainable, save_trainable
from rematch_pl.model import ReMatchModel


@pytest.mark.parametrize("kind", KINDS)
def test_packed_inputs_equal_hf_forward_with_mrope(backbones, kind):
    """Our inputs_embeds + explicit 3-D positions == the HF model's own forward (never 1-D fallback)."""
    bb = backbones[kind]
    b = triple_batch(bb.processor)
    q = b["qry"]
    grids = b["image_grid_thw"]
    feats = bb.encode_images(b["pixel_values"], grids)
    rows = [[Segment([Ids(q["ids"][i, : q["lengths"][i]].tolist(), None if q["image"][i] < 0 else int(q["image"][i]))])]
            for i in range(3)]
    packed = build_inputs(rows, bb.embed_tokens, feats, grids, bb.image_token_id, bb.processor.pad_id, bb.merge)
    attn = (packed.segment_ids >= 0).long()
    with torch.no_grad():
        ours = bb(packed, attn)
        # the HF path, fed the same images in the same order (query images only)
        used = [int(i) for i in q["image"] if i >= 0]
        pv = torch.cat([b["pixel_values"][_patch_slice(grids, j)] for j in used])
        mm = (q["ids"] == bb.image_token_id).int()
        ref = bb.hf.model(input_ids=q["ids"], attention_mask=attn, pixel_values=pv, image_grid_thw=grids[used],
                          mm_token_type_ids=mm).last_hidden_state
        ref_pos, _ = bb.hf.model.get_rope_index(q["ids"], mm, grids[used], attention_mask=attn)
    m = attn.bool()
    assert torch.equal(packed.position_ids[:, m], ref_pos[:, m])
    torch.testing.assert_close(ours[m], ref[m], atol=1e-5, rtol=1e-4)


def _patch_slice(grids, j):
    n = grids.prod(-1)
    start = int(n[:j].sum())
    return slice(start, start + int(n[j]))


@pytest.mark.parametrize("kind", KINDS)
def test_lora_targets_language_model_only(backbones, kind):
    names = [n for n, p in backbones[kind].named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    assert not any("visual" in n for n in names)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_and_adapter_roundtrip(kind, tmp_path):
    torch.manual_seed(0)
    bb = make_backbone(kind)
    model = ReMatchModel(bb, k=4, matching="all")
    batch = triple_batch(bb.processor)
    out = model(batch)
    out["loss"].backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.step()  # move every trainable weight away from its init (LoRA B starts at 0)
    model.eval()
    with torch.no_grad():
        before = model.encode(batch["qry"], batch["pixel_values"], batch["image_grid_thw"])
    save_trainable(model, tmp_path / "adapter")
    fresh = ReMatchModel(make_backbone(kind), k=4, matching="all").eval()
    with torch.no_grad():
        differs = fresh.encode(batch["qry"], batch["pixel_values"], batch["image_grid_thw"])
    assert not torch.allclose(before, differs)
    load_trainable(fresh, tmp_path / "adapter")
    with torch.no_grad():
        after = fresh.encode(batch["qry"], batch["pixel_values"], batch["image_grid_thw"])
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_load_trainable_requires_the_rematch_modules_the_model_has(tmp_path):
    """A model with learnable tokens / a projector needs rematch_modules.safetensors (else they would
    keep their fresh initialisation) and every one of its modules in it; a model without any
    (K = 0, no matching head) needs no such file."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = ReMatchModel(make_backbone("qwen2vl"), k=4, matching="all")
    save_trainable(model, tmp_path / "a")
    modules = tmp_path / "a" / "rematch_modules.safetensors"
    state = load_file(str(modules))
    assert any(k.startswith("fusion.") for k in state) and any(k.startswith("matching.") for k in state)
    save_file({k: v for k, v in state.items() if not k.startswith("matching.")}, str(modules))
    with pytest.raises(ValueError, match=r"matching\.(.|\n)*not in"):
        load_trainable(model, tmp_path / "a")
    modules.unlink()
    with pytest.raises(FileNotFoundError, match=rf"rematch_modules\.safetensors(.|\n)*{tmp_path / 'a'}"):
        load_trainable(model, tmp_path / "a")
    bare = ReMatchModel(make_backbone("qwen2vl"), k=0, matching="none")
    save_trainable(bare, tmp_path / "b")
    (tmp_path / "b" / "rematch_modules.safetensors").unlink()
    load_trainable(bare, tmp_path / "b")  # nothing of its own to restore


def test_truncation_never_cuts_image_tokens(backbones):
    pr = backbones["qwen2vl"].processor
    from PIL import Image

    ib = pr.process_images([Image.new("RGB", (112, 112), (1, 2, 3))])
    n = pr.num_image_tokens(ib.grid_thw[0])
    text = "<|image_1|> " + "red circle " * 50
    ids = pr.encode_content(text, n, max_length=n + 6)
    assert len(ids) == n + 6
    assert ids.count(pr.image_token_id) == n and pr.vision_end_id in ids
    from rematch_pl.backbone.processor import ContentError

    with pytest.raises(ContentError, match="max_length"):
        pr.encode_content(text, n, max_length=n)
    with pytest.raises(ContentError, match="placeholder"):
        pr.encode_content("no placeholder here", n)
    with pytest.raises(ContentError, match="no image"):
        pr.encode_content("<|image_1|> x", None)


def test_side_batch_image_tokens_match_grid(backbones):
    pr = backbones["qwen25vl"].processor
    b = triple_batch(pr)
    for side in ("qry", "pos", "neg"):
        s = b[side]
        for i in range(len(s["lengths"])):
            n = int((s["ids"][i] == pr.image_token_id).sum())
            img = int(s["image"][i])
            assert n == (0 if img < 0 else int(b["image_grid_thw"][img].prod()) // 4)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_same_loss_and_gradients():
    """backbone.compile=true (torch.compile per decoder layer, dynamic shapes): packed matching
    pass with its 4-D mask included, the step equals the eager one."""
    from rematch_pl.backbone.model import load_backbone

    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        bb = load_backbone("tiny://qwen2vl", lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
                           compile=compiled)
        model = ReMatchModel(bb, k=4, matching="all")
        batch = triple_batch(bb.processor)
        torch.manual_seed(1)
        loss = model(batch)["loss"]
        loss.backward()
        out[compiled] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert out[True][1].keys() == out[False][1].keys() and out[False][1]
    for k, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], g, atol=1e-5, rtol=1e-4)


def _lora_step(compute_dtype: str, dtype: str, dropout: float = 0.0, fused: bool = True):
    """LLM forward + backward of the tiny backbone with nonzero LoRA branches; the live-tensor peak."""
    from rematch_pl.backbone.model import load_backbone
    from rematch_pl.memory import LiveBytes

    load_backbone("tiny://qwen2vl")  # the first call makes the tiny checkpoint (draws random numbers)
    torch.manual_seed(0)
    bb = load_backbone("tiny://qwen2vl", dtype=dtype,
                       lora={"r": 8, "alpha": 16, "dropout": dropout, "compute_dtype": compute_dtype, "fused": fused})
    g = torch.Generator().manual_seed(1)
    for n, p in bb.named_parameters():
        if "lora_B" in n:  # B starts at zero: make the branch matter
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05
    ids = torch.randint(0, bb.embed_tokens.num_embeddings, (4, 48), generator=g)
    mode = LiveBytes()
    mode.track(list(bb.parameters()), ids)
    torch.manual_seed(2)  # the same dropout masks
    with mode:
        out = bb.hf.model.language_model(input_ids=ids, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in bb.named_parameters() if p.requires_grad}
    return out.detach().float(), grads, mode.peak


@pytest.mark.parametrize("compute_dtype,fused", [("backbone", True), ("backbone", False), ("fp32", True)])
def test_lora_branch_against_a_float64_reference(compute_dtype, fused):
    """One LoRA layer of a bf16 backbone (fp32 LoRA weights): the branch's output and its weight
    gradients against float64, for the bf16 branch (default: fused epilogue; and PEFT's order) and
    PEFT's fp32 one (`fused` does not apply to it)."""
    from rematch_pl.backbone.model import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("tiny://qwen2vl", dtype="bf16",
                       lora={"r": 8, "alpha": 16, "dropout": 0.0, "compute_dtype": compute_dtype, "fused": fused})
    layer = bb.hf.model.language_model.layers[0].mlp.down_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    B.data = torch.randn(B.shape) * 0.05
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, A.shape[1], generator=g).to(torch.bfloat16)
    s = layer.scaling["default"]
    out = layer(x) - layer.base_layer(x)  # the LoRA branch, in the output dtype (bf16)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    ref = (x.double() @ A64.T @ B64.T) * s
    (ref * torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)).sum().backward()
    assert out.dtype == torch.bfloat16 and A.dtype == B.dtype == A.grad.dtype == B.grad.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
    for grad, grad64 in ((A.grad, A64.grad), (B.grad, B64.grad)):
        assert (grad.double() - grad64).norm() / grad64.norm() < 1e-2


def test_lora_branch_in_the_activation_dtype_holds_less_memory():
    """Whole LLM, bf16: the default branch gives PEFT's fp32-branch outputs within bf16 precision
    and holds less memory (no fp32 copy of each LoRA input, no fp32 dropout)."""
    ref, _, ref_peak = _lora_step("fp32", "bf16", dropout=0.1)
    out, g, peak = _lora_step("backbone", "bf16", dropout=0.1)
    assert ((out - ref).norm() / ref.norm()) < 2e-2
    assert all(v.dtype == torch.float32 for v in g.values())
    assert peak < 0.85 * ref_peak


def test_lora_compute_dtype_changes_nothing_on_an_fp32_backbone():
    ref, ref_g, _ = _lora_step("fp32", "fp32")
    out, g, _ = _lora_step("backbone", "fp32", fused=False)
    assert torch.equal(out, ref)
    assert all(torch.equal(g[n], ref_g[n]) for n in g)


def test_fused_lora_epilogue_gives_peft_outputs_and_gradients():
    """backbone.lora.fused (scale and add in the B product's addmm) against PEFT's product, scale and
    add, whole tiny fp32 LLM with dropout (the same masks): outputs and every trainable gradient
    equal to fp32 rounding, and no more memory held."""
    ref, ref_g, ref_peak = _lora_step("backbone", "fp32", dropout=0.1, fused=False)
    out, g, peak = _lora_step("backbone", "fp32", dropout=0.1, fused=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert g.keys() == ref_g.keys() and any("lora_A" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], atol=1e-7, rtol=1e-4)
    assert peak <= ref_peak


def test_fused_lora_epilogue_is_one_addmm_and_keeps_peft_controls():
    """A fused LoRA projection issues one addmm where PEFT issues a product, a scale and an add:
    no elementwise pass over the output in forward or backward (aten ops counted); disabling or
    merging the adapter falls back to PEFT's forward (the base output; the merged weight)."""
    from tinyutil import OpLog

    from rematch_pl.backbone.model import load_backbone

    counts = {}
    for fused in (False, True):
        torch.manual_seed(0)
        bb = load_backbone("tiny://qwen2vl", dtype="fp32",
                           lora={"r": 8, "alpha": 16, "dropout": 0.0, "fused": fused})
        proj = bb.hf.model.language_model.layers[0].mlp.up_proj
        torch.nn.init.normal_(proj.lora_B["default"].weight, std=0.1)
        x = torch.randn(5, proj.in_features, requires_grad=True)
        with OpLog() as ops:
            y = proj(x)
            y.sum().backward()
        counts[fused] = ops.ops
        if fused:
            assert type(proj).__name__ == "FusedLinear" and "addmm" in [n for n, _ in ops.ops]
            with torch.no_grad():
                lora = proj.scaling["default"] * proj.lora_B["default"](proj.lora_A["default"](x))
                torch.testing.assert_close(y, proj.base_layer(x) + lora)
                with bb.model.disable_adapter():
                    torch.testing.assert_close(proj(x), proj.base_layer(x))
                proj.merge()
                torch.testing.assert_close(proj(x), y, atol=1e-5, rtol=1e-5)
                assert proj.merged and proj.base_layer.weight.grad_fn is None
    full = y.numel()  # elementwise passes over the [5, out] output: PEFT's scale and add, the scale's backward

    def passes(names):
        return sum(1 for n, numel in names if n in ("mul", "add") and numel == full)

    assert passes(counts[False]) == 3 and passes(counts[True]) == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_lora_computes_the_branch_function(dtype):
    """Backbone.merge_lora (inference): W + s·BA folded into each weight gives the LLM the separate
    branch gives: to float32 rounding on an fp32 backbone, and on a bf16 one no further from a float64
    reference than the branch itself (one rounding of the merged weight); PEFT's wrappers are gone."""
    import copy

    from peft.tuners.lora import LoraLayer

    from rematch_pl.backbone.model import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("tiny://qwen2vl", dtype=dtype, lora={"r": 8, "alpha": 16, "dropout": 0.0})
    g = torch.Generator().manual_seed(1)
    for n, p in bb.named_parameters():
        if "lora_B" in n:  # B starts at zero: make the branch matter
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05
    ids = torch.randint(0, bb.embed_tokens.num_embeddings, (4, 48), generator=g)
    ref64 = copy.deepcopy(bb).double()

    def llm(b):
        with torch.no_grad():
            return b.hf.model.language_model(input_ids=ids, use_cache=False).last_hidden_state.double()

    ref, branch = llm(ref64), llm(bb)
    with bb.model.disable_adapter():
        base = llm(bb)
    n_base = sum(p.numel() for n, p in bb.named_parameters() if "lora_" not in n)
    assert bb.has_lora and bb.merge_lora()
    merged = llm(bb)
    assert not bb.has_lora and not bb.merge_lora()  # nothing left to merge
    assert not any(isinstance(m, LoraLayer) for m in bb.modules())
    assert sum(p.numel() for p in bb.parameters()) == n_base
    assert ((branch - base).norm() / base.norm()).item() > 0.05  # the branch matters
    if dtype == "fp32":
        torch.testing.assert_close(merged, branch, atol=1e-5, rtol=1e-5)
    else:
        err_branch = ((branch - ref).norm() / ref.norm()).item()
        err_merged = ((merged - ref).norm() / ref.norm()).item()
        print(f"bf16 relative error to float64: branch {err_branch:.2e}, merged {err_merged:.2e}")
        assert err_merged < 2e-2 and err_merged < 1.5 * err_branch, (err_merged, err_branch)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_vision_tower_is_never_differentiated(kind):
    """With gradient checkpointing on, transformers makes the patch embeddings require grad; a
    frozen tower must still run without autograd (its activations not kept, no backward through
    it), while a trained one (no LoRA: everything trains) keeps its gradients."""
    from rematch_pl.backbone.model import load_backbone

    for lora, trains_vision in ((True, False), (False, True)):
        torch.manual_seed(0)
        bb = load_backbone(f"tiny://{kind}", lora={"r": 4, "alpha": 8, "dropout": 0.0} if lora else None,
                           gradient_checkpointing=True)
        model = ReMatchModel(bb, k=2, matching="all").train()
        tracked = []
        bb.hf.model.visual.register_forward_hook(
            lambda mod, args, out: tracked.append(getattr(out, "pooler_output", out).requires_grad))
        model(triple_batch(bb.processor))["loss"].backward()
        vision_grads = [p.grad for n, p in bb.named_parameters() if "visual" in n and p.requires_grad]
        assert tracked == [trains_vision]  # one tower pass per step, on autograd's tape only when it trains
        assert bool(vision_grads) == trains_vision and all(g is not None for g in vision_grads)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_mask_of_padded_rows_equals_transformers_padding_mask(attn):
    """`Backbone.causal_mask` gives the hidden states of HF's own [B, L] padding-mask path on every
    real token: SDPA needs no mask for right-padded rows (causality alone), eager gets a 4-D one
    built on the device; an unpadded pass needs no mask."""
    from rematch_pl.backbone.model import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("tiny://qwen2vl", attn_implementation=attn)
    rows = [[Segment([Ids(list(range(5, 5 + n)))])] for n in (9, 4, 7)]
    packed = build_inputs(rows, bb.embed_tokens, None, None, bb.image_token_id, bb.processor.pad_id, bb.merge)
    mask = bb.causal_mask(packed)
    assert mask is None if attn == "sdpa" else mask.shape == (3, 1, 9, 9)
    with torch.no_grad():
        ours = bb(packed, mask)
        ref = bb(packed, (packed.segment_ids >= 0).long())
    real = packed.segment_ids >= 0
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    full = build_inputs(rows[:1], bb.embed_tokens, None, None, bb.image_token_id, bb.processor.pad_id, bb.merge)
    assert bb.causal_mask(full) is None
    with torch.no_grad():
        torch.testing.assert_close(bb(full, None)[0], ours[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path, says", [
    ("/nonexistent/qwen2-vl", "no such folder (/nonexistent/qwen2-vl)"),
    ("no-such-org/no-such-model-rematch", "reads as a hub id"),
    ("EMPTY", "reads as a local folder"),  # a folder without config.json
])
def test_a_backbone_that_cannot_be_loaded_names_the_setting_and_what_to_do(path, says, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once, never touch the network
    path = str(tmp_path) if path == "EMPTY" else path
    with pytest.raises((OSError, ValueError)) as info:
        load_backbone(path)
    msg = str(info.value)
    assert f"backbone.path={path!r} could not be loaded" in msg
    assert says in msg and "backbone=qwen2vl_tiny" in msg
    assert type(info.value) is type(info.value.__cause__)  # same type, transformers' own error as the cause


def test_chat_template_kept_for_the_processor_only_is_found(tmp_path):
    """A folder whose chat template sits in chat_template.json (the processor's file in older
    transformers) gives the same chat turns; one with no template at all fails saying what to do."""
    import json
    import shutil

    from rematch_pl.backbone.processor import MultimodalProcessor
    from rematch_pl.backbone.tiny import resolve_tiny

    src = resolve_tiny("qwen2vl")
    ref = MultimodalProcessor.from_pretrained(src).chat_turn_ids()
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert MultimodalProcessor.from_pretrained(str(d)).chat_turn_ids() == ref
    (d / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="has no chat template .*embedding=plain matching=none"):
        MultimodalProcessor.from_pretrained(str(d)).chat_turn_ids()
