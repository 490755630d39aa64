"""Every shipped config composes, validates and instantiates; bad values fail at start-up by key name."""


import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rematch_pl.build import CONF_DIR, build_model
from rematch_pl.config import ConfigError, validate

GROUP_OPTIONS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir() if g.is_dir()}
EXPERIMENTS = GROUP_OPTIONS["experiment"]


def _compose(overrides=()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_groups_exist():
    for group in ["backbone", "data", "fusion", "matching", "loss", "optimizer", "trainer", "strategy", "logger",
                  "experiment", "paths", "debug", "embedding"]:
        assert GROUP_OPTIONS.get(group), group


@pytest.mark.parametrize("group_option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts
                                          if g not in ("experiment", "eval")])  # eval: conf/eval.yaml
def test_every_group_option_composes_and_validates(group_option, tmp_path):
    g, o = group_option
    over = [f"{g}={o}", f"paths.output_root={tmp_path}"]
    if g == "data" and o == "mmeb":
        over += ["data.train.image_root=/x", "data.eval.image_root=/y"]
    cfg = _compose(over)
    OmegaConf.resolve(cfg) if g != "paths" else None
    validate(cfg)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_validates(exp):
    over = [f"experiment={exp}"]
    if exp.startswith("paper_"):
        over += ["data.train.image_root=/x", "data.eval.image_root=/y"]
    cfg = _compose(over)
    validate(cfg)
    assert cfg.experiment_name == exp


def test_ablation_axes_take_their_values():
    assert _compose(["experiment=t3_0_baseline"]).fusion.k == 0
    assert _compose(["experiment=t3_6_mef"]).matching.views == "none"
    assert _compose(["experiment=t4_wqdm_08"]).loss.w_qdm == 0.8
    assert _compose(["experiment=t5_views_raw_feat"]).matching.views == "raw_feat"
    c = _compose(["experiment=t6_k32_avg"])
    assert c.fusion.k == 32 and not c.fusion.orthogonality
    # command-line group choices win over an experiment's defaults (multirun sweeps rely on it)
    assert _compose(["experiment=t5_views_all", "matching=feat_feat"]).matching.views == "feat_feat"
    assert _compose(["experiment=t6_k16_or", "fusion.k=4"]).fusion.k == 4
    p = _compose(["experiment=paper_qwen2vl_2b", "data.train.image_root=/x", "data.eval.image_root=/y"])
    assert (p.trainer.max_steps, p.trainer.devices, p.data.batch_size, p.fusion.k, p.optimizer.lr) == (2500, 8, 128, 16, 1e-4)
    assert (p.backbone.lora.r, p.backbone.lora.alpha, p.loss.temperature) == (32, 64, 0.02)


@pytest.mark.parametrize("override,key", [
    ("fusion.k=65", "fusion.k"), ("matching.views=bogus", "matching.views"), ("loss.temperature=0", "loss.temperature"),
    ("backbone.dtype=fp8", "backbone.dtype"), ("data.on_bad_row=ignore", "data.on_bad_row"),
    ("embedding.template=fancy", "embedding.template"), ("data.batch_size=1", "data.batch_size"),
    ("strategy.name=horovod", "strategy.name"), ("strategy=fsdp,strategy.param_dtype=fp8", "strategy.param_dtype"),
    ("strategy=fsdp,trainer.devices=auto", "trainer.devices"), ("strategy=fsdp,strategy.hybrid=true", "strategy.hybrid"),
    ("strategy=deepspeed_zero3,trainer.accelerator=cpu", "trainer.accelerator"),
    ("strategy=deepspeed_zero2,strategy.stage=3", "strategy.stage"),
    ("train.memory_check.mode=sometimes", "train.memory_check.mode"),
    ("train.memory_check.budget_gib=0", "train.memory_check.budget_gib"),
    ("train.memory_check.images=huge", "train.memory_check.images"),
    ("backbone.lora.compute_dtype=fp16", "backbone.lora.compute_dtype"),
    ("backbone.lora.fused=maybe", "backbone.lora.fused"), ("backbone.fused_rms_norm=1", "backbone.fused_rms_norm"),
    ("train.memory_check.budget_gib=8,train.memory_check.reserve_gib=8", "train.memory_check.reserve_gib"),
    ("loss.mask_false_negatives=sometimes", "loss.mask_false_negatives"),
    ("train.gradcache.chunk_size=1,data.num_hardneg=0", "train.gradcache.chunk_size"),
])
def test_invalid_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose(override.split(",")))


