"""What only a CUDA device runs: bf16 through SDPA's flash and memory-efficient kernels, the fused
LoRA epilogue and RMSNorm in bf16 under cuBLAS, and a real training run with `bf16-mixed`.

Skipped without a CUDA device (CI has none); on a GPU `pytest -m gpu` runs these and the CUDA
cases of the CPU suite's equivalences (`tinyutil.DEVICES`); `scripts/gpu_bench.sh` part
`cuda_tests` runs them first. bf16 keeps 8 bits of mantissa, so results are compared by cosine
similarity or with bf16-sized tolerances, not bit for bit.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rematch_pl.backbone.model import load_backbone
from rematch_pl.model import ReMatchModel
from tinyutil import GPU, on, triple_batch

pytestmark = GPU


def _model(dtype="bf16", matching="all", lora_fused=True, fused_rms_norm=True, seed=0):
    torch.manual_seed(seed)
    bb = load_backbone("tiny://qwen2vl", dtype=dtype, fused_rms_norm=fused_rms_norm,
                       lora={"r": 8, "alpha": 16, "dropout": 0.0, "fused": lora_fused})
    with torch.no_grad():  # LoRA away from zero, so that the adapter takes part
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return ReMatchModel(bb, k=4, matching=matching).cuda()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1)  # per row


def test_bf16_embedding_passes_equal_without_padding():
    """The embedding passes run without a mask (causal kernels, right padding): an item padded in
    one pass with longer ones gets the embedding it gets in a pass without padding."""
    model = _model(matching="none").eval()
    batch = on("cuda", triple_batch(model.backbone.processor))
    feats = model.backbone.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    groups = [("qry", model.contents(batch["qry"])), ("doc", model.contents(batch["pos"])),
              ("doc", model.contents(batch["neg"]))]
    with torch.no_grad():
        model.bucket_pass_tokens = 0  # every bucket holds rows of one length: no padding
        exact = model.embed(groups, feats, batch["image_grid_thw"])
        model.bucket_pass_tokens = math.inf  # one pass, padded to the longest row
        padded = model.embed(groups, feats, batch["image_grid_thw"])
    for (a, sa), (b, sb) in zip(exact, padded):
        assert _cos(a, b).min() > 0.999
        assert _cos(sa, sb).min() > 0.999


def test_bf16_packed_matching_equals_isolated():
    model = _model().eval()
    batch = on("cuda", triple_batch(model.backbone.processor))
    grids = batch["image_grid_thw"]
    feats = model.backbone.encode_images(batch["pixel_values"], grids)
    q, p, n = (model.contents(batch[s]) for s in ("qry", "pos", "neg"))
    with torch.no_grad():
        (eq, qs), (ep, ps), (en, ns) = model.embed([("qry", q), ("doc", p), ("doc", n)], feats, grids)
        mi = model.matching_inputs(q, p, n, eq, ep, en, qs, ps, ns)
        packed = model.matching_logits(*mi[:-1], feats, grids)  # [B, 8, vocab]
        for v in range(packed.shape[1]):
            iso = model.matching_logits(*mi[:-1], feats, grids, isolate=v)[:, 0]  # [B, vocab]
            assert _cos(iso, packed[:, v]).min() > 0.999
            yes, no = model.matching.yes_id, model.matching.no_id
            torch.testing.assert_close(iso[:, yes] - iso[:, no], packed[:, v, yes] - packed[:, v, no],
                                       atol=0.1, rtol=0.05)


def test_bf16_fused_lora_and_rms_norm_step_matches_the_unfused_one():
    """`backbone.lora.fused` and `backbone.fused_rms_norm` (the defaults) against PEFT's branch and
    transformers' RMSNorm: same loss terms and gradients up to bf16 rounding."""
    results = []
    for fused in (True, False):
        model = _model(lora_fused=fused, fused_rms_norm=fused).train()
        batch = on("cuda", triple_batch(model.backbone.processor))
        torch.manual_seed(1)  # the matching pass draws its document order
        terms = model(batch)
        terms["loss"].backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append(({k: v.detach().float() for k, v in terms.items() if k.startswith("loss")}, grads))
    (t_f, g_f), (t_u, g_u) = results
    for k in t_u:
        torch.testing.assert_close(t_f[k], t_u[k], atol=2e-2, rtol=2e-2, msg=k)
    assert g_f.keys() == g_u.keys() and g_u
    for n in g_u:
        assert _cos(g_f[n].flatten()[None], g_u[n].flatten()[None]).item() > 0.99, n


@pytest.mark.slow
def test_bf16_mixed_training_run(tmp_path):
    """The real entry point on one GPU: bf16 weights, `bf16-mixed`, 4 steps, validation, adapter."""
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "rematch_pl.train", f"hydra.run.dir={run}", "debug=fast", "logger=csv",
           "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "backbone.dtype=bf16"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["peak_memory_gb"] > 0
    assert all(math.isfinite(v) for v in summary["last_loss"].values())
    assert "val/hit@1" in summary["val"]
    assert (run / "adapter" / "rematch_modules.safetensors").exists()


@pytest.mark.slow
def test_trained_run_encodes_and_evaluates_on_the_gpu(tmp_path_factory, tmp_path):
    """A CPU-trained run on the GPU in bf16: LoRA merged at load or kept as PEFT's branch gives the
    same embeddings, close to the fp32 CPU ones; the MMEB eval runs there and scores above chance."""
    from PIL import Image

    from rematch_pl import Encoder
    from rematch_pl.eval import run as eval_run
    from test_eval_support import eval_cfg, trained_run_dir

    run = trained_run_dir(tmp_path_factory)
    images = [Image.new("RGB", (64 + 16 * i, 48), (40 * i, 200 - 30 * i, 90)) for i in range(3)]
    texts = ["two red circles", "a blue square on grey", "three green triangles"]
    out = {}
    for name, kw in {"cpu": dict(device="cpu", dtype="fp32"), "merged": dict(device="cuda", merge_lora=True),
                     "branch": dict(device="cuda", merge_lora=False)}.items():
        enc = Encoder.from_pretrained(run, **kw)
        out[name] = torch.cat([enc.encode(texts=texts, instruction="Find an image of:"),
                               enc.encode(images=images, instruction="Represent the given image.", side="document")])
    assert _cos(out["merged"], out["branch"]).min() > 0.995
    assert _cos(out["merged"], out["cpu"]).min() > 0.99
    res = eval_run(eval_cfg(f"ckpt={run}", "eval.accelerator=gpu", "eval.subsets=[Syn_CLS,Syn_T2I]",
                            cache_dir=tmp_path / "cache"), tmp_path / "ev")
    hit1 = sum(r["hit@1"] for r in res["mmeb"].values()) / len(res["mmeb"])
    chance = sum(r["chance@1"] for r in res["mmeb"].values()) / len(res["mmeb"])
    assert hit1 > 1.5 * chance, (hit1, chance)  # the criterion of the CPU eval test on this short run
