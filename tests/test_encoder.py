"""`rematch_pl.Encoder`: a trained model as a plain embedding model and reranker."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_support import env, one_thread, trained_run_dir  # noqa: F401 (fixture)


def test_import_rematch_pl_stays_light():
    code = ("import sys, rematch_pl; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from rematch_pl import Encoder; assert Encoder.__name__ == 'Encoder'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env())


def test_content_text():
    from rematch_pl.encoder import content_text

    assert content_text("a cat", False) == "a cat"
    assert content_text("a cat", True, "Represent the given image with the following question:") == \
        "<|image_1|>\nRepresent the given image with the following question: a cat"
    assert content_text(None, True) == "<|image_1|>"
    assert content_text("<|image_1|> what?", True) == "<|image_1|> what?"  # an existing placeholder is kept


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lora_merged_at_load_has_its_own_cache_fingerprint():
    """Merging at load rounds differently from the branch (bf16): a cache written one way is never
    read the other way; without a pending adapter (base model, merged export) the key is unchanged."""
    from rematch_pl.encoder import ModelSpec, fingerprint, lora_pending

    lora = ModelSpec(backbone={"path": "tiny://qwen2vl", "lora": {"enabled": True, "r": 8}})
    assert lora_pending(lora)
    assert fingerprint(lora, "bf16", merge_lora=True) != fingerprint(lora, "bf16", merge_lora=False)
    for spec in (ModelSpec(backbone={"path": "tiny://qwen2vl", "lora": {"enabled": False}}),
                 ModelSpec(backbone={"path": "tiny://qwen2vl", "lora": {"enabled": True}}, merged=True)):
        assert not lora_pending(spec)
        assert fingerprint(spec, "bf16", merge_lora=True) == fingerprint(spec, "bf16", merge_lora=False)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_cache_fingerprint_covers_the_eval_time_settings():
    """eval.max_length truncates differently from the checkpoint's max_length and eval.compile runs
    other kernels: each has its own cache key; the checkpoint's own value keeps the key it had."""
    from rematch_pl.encoder import ModelSpec, fingerprint

    spec = ModelSpec(backbone={"path": "tiny://qwen2vl", "lora": {"enabled": False}}, max_length=1024)
    plain = fingerprint(spec, "fp32")
    assert fingerprint(spec, "fp32", max_length=1024) == fingerprint(spec, "fp32", max_length=None) == plain
    assert fingerprint(spec, "fp32", max_length=12) != plain
    assert fingerprint(spec, "fp32", compile=True) != plain
    assert fingerprint(spec, "fp32", compile=False) == plain


def test_encode_and_score(tmp_path_factory):
    import json

    from PIL import Image

    from rematch_pl import Encoder
    from rematch_pl.evaluation.rerank import match_probs

    run_dir = trained_run_dir(tmp_path_factory)
    out_dir = json.loads((run_dir / "adapter" / "meta.json").read_text())["config"]["data"]["synthetic"]["out_dir"]
    img = sorted((Path(out_dir) / "eval" / "images" / "Syn_CLS").glob("*.png"))[0]
    enc = Encoder.from_pretrained(run_dir, device="cpu")
    assert enc.device.type == "cpu" and enc.dtype == torch.float32  # the checkpoint's dtype on CPU
    e = enc.encode(texts=["two red circles", "blue square", None], images=[None, None, img],
                   instruction="Find me an everyday image that matches the given caption:")
    assert e.shape == (3, enc.dim) and torch.allclose(e.norm(dim=-1), torch.ones(3))
    # a PIL image and its path, one at a time or batched: the same embedding
    single = enc.encode(images=Image.open(img), instruction="Find me an everyday image that matches the given caption:")
    torch.testing.assert_close(single[0], e[2], atol=1e-5, rtol=1e-5)
    # files go through the evaluation engine (length order, a shared image, a repeated item, workers),
    # in-memory PIL images through the in-order loop: the same embeddings, in input order
    img2 = sorted((Path(out_dir) / "eval" / "images" / "Syn_CLS").glob("*.png"))[1]
    texts, imgs = ["What color?", "How many?", "two red circles", "What color?", None], [img, img, None, img, img2]
    ask = "Represent the given image with the following question:"
    files = enc.encode(texts=texts, images=imgs, instruction=ask, side="document", num_workers=2)
    pil = enc.encode(texts=texts, images=[Image.open(p) if p else None for p in imgs], instruction=ask,
                     side="document")
    torch.testing.assert_close(files, pil, atol=1e-5, rtol=1e-5)
    assert torch.equal(files[0], files[3]) and not torch.allclose(files[0], files[1])
    d = enc.encode(texts=["two red circles"], side="document")
    q = enc.encode(texts=["two red circles"], side="query")
    assert not torch.allclose(d, q)  # separate query / document token sets
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        enc.encode(texts=["a", "b"], images=[img])
    with pytest.raises(ValueError, match="side="):
        enc.encode(texts=["a"], side="both")
    with pytest.raises(ValueError, match="needs texts and/or images"):
        enc.encode()
    p = enc.score("two red circles", ["red circle", (None, str(img)), {"text": "blue", "image": None}])
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())
    direct = match_probs(enc.model, [("two red circles", None)], [("<|image_1|>", str(img))])
    torch.testing.assert_close(p[1:2], direct, atol=1e-6, rtol=1e-5)


