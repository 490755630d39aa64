"""Operator benchmarks: `--suite vision` (the vision tower's fast paths) and `--suite lora`
(PEFT's LoRA branch against the fused epilogue)."""

from __future__ import annotations

import torch

from .common import SHAPES, print_rows, shaped_backbone, timeit


def suite_vision(shape: str, device: str, dtype: str, n_images: int, image_size: int, iters: int) -> dict:
    """Vision tower, one fast path added per row: transformers' forward (per-image attention loop,
    its rotary, MLP and Conv3d patch embedding); grouped attention (`backbone.vision_attention`:
    one SDPA call per run of equal-size images, q and k rotated together); the folded QuickGELU
    MLP (`backbone.vision_mlp`, Qwen2-VL); the patch embedding as a GEMM (`backbone.patch_embed`):
    the default."""
    from PIL import Image

    from ..backbone.patch_embed import set_linear_patch_embed
    from ..backbone.vision_attention import set_grouped_vision_attention
    from ..backbone.vision_mlp import set_folded_vision_mlp

    torch.manual_seed(0)
    bb = shaped_backbone(shape, device, dtype)
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(image_size, image_size, 3, generator=g) * 255).byte().numpy())
            for _ in range(n_images)]
    ib = bb.processor.process_images(imgs)
    pv, grid = ib.pixel_values.to(device, bb.embed_tokens.weight.dtype), ib.grid_thw.to(device)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "images": n_images, "image_size": image_size, "patches": int(grid.prod(-1).sum())}
    configs = (("per_image", (False, False, False), "transformers (per-image attention, Conv3d)"),
               ("grouped", (True, False, False), "+ grouped attention"),
               ("grouped_folded_mlp", (True, True, False), "+ folded MLP"),
               ("default", (True, True, True), "+ patch embedding as a GEMM (default)"))
    rows = []
    with torch.no_grad():
        for name, (grouped, folded, linear), label in configs:
            set_grouped_vision_attention(bb.hf, grouped)
            set_folded_vision_mlp(bb.hf, folded)
            set_linear_patch_embed(bb.hf, linear)
            t = timeit(lambda: bb.encode_images(pv, grid), device, warmup=1, iters=iters)
            res[f"{name}_s"] = t
            res[f"{name}_images_per_s"] = n_images / t
            rows.append((label, f"{t * 1e3:.1f} ms ({n_images / t:.1f} images/s)"))
    res["speedup"] = res["per_image_s"] / res["grouped_s"]
    res["speedup_default"] = res["per_image_s"] / res["default_s"]
    rows += [("speed-up, grouped attention", f"{res['speedup']:.2f}x"),
             ("speed-up, default", f"{res['speedup_default']:.2f}x")]
    print_rows(f"bench vision: shape={shape} device={res['device']} dtype={dtype} {n_images} images "
               f"{image_size}x{image_size}", rows)
    return res


def suite_lora(shape: str, device: str, dtype: str, tokens: int, iters: int, r: int = 32) -> dict:
    """The seven LoRA projections of one decoder layer of the shape, forward + backward over
    `tokens` tokens: PEFT's branch order (product, scale, add) against the fused epilogue
    (`backbone.lora.fused`: scale and add inside the B product). Frozen base weight in `dtype`,
    fp32 LoRA factors computing in `dtype` (`compute_dtype=backbone`), input gradient included."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from ..backbone.lora import LLM_LINEAR, lora_in_activation_dtype
    from ..backbone.model import DTYPES

    if shape == "tiny":
        raise SystemExit("--suite lora: pick --shape 2b or 7b (the tiny projections time nothing but overheads)")
    t = SHAPES[shape]["text"]
    d, inter = t["hidden_size"], t["intermediate_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    dims = dict(q_proj=(d, d), k_proj=(d, kv), v_proj=(d, kv), o_proj=(d, d), gate_proj=(d, inter),
                up_proj=(d, inter), down_proj=(inter, d))
    dt = DTYPES[dtype]
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
           "tokens": tokens, "r": r, "runs": []}
    rows = []
    for name in LLM_LINEAR:
        n_in, n_out = dims[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, n_in, generator=g).to(device, dt).requires_grad_()
        dy = torch.randn(tokens, n_out, generator=g).to(device, dt)
        row = {"projection": name, "in": n_in, "out": n_out}
        projs = {}
        for fused in (False, True):
            torch.manual_seed(0)  # the same weights for both
            layer = nn.Module()
            layer.proj = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dt)
            layer = get_peft_model(layer, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
            lora_in_activation_dtype(layer, fused=fused)
            projs[fused] = layer.base_model.model.proj
            nn.init.normal_(projs[fused].lora_B["default"].weight, std=0.02,
                            generator=torch.Generator(device).manual_seed(1))  # B starts at zero: make it count

        def step(proj):
            x.grad = None
            proj(x).backward(dy)

        times = {False: [], True: []}
        for _ in range(2):  # interleaved rounds, the best of each: the two see the same machine state
            for fused, proj in projs.items():
                times[fused].append(timeit(lambda proj=proj: step(proj), device, warmup=1, iters=iters))
        row.update(unfused_s=min(times[False]), fused_s=min(times[True]))
        row["speedup"] = row["unfused_s"] / row["fused_s"]
        p = projs[True]  # against float64: x Wᵀ + s·x Aᵀ Bᵀ
        x64, w64 = x.detach().double(), p.base_layer.weight.double()
        a64, b64 = p.lora_A["default"].weight.double(), p.lora_B["default"].weight.double()
        ref = x64 @ w64.T + p.scaling["default"] * (x64 @ a64.T) @ b64.T
        with torch.no_grad():
            for fused, proj in projs.items():
                err = float((proj(x).double() - ref).norm() / ref.norm())
                row["rel_err_fused" if fused else "rel_err_unfused"] = err
        res["runs"].append(row)
        rows.append((f"{name} {n_in}->{n_out}", f"unfused {row['unfused_s'] * 1e3:7.2f} ms  fused "
                     f"{row['fused_s'] * 1e3:7.2f} ms  {row['speedup']:.2f}x  (error vs fp64: unfused "
                     f"{row['rel_err_unfused']:.1e}, fused {row['rel_err_fused']:.1e})"))
    res["layer_unfused_s"] = sum(r_["unfused_s"] for r_ in res["runs"])
    res["layer_fused_s"] = sum(r_["fused_s"] for r_ in res["runs"])
    res["layer_speedup"] = res["layer_unfused_s"] / res["layer_fused_s"]
    rows.append(("all seven (one decoder layer)", f"unfused {res['layer_unfused_s'] * 1e3:7.2f} ms  fused "
                 f"{res['layer_fused_s'] * 1e3:7.2f} ms  {res['layer_speedup']:.2f}x"))
    print_rows(f"bench lora: Qwen2-VL-{shape} projections, {tokens} tokens, r={r}, device={res['device']} "
               f"dtype={dtype}, forward + backward", rows)
    return res
