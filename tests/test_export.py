"""Export and reuse: round trip through unmerged and merged exports, the model card, safe formats, generation."""

import re
from pathlib import Path

import pytest
import torch
from test_eval_support import eval_cfg, one_thread, trained_run_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SRC = Path(__file__).resolve().parents[1] / "src" / "rematch_pl"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def image(run_dir):
    import json

    out_dir = json.loads((run_dir / "adapter" / "meta.json").read_text())["config"]["data"]["synthetic"]["out_dir"]
    return sorted((Path(out_dir) / "eval" / "images" / "Syn_CLS").glob("*.png"))[0]


def test_export_round_trip_gives_the_same_embeddings(run_dir, image, tmp_path):
    from rematch_pl import Encoder
    from rematch_pl.eval import run
    from rematch_pl.export import main as export_main

    ev = tmp_path / "ev"
    ref = run(eval_cfg(f"ckpt={run_dir}", "eval.subsets=[Syn_CLS]", "eval.mmeb.max_queries=12",
                       cache_dir=tmp_path / "c"), ev)
    u, m = tmp_path / "unmerged", tmp_path / "merged"
    export_main([f"ckpt={run_dir}", f"out={u}", f"eval_dir={ev}"])
    export_main([f"ckpt={run_dir}", f"out={m}", "merge=true"])
    assert (u / "adapter" / "adapter_model.safetensors").is_file() and not (m / "adapter").exists()
    for d in (u, m):
        assert (d / "model" / "model.safetensors").is_file() and (d / "rematch_modules.safetensors").is_file()
        assert (d / "rematch.json").is_file() and (d / "model" / "tokenizer.json").is_file()
        assert not [p for p in d.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # no pickles
    card = (u / "README.md").read_text()
    assert "## Training config" in card and "| Model | CLS |" in card and "Encoder.from_pretrained" in card
    with pytest.raises(FileExistsError):
        export_main([f"ckpt={run_dir}", f"out={u}"])

    texts = ["two red circles", None, "<|image_1|>\nRepresent the given image for classification."]
    images = [None, str(image), str(image)]
    got = {}
    for name, src, merge in (("run", run_dir, False), ("adapter", run_dir / "adapter", False),
                             ("unmerged", u, False), ("merged", m, False), ("run, merged at load", run_dir, True),
                             ("unmerged, merged at load", u, True)):
        enc = Encoder.from_pretrained(src, device="cpu", merge_lora=merge)
        assert enc.model.backbone.has_lora == (name in ("run", "adapter", "unmerged")), name
        got[name] = (enc.encode(texts=texts, images=images, instruction="Find me an everyday image:"),
                     enc.encode(texts=texts, images=images, side="document"),
                     enc.score(("two red circles", None), [("red circle", None), (None, str(image))]))
    for name in ("adapter", "unmerged"):  # the very same weights: bitwise
        assert all(torch.equal(a, b) for a, b in zip(got["run"], got[name])), name
    for a, b in zip(got["run"], got["merged"]):  # LoRA folded into the weights: float32 rounding
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for name in ("run, merged at load", "unmerged, merged at load"):  # the same fold as the merged export
        assert all(torch.equal(a, b) for a, b in zip(got["merged"], got[name])), name
    # the eval entry point reads exported folders too, and scores them the same
    for d in (u, m):
        r = run(eval_cfg(f"ckpt={d}", "eval.subsets=[Syn_CLS]", "eval.mmeb.max_queries=12", cache_dir=tmp_path / "c"),
                tmp_path / f"ev_{d.name}")
        assert r["model"]["kind"] == "export" and r["cache"]["encoded"] > 0  # another fingerprint
        assert r["mmeb"]["Syn_CLS"]["hit@1"] == ref["mmeb"]["Syn_CLS"]["hit@1"]


def test_no_unsafe_loading_in_the_eval_and_export_code():
    files = [SRC / f for f in ("eval.py", "export.py", "encoder.py", "zeroshot.py", "generate.py", "eval_bench.py")]
    files += sorted((SRC / "evaluation").glob("*.py"))
    for f in files:
        text = f.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
        assert "import pickle" not in text and not re.search(r"(?<![\w.])(eval|exec)\(", text), f
        assert "trust_remote_code=True" not in text, f


def test_generate_uses_the_trained_lm_head(run_dir, image):
    from rematch_pl.encoder import load_model, read_spec
    from rematch_pl.generate import generate, generate_base, main, prompt_inputs

    model = load_model(read_spec(run_dir), "cpu")
    text, ids = generate(model, image, max_new_tokens=4, return_ids=True)
    assert isinstance(text, str) and 1 <= len(ids) <= 4
    inputs = prompt_inputs(model, image)
    with torch.no_grad():
        trained = model.backbone.model(**inputs).logits[0, -1]
        with model.backbone.model.disable_adapter():
            base = model.backbone.model(**inputs).logits[0, -1]
    assert ids[0] == int(trained.argmax())  # greedy decoding through the LM head with the adapter on
    assert not torch.allclose(trained, base)  # the trained adapter is used
    _, base_ids = generate_base(model, image, max_new_tokens=4, return_ids=True)
    assert base_ids[0] == int(base.argmax())
    res = main([f"ckpt={run_dir}", f"image={image}", "max_new_tokens=3", "compare_base=true"])
    assert set(res) == {"prompt", "rematch", "base"}


def test_base_weights_moved_since_training_are_found_through_backbone_path(run_dir, image, tmp_path, monkeypatch):
    """A run records its base weights' location; on another machine eval, export, generate and the
    Encoder take the new one, and a wrong one fails naming the setting."""
    import json
    import shutil

    from rematch_pl import Encoder
    from rematch_pl.backbone.tiny import resolve_tiny
    from rematch_pl.export import main as export_main
    from rematch_pl.generate import main as generate_main

    moved = tmp_path / "run_elsewhere"
    shutil.copytree(run_dir / "adapter", moved / "adapter")
    meta = json.loads((moved / "adapter" / "meta.json").read_text())
    meta["config"]["backbone"]["path"] = "/nonexistent/qwen2vl_base"  # the training machine's folder
    (moved / "adapter" / "meta.json").write_text(json.dumps(meta))
    base = str(tmp_path / "base")
    shutil.copytree(resolve_tiny("qwen2vl"), base)  # the same weights at their new location
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(OSError, match=r"backbone.path='/nonexistent/qwen2vl_base' could not be loaded: no such "
                                      r"folder(.|\n)*eval.backbone_path=, export's backbone_path="):
        Encoder.from_pretrained(moved, device="cpu")
    texts, images = ["two red circles", None], [None, str(image)]
    ref = Encoder.from_pretrained(run_dir, device="cpu").encode(texts=texts, images=images)
    got = Encoder.from_pretrained(moved, device="cpu", backbone_path=base).encode(texts=texts, images=images)
    assert torch.equal(ref, got)
    out = export_main([f"ckpt={moved}", f"out={tmp_path / 'exp'}", f"backbone_path={base}"])
    assert torch.equal(ref, Encoder.from_pretrained(out, device="cpu").encode(texts=texts, images=images))
    gen = generate_main([f"ckpt={moved}", f"backbone={base}", f"image={image}", "max_new_tokens=4"])
    assert gen["rematch"] == generate_main([f"ckpt={run_dir}", f"image={image}", "max_new_tokens=4"])["rematch"]
    from rematch_pl.eval import run

    kw = ("eval.subsets=[Syn_CLS]", "eval.mmeb.max_queries=12")
    r_moved = run(eval_cfg(f"ckpt={moved}", f"eval.backbone_path={base}", *kw, cache_dir=tmp_path / "c1"), tmp_path / "e1")
    r_ref = run(eval_cfg(f"ckpt={run_dir}", *kw, cache_dir=tmp_path / "c2"), tmp_path / "e2")
    assert r_moved["mmeb"]["Syn_CLS"]["hit@1"] == r_ref["mmeb"]["Syn_CLS"]["hit@1"]


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The run exported unmerged and merged."""
    from rematch_pl.export import export

    root = tmp_path_factory.mktemp("exports")
    return {m: export(str(run_dir), str(root / ("merged" if m else "unmerged")), merge=m) for m in (False, True)}


def test_backbone_path_relocates_an_unmerged_export_and_is_refused_for_a_merged_one(exports, tmp_path):
    """A merged export's model/ holds the trained weights: a backbone_path would replace them with the
    base model, so it is an error; an unmerged export's model/ is the base model, which may move."""
    import shutil

    from rematch_pl import Encoder
    from rematch_pl.encoder import read_spec
    from rematch_pl.export import export

    texts = ["two red circles"]
    with pytest.raises(ValueError, match=r"merged export(.|\n)*backbone_path"):
        read_spec(exports[True], "tiny://qwen2vl")
    with pytest.raises(ValueError, match="merged export"):
        Encoder.from_pretrained(exports[True], device="cpu", backbone_path="tiny://qwen2vl")
    with pytest.raises(ValueError, match="merged export"):
        export(str(exports[True]), str(tmp_path / "again"), backbone_path="tiny://qwen2vl")
    moved = tmp_path / "base_elsewhere"
    shutil.copytree(exports[False] / "model", moved)
    assert read_spec(exports[False], str(moved)).backbone["path"] == str(moved)
    ref = Encoder.from_pretrained(exports[False], device="cpu").encode(texts=texts)
    got = Encoder.from_pretrained(exports[False], device="cpu", backbone_path=str(moved)).encode(texts=texts)
    assert torch.equal(ref, got)


def test_missing_rematch_modules_is_an_error(run_dir, exports, tmp_path):
    """Without rematch_modules.safetensors the learnable tokens, projector and markers would keep
    their fresh initialisation: loading, exporting and evaluating stop, naming the file and folder."""
    import shutil

    from rematch_pl import Encoder
    from rematch_pl.eval import run
    from rematch_pl.export import export

    from safetensors import safe_open

    from rematch_pl.encoder import model_modules, read_spec

    with safe_open(str(run_dir / "adapter" / "rematch_modules.safetensors"), framework="pt") as f:
        saved = list(f.keys())
    expected = model_modules(read_spec(run_dir))  # what export checks for, from the config alone
    assert expected and all(any(k.startswith(m) for m in expected) for k in saved)
    assert all(any(k.startswith(m) for k in saved) for m in expected)
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir / "adapter", run_copy / "adapter")
    (run_copy / "adapter" / "rematch_modules.safetensors").unlink()
    exp = tmp_path / "export"
    shutil.copytree(exports[False], exp)
    (exp / "rematch_modules.safetensors").unlink()
    for src, folder in ((run_copy, run_copy / "adapter"), (run_copy / "adapter", run_copy / "adapter"), (exp, exp)):
        with pytest.raises(FileNotFoundError, match=rf"rematch_modules\.safetensors(.|\n)*{re.escape(str(folder))}"):
            Encoder.from_pretrained(src, device="cpu")
    for merge in (False, True):
        with pytest.raises(FileNotFoundError, match=r"rematch_modules\.safetensors"):
            export(str(run_copy), str(tmp_path / f"out_{merge}"), merge=merge)
        assert not (tmp_path / f"out_{merge}").exists()
    with pytest.raises(FileNotFoundError, match=r"rematch_modules\.safetensors"):
        run(eval_cfg(f"ckpt={exp}", "eval.subsets=[Syn_CLS]", "eval.mmeb.max_queries=4", "eval.cache=false"),
            tmp_path / "ev")
