"""What a run prints: parameters counted by ReMatch part (they add up to the model's own counts)."""

import pytest
from hydra import compose, initialize_config_dir

from rematch_pl.build import CONF_DIR, build_backbone, build_model
from rematch_pl.console import parameter_counts, parameter_record, parameter_table


def _model(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return build_model(cfg, build_backbone(cfg.backbone))


@pytest.mark.parametrize("overrides, parts", [
    ((), {"backbone", "LoRA adapters", "learnable tokens (fusion)", "matching projector",
          "<feat_start>/<feat_end> markers"}),
    (("matching=raw_raw",), {"backbone", "LoRA adapters", "learnable tokens (fusion)"}),  # no projector
    (("fusion=eos", "matching=none", "backbone.lora.enabled=false"), {"backbone"}),
])
def test_parts_add_up_to_the_model(overrides, parts):
    model = _model(*overrides)
    counts = parameter_counts(model)
    assert set(counts) == parts
    assert sum(n for n, _ in counts.values()) == sum(p.numel() for p in model.parameters())
    assert sum(t for _, t in counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts.get("LoRA adapters", (0, 0)) == (lora, lora)
    base, trainable = counts["backbone"]
    assert trainable == (0 if lora else base)  # frozen under LoRA; without it every base weight trains
    if "learnable tokens (fusion)" in counts:
        assert counts["learnable tokens (fusion)"][0] == model.fusion.tokens.numel()


def test_table_has_a_row_per_part_and_the_trainable_share():
    table = parameter_table({"backbone": (2_000_000, 0), "LoRA adapters": (500_000, 500_000)}, "title")
    assert "| backbone | 2.0 M | 0 |" in table
    assert "| LoRA adapters | 500.0 K | 500.0 K |" in table
    assert "| total | 2.5 M | 500.0 K (20.00%) |" in table


def test_record_has_flat_names_and_totals():
    rec = parameter_record({"backbone": (100, 0), "LoRA adapters": (10, 10), "<feat_start>/<feat_end> markers": (2, 2)})
    assert rec == {"backbone": 100, "lora": 10, "markers": 2, "total": 112, "trainable": 12}


def test_progress_bar_total_is_the_runs_batches_also_after_a_resume(tmp_path):
    """Over an endless stream the bar counts the run's batches; Lightning's own total is the
    steps left, so a resumed run showed '8/3'."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from rematch_pl.console import step_progress_bar

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield torch.randn(2)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.w(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    totals = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            bar = next(c for c in trainer.callbacks if c is not self and hasattr(c, "total_train_batches"))
            totals.append(bar.total_train_batches)

    def fit(max_steps, accumulate=1, ckpt=None):
        bar = step_progress_bar()
        if bar is None:
            pytest.skip("rich is not installed")
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            callbacks=[bar, Record()], default_root_dir=tmp_path, enable_model_summary=False,
                            accumulate_grad_batches=accumulate)
        trainer.fit(Tiny(), DataLoader(Endless(), batch_size=4), ckpt_path=ckpt)
        return trainer

    first = fit(3)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    fit(8, ckpt=str(tmp_path / "step3.ckpt"))
    fit(2, accumulate=3)
    assert totals == [3, 8, 6]
