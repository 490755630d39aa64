"""Tiny Qwen2-VL / Qwen2.5-VL backbones made locally, with no download.

`make_tiny_backbone(kind, out_dir)` writes a folder with the same layout as a hub
checkpoint (config, safetensors weights, tokenizer, image-processor config), so the
tiny models are loaded by exactly the same `from_pretrained` code path as the real
ones. Everything is deterministic: the tokenizer is a byte-level BPE trained on a
fixed corpus, the weights come from a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Qwen special tokens, in the order Qwen assigns them after the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same structure as Qwen2-VL's own chat template (image-only subset).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_WORDS = (
    "red green blue yellow purple orange white black gray cyan pink brown "
    "circle circles square squares triangle triangles star stars shape shapes "
    "one two three four five six seven eight nine ten zero "
    "left right top bottom center middle upper lower corner "
    "a an the of and or in on at with is are there how many what which where who "
    "image images picture photo caption text query document doc answer question "
    "represent given following for classification retrieve find me everyday that "
    "matches select portion isolates object labeled as relevant information inside "
    "compare determine whether only yes no wrap your tags you helpful assistant "
    "system user news scene colour color count position small large big tiny "
    "Yes No QUERY DOC ANSWER feat_start feat_end Represent Find Select Retrieve "
    "Compare Determine Answer Is Are How What Which Where"
)


def _training_corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [
        'Compare the content inside <QUERY> and <DOC>. Determine whether the information in '
        '<DOC> is relevant to the query in <QUERY>. Answer only with "Yes" or "No", and wrap '
        "your answer in <ANSWER></ANSWER> tags.",
        "<QUERY> </QUERY> <DOC> </DOC> <ANSWER>Yes</ANSWER> <ANSWER>No</ANSWER>",
        "Represent the given image for classification.\n",
        "Represent the given image with the following question: How many circles are there?\n",
        "Find me an everyday image that matches the given caption: two red circles.",
        'Select the portion of the image that isolates the object labeled as "blue star"',
        "0123456789 ,.;:!?\"'()[]{}<>/\\-_=+*&%$#@ \n\t",
    ]
    return lines * 4


def build_tokenizer():
    """Train a deterministic byte-level BPE with the Qwen special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


# Architecture of the tiny backbones: hidden 128, 4 layers (see environment notes:
# the smallest size that learns the embedded dataset well with LoRA on CPU).
TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
)


def _tiny_config(kind: str, vocab_size: int, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(TINY_TEXT, vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    if kind == "qwen2vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if kind == "qwen25vl":
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                      out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown tiny backbone kind {kind!r}: expected 'qwen2vl' or 'qwen25vl'")


def make_tiny_backbone(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of `kind` ('qwen2vl' | 'qwen25vl') to `out_dir`.

    Idempotent: an existing complete folder is left as it is.
    """
    from ..folders import build_once

    return build_once(out_dir, "rematch_tiny.json", {"kind": kind, "seed": seed},
                      lambda tmp: _write_tiny(tmp, kind, seed))


def _write_tiny(tmp: Path, kind: str, seed: int) -> None:
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer) + (-len(tokenizer)) % 64  # round up like real checkpoints
    config = _tiny_config(kind, vocab_size, ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    # Token embeddings (tied to the LM head) with unit-scale rows, like a trained model's: with
    # the default std 0.02 a 128-d head cannot give any token more than ~2% probability, and the
    # generative Yes/No matching loss would plateau at ~4.8 nats whatever LoRA learns.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, config.text_config.hidden_size ** -0.5)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Small images: 56*56 .. 112*112 pixels (4..16 merged image tokens).
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(tmp)


TINY_VERSION = "v2"  # bump when the tiny checkpoints change (the cache folder name carries it)


def tiny_cache_dir() -> Path:
    root = os.environ.get("REMATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rematch_pl"))
    return Path(root) / "tiny"


def resolve_tiny(kind: str) -> str:
    """Path of the tiny checkpoint of `kind`, made on first use."""
    return str(make_tiny_backbone(kind, tiny_cache_dir() / f"{kind}_tiny_{TINY_VERSION}"))