def test_eval_bench_encode_suite_runs(tmp_path):
    from rematch_pl.eval_bench import main

    res = main(["--suite", "encode", "--n-image", "4", "--n-text", "6", "--batch", "4", "--out", str(tmp_path / "b.json")])
    assert res["image_items"] == 4 and res["text_items"] == 6 and res["image_items_per_s"] > 0
    assert res["mmeb_counts"]["image_items"] > 0 and res["mmeb_projected_s"] > 0 and (tmp_path / "b.json").is_file()
    assert res["lora"] == "merged"  # as eval loads a LoRA checkpoint by default
    for kind in ("image", "text"):  # the encode time split into the model's share and the wait for inputs
        assert res[f"{kind}_model_s"] > 0 and res[f"{kind}_data_wait_s"] >= 0
        assert res[f"{kind}_model_s"] + res[f"{kind}_data_wait_s"] <= res[f"{kind}_s"] + 0.02
    sep = main(["--suite", "encode", "--n-image", "4", "--n-text", "6", "--batch", "4", "--lora", "separate"])
    assert sep["lora"] == "separate" and sep["image_tokens_per_item"] == res["image_tokens_per_item"]


def test_eval_bench_memory_suite_plans_the_worst_batch():
    from rematch_pl.eval_bench import main

    res = main(["--suite", "memory", "--configs", "4:none,8:none,8:200"])
    rows = [(r["batch"], r["max_tokens"], r["rows"]) for r in res["runs"]]
    assert rows == [(4, None, 4), (8, None, 8), (8, 200, 2)]  # 200 tokens hold two ~90-token rows
    peak = [r["peak_gib"] for r in res["runs"]]
    assert peak[2] < peak[0] < peak[1] and all(r["fits"] for r in res["runs"])
    assert res["runs"][1]["patches"] == 2 * res["runs"][0]["patches"] > 0


def test_eval_bench_roofline_suite_floors_the_mmeb_eval(tmp_path):
    """Roofline of the eval forward per item (meta device) and the MMEB floors it implies: eager
    kernels (matrix + memory-bound) above the matrix products alone; an image item (vision tower
    included) costs more than a text item (the op counts themselves: tests/test_bench_roofline.py)."""
    from rematch_pl.eval_bench import main

    res = main(["--suite", "roofline", "--rows", "4", "--out", str(tmp_path / "r.json")])
    img, txt = res["image"], res["text"]
    assert img["roofline_ms"] == pytest.approx(img["matrix_ms"] + img["memory_ms"]) and img["memory_ms"] > 0
    assert 0 < img["vision_ms"] < img["roofline_ms"] and img["roofline_ms"] > txt["roofline_ms"] > 0
    assert 0 < img["mfu_ceiling"] < 1
    assert res["mmeb_roofline_s"] > res["mmeb_matrix_only_s"] > 0 and (tmp_path / "r.json").is_file()
    c = res["mmeb_counts"]
    assert res["mmeb_roofline_s"] == pytest.approx(
        (c["image_items"] * img["roofline_ms"] + c["text_items"] * txt["roofline_ms"]) / 1e3)


@pytest.mark.slow  # ~20 s: compiles the tiny model
def test_compiled_model_gives_the_eager_embeddings():
    """eval.compile=true (`load_model(compile=True)`, which `Encoder.from_pretrained(compile=True)`
    calls: decoder layers and vision blocks compiled after the LoRA merge) encodes image and text
    items as the eager model does."""
    from tinyutil import triple_batch

    from rematch_pl.encoder import ModelSpec, load_model

    spec = ModelSpec(backbone={"path": "tiny://qwen2vl", "lora": {"enabled": True, "r": 8, "alpha": 16}})
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = load_model(spec, "cpu", "fp32", merge_lora=True, compile=compiled)
        layers = model.backbone.hf.model.language_model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        b = triple_batch(model.backbone.processor)
        with torch.no_grad():
            out[compiled] = [model.encode(b[s], b["pixel_values"], b["image_grid_thw"]) for s in ("qry", "pos")]
    for eager, compiled in zip(out[False], out[True]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
