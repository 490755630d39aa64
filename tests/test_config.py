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


def _refused(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(_compose(overrides))
    return str(e.value)


# (the edge of the range: accepted, the value past it: refused with this message). Every message
# names the key, the bad value (repr) and what is expected, as the other start-up errors do.
@pytest.mark.parametrize("good,bad,message", [
    ("train.max_nonfinite_steps=1", "train.max_nonfinite_steps=0",
     "train.max_nonfinite_steps=0 is invalid: expected an integer >= 1"),
    ("train.max_nonfinite_steps=1", "train.max_nonfinite_steps=-3", "train.max_nonfinite_steps=-3 is invalid"),
    ("trainer.checkpoint_every_n_steps=1", "trainer.checkpoint_every_n_steps=0",
     "trainer.checkpoint_every_n_steps=0 is invalid: expected an integer >= 1"),
    ("trainer.checkpoint_every_n_steps=300", "trainer.checkpoint_every_n_steps=null",
     "trainer.checkpoint_every_n_steps=None is invalid: expected an integer >= 1"),
    ("optimizer.min_lr_ratio=1", "optimizer.min_lr_ratio=3", "optimizer.min_lr_ratio=3 is invalid: expected a number in [0, 1]"),
    ("optimizer.min_lr_ratio=0", "optimizer.min_lr_ratio=-0.1", "optimizer.min_lr_ratio=-0.1 is invalid"),
    ("optimizer.warmup_steps=0", "optimizer.warmup_steps=-10", "optimizer.warmup_steps=-10 is invalid: expected an integer >= 0"),
    ("optimizer.warmup_steps=5", "optimizer.warmup_steps=2.5", "optimizer.warmup_steps=2.5 is invalid"),
    ("optimizer.weight_decay=0", "optimizer.weight_decay=-1", "optimizer.weight_decay=-1 is invalid: expected a number >= 0"),
    ("optimizer.betas=[0,0.5]", "optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] is invalid"),
    ("optimizer.lr_scale=2", "optimizer.lr_scale=abc", "optimizer.lr_scale='abc' is invalid: expected a number > 0"),
    ("optimizer.lr=0.5", "optimizer.lr=abc", "optimizer.lr='abc' is invalid: expected a number > 0"),
    ("loss.temperature=0.5", "loss.temperature=abc", "loss.temperature='abc' is invalid"),
    ("trainer.max_steps=1", "trainer.max_steps=1.5", "trainer.max_steps=1.5 is invalid: expected an integer >= 1"),
    ("trainer.val_check_interval=1", "trainer.val_check_interval=0",
     "trainer.val_check_interval=0 is invalid: expected an integer >= 1"),
    ("trainer.val_check_interval=1", "trainer.val_check_interval=0.5", "trainer.val_check_interval=0.5 is invalid"),
    ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val=-1",
     "trainer.gradient_clip_val=-1 is invalid: expected null or a number >= 0"),
    ("trainer.gradient_clip_val=null", "trainer.gradient_clip_val=big", "trainer.gradient_clip_val='big' is invalid"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=0",
     "trainer.accumulate_grad_batches=0 is invalid: expected an integer >= 1"),
    ("trainer.limit_val_batches=3", "trainer.limit_val_batches=0.5",
     "trainer.limit_val_batches=0.5 is invalid: expected an integer >= 0 (validation batches per rank; 0: no "
     "validation) or 1.0"),
    ("seed=7", "seed=abc", "seed='abc' is invalid: expected an integer"),
    ("data.homogeneous=true", "data.homogeneous=maybe", "data.homogeneous='maybe' is invalid: expected true or false"),
    ("train.log_rows=true", "train.log_rows=1", "train.log_rows=1 is invalid: expected true or false"),
    ("save_adapter=false", "save_adapter=no", "save_adapter='no' is invalid: expected true or false"),
    ("fusion.orthogonality=false", "fusion.orthogonality=yes", "fusion.orthogonality='yes' is invalid"),
    ("backbone.lora.enabled=false", "backbone.lora.enabled=0", "backbone.lora.enabled=0 is invalid"),
    ("trainer.enable_progress_bar=false", "trainer.enable_progress_bar=off", "trainer.enable_progress_bar='off' is invalid"),
])
def test_ranges_and_types_are_checked_at_start_up(good, bad, message):
    validate(_compose([good]))
    assert message in _refused([bad])


