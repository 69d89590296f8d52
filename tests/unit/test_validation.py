"""Every config value is checked before a model is loaded, with one message naming the full key."""
from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_module
from transformers import AutoConfig

from ascend_edit.config import (
    ConfigError,
    LayerwiseConfig,
    MLAConfig,
    ModelLevelConfig,
    StageConfig,
    register_configs,
    to_typed,
)
from ascend_edit.validation import check_against_teacher, check_batches, check_mla_cache, teacher_kv_values


def compose_typed(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=["output_dir=.", *overrides]))


# (override, text the error must contain: the full key with the bad value, or the broken rule)
BAD_VALUES = [
    ("engine.grad_clip=-1", "engine.grad_clip=-1.0 must be a finite number >= 0"),
    ("engine.grad_clip=inf", "engine.grad_clip=inf"),
    ("engine.checkpoint_every=-1", "engine.checkpoint_every=-1 must be >= 0"),
    ("engine.keep_last=0", "engine.keep_last=0 must be >= 1"),
    ("engine.zero_stage=2", "engine.zero_stage=2 needs engine.kind=deepspeed"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("eval.context=0", "eval.context=0"),
    ("device.threads=-1", "device.threads=-1 must be >= 0"),
    ("device.seed=-1", "device.seed=-1"),
    ("distill.layerwise.warmup_steps=-1", "distill.layerwise.warmup_steps=-1"),
    ("distill.model_level.warmup_steps=500", "distill.model_level.warmup_steps=500 must be <= distill.model_level.steps"),
    ("distill.layerwise.min_lr_ratio=1.5", "distill.layerwise.min_lr_ratio=1.5 must be in [0.0, 1.0]"),
    ("distill.model_level.min_lr_ratio=-0.1", "distill.model_level.min_lr_ratio=-0.1"),
    ("distill.layerwise.lr=0", "distill.layerwise.lr=0.0 must be a finite number > 0"),
    ("distill.model_level.lr=nan", "distill.model_level.lr=nan"),
    ("distill.layerwise.steps=-1", "distill.layerwise.steps=-1"),
    ("distill.model_level.batch_size=0", "distill.model_level.batch_size=0"),
    ("distill.layerwise.micro_batch_size=-2", "distill.layerwise.micro_batch_size=-2"),
    ("distill.model_level.micro_batch_size=16",
     "distill.model_level.micro_batch_size=16 must be <= distill.model_level.batch_size=8"),
    ("distill.model_level.weight_decay=-1", "distill.model_level.weight_decay=-1.0"),
    ("distill.model_level.weight_decay=5000", "lr x weight_decay >= 1"),
    ("distill.model_level.temperature=1e-30", "distill.model_level.temperature=1e-30 must be >= 0.05"),
    ("distill.model_level.trainable=everything", "distill.model_level.trainable='everything'"),
    ("distill.model_level.chunk_size=0", "distill.model_level.chunk_size=0"),
    ("distill.model_level.top_k=0", "distill.model_level.top_k=0"),
    ("distill.model_level.temperature=0", "distill.model_level.temperature=0.0"),
    ("distill.model_level.feature_weight=-1", "distill.model_level.feature_weight=-1.0"),
    ("distill.model_level.ce_weight=-1", "distill.model_level.ce_weight=-1.0"),
    ("distill.model_level.feature_layers=[-1]", "distill.model_level.feature_layers=[-1]"),
    ("distill.log_every=-1", "distill.log_every=-1"),
    ("distill.init_from=/x", "distill.init_from='/x' is only read with distill.stage=model_level"),
    ("data.seq_len=1", "data.seq_len=1 must be >= 2"),
    ("data.eval_sequences=0", "data.eval_sequences=0"),
    ("data.max_documents=0", "data.max_documents=0"),
    ("data.synthetic_sequences=0", "data.synthetic_sequences=0"),
    ("data.cache_dir=/c", "data.cache_dir is only used with data.source=files or indexed (data.source=shakespeare"),
    ("target.layers=[]", "target.layers=[] must name at least one layer"),
    ("target.layers=[1,1]", "target.layers=[1, 1] lists a layer twice"),
    ("target.calibration_batches=0", "target.calibration_batches=0: target.init=warm"),
    ("target.mla.kv_lora_rank=0", "target.mla.kv_lora_rank=0"),
    ("target.gate_swa.full_every=-1", "target.gate_swa.full_every=-1"),
    ("target.gate_swa.full_layers=[-3]", "target.gate_swa.full_layers=[-3]"),
    ("model.gguf_file=x.gguf", "model.gguf_file='x.gguf' is only read with model.source=hf"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_names_its_full_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose_typed([override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_and_stage_boundaries_are_accepted():
    cfg = compose_typed(["engine.grad_clip=0", "distill.layerwise.steps=0", "distill.model_level.warmup_steps=200",
                         "distill.model_level.min_lr_ratio=1", "distill.model_level.micro_batch_size=8"])
    assert cfg.engine.grad_clip == 0 and cfg.distill.layerwise.steps == 0


def test_stage_errors_name_the_stage():
    # StageConfig is shared by both stages: each subclass names its own prefix.
    with pytest.raises(ConfigError, match=r"^distill\.layerwise\.lr="):
        LayerwiseConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^distill\.model_level\.lr="):
        ModelLevelConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^distill\.model_level\.warmup_steps=20 must be <= "):
        ModelLevelConfig(steps=10, warmup_steps=20)
    StageConfig(steps=8, warmup_steps=2)  # the base class stays usable on its own


@pytest.mark.parametrize(("batch", "micro", "world", "message"), [
    (6, 0, 4, "distill.layerwise.batch_size=6 is not divisible by the world size 4"),
    (8, 3, 1, "distill.layerwise.micro_batch_size=3 does not divide the per-process batch 8"),
    (8, 4, 4, "distill.layerwise.micro_batch_size=4 does not divide the per-process batch 2"),
])
def test_batch_geometry_against_the_world_size(batch, micro, world, message):
    with pytest.raises(ConfigError, match=message):
        check_batches(LayerwiseConfig(steps=4, warmup_steps=1, batch_size=batch, micro_batch_size=micro), world)
    check_batches(LayerwiseConfig(steps=4, warmup_steps=1, batch_size=8, micro_batch_size=2), 2)


def tiny_qwen3():
    # 2 KV heads x head_dim 16: keys + values = 64 values = 128 B per token and layer at 16 bits.
    return AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)


def test_mla_cache_larger_than_the_teacher_is_refused_with_both_byte_figures():
    config = tiny_qwen3()
    assert teacher_kv_values(config) == 64
    problem = check_mla_cache(MLAConfig(kv_lora_rank=64, qk_rope_head_dim=8), config)
    assert problem and "target.mla.kv_lora_rank=64" in problem
    assert "144 B" in problem and "128 B" in problem and "kv_lora_rank <= 56" in problem
    assert check_mla_cache(MLAConfig(kv_lora_rank=56, qk_rope_head_dim=8), config) is None  # equal: allowed
    assert check_mla_cache(MLAConfig(kv_lora_rank=64, qk_rope_head_dim=8, allow_larger_cache=True), config) is None
    # a target sized for a large teacher: its rope key alone is the teacher's whole cache (no rank can fit)
    problem = check_mla_cache(MLAConfig(kv_lora_rank=512, qk_rope_head_dim=64), config)
    assert problem and "target.mla.qk_rope_head_dim=64 alone is 128 B" in problem and "<= 0" not in problem


def test_checks_against_the_teacher_config():
    config = tiny_qwen3()
    base = ["model=qwen3_tiny", "target.mla.kv_lora_rank=32", "target.mla.qk_rope_head_dim=8",
            "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16"]
    check_against_teacher(compose_typed(base), config)  # fits: no error
    cases = [
        (["target.mla.kv_lora_rank=512"], "target.mla.kv_lora_rank=512 gives an MLA cache of 1,040 B"),
        (["target.layers=[0,4]"], "target.layers=[0, 4]: [4] out of range, the teacher has 4 layers"),
        (["distill.model_level.top_k=300"], "distill.model_level.top_k=300 must be <= the vocabulary size 256"),
        (["target.layers=[0,1]", "distill.model_level.feature_layers=[2]"], "[2] are not converted layers"),
        (["target=gate_swa", "target.gate_swa.full_every=0", "target.gate_swa.full_layers=[9]"],
         "target.gate_swa.full_layers=[9]"),
        (["target=gate_swa", "target.gate_swa.full_every=5"], "target.gate_swa.full_every=5 must be <="),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_against_teacher(compose_typed([*base, *overrides]), config)


def test_larger_mla_cache_only_warns_for_inspect(caplog):
    cfg = compose_typed(["task=inspect", "model=qwen3_tiny", "target.mla.kv_lora_rank=512",
                         "target.mla.qk_rope_head_dim=8"])  # (a rope key wider than head_dim 16 is refused)
    check_against_teacher(cfg, tiny_qwen3())  # inspect shows the numbers; it trains nothing
    assert "larger than the teacher's" in caplog.text


def test_init_from_takes_a_saved_model_or_a_run_directory_holding_one(tmp_path):
    """distill.init_from names a stage-1 result: the saved model itself, or a run directory with stage-layerwise/
    (or converted/); anything else is named before the teacher loads."""
    from ascend_edit.validation import init_from_directory

    run = tmp_path / "run"
    (run / "stage-layerwise").mkdir(parents=True)
    (run / "stage-layerwise" / "manifest.json").write_text("{}")
    assert init_from_directory(str(run)) == run / "stage-layerwise"
    assert init_from_directory(str(run / "stage-layerwise")) == run / "stage-layerwise"
    with pytest.raises(ConfigError, match="holds no saved model"):
        init_from_directory(str(tmp_path))
    with pytest.raises(ConfigError, match="is not a directory"):
        init_from_directory(str(tmp_path / "missing"))


def test_a_stage_checkpoint_whose_run_config_changed_is_refused_in_one_line(tmp_path):
    """A stage checkpoint is rebuilt from its run's saved config: when that config no longer builds the shapes the
    checkpoint holds (edited by hand, or by a tool), the export says so rather than failing inside a copy."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ascend_edit.train.checkpoint_io import TRAINABLE_FILE, write_manifest
    from ascend_edit.train.rebuild import rebuild_from_engine_checkpoint

    overrides = ["model=qwen3_tiny", "model.dtype=fp32", "target=mla_small", "target.init=random",
                 "target.mla.kv_lora_rank=16", "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8",
                 "target.mla.v_head_dim=16", "output_dir=."]
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_typed(overrides))))
    checkpoint = run / "checkpoints" / "step-model_level-1"
    checkpoint.mkdir(parents=True)
    name = "model.layers.0.self_attn.target.kv_a_proj_with_mqa.weight"
    save_file({name: torch.zeros(8 + 32, 64)}, str(checkpoint / TRAINABLE_FILE))  # built for another rank
    write_manifest(checkpoint)
    with pytest.raises(ValueError, match=r"weight shapes differ from the model its run's saved config builds \("
                                         + name.replace(".", r"\.")):
        rebuild_from_engine_checkpoint(checkpoint)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data=mix", "data.max_documents=3"], "data.max_documents is not read with data.source=mix"),
    (["data=mix", "data.cache_dir=/c"], "data.cache_dir is only used with data.source=files or indexed"),
    (["data=mix", "data.mix=[{name:news,path:/nonexistent/c.jsonl,format:jsonl}]"],
     "data.mix[news].path='/nonexistent/c.jsonl' is only read by a source named files"),
    (["data=mix", "data.mix=[{name:wiki,text_field:body}]"], "data.mix[wiki].text_field='body' is only read"),
    (["data=indexed", "data.path=/x", "data.max_documents=2"], "data.max_documents is not read with data.source=indexed"),
    (["data=indexed", "data.path=/x", "data.format=jsonl"], "data.format is not read with data.source=indexed"),
])
def test_data_keys_a_source_never_reads_are_refused(overrides, message):
    """A data option the chosen source ignores would train on other data than the user named, silently."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_typed(overrides)


def test_full_by_sensitivity_must_leave_a_converted_layer_sliding():
    cfg = compose_typed(["model=qwen3_tiny", "target=gate_swa", "target.gate_swa.full_every=0",
                         "target.gate_swa.full_by_sensitivity=2", "target.layers=[0,1]"])
    with pytest.raises(ConfigError, match=r"full_by_sensitivity=2 keeps every converted layer \(2\) at full"):
        check_against_teacher(cfg, tiny_qwen3())
    check_against_teacher(compose_typed(["model=qwen3_tiny", "target=gate_swa", "target.gate_swa.full_every=0",
                                         "target.gate_swa.full_by_sensitivity=1", "target.layers=[0,1]"]),
                          tiny_qwen3())


def test_sequences_longer_than_the_teachers_positions_are_warned_about(caplog):
    cfg = compose_typed(["model=qwen3_tiny", "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8",
                         "target.mla.kv_lora_rank=16", "target.mla.v_head_dim=16", "data.seq_len=100000"])
    with caplog.at_level("WARNING"):
        check_against_teacher(cfg, tiny_qwen3())
    assert "data.seq_len=100000 is longer than the teacher's max_position_embeddings" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a plan for those positions says the same
        check_against_teacher(compose_typed(["model=qwen3_tiny", "task=plan", "target.mla.qk_rope_head_dim=8",
                                             "target.mla.qk_nope_head_dim=8", "target.mla.kv_lora_rank=16",
                                             "target.mla.v_head_dim=16", "data.seq_len=100000"]), tiny_qwen3())
    assert "data.seq_len=100000 is longer than the teacher's max_position_embeddings" in caplog.text


@pytest.mark.parametrize("arch,overrides,refused", [
    ("mistral", {"sliding_window": 24}, True),  # Mistral-7B-v0.1 style: every layer slides
    ("mistral", {"sliding_window": None}, False),  # v0.2 and later
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}, True),
    ("qwen2", {"sliding_window": 24}, False),  # a window value that use_sliding_window=false leaves off
])
def test_a_teacher_whose_own_attention_slides_is_refused_in_one_line(arch, overrides, refused):
    """The targets replace full attention: a sliding teacher's window would be dropped by native exports and by
    the KV accounting (a 24-token window reported as 2 MiB saved at 8K), so it is refused, not converted wrongly."""
    from ascend_edit.models.loading import check_full_attention, check_supported
    from tests.conftest import tiny_model

    config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, **overrides)
    if not refused:
        check_full_attention(config)
        return
    with pytest.raises(NotImplementedError, match=r"^the teacher's own attention slides \(sliding_window=24") as info:
        check_full_attention(config)
    assert "\n" not in str(info.value)
    with pytest.raises(NotImplementedError, match="own attention slides"):
        check_supported(tiny_model(arch, **overrides))


def test_the_torch_engine_under_a_launcher_is_refused_before_any_rank_loads():
    """engine=torch at world size 16 passed the launchers' check and plan, then failed on every rank after the
    teacher loaded and two evaluations ran."""
    from ascend_edit.validation import check_engine_world

    check_engine_world("torch", 1)
    check_engine_world("deepspeed", 16)
    with pytest.raises(ConfigError, match=r"^engine=torch trains in one process, and this job has 16"):
        check_engine_world("torch", 16)


@pytest.mark.parametrize(("overrides", "message"), [
    (["target=gate_swa", "target.gate_swa.full_layers=[1]"],
     "set: full_layers=[1], full_every=4 (target=gate_swa sets full_every=4: add target.gate_swa.full_every=0"),
])
def test_gate_swa_choices_name_what_is_set(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_typed(overrides)
    compose_typed(["target=gate_swa", "target.gate_swa.full_every=0", "target.gate_swa.kv_budget=0.5",
                   "target.gate_swa.selection=both"])  # a measured choice reads them


def test_a_window_that_never_slides_on_the_training_sequences_is_refused():
    """window >= seq_len: no layer slides in calibration, training or the run's own evaluations, and the report
    showed the teacher's numbers beside a KV saving never exercised (experiment=tiny target=gate_swa did)."""
    from ascend_edit.validation import check_run_inputs

    with pytest.raises(ConfigError, match=r"target.gate_swa.window=1024 is not shorter than data.seq_len=32"):
        check_run_inputs(compose_typed(["experiment=tiny", "target=gate_swa"]), world_size=1)
    check_run_inputs(compose_typed(["experiment=tiny", "target=gate_swa", "target.gate_swa.window=8"]), world_size=1)
    check_run_inputs(compose_typed(["experiment=tiny", "target=gate_swa", "task=inspect"]), world_size=1)  # no training


@pytest.mark.parametrize(("overrides", "message"), [
    (["target.gate_swa.full_every=1"], "target.gate_swa.full_every=1 keeps every converted layer (4) at full attention"),
    (["target.gate_swa.full_every=0", "target.gate_swa.full_layers=[0,1,2,3]"],
     "target.gate_swa.full_layers=[0, 1, 2, 3] keeps every converted layer"),
    (["target.gate_swa.window=8", "target.gate_swa.sink_tokens=100000"],
     "target.gate_swa.sink_tokens=100000 is not shorter than data.seq_len=32"),
])
def test_gate_swa_settings_under_which_nothing_slides_are_refused(overrides, message):
    """They trained to the end and reported 0 % KV saved; full_by_sensitivity was already refused the same way."""
    from ascend_edit.validation import check_before_load

    cfg = compose_typed(["experiment=tiny", "target=gate_swa", "target.gate_swa.window=8", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_before_load(cfg)


def test_a_low_rank_query_above_full_rank_is_refused_before_loading():
    """It failed with a RuntimeError traceback in the warm start, after the teacher loaded (and mid-sweep)."""
    from ascend_edit.validation import check_before_load

    with pytest.raises(ConfigError, match=r"target.mla.q_lora_rank=65 exceeds the query's full rank .* = 64"):
        check_before_load(compose_typed(["experiment=tiny", "target.mla.q_lora_rank=65"]))
    check_before_load(compose_typed(["experiment=tiny", "target.mla.q_lora_rank=64"]))
