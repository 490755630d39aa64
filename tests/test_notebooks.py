"""The analysis notebooks run top to bottom on the tiny backbone and render their plots; the helpers
they rely on (`rematch_pl.analysis`) reload trained runs faithfully.

One small demo sweep (2 jobs: K=16 tokens with / without the orthogonality loss, through the real
entry point) is trained once per module and shared by all notebooks (``REMATCH_SWEEP_DIR``).
"""

import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from rematch_pl.build import CONF_DIR

NOTEBOOKS = CONF_DIR.parent / "notebooks"
EXPECTED = ["a_ablation_comparison.ipynb", "b_embedding_tsne.ipynb", "c_token_attention.ipynb",
            "d_caption_retention.ipynb"]


def test_notebooks_are_there_valid_and_stored_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), name
        assert "demo_sweep" in "".join(c.source for c in code), name  # runs on the embedded default


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rematch_pl import analysis

    fast = tuple(o for o in analysis.DEMO_OVERRIDES if not o.startswith(("trainer.max_steps", "trainer.val_check")))
    root = analysis.demo_sweep(tmp_path_factory.mktemp("nb") / "demo",
                               overrides=fast + ("trainer.max_steps=2", "trainer.val_check_interval=2"))
    runs = analysis.run_dirs(root)
    assert list(runs) == ["rematch[fusion=mef]", "rematch[fusion=mef_avg]"]
    return root


def _execute(name: str, sweep_dir: Path, workdir: Path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel inherits the environment: the demo sweep, and one thread per kernel (shared CI cores)
    env = {"REMATCH_SWEEP_DIR": str(sweep_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _outputs(nb, kind: str) -> list:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if kind == "png" and "image/png" in o.get("data", {}):
                out.append(o)
            elif kind == "text":
                out.append(o.get("text", "") + o.get("data", {}).get("text/plain", "") +
                           o.get("data", {}).get("text/markdown", ""))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,min_png,needles", [
    ("a_ablation_comparison.ipynb", 2, ["| Exp | Configuration | Overall | Δ | CLS | QA | RET | VG | chance |",
                                        "rematch[fusion=mef_avg]"]),
    ("b_embedding_tsne.ipynb", 1, ["Syn_VG", "align"]),
    ("c_token_attention.ipynb", 2, ["MEF + Avg + OR", "diversity"]),
    ("d_caption_retention.ipynb", 1, ["token_agreement", "kl_base_trained"]),
])
def test_notebook_runs_top_to_bottom_and_renders_plots(name, min_png, needles, demo, tmp_path):
    nb = _execute(name, demo, tmp_path)  # raises CellExecutionError on any failing cell
    assert len(_outputs(nb, "png")) >= min_png, name
    text = "\n".join(_outputs(nb, "text"))
    for needle in needles:
        assert needle in text, (name, needle)


@pytest.mark.slow
def test_reloaded_run_reproduces_its_validation_and_gives_attention_maps_and_captions(demo):
    from rematch_pl import analysis

    torch.set_num_threads(1)
    run_dir = analysis.select_run(demo, fusion__orthogonality=True)
    run = analysis.load_run(run_dir, attn_implementation="eager")
    # embeddings computed as validation does, with the saved adapter: the same Hit@1 per subset
    emb = analysis.embed_eval(run)
    for subset, e in emb.items():
        assert e.hit1 == pytest.approx(run.summary["val"][f"val/hit@1/{subset}"], abs=1e-4), subset
        assert e.query.shape == e.doc.shape and e.query.shape[0] == 4
    # Fig. 7: one map per learnable token over the 4x4 merged patch grid, min-max normalised
    subset, image, text = analysis.eval_images(run, n=1)[0]
    att = analysis.token_attention(run, image, text=text, size=112)
    assert att.maps.shape == (16, 4, 4) and att.grid == (4, 4) and att.image.size == (112, 112)
    assert np.allclose(att.maps.reshape(16, -1).min(1), 0) and np.allclose(att.maps.reshape(16, -1).max(1), 1)
    assert 0 <= att.diversity <= 1
    with pytest.raises(ValueError, match="eager"):
        analysis.token_attention(analysis.load_run(run_dir), image)
    # S9: the adapter changes generation; disabling it gives back the base model
    rows = analysis.caption_retention(run, [image], max_new_tokens=6)
    assert set(rows[0]) == {"base", "trained", "token_agreement", "kl_base_trained"} and rows[0]["kl_base_trained"] > 0
    from rematch_pl.generate import generate, generate_base

    base = analysis.load_run(run_dir, attn_implementation="eager", trained=False)
    assert generate(base.model, image, max_new_tokens=6, return_ids=True)[1] == \
        generate_base(run.model, image, max_new_tokens=6, return_ids=True)[1]