# data.* values checked from the config alone, before the backbone loads (the datamodule is built
# after it); only the subset names need the dataset.
@pytest.mark.parametrize("good,bad,message", [
    ("data.num_workers=0", "data.num_workers=-1", "data.num_workers=-1 is invalid: expected an integer >= 0"),
    ("data.batch_size=2", "data.batch_size=2.5", "data.batch_size=2.5 is invalid: expected an integer >= 2"),
    ("data.num_hardneg=0", "data.num_hardneg=1.5", "data.num_hardneg=1.5 is invalid: expected an integer >= 0"),
    ("data.eval_batch_size=1", "data.eval_batch_size=0", "data.eval_batch_size=0 is invalid: expected an integer >= 1"),
    ("data.prefetch_factor=1", "data.prefetch_factor=0", "data.prefetch_factor=0 is invalid: expected an integer >= 1"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=-1", "data.shuffle_buffer=-1 is invalid"),
    ("data.max_length=null", "data.max_length=0", "data.max_length=0 is invalid: expected null or an integer >= 1"),
    ("data.eval.max_queries=1", "data.eval.max_queries=0", "data.eval.max_queries=0 is invalid"),
    ("data.train.subsets=[Syn_CLS]", "data.train.subsets=Syn_CLS",
     "data.train.subsets='Syn_CLS' is invalid: expected null or a list of subset names"),
    ("data.eval.subsets=[Syn_CLS,Syn_VQA]", "data.eval.subsets=[Syn_CLS,3]", "data.eval.subsets=['Syn_CLS', 3] is invalid"),
    ("data.train.caps={Syn_CLS:0}", "data.train.caps=5",
     "data.train.caps=5 is invalid: expected null or a mapping subset -> maximum rows"),
    ("data.train.caps={Syn_CLS:100}", "data.train.caps={Syn_CLS:-1}",
     "data.train.caps.Syn_CLS=-1 is invalid: expected an integer >= 0"),
    ("data.train.caps={Syn_CLS:100}", "data.train.caps={Syn_CLS:2.5}", "data.train.caps.Syn_CLS=2.5 is invalid"),
    ("data.train.weights={Syn_CLS:0.5}", "data.train.weights={Syn_CLS:0}",
     "data.train.weights.Syn_CLS=0 is invalid: expected a number > 0"),
    ("data.train.split=train", "data.train.split=3", "data.train.split=3 is invalid: expected a split name"),
    ("data.target_instruction=default", "data.target_instruction=fancy",
     "data.target_instruction='fancy' is invalid: expected null, default or a mapping"),
    ("data.target_instruction={default:'Represent: ',Syn_T2I:{image:'An image: ',text:null}}",
     "data.target_instruction={Syn_CLS:3}", "data.target_instruction.Syn_CLS=3 is invalid"),
    ("data.target_instruction={Syn_T2I:{image:'An image: '}}", "data.target_instruction={Syn_T2I:{audio:x}}",
     "data.target_instruction.Syn_T2I={'audio': 'x'} is invalid"),
])
def test_data_values_are_checked_before_the_backbone_loads(good, bad, message):
    validate(_compose([good]))
    assert message in _refused([bad])


def test_matching_refuses_an_attention_that_ignores_its_mask():
    """The packed matching pass needs its unified 4-D mask: sdpa and eager take it, flash-attention not."""
    for impl in ("sdpa", "eager"):
        validate(_compose([f"backbone.attn_implementation={impl}"]))
    validate(_compose(["backbone.attn_implementation=flash_attention_2", "matching=none"]))  # no matching pass
    msg = _refused(["backbone.attn_implementation=flash_attention_2", "matching=feat_feat"])
    assert msg.startswith("backbone.attn_implementation='flash_attention_2' is invalid: expected sdpa | eager")
    assert "matching.views=feat_feat" in msg and "matching=none" in msg


def test_gradcache_refuses_every_chunk_of_one_instance():
    """Without hard negatives, matching takes d- from another instance of the same chunk: no chunk may
    hold one instance, the last one included (data.batch_size % chunk_size == 1)."""
    base = ["data.num_hardneg=0", "data.batch_size=9"]
    msg = _refused(base + ["train.gradcache.chunk_size=4"])
    assert msg.startswith("train.gradcache.chunk_size=4 is invalid")
    assert "chunks of 4, 4, 1" in msg and "3, 5, 6, 7 or >= 9" in msg
    assert "Sizes that work: >= 3 (one chunk)" in _refused(["data.num_hardneg=0", "data.batch_size=3",
                                                           "train.gradcache.chunk_size=2"])
    for ok in (["train.gradcache.chunk_size=3"], ["train.gradcache.chunk_size=5"], ["train.gradcache.chunk_size=64"],
               ["train.gradcache.chunk_size=4", "data.num_hardneg=1"], ["train.gradcache.chunk_size=4", "matching=none"]):
        validate(_compose(base + ok))
    # the rule is exactly "no chunk of one", with the chunks formed as gradcache.gradcache_step forms them
    for B in (2, 3, 8, 9, 16, 17):
        for c in range(1, B + 2):
            chunks = [list(range(s, min(s + c, B))) for s in range(0, B, c)]
            over = base[:1] + [f"data.batch_size={B}", f"train.gradcache.chunk_size={c}"]
            if min(map(len, chunks)) >= 2:
                validate(_compose(over))
            else:
                _refused(over)
