"""`python -m rematch_pl.generate ckpt=DIR image=PATH [prompt=...] [max_new_tokens=128] [compare_base=true]`

Generates text about an image with the trained backbone (its LM head is intact: ReMatch trains LoRA
on the language model and reads embeddings from learnable tokens, not from a repurposed last
token), greedily. With ``compare_base=true`` (unmerged checkpoints) it also generates with the
adapter switched off, i.e. with the base model, to compare as in the paper's S9. ``ckpt`` may be a
run directory, an exported folder, or omitted together with ``backbone=PATH_OR_HUB_ID`` for a plain
base model; given with ``ckpt``, ``backbone=`` says where the checkpoint's base weights are now.
"""

from __future__ import annotations

import sys

import torch

DEFAULT_PROMPT = "Describe this image in detail."


@torch.no_grad()
def prompt_inputs(model, image, prompt: str = DEFAULT_PROMPT) -> dict:
    """Model inputs of a chat turn holding `image` and `prompt`, with the generation prompt opened."""
    from .data.images import load_image, make_processor_safe

    bb = model.backbone
    proc = bb.processor
    p = next(model.parameters())
    img = make_processor_safe(load_image(image) if not hasattr(image, "convert") else image)
    ib = proc.process_images([img])
    text = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([proc.encode_content(text, proc.num_image_tokens(ib.grid_thw[0]))], device=p.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": ib.pixel_values.to(p.device, p.dtype), "image_grid_thw": ib.grid_thw.to(p.device),
            "mm_token_type_ids": (ids == bb.image_token_id).int()}


@torch.no_grad()
def generate(model, image, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128, return_ids: bool = False):
    """Greedy generation of `model` (a `ReMatchModel`, with whatever adapter it holds active)."""
    proc = model.backbone.processor
    inputs = prompt_inputs(model, image, prompt)
    out = model.backbone.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=proc.pad_id,
        eos_token_id=proc.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    new = out[0, inputs["input_ids"].shape[1]:]
    text = proc.tokenizer.decode(new, skip_special_tokens=True).strip()
    return (text, new.tolist()) if return_ids else text


@torch.no_grad()
def generate_base(model, image, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128, return_ids: bool = False):
    """The same with the LoRA adapter switched off (the base backbone)."""
    peft = model.backbone.model
    if not hasattr(peft, "disable_adapter"):
        raise ValueError("this model has no separate adapter (merged or full fine-tuning): no base to compare with")
    with peft.disable_adapter():
        return generate(model, image, prompt, max_new_tokens, return_ids)


def main(argv: list[str] | None = None) -> dict:
    from .encoder import load_model, read_spec, spec_from_config
    from .export import parse_args

    a = parse_args(sys.argv[1:] if argv is None else argv,
                   {"ckpt": None, "backbone": None, "image": "???", "prompt": DEFAULT_PROMPT, "max_new_tokens": 128,
                    "compare_base": False, "device": "auto", "dtype": "auto"}, "python -m rematch_pl.generate", __doc__)
    if a["ckpt"]:  # backbone=: where the checkpoint's base weights are now (else the recorded location)
        spec = read_spec(str(a["ckpt"]), str(a["backbone"]) if a["backbone"] else None)
    elif a["backbone"]:
        spec = spec_from_config({"backbone": {"path": str(a["backbone"]), "dtype": "bf16" if torch.cuda.is_available()
                                              else "fp32", "lora": {"enabled": False}}, "matching": {"views": "none"}})
    else:
        raise SystemExit("rematch_pl.generate: give ckpt=DIR (run or export) or backbone=PATH_OR_HUB_ID")
    model = load_model(spec, a["device"], a["dtype"])
    res = {"prompt": a["prompt"], "rematch": generate(model, a["image"], a["prompt"], int(a["max_new_tokens"]))}
    print(f"[{spec.source or spec.backbone['path']}]\n{res['rematch']}")
    if a["compare_base"]:
        res["base"] = generate_base(model, a["image"], a["prompt"], int(a["max_new_tokens"]))
        print(f"\n[base {spec.backbone['path']}]\n{res['base']}")
    return res


if __name__ == "__main__":
    main()
