"""Qwen2-VL's tokenizer, made locally from Qwen's public BPE ranks (no hub access needed).

The shaped benchmarks tokenise with the tiny model's 640-entry BPE unless told otherwise; it
splits English into about 1.5x the tokens Qwen2 makes, so every text segment (chat template,
instructions, the S7 matching prompt, captions) weighs more there than in a real run.
`--tokenizer DIR` (or ``REMATCH_BENCH_TOKENIZER``) gives them a real tokenizer instead: the
user's own Qwen2-VL checkpoint folder or hub id, or the folder this module writes.

Qwen2 kept Qwen's byte-level BPE: 151,643 ranked byte strings, split by the pre-tokenizer
pattern below, then the special tokens from id 151643 on (`SPECIAL_TOKENS`, Qwen2-VL's order).
The ranks are public as ``qwen.tiktoken`` in the Apache-2.0 PyPI package ``dashscope``, which a
machine without hub access can still fetch (``pip download --no-deps dashscope==2.0.2``; only
that one data file is read, nothing is installed or imported). transformers' `TikTokenConverter`
turns the ranks into the BPE vocabulary and merges. The result gives the ids transformers'
own Qwen2-VL test expects for a chat prompt (tests/test_bench_vocab.py).

    python -m rematch_pl.bench.vocab --source dashscope-2.0.2-py3-none-any.whl --out qwen2_tokenizer/
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import zipfile
from pathlib import Path

RANKS_NAME = "qwen.tiktoken"
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # one digit per token
N_RANKS = 151643
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643..151656
DEFAULT_SOURCE_ENV = "REMATCH_QWEN_RANKS"


def read_ranks(source: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Qwen's BPE ranks {token bytes: rank} from `source`: a ``qwen.tiktoken`` file, a dashscope
    wheel (or any zip) holding one, or None: ``$REMATCH_QWEN_RANKS``, else an installed dashscope."""
    source = source or os.environ.get(DEFAULT_SOURCE_ENV)
    if source is None:
        spec = importlib.util.find_spec("dashscope")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"no source for Qwen's BPE ranks ({RANKS_NAME}): pass --source (the file, or the wheel from "
                f"`pip download --no-deps dashscope==2.0.2`) or set ${DEFAULT_SOURCE_ENV}")
        source = Path(list(spec.submodule_search_locations)[0]) / "resources" / RANKS_NAME
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file (expected {RANKS_NAME} or a wheel holding it)")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [n for n in z.namelist() if n.endswith("/" + RANKS_NAME) or n == RANKS_NAME]
            if not names:
                raise FileNotFoundError(f"{source} holds no {RANKS_NAME}")
            text = z.read(names[0]).decode()
    else:
        text = source.read_text()
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != N_RANKS or sorted(ranks.values()) != list(range(N_RANKS)):
        raise ValueError(f"{source}: {len(ranks)} ranks, expected Qwen's {N_RANKS} (0..{N_RANKS - 1})")
    return ranks


def qwen2_tokenizer(source: str | os.PathLike | None = None):
    """A `PreTrainedTokenizerFast` with Qwen2-VL's vocabulary, pre-tokenizer and special tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from ..backbone.tiny import CHAT_TEMPLATE

    ranks = read_ranks(source)

    class _Converter(TikTokenConverter):  # the ranks are parsed above: no tiktoken package needed
        @staticmethod
        def load_tiktoken_bpe(_):
            return ranks

    tok = _Converter(vocab_file=RANKS_NAME, pattern=QWEN2_PATTERN, extra_special_tokens=SPECIAL_TOKENS).converted()
    found = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if found != list(range(N_RANKS, N_RANKS + len(SPECIAL_TOKENS))):
        raise ValueError(f"special tokens got ids {found}, expected {N_RANKS}..")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768)
    fast.padding_side = "right"
    fast.chat_template = CHAT_TEMPLATE  # Qwen2-VL's structure (image-only), as the tiny checkpoints carry
    return fast


def build_qwen2_tokenizer(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write the tokenizer folder (AutoTokenizer loads it) to `out_dir`, once (atomically)."""
    from ..folders import build_once

    return build_once(out_dir, "rematch_qwen2_tokenizer.json", {"vocab": "qwen2", "ranks": N_RANKS, "chat_template": True},
                      lambda tmp: qwen2_tokenizer(source).save_pretrained(tmp))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rematch_pl.bench.vocab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help=f"{RANKS_NAME}, or a dashscope wheel holding it (default: "
                                     f"${DEFAULT_SOURCE_ENV}, else an installed dashscope)")
    ap.add_argument("--out", required=True, help="folder to write (bench --tokenizer takes it)")
    a = ap.parse_args(argv)
    out = build_qwen2_tokenizer(a.out, a.source)
    print(f"written {out}: Qwen2-VL tokenizer ({N_RANKS} BPE tokens + {len(SPECIAL_TOKENS)} special)")


if __name__ == "__main__":
    main()
