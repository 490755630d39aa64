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