@pytest.mark.parametrize("option", GROUP_OPTIONS["strategy"])
def test_every_strategy_instantiates(option):
    from lightning.pytorch.strategies import DDPStrategy

    from rematch_pl.build import build_strategy
    from rematch_pl.sharding import FSDPStrategy

    cfg = _compose([f"strategy={option}", "trainer.devices=4", "trainer.num_nodes=2"])
    validate(cfg)
    if option.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:  # the optional extra: the error must say how to get it
            with pytest.raises(RuntimeError, match=r"rematch_pl\[deepspeed\]"):
                build_strategy(cfg)
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy

        s = build_strategy(cfg)
        assert isinstance(s, DeepSpeedStrategy) and s.config["zero_optimization"]["stage"] == cfg.strategy.stage
        return
    s = build_strategy(cfg)
    if option == "fsdp":
        assert isinstance(s, FSDPStrategy)
        assert (s._data_parallel_size, s._tensor_parallel_size) == (8, 1)  # shard over all 8 ranks
        hybrid = build_strategy(_compose(["strategy=fsdp", "strategy.hybrid=true", "trainer.devices=4",
                                          "trainer.num_nodes=2"]))
        assert (hybrid._data_parallel_size, hybrid._tensor_parallel_size) == (2, 4)  # replicate x shard
    elif option == "ddp":
        assert isinstance(s, DDPStrategy)
    else:
        assert s == option


def test_typo_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="fusion"):
        _compose(["fusion.kk=3"])


def test_missing_mandatory_value_is_named():
    with pytest.raises(ConfigError, match="image_root"):
        validate(_compose(["data=mmeb"]))


@pytest.mark.parametrize("fusion,matching,embedding", [
    ("mef", "all", "chat"), ("eos", "none", "plain"), ("mef_avg", "feat_feat", "plain"), ("eos", "raw_raw", "chat"),
    ("mef", "raw_feat", "chat"), ("mef", "feat_raw", "plain"),
])
def test_model_instantiates_for_each_axis(backbones, fusion, matching, embedding):
    cfg = _compose([f"fusion={fusion}", f"matching={matching}", f"embedding={embedding}"])
    model = build_model(cfg, backbones["qwen2vl"])
    assert model.fusion.k == cfg.fusion.k
    assert (model.matching is None) == (matching == "none")


@pytest.mark.parametrize("backbone", [o for o in GROUP_OPTIONS["backbone"] if not o.endswith("tiny")])
def test_hub_backbone_configs_load_through_the_same_path(backbone, tiny_paths):
    """The hub configs load with from_pretrained; pointed at a local folder (no download here)."""
    from rematch_pl.build import build_backbone

    kind = "qwen25vl" if backbone.startswith("qwen25") else "qwen2vl"
    cfg = _compose([f"backbone={backbone}", f"backbone.path={tiny_paths[kind]}", "backbone.gradient_checkpointing=false"])
    assert cfg.backbone.dtype == "bf16"
    bb = build_backbone(cfg.backbone)
    assert next(bb.hf.parameters()).dtype.is_floating_point
    assert bb.processor.pixel_range == (cfg.backbone.min_pixels, cfg.backbone.max_pixels)


@pytest.mark.parametrize("dtype,expected", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_datamodule_collates_pixels_in_the_backbones_dtype(dtype, expected, tmp_path):
    import torch

    from rematch_pl.build import build_datamodule

    cfg = _compose([f"backbone.dtype={dtype}", f"paths.output_root={tmp_path}"])
    dm = build_datamodule(cfg, processor=None)
    assert dm.pixel_dtype == getattr(torch, expected)


def test_eval_dataset_folders_are_checked_before_any_model_loads(tmp_path):
    from test_eval_support import eval_cfg

    from rematch_pl.eval import mmeb_subsets, zeroshot_sets

    cases = [(["eval.mmeb.path=TIGER-Lab/MMEB-eval"], "eval.mmeb.image_root is not set .* is a hub id"),
             ([f"eval.mmeb.path={tmp_path}", "eval.mmeb.image_root=/nonexistent/img"],
              "eval.mmeb.image_root='/nonexistent/img': no such folder")]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            mmeb_subsets(eval_cfg(*overrides))
    (tmp_path / "Urban1k").mkdir()
    with pytest.raises(ConfigError, match=r"eval.zeroshot: no such file or folder for \{'flickr30k': .*"
                                          r"run the sets that are there: eval.subsets=\[urban1k\]") as e:
        zeroshot_sets(eval_cfg("eval=zeroshot", f"eval.zeroshot.root={tmp_path}"))
    assert "'urban1k'" not in str(e.value).split("for {")[1].split("}")[0]
