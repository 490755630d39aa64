"""`bench.vocab`: Qwen2-VL's tokenizer made from Qwen's public BPE ranks, and the shaped benchmarks
tokenising with it (`--tokenizer`)."""

import base64
import glob
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from rematch_pl.bench import main as bench_main
from rematch_pl.bench.common import TOKENIZER_ENV, bench_processor, bench_tokenizer, make_batch, shaped_backbone
from rematch_pl.bench.vocab import N_RANKS, build_qwen2_tokenizer, read_ranks
from rematch_pl.matching import SYSTEM
from rematch_pl.model import ReMatchModel

ROOT = Path(__file__).resolve().parents[1]
# scripts/install.sh fetches the dashscope wheel that holds the ranks (`qwen.tiktoken`) into .cache/
RANKS = os.environ.get("REMATCH_QWEN_RANKS") or next(iter(sorted(glob.glob(str(ROOT / ".cache" / "dashscope-*.whl")))),
                                                      None)
needs_ranks = pytest.mark.skipif(RANKS is None, reason="Qwen's BPE ranks not fetched: run scripts/install.sh")

# The ids transformers' own Qwen2-VL processor test expects for the start of a chat with an image.
QWEN2_VL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|image_pad|>")
QWEN2_VL_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655,
                151655]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return str(build_qwen2_tokenizer(tmp_path_factory.mktemp("vocab") / "qwen2", RANKS))


@needs_ranks
def test_the_built_tokenizer_gives_qwen2_vl_ids(qwen2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_dir)
    assert len(tok) == N_RANKS + 14
    assert tok(QWEN2_VL_CHAT, add_special_tokens=False).input_ids == QWEN2_VL_IDS
    assert tok("What is 2+2?").input_ids == [3838, 374, 220, 17, 10, 17, 30]  # one token per digit
    text = "<|image_1|>\nRepresent the given image with the following question: Is the value 38 in 2015?\n"
    assert tok.decode(tok(text).input_ids) == text
    assert build_qwen2_tokenizer(qwen2_dir, RANKS) == Path(qwen2_dir)  # made once: the folder is reused


@needs_ranks
def test_shaped_backbone_on_the_qwen2_vocabulary(qwen2_dir, monkeypatch):
    """The model's vocabulary and special-token ids follow the tokenizer; the bench's inputs are
    Qwen2's tokens (chat turn and contents), and a full ReMatch step runs on them."""
    monkeypatch.setenv(TOKENIZER_ENV, qwen2_dir)
    assert bench_tokenizer() == qwen2_dir
    bb = shaped_backbone("tiny", "cpu", "fp32")
    proc, cfg = bb.processor, bb.hf.config
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (151655, 151652, 151653)
    assert bb.embed_tokens.weight.shape[0] >= len(proc.tokenizer) > 151000
    user, assistant = proc.chat_turn_ids(SYSTEM)
    assert user == QWEN2_VL_IDS[:14] and assistant == [151645, 198, 151644, 77091, 198]

    batch = make_batch(proc, 2, 112, "cpu")
    n_img = int(batch["image_grid_thw"][0].prod()) // 4
    words = proc.tokenizer("\nRepresent the given image with the following question: how many red circles are there?",
                           add_special_tokens=False).input_ids
    row = batch["qry"]["ids"][0, : batch["qry"]["lengths"][0]].tolist()
    assert row == [151652] + [151655] * n_img + [151653] + words

    model = ReMatchModel(bb, k=4, template="chat", matching="all")
    torch.manual_seed(0)
    out = model(batch)
    assert torch.isfinite(out["loss"])


@needs_ranks
def test_bench_flops_with_the_qwen2_tokenizer(qwen2_dir, tmp_path, monkeypatch):
    """`--tokenizer` reaches the token counts (fewer text tokens than the tiny BPE makes; image
    tokens unchanged) and is recorded in the JSON."""
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    runs = {}
    for name, extra in (("tiny", []), ("qwen2", ["--tokenizer", qwen2_dir])):
        out = tmp_path / f"{name}.json"
        bench_main(["--suite", "flops", "--shape", "2b", "--batch", "2", "--chunk", "0", "--out", str(out), *extra])
        runs[name] = json.loads(out.read_text())
        monkeypatch.delenv(TOKENIZER_ENV, raising=False)  # the CLI sets it for its run
    assert runs["tiny"]["tokenizer"].startswith("tiny BPE") and runs["qwen2"]["tokenizer"] == qwen2_dir
    for v in ("rematch", "rematch_no_matching"):
        assert runs["qwen2"]["runs"][v]["embed_tokens"] < runs["tiny"]["runs"][v]["embed_tokens"]
    assert runs["qwen2"]["runs"]["rematch"]["match_tokens"] < runs["tiny"]["runs"]["rematch"]["match_tokens"]
    image_tokens = 3 * 256  # 2 query images + 1 image positive, 448 px = 16x16 merged tokens each
    assert runs["qwen2"]["runs"]["baseline"]["embed_tokens"] > image_tokens


def test_read_ranks_names_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_ranks(tmp_path / "missing.tiktoken")
    empty = tmp_path / "other.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("pkg/readme.txt", "x")
    with pytest.raises(FileNotFoundError, match="holds no qwen.tiktoken"):
        read_ranks(empty)
    short = tmp_path / "qwen.tiktoken"
    short.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    with pytest.raises(ValueError, match="256 ranks, expected Qwen's 151643"):
        read_ranks(short)
    monkeypatch.delenv("REMATCH_QWEN_RANKS", raising=False)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps dashscope"):
        read_ranks(None)
    with pytest.raises(FileNotFoundError, match="no such folder .* rematch_pl.bench.vocab"):
        bench_processor(None, None, str(tmp_path / "no_tokenizer"))


@needs_ranks
def test_matching_prompt_pieces_tokenise_as_the_joined_prompt(qwen2_dir):
    """The matching prompt is tokenised piece by piece; with Qwen2's BPE the pieces must give the
    ids of the joined text at each boundary (a space ending a piece would be a lone " " token)."""
    from transformers import AutoTokenizer

    from rematch_pl.matching import D_CLOSE, D_OPEN, INSTRUCTION, Q_CLOSE, Q_OPEN

    tok = AutoTokenizer.from_pretrained(qwen2_dir)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for a, b in ((INSTRUCTION, Q_OPEN), (Q_CLOSE, D_OPEN), (D_CLOSE, D_OPEN)):
        assert ids(a) + ids(b) == ids(a + b), (a, b)
