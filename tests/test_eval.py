"""End to end: `python -m rematch_pl.eval` on a tiny model trained with the real entry point.

MMEB on the synthetic MMEB-eval subsets (local clone layout), the zero-shot suite on synthetic sets in
each public layout and in the MMEB-eval layout; cache, resume, 2-process DDP, reranking, a collapsed
model, the base backbone.
"""

import json
import subprocess
import sys

import pytest
import torch
from test_eval_support import env, eval_cfg, metrics_only, one_thread, trained_run_dir  # noqa: F401 (fixture)

from rematch_pl.eval import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SUBSET_ARGS = ["eval.mmeb.max_queries=24", "eval.zeroshot.limit=12"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory):
    return tmp_path_factory.mktemp("cache_a")


@pytest.fixture(scope="module")
def reference(run_dir, cache_a, tmp_path_factory):
    """eval=all in process: the reference every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    res = run(eval_cfg(f"ckpt={run_dir}", "eval=all", cache_dir=cache_a), out)
    return res, out


def _cli(*args, timeout=900):
    p = subprocess.run([sys.executable, "-m", "rematch_pl.eval", *args], env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_trained_model_beats_chance_and_tables_are_written(reference):
    res, out = reference
    mmeb = res["mmeb"]
    assert sorted(mmeb) == ["Syn_CLS", "Syn_I2T", "Syn_T2I", "Syn_VG", "Syn_VQA"]
    hit1 = sum(r["hit@1"] for r in mmeb.values()) / len(mmeb)
    chance = sum(r["chance@1"] for r in mmeb.values()) / len(mmeb)
    assert hit1 > 1.5 * chance, (hit1, chance)
    assert res["table1"]["Overall"] == pytest.approx(100 * hit1, abs=0.01)
    # zero-shot, short captions (the training distribution): Recall@5 above its chance level
    zs = res["zeroshot"]
    r5 = [zs[s][d]["R@5"] for s in ("flickr30k", "coco") for d in ("t2i", "i2t")]
    assert sum(r5) / 4 > 100 * 5 / 12, r5
    for name in ("flickr30k", "coco", "sharegpt4v", "urban1k"):
        assert zs[name]["images"] == 12
    assert set(zs["sugarcrepe"]["parts"]) == {"replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att",
                                              "add_obj", "add_att"}
    for f in ("table1.md", "table1.json", "table2.md", "table2.json", "mmeb_subsets.md", "results.json",
              "mmeb/Syn_CLS.json", "zeroshot/flickr30k.json", "zeroshot/sugarcrepe.json"):
        assert (out / f).is_file(), f
    assert "| CLS | VQA | RET | VG | IND | OOD | Overall |" in (out / "table1.md").read_text()
    t = res["timing"]
    assert t["model_s"] > 0 and t["data_wait_s"] >= 0 and t["model_s"] + t["data_wait_s"] <= t["encode_s"] + 0.02
    assert "Flickr30K t->i" in (out / "table2.md").read_text()


def test_cli_equals_in_process_and_second_run_encodes_nothing(reference, run_dir, cache_a, tmp_path, monkeypatch):
    res, _ = reference
    out = tmp_path / "cli"
    _cli(f"ckpt={run_dir}", "eval=all", f"hydra.run.dir={out}", f"eval.cache_dir={tmp_path / 'cache_b'}",
         "logger=csv", "eval.accelerator=cpu", "eval.num_workers=1", *SUBSET_ARGS)
    cli = json.loads((out / "results.json").read_text())
    assert metrics_only(cli) == metrics_only(res)  # DataLoader workers, subprocess: same numbers
    c = cli["cache"]  # a fresh cache: hits are only items shared by several subsets / sets
    assert c["encoded"] > 0 and c["encoded"] + c["cache_hits"] == c["unique"]
    # a second run over the filled cache (with the W&B table logging path switched on, W&B disabled)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    again = run(eval_cfg(f"ckpt={run_dir}", "eval=all", "logger=wandb", cache_dir=cache_a), tmp_path / "again")
    assert again["cache"]["encoded"] == 0 and again["cache"]["cache_hits"] == again["cache"]["unique"]
    assert metrics_only(again) == metrics_only(res)  # identical, not merely close


def test_zeroshot_mmeb_layout_equals_public_layouts(reference, run_dir, cache_a, tmp_path):
    res, _ = reference
    conv = run(eval_cfg(f"ckpt={run_dir}", "eval=zeroshot", "eval.zeroshot.synthetic_layout=mmeb", cache_dir=cache_a),
               tmp_path)
    assert conv["cache"]["encoded"] == 0  # the very same items
    assert metrics_only(conv)["zeroshot"] == metrics_only(res)["zeroshot"]


def test_faiss_scoring_equals_torch(reference, run_dir, cache_a, tmp_path):
    """eval.scoring=faiss (the real faiss-cpu index) gives the zero-shot table of the exact torch scoring."""
    res, _ = reference
    fa = run(eval_cfg(f"ckpt={run_dir}", "eval=zeroshot", "eval.scoring=faiss", cache_dir=cache_a), tmp_path)
    assert fa["cache"]["encoded"] == 0
    assert metrics_only(fa)["zeroshot"] == metrics_only(res)["zeroshot"]


def test_interrupted_run_resumes(reference, run_dir, tmp_path, monkeypatch):
    import rematch_pl.evaluation.engine as engine_mod

    res, _ = reference
    real, calls = engine_mod.embed_batch, {"n": 0}

    class Interrupted(Exception):
        pass

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise Interrupted
        return real(*a, **k)

    cfg = eval_cfg(f"ckpt={run_dir}", "eval=all", "eval.subsets=[Syn_CLS,Syn_T2I,flickr30k]", "eval.flush_every=8",
                   "eval.batch_size=8", cache_dir=tmp_path / "cache_c")
    monkeypatch.setattr(engine_mod, "embed_batch", dying)
    with pytest.raises(Interrupted):
        run(cfg, tmp_path / "first")
    chunks = list((tmp_path / "cache_c").rglob("*.safetensors"))
    assert len(chunks) >= 5  # written before the interruption, one per batch of 8
    monkeypatch.setattr(engine_mod, "embed_batch", real)
    resumed = run(cfg, tmp_path / "second")
    c = resumed["cache"]
    assert c["cache_hits"] >= 5 * 7 and c["encoded"] == c["unique"] - c["cache_hits"] > 0
    ref = metrics_only(res)
    assert metrics_only(resumed) == {"mmeb": {k: ref["mmeb"][k] for k in ("Syn_CLS", "Syn_T2I")},
                                     "zeroshot": {"flickr30k": ref["zeroshot"]["flickr30k"]}}


def test_two_process_ddp_equals_single_process(reference, run_dir, tmp_path):
    res, _ = reference
    out = tmp_path / "ddp"
    subsets = "[Syn_CLS,Syn_T2I,Syn_VG,coco,sugarcrepe]"
    _cli(f"ckpt={run_dir}", "eval=all", f"eval.subsets={subsets}", f"hydra.run.dir={out}",
         f"eval.cache_dir={tmp_path / 'cache_d'}", "logger=csv", "eval.accelerator=cpu", "eval.devices=2",
         "eval.num_workers=0", "eval.threads=1", "eval.progress=false", *SUBSET_ARGS)
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["model"]["world_size"] == 2
    ref = metrics_only(res)
    want = {"mmeb": {k: ref["mmeb"][k] for k in ("Syn_CLS", "Syn_T2I", "Syn_VG")},
            "zeroshot": {k: ref["zeroshot"][k] for k in ("coco", "sugarcrepe")}}
    assert metrics_only(ddp) == want
    assert ddp["cache"]["encoded"] + ddp["cache"]["cache_hits"] == ddp["cache"]["unique"]
    assert any("-r1-" in p.name for p in (tmp_path / "cache_d").rglob("*.safetensors"))  # rank 1 encoded a shard


def test_reranking_off_changes_nothing_and_on_uses_the_matching_head(reference, run_dir, cache_a, tmp_path):
    from rematch_pl import Encoder
    from rematch_pl.data.mmeb import load_eval_subset
    from rematch_pl.data.synthetic import synthetic_paths

    res, _ = reference
    off = run(eval_cfg(f"ckpt={run_dir}", "eval.subsets=[Syn_I2T,Syn_VQA]", "eval.rerank_top_k=0", cache_dir=cache_a),
              tmp_path / "off")
    assert metrics_only(off)["mmeb"] == {k: metrics_only(res)["mmeb"][k] for k in ("Syn_I2T", "Syn_VQA")}
    assert all("rerank" not in r for r in off["mmeb"].values())
    on = run(eval_cfg(f"ckpt={run_dir}", "eval.subsets=[Syn_I2T,Syn_VQA]", "eval.rerank_top_k=3", cache_dir=cache_a),
             tmp_path / "on")
    assert on["cache"]["encoded"] == 0
    assert sum(r["rerank"]["top1_changed"] for r in on["mmeb"].values()) > 0  # the head flips some top-1s
    enc = Encoder.from_pretrained(run_dir, device="cpu")
    paths = synthetic_paths(json.loads((run_dir / "adapter" / "meta.json").read_text())["config"]["data"]
                            ["synthetic"]["out_dir"])
    for subset, r in on["mmeb"].items():
        rr = r["rerank"]
        assert rr["hit@1_before"] == res["mmeb"][subset]["hit@1"]  # reranking starts from the same ranking
        assert r["hit@1"] == res["mmeb"][subset]["hit@1"]
        es = load_eval_subset(paths["eval"], paths["eval_images"], subset, max_queries=24)
        for qi in range(4):  # independent check through the Encoder
            q = es.queries[qi]
            cands = es.candidates[qi]
            qe = enc.encode(texts=[es.items[q][0]], images=[es.image_file(q)])
            de = enc.encode(texts=[es.items[c][0] for c in cands], images=[es.image_file(c) for c in cands],
                            side="document")
            top = (qe @ de.T)[0].topk(3).indices.tolist()
            assert rr["top1_before"][qi] == top[0]
            p = enc.score((es.items[q][0], es.image_file(q)), [(es.items[cands[j]][0], es.image_file(cands[j]))
                                                                 for j in top])
            chosen = top.index(rr["top1_after"][qi])
            assert p[chosen] >= p.max() - 1e-5  # the reranked top-1 is the matching head's favourite


def test_collapsed_model_never_scores_above_chance(run_dir, tmp_path):
    """A model whose embeddings are all equal: strict ties give 0 everywhere (upstream's argmax: 100%)."""
    from rematch_pl.encoder import load_model, read_spec

    spec = read_spec(run_dir)
    model = load_model(spec, "cpu")
    with torch.no_grad():
        model.backbone.hf.model.language_model.norm.weight.zero_()  # every hidden state -> 0
    res = run(eval_cfg(f"ckpt={run_dir}", "eval=all", "eval.subsets=[Syn_CLS,Syn_T2I,flickr30k,sugarcrepe]",
                       "eval.mmeb.max_queries=8", "eval.zeroshot.limit=6"), tmp_path, model=model, spec=spec)
    assert res["cache"]["dir"] is None  # an in-memory model is never cached on disk
    for r in res["mmeb"].values():
        assert r["hit@1"] == 0.0 and r["hit@5"] <= 5 / 12
    assert res["table1"]["Overall"] == 0.0
    fl = res["zeroshot"]["flickr30k"]
    assert fl["t2i"]["R@1"] == 0.0 and fl["i2t"]["R@1"] == 0.0
    assert all(v["accuracy"] == 0.0 for v in res["zeroshot"]["sugarcrepe"]["parts"].values())


def test_separate_lora_branch_scores_as_the_merged_default(reference, run_dir, cache_a, tmp_path):
    """eval.merge_lora=false keeps PEFT's branch: its own cache key, the same scores (fp32 on CPU)."""
    res, _ = reference
    sep = run(eval_cfg(f"ckpt={run_dir}", "eval=mmeb", "eval.merge_lora=false", cache_dir=cache_a), tmp_path)
    assert sep["cache"]["encoded"] == sep["cache"]["unique"] > 0  # nothing read from the merged model's cache
    assert sep["model"]["fingerprint"] != res["model"]["fingerprint"]
    assert (sep["model"]["lora"], res["model"]["lora"]) == ("separate", "merged")
    assert metrics_only(sep)["mmeb"] == metrics_only(res)["mmeb"]


def test_max_length_override_is_not_served_from_the_cache(run_dir, tmp_path):
    """eval.max_length truncates the items differently: a cache filled at the checkpoint's max_length
    is not read, and the run scores as the same run without a cache."""
    kw = (f"ckpt={run_dir}", "eval.subsets=[Syn_I2T,Syn_VQA]", "eval.mmeb.max_queries=8")
    first = run(eval_cfg(*kw, cache_dir=tmp_path / "c"), tmp_path / "default")
    short = run(eval_cfg(*kw, "eval.max_length=12", cache_dir=tmp_path / "c"), tmp_path / "short")
    assert short["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert short["cache"]["encoded"] == short["cache"]["unique"] > 0  # nothing from the other length's entries
    uncached = run(eval_cfg(*kw, "eval.max_length=12", "eval.cache=false"), tmp_path / "uncached")
    assert metrics_only(short) == metrics_only(uncached) != metrics_only(first)
    again = run(eval_cfg(*kw, "eval.max_length=12", cache_dir=tmp_path / "c"), tmp_path / "again")
    assert again["cache"]["encoded"] == 0 and metrics_only(again) == metrics_only(short)


def test_subset_names_that_pass_the_check_are_the_ones_run(tmp_path):
    """eval.subsets names zero-shot sets as loosely as MMEB subsets (case and punctuation aside):
    every name the check accepts runs."""
    from rematch_pl.eval import _check_subset_names, zeroshot_sets

    cfg = eval_cfg("eval=zeroshot", "eval.subsets=[Flickr-30K,Urban_1K,coco]", f"paths.data_dir={tmp_path}")
    _check_subset_names(cfg, [])
    assert sorted(zeroshot_sets(cfg)) == ["coco", "flickr30k", "urban1k"]


def test_base_backbone_without_checkpoint(tmp_path):
    res = run(eval_cfg("eval.subsets=[Syn_CLS]", "eval.mmeb.max_queries=8", cache_dir=tmp_path / "c"), tmp_path)
    assert res["model"]["kind"] == "base" and res["model"]["ckpt"] is None
    assert 0.0 <= res["mmeb"]["Syn_CLS"]["hit@1"] <= 1.0 and (tmp_path / "table1.md").is_file()


def test_bad_settings_fail_early(run_dir, tmp_path):
    from rematch_pl.eval import EvalConfigError

    with pytest.raises(EvalConfigError, match="eval.subsets: unknown name"):
        run(eval_cfg(f"ckpt={run_dir}", "eval.subsets=[NoSuchSubset]"), tmp_path)
    with pytest.raises(EvalConfigError, match=r"\['Flickr-30K'\]: zero-shot sets, .* add eval=all"):
        run(eval_cfg(f"ckpt={run_dir}", "eval.subsets=[Syn_CLS,Flickr-30K]"), tmp_path)  # eval=mmeb
    with pytest.raises(EvalConfigError, match="eval.scoring"):
        run(eval_cfg(f"ckpt={run_dir}", "eval.scoring=annoy"), tmp_path)
    with pytest.raises(EvalConfigError, match="eval.compile"):
        run(eval_cfg(f"ckpt={run_dir}", "eval.compile=sometimes"), tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        run(eval_cfg(f"ckpt={tmp_path}"), tmp_path)
