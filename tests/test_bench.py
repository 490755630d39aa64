"""The benchmark entry points run on CPU and write their figures (the figures themselves are not tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rematch_pl.bench import VARIANTS, device_busy_s, largest_batch, main, suite_train


@pytest.mark.parametrize("capacity", [0, 1, 7, 8, 9, 100, 511, 512, 1000])
def test_largest_batch_search(capacity):
    tried = []

    def fits(B):
        tried.append(B)
        return B <= capacity

    best, capped = largest_batch(fits, start=8, limit=512)
    assert best <= capacity and fits(best) or best == 0
    assert capped == (capacity >= 512)
    if capacity >= 512:
        assert best == 512
    else:  # within 1/8 of the true capacity
        assert capacity - best <= max(1, best // 8)
    assert len(tried) < 25


def test_train_and_max_batch_suites_write_json(tmp_path):
    res = main(["--suite", "train", "--batches", "4", "--chunk", "2", "--iters", "1", "--out", str(tmp_path / "t.json")])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"]))
    got = {(r["variant"], r["gradcache_chunk"]) for r in saved["runs"]}
    assert {("baseline", None), ("rematch", None), ("baseline", 2), ("rematch", 2)} <= got
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in saved["runs"])
    assert any("ratio_to_baseline" in r for r in saved["runs"] if r["variant"] == "rematch")
    res = main(["--suite", "max_batch", "--start", "2", "--limit", "4", "--chunk", "2", "--out", str(tmp_path / "m.json")])
    assert [(r["variant"], r["gradcache_chunk"], r["max_batch"]) for r in res["runs"]] == [
        ("baseline", None, 4), ("baseline", 2, 4), ("rematch", None, 4), ("rematch", 2, 4)]  # CPU: bounded by --limit


def test_train_suite_runs_the_chosen_variants_and_gradcache_setting():
    """`--variants` and `--gradcache on` (the GPU script's 128-triple run): only those runs, and
    full ReMatch's ratio is to the baseline with the same GradCache chunks."""
    res = main(["--suite", "train", "--batches", "2,4", "--chunk", "2", "--iters", "1", "--variants",
                "baseline,rematch", "--gradcache", "on"])
    got = [(r["variant"], r["batch"], r["gradcache_chunk"]) for r in res["runs"]]
    assert got == [("baseline", 2, None), ("rematch", 2, None), ("baseline", 4, 2), ("rematch", 4, 2)]
    by = {(r["variant"], r["batch"]): r for r in res["runs"]}
    assert by[("rematch", 4)]["ratio_to_baseline"] == pytest.approx(by[("rematch", 4)]["step_s"] / by[("baseline", 4)]["step_s"])
    with pytest.raises(SystemExit):
        main(["--suite", "train", "--batches", "2", "--variants", "rematch,nope"])
    with pytest.raises(ValueError, match="unknown variant"):
        suite_train("tiny", "cpu", "fp32", [2], 112, 1, 0, variants=["nope"])


def test_train_suite_gradcache_on_covers_every_variant_and_recompute_is_chosen():
    """`--gradcache on` chunks every variant (feat_feat's ratio is to K=16 without matching at the
    same chunks); `--recompute on` turns gradient checkpointing on for the tiny shape too."""
    res = main(["--suite", "train", "--batches", "4", "--chunk", "2", "--iters", "1", "--warmup", "0", "--variants",
                "baseline,rematch_feat_feat,rematch_no_matching", "--gradcache", "on", "--recompute", "on",
                "--lora-dropout", "0.05"])
    assert res["recompute"] is True and res["lora_dropout"] == 0.05
    from rematch_pl.bench import shaped_backbone

    drops = {m.p for n, m in shaped_backbone("tiny", "cpu", "fp32", lora_dropout=0.05).hf.named_modules()
             if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n}
    assert drops == {0.05}  # the benchmarked step applies it to every LoRA input
    assert [(r["variant"], r["gradcache_chunk"]) for r in res["runs"]] == [
        ("baseline", 2), ("rematch_feat_feat", 2), ("rematch_no_matching", 2)]
    by = {r["variant"]: r for r in res["runs"]}
    ff, nm = by["rematch_feat_feat"], by["rematch_no_matching"]
    assert ff["ratio_to_no_matching"] == pytest.approx(ff["step_s"] / nm["step_s"])
    assert main(["--suite", "train", "--batches", "2", "--chunk", "0", "--iters", "1", "--warmup", "0",
                 "--variants", "baseline"])["recompute"] is False


def test_shaped_backbone_compiles_the_decoder_layers_on_request():
    """`--compile` builds the backbone as `backbone.compile=true` does (the compiled step's
    equality with the eager one: tests/test_backbone.py)."""
    from rematch_pl.bench import shaped_backbone

    layers = lambda bb: list(bb.hf.model.language_model.layers)  # noqa: E731
    assert all(layer._compiled_call_impl is None for layer in layers(shaped_backbone("tiny", "cpu", "fp32")))
    assert all(layer._compiled_call_impl is not None
               for layer in layers(shaped_backbone("tiny", "cpu", "fp32", compile=True)))


def test_lora_suite_times_both_branch_orders_of_every_projection(tmp_path):
    """`--suite lora` (2B projections, a few tokens): each of the seven projections timed both
    ways, both as close to float64 as fp32 allows; `--lora-unfused` reaches the train suite."""
    res = main(["--suite", "lora", "--shape", "2b", "--tokens", "8", "--iters", "1", "--out", str(tmp_path / "l.json")])
    assert [r["projection"] for r in res["runs"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]
    assert dict((r["projection"], (r["in"], r["out"])) for r in res["runs"])["down_proj"] == (8960, 1536)
    for r in res["runs"]:
        assert r["fused_s"] > 0 and r["unfused_s"] > 0
        assert 0 < r["rel_err_fused"] < 1e-6 and 0 < r["rel_err_unfused"] < 1e-6
    assert json.loads((tmp_path / "l.json").read_text())["layer_speedup"] == pytest.approx(res["layer_speedup"])
    with pytest.raises(SystemExit, match="2b or 7b"):
        main(["--suite", "lora", "--shape", "tiny"])
    res = main(["--suite", "train", "--batches", "2", "--chunk", "0", "--iters", "1", "--variants", "baseline",
                "--lora-unfused"])
    assert res["lora_fused"] is False


def test_device_busy_counts_each_kernel_once():
    """Host ops carry their kernels' time as self device time; only the device events count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    ev = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=300.0),  # aten::mm
          SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=300.0),  # its kernel
          SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=200.0),  # a copy
          SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0)]
    assert device_busy_s(ev) == pytest.approx(500e-6)


def test_gpu_suite_refuses_a_cpu_clearly():
    with pytest.raises(SystemExit, match="CUDA"):
        main(["--suite", "gpu", "--device", "cpu"])


def test_flops_suite_prices_the_real_token_layout(tmp_path):
    """2B-shaped FLOPs per step (no device): the matching pass and the K tokens add work in the
    expected order, and the token counts are those of the 448 px layout (256 image tokens per image)."""
    res = main(["--suite", "flops", "--batch", "2", "--chunk", "0", "--out", str(tmp_path / "f.json")])
    r = res["runs"]
    assert r["rematch"]["tflop"] > r["rematch_feat_feat"]["tflop"] > r["rematch_no_matching"]["tflop"] \
        > r["baseline"]["tflop"] > 0
    assert r["baseline"]["match_tokens"] == r["rematch_no_matching"]["match_tokens"] == 0
    assert r["rematch"]["match_tokens"] > r["rematch_feat_feat"]["match_tokens"] > 0
    # 2 queries + 1 image positive, 256 tokens each at 448 px: the embedding passes hold them
    assert r["baseline"]["embed_tokens"] > 3 * 256
    gc = main(["--suite", "flops", "--batch", "2", "--chunk", "1"])["runs"]
    assert gc["rematch"]["tflop"] > r["rematch"]["tflop"]  # GradCache's extra no-grad forward


def test_profile_and_vision_suites_run_on_cpu(tmp_path):
    res = main(["--suite", "profile", "--batch", "2", "--out", str(tmp_path / "p.json")])
    runs = res["runs"]
    assert set(runs["rematch"]["phase_s"]) == {"vision", "embed", "matching"}
    assert "matching" not in runs["baseline"]["phase_s"]
    assert all(r["aten_ops"] > 0 and r["top"] for r in runs.values())
    assert runs["rematch"]["aten_ops"] > runs["rematch_no_matching"]["aten_ops"]
    for r in runs.values():  # each operator's time against its roofline (priced for an H100 on a CPU)
        e = r["roofline"]
        assert e["roofline_s"] > 0 and e["busy_s"] == pytest.approx(sum(r["by_op"].values()))
        assert e["top"] and all(t["measured_s"] == r["by_op"][t["op"]] and t["roofline_s"] > 0 for t in e["top"])
        assert "aten::mm" in {t["op"] for t in e["top"]}
    assert runs["rematch"]["roofline"]["roofline_s"] > runs["baseline"]["roofline"]["roofline_s"]
    res = main(["--suite", "vision", "--batch", "3", "--iters", "1"])
    assert all(res[f"{k}_s"] > 0 for k in ("per_image", "grouped", "grouped_folded_mlp", "default"))
    assert res["speedup_default"] == pytest.approx(res["per_image_s"] / res["default_s"])


@pytest.mark.slow  # ~40 s: 20 planned steps
def test_memory_suite_plans_every_variant_and_searches_within_the_budget(tmp_path):
    """Tiny shape on meta: every variant is planned, GradCache lowers the full step's peak, and
    the batch search stops where the planned peak leaves the (tiny) budget."""
    budget = 0.05  # GiB: the tiny full ReMatch step crosses it between 4 and 16 triples
    res = main(["--suite", "memory", "--batches", "4", "--chunk", "2", "--search", "16", "--gpu-gib", str(budget),
                "--reserve-gib", "0", "--out", str(tmp_path / "mem.json")])
    saved = json.loads((tmp_path / "mem.json").read_text())
    rows = {(r["variant"], r["gradcache_chunk"]): r for r in saved["runs"]}
    assert set(rows) == {(v, gc) for v in ("baseline", "rematch", "rematch_feat_feat", "rematch_no_matching")
                         for gc in (None, 2)}
    for r in rows.values():
        assert r["peak_gib"] >= r["weights_gib"] + r["optimizer_gib"] + r["transient_gib"] > 0
        assert r["fits"] == (r["peak_gib"] <= budget)
    assert rows["rematch", 2]["peak_gib"] < rows["rematch", None]["peak_gib"]
    assert rows["baseline", None]["peak_gib"] < rows["rematch", None]["peak_gib"]
    planned = {(r["variant"], r["gradcache_chunk"], r["batch"]): r["fits"] for r in saved["runs"] + saved["searched"]}
    for s in res["largest_batch"]:
        best = s["max_batch"]
        assert planned[s["variant"], s["gradcache_chunk"], best]
        if not s["limit_reached"]:  # a larger batch was planned and does not fit
            assert any(not ok for (v, gc, B), ok in planned.items()
                       if (v, gc) == (s["variant"], s["gradcache_chunk"]) and B > best)
    full = next(s for s in res["largest_batch"] if s["variant"] == "rematch" and s["gradcache_chunk"] is None)
    assert not full["limit_reached"]


def test_memory_suite_plans_the_lora_branch_it_is_given():
    """`--lora-compute fp32` (PEFT's fp32 LoRA branch) is planned, not ignored: on a bf16 backbone
    its fp32 copies of the LoRA inputs raise the planned activations above the bf16 branch's."""
    def transient(*extra: str) -> float:
        res = main(["--suite", "memory", "--batches", "4", "--dtype", "bf16", *extra])
        assert res["lora_compute"] == (extra[-1] if extra else "backbone")
        return next(r["transient_gib"] for r in res["runs"] if r["variant"] == "rematch")

    assert transient("--lora-compute", "fp32") > transient()


def test_syncs_suite_audits_every_step_kind(tmp_path):
    res = main(["--suite", "syncs", "--batch", "2", "--chunk", "1", "--image-size", "56", "--out", str(tmp_path / "s.json")])
    names = list(res["runs"])
    assert [n for n in names if n.startswith("step ")] == [f"step {v}" for v in VARIANTS]
    assert any(n.startswith("GradCache step") for n in names) and "embedding pass (inference)" in names
    assert all(v == [] for v in res["runs"].values()), res["runs"]
    assert json.loads((tmp_path / "s.json").read_text())["runs"] == res["runs"]


def _gpu_bench_parts():
    """`scripts/gpu_bench.sh`: the default SUITES and each part's command lines (module, args), the
    shell's variables expanded as the script would."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "scripts" / "gpu_bench.sh").read_text()
    suites = re.search(r"SUITES=\$\{SUITES:-([^}]*)\}", text).group(1).split()
    strategies = re.search(r"STRATEGIES:-([^}]*)\}", text).group(1).split()
    body = text[text.index("case $suite in"):text.index("esac")].replace("\\\n", " ")
    parts = {}
    for name, block in re.findall(r"^\s{4}(\w+)\)(.*?);;", body, flags=re.S | re.M):
        block = re.sub(r"\$\{EVAL_BENCH_ARGS:-([^}]*)\}", r"\1", block).replace("$OUT", "/tmp/out")
        cmds = []
        for line in re.findall(r"\brun \S+ ((?:rematch_pl\.\w+|pytest) [^\n]*)", block):
            for s in (strategies if "$s" in line else [None]):
                cmds.append(shlex.split(line.replace("$s", s) if s else line))
        parts[name] = cmds
    return suites, parts


def test_gpu_bench_script_parts_exist_and_their_command_lines_parse():
    """A GPU session is short: every part the script would run must exist and its arguments parse
    (the benchmarks' parsers, the variants named, the training overrides composed and validated)."""
    from hydra import compose, initialize_config_dir

    from rematch_pl import eval_bench
    from rematch_pl.bench import cli, pick_variants
    from rematch_pl.build import CONF_DIR
    from rematch_pl.config import validate

    suites, parts = _gpu_bench_parts()
    assert sorted(suites) == sorted(parts), "every case in SUITES and every SUITE a case"
    seen = set()
    for name, cmds in parts.items():
        assert cmds, name
        for module, *args in cmds:
            seen.add(module)
            if module == "rematch_pl.bench":
                a = cli.parser().parse_args(args)
                if a.variants:
                    pick_variants(a.variants.split(","))
            elif module == "rematch_pl.eval_bench":
                eval_bench.parser().parse_args(args)
            elif module == "pytest":  # the selection collects the CUDA cases (here they would be skipped)
                res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], capture_output=True,
                                     text=True, cwd=Path(__file__).parents[1], timeout=300)
                assert res.returncode == 0 and "test_cuda.py" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
            else:
                assert module == "rematch_pl.train", module
                with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                    validate(compose("config", overrides=[x for x in args if not x.startswith("hydra.")]))
    assert seen == {"rematch_pl.bench", "rematch_pl.eval_bench", "rematch_pl.train", "pytest"}
