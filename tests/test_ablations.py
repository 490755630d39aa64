"""Every ablation experiment composes, builds and runs one training step on the embedded default."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from rematch_pl.build import CONF_DIR, build_backbone, build_datamodule, build_model
from rematch_pl.config import validate

ABLATIONS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("paper_"))


@pytest.fixture(scope="module")
def batches():
    """One real batch from the synthetic datamodule, per (num_hardneg, target_instruction) setting."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("exp", ABLATIONS)
def test_ablation_runs_one_training_step(exp, batches, tmp_path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={exp}", "data.batch_size=4", "data.shuffle_buffer=8",
                                           f"paths.output_root={tmp_path}"])
    validate(cfg)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone)
    model = build_model(cfg, backbone)
    key = (cfg.data.num_hardneg, str(cfg.data.target_instruction))
    if key not in batches:
        dm = build_datamodule(cfg, backbone.processor)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batches[key] = dm.on_before_batch_transfer(batch, 0)
    batch = batches[key]
    assert (batch["neg"] is None) == (cfg.data.num_hardneg == 0)
    terms = model(batch)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert ("loss_qdm" in terms) == (cfg.matching.views != "none")
    assert model.fusion.k == cfg.fusion.k
