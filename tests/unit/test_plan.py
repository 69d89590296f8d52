"""`ascend-edit plan`: memory parts of a tiny config against hand-computed numbers, and the task end to end."""
from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_module

from ascend_edit.config import register_configs, to_typed
from ascend_edit.plan.memory import (
    GIB,
    ModelShape,
    ParamCounts,
    RunSettings,
    TargetShape,
    layer_bytes,
    plan_stage,
)
from ascend_edit.tasks.plan import plan_run

# qwen3_tiny: hidden 64, MLP 128, 4 layers, 4 heads / 2 KV heads of 16, vocab 256
TINY = ModelShape(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=256, intermediate=128)
# MLA: latent 32, rope 8, nope 8, v 16 (conf/experiment/tiny.yaml)
MLA = TargetShape(kind="mla", converted_layers=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                  v_head_dim=16)
# per layer: q_proj 64x(4*16) + kv_a 64x(32+8) + latent norm 32 + kv_b 32x(4*(8+16)) + o_proj (4*16)x64
TARGET_PER_LAYER = 64 * 64 + 64 * 40 + 32 + 32 * 96 + 64 * 64
TARGET = 4 * TARGET_PER_LAYER
# embeddings 256x64, lm_head 256x64 (untied), per layer: q 64x64, k 64x32, v 64x32, o 64x64, q/k norm 16+16,
# MLP 3x64x128, two norms 2x64; final norm 64
FROZEN = 2 * 256 * 64 + 4 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 32 + 3 * 64 * 128 + 2 * 64) + 64


def overrides(*extra):
    return ["experiment=tiny", "data=synthetic", "data.seq_len=32", "distill.model_level.micro_batch_size=2",
            "distill.layerwise.micro_batch_size=2", "model.dtype=bf16", "target.mla.latent_norm=true", *extra]


def compose_cfg(extra=()):
    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=[*overrides(*extra), "output_dir=."]))


def test_parts_of_the_torch_engine_by_hand():
    run = RunSettings(stage="model_level", seq_len=32, micro_batch=2, weight_bytes=2, kd_chunk=16)
    plan = plan_stage(TINY, MLA, ParamCounts(frozen=FROZEN, target=TARGET, largest_layer=1), run)
    parts = plan.parts
    assert parts["frozen weights"] == FROZEN * 2  # bf16
    assert parts["target weights"] == TARGET * (4 + 2)  # fp32 master copy itself + autocast's bf16 copy
    assert parts["fp32 masters"] == 0
    assert parts["optimizer states"] == TARGET * 8  # AdamW: two fp32 states
    assert parts["gradients"] == TARGET * 4
    assert parts["comm buffers"] == 0
    assert parts["KD loss chunk"] == 3.5 * 4 * 16 * 256 + 2 * 2 * 32 * 64
    # one layer, stage 2, per token (bf16 activations): two norms (fp32 input + bf16 output each);
    # MLA: kv_b output 4*(8+16), q and k 4*16 each, output and o_proj input 4*16 each, latent norm fp32 32
    # + bf16 32, rope key 2x8, log-sum-exp 4 heads fp32; MLP: 3 x 128
    mla = 2 * 96 + 2 * 2 * 64 + 2 * 2 * 64 + 4 * 32 + 2 * 32 + 2 * 2 * 8 + 4 * 4
    per_layer = 2 * (4 * 64 + 2 * 64) + mla + 2 * 3 * 128
    assert layer_bytes(TINY, MLA, 2, "model_level") == per_layer
    transient = 2 * (4 * 64 + 3 * 128)
    final_norm = 4 * 64 + 2 * 64
    assert plan.activations_without_ckpt == 2 * 32 * (4 * per_layer + transient + final_norm)
    # every layer checkpointed: each keeps its bf16 input; one layer is recomputed at a time
    assert plan.activations_with_ckpt == 2 * 32 * (4 * 2 * 64 + per_layer + transient + final_norm)


def test_compiled_layers_keep_norm_inputs_and_matmul_outputs_only():
    mla = 2 * 96 + 2 * 2 * 64 + 2 * 2 * 64 + 4 * 32 + 2 * 32 + 2 * 2 * 8 + 4 * 4  # as in the eager hand count
    # whole layers compiled: each norm keeps its bf16 input only, the MLP its gate and up outputs
    assert layer_bytes(TINY, MLA, 2, "model_level", "layers") == 2 * 2 * 64 + mla + 2 * 2 * 128
    # dense MLP blocks compiled: the norms stay eager
    assert layer_bytes(TINY, MLA, 2, "model_level", "blocks") == 2 * (4 * 64 + 2 * 64) + mla + 2 * 2 * 128
    eager = plan_stage(TINY, MLA, ParamCounts(FROZEN, TARGET, 1), RunSettings("model_level", 32, 2))
    compiled = plan_stage(TINY, MLA, ParamCounts(FROZEN, TARGET, 1), RunSettings("model_level", 32, 2,
                                                                                 compiled="layers"))
    assert compiled.activations_without_ckpt < eager.activations_without_ckpt
    # the compiled KD chunk math holds the two logits and the gradient in bf16 instead of ~3.5 fp32 tensors,
    # reverse KL and JSD one fp32 tensor more
    chunk_rows, hidden_grad = min(512, 2 * 32), 2 * 2 * 32 * 64
    assert eager.parts["KD loss chunk"] == 3.5 * 4 * chunk_rows * 256 + hidden_grad
    assert compiled.parts["KD loss chunk"] == eager.parts["KD loss chunk"]  # compiled layers alone: eager KD
    fused = {kind: plan_stage(TINY, MLA, ParamCounts(FROZEN, TARGET, 1), RunSettings(
        "model_level", 32, 2, compiled="layers", kd_fused=True, kd_kind=kind)).parts["KD loss chunk"]
        for kind in ("forward", "reverse", "jsd")}
    assert fused["forward"] == 3 * 2 * chunk_rows * 256 + hidden_grad
    assert fused["reverse"] == fused["jsd"] == (3 * 2 + 4) * chunk_rows * 256 + hidden_grad


def test_plan_resolves_compile_for_the_clusters_device():
    # engine.compile=auto compiles whole layers on a CUDA cluster and nothing on Ascend (compile.py)
    cuda = plan_run(compose_cfg(["engine.compile=auto", "cluster=h200", "plan.stage=model_level"]))[0]
    npu = plan_run(compose_cfg(["engine.compile=auto", "cluster=910b_64g", "cluster.devices_per_node=1",
                                "plan.stage=model_level"]))[0]
    assert cuda["activations_no_ckpt_gib"] < npu["activations_no_ckpt_gib"]
    # the KD chunk math is compiled on CUDA only; an explicit engine.compile on Ascend compiles the layers
    # (torchair aside) but the KD loss stays eager there
    assert cuda["parts_gib"]["KD loss chunk"] < npu["parts_gib"]["KD loss chunk"]
    forced = plan_run(compose_cfg(["engine.compile=layers", "cluster=910b_64g", "cluster.devices_per_node=1",
                                   "plan.stage=model_level"]))[0]
    assert forced["parts_gib"]["KD loss chunk"] == npu["parts_gib"]["KD loss chunk"]
    eager_cuda = plan_run(compose_cfg(["engine.compile=off", "cluster=h200", "plan.stage=model_level"]))[0]
    assert eager_cuda["parts_gib"]["KD loss chunk"] == npu["parts_gib"]["KD loss chunk"]


def test_zero_partitions_what_each_stage_says():
    counts = ParamCounts(frozen=FROZEN, target=TARGET, largest_layer=5000)
    base = {"stage": "model_level", "seq_len": 32, "micro_batch": 2, "engine": "deepspeed", "world_size": 4,
            "weight_bytes": 2}
    z2 = plan_stage(TINY, MLA, counts, RunSettings(zero_stage=2, **base)).parts
    assert z2["frozen weights"] == FROZEN * 2  # replicated below ZeRO-3
    assert z2["target weights"] == TARGET * 2  # DeepSpeed holds the module in bf16 ...
    assert z2["fp32 masters"] == TARGET * 4 / 4  # ... and partitioned fp32 masters in its optimizer
    assert z2["optimizer states"] == TARGET * 8 / 4
    assert z2["gradients"] == TARGET * 4 / 4  # accumulated in fp32, partitioned
    z1 = plan_stage(TINY, MLA, counts, RunSettings(zero_stage=1, **base)).parts
    assert z1["gradients"] == TARGET * 4  # DeepSpeed's bf16 optimizer: whole fp32 accumulators on every rank
    z1_off = plan_stage(TINY, MLA, counts, RunSettings(zero_stage=1, offload_optimizer=True, **base)).parts
    assert z1_off["gradients"] == TARGET * 4 / 4 and z1_off["optimizer states"] == 0
    # host memory: fp32 master + two AdamW states + fp32 gradient = 16 B per target parameter, over 4 ranks
    big = ParamCounts(frozen=FROZEN, target=2**30, largest_layer=5000)
    notes = plan_stage(TINY, MLA, big, RunSettings(zero_stage=1, offload_optimizer=True, **base)).notes
    assert any("(4.0 GiB per rank)" in note for note in notes), notes
    z3 = plan_stage(TINY, MLA, counts, RunSettings(zero_stage=3, **base)).parts
    assert z3["frozen weights"] == FROZEN * 2 / 4
    assert z3["comm buffers"] == TARGET * 2 + 2 * 5000 * 2  # reduce bucket + gathered and prefetched layer
    assert z3["gradients"] == TARGET * 2 / 4  # ZeRO-3 accumulates in the module's dtype
    off = plan_stage(TINY, MLA, counts, RunSettings(zero_stage=3, offload_optimizer=True, **base)).parts
    assert off["optimizer states"] == 0 and off["fp32 masters"] == 0


def test_stage2_training_shared_weights_counts_a_copy_of_what_it_trains():
    counts = ParamCounts(frozen=FROZEN, target=TARGET, largest_layer=1, target_attention=TARGET // 4)
    run = RunSettings(stage="model_level", seq_len=32, micro_batch=2, weight_bytes=2, kd_chunk=16, teacher_copy=True)
    with_copy = plan_stage(TINY, MLA, counts, run)
    without = plan_stage(TINY, MLA, counts, dataclasses.replace(run, teacher_copy=False))
    copied = TARGET - TARGET // 4  # the trained weights outside the target attentions; frozen ones are shared
    assert with_copy.parts["teacher copy"] == copied * 2  # bf16
    assert without.parts["teacher copy"] == 0
    assert with_copy.total - without.total == copied * 2
    stage1 = plan_stage(TINY, MLA, counts, dataclasses.replace(run, stage="layerwise"))
    assert stage1.parts["teacher copy"] == 0  # stage 1 never makes one
    # the task sets it from the stage-2 policy
    from ascend_edit.models.build import edited_shape_model
    from ascend_edit.models.surgery import parameter_counts

    _, all_weights = plan_run(compose_cfg(["distill.model_level.trainable=all"]))
    _, norms = plan_run(compose_cfg(["distill.model_level.trainable=target+norms"]))
    _, targets_only = plan_run(compose_cfg())
    assert targets_only["parts_gib"]["teacher copy"] == 0
    cfg = compose_cfg()
    teacher_attention = parameter_counts(edited_shape_model(cfg.model, cfg.target))["teacher_attention"]
    # `all`: every shared weight, i.e. what stays frozen when only the targets train, less the teacher attentions
    assert all_weights["parts_gib"]["teacher copy"] * GIB == pytest.approx(
        targets_only["parts_gib"]["frozen weights"] * GIB - teacher_attention * 2)
    # `target+norms`: the norms only (was: the whole model, 57 GiB at the 30B-A3B shape)
    assert 0 < norms["parts_gib"]["teacher copy"] < 0.01 * targets_only["parts_gib"]["frozen weights"]


def test_largest_micro_batch_is_the_last_that_fits():
    run = RunSettings(stage="model_level", seq_len=32, micro_batch=2, weight_bytes=2, kd_chunk=16)
    plan = plan_stage(TINY, MLA, ParamCounts(frozen=FROZEN, target=TARGET, largest_layer=1), run)
    fixed = plan.total - 2 * plan.per_sequence
    budget = fixed + 7.5 * plan.per_sequence
    assert plan.largest_micro_batch(budget, 2) == 7


def test_plan_task_counts_the_meta_model_like_the_hand():
    cfg = compose_cfg()
    layerwise, model_level = plan_run(cfg)
    assert model_level["parts_gib"]["target weights"] * GIB == pytest.approx(TARGET * 6)
    assert model_level["parts_gib"]["frozen weights"] * GIB == pytest.approx(FROZEN * 2)
    assert layerwise["stage"] == "layerwise" and layerwise["parts_gib"]["KD loss chunk"] == 0
    assert model_level["fits"] and model_level["largest_micro_batch"] > 2
    assert model_level["tokens_per_s_per_device"] > 0


def test_largest_micro_batch_shows_the_batch_share_that_bounds_it():
    from ascend_edit.tasks.plan import _largest_micro_cell

    assert _largest_micro_cell({"largest_micro_batch": 35, "batch_per_rank": 8}) == "35 (batch per rank 8)"
    assert _largest_micro_cell({"largest_micro_batch": 6, "batch_per_rank": 64}) == "6"
    _, model_level = plan_run(compose_cfg())
    assert model_level["batch_per_rank"] == compose_cfg().distill.model_level.batch_size


def test_cluster_multiplies_devices_and_partitions():
    cfg = compose_cfg(["cluster=910b_64g", "cluster.nodes=2", "engine=zero3", "distill.model_level.batch_size=32"])
    _, model_level = plan_run(cfg)
    assert model_level["world_size"] == 16
    assert model_level["parts_gib"]["frozen weights"] * GIB == pytest.approx(FROZEN * 2 / 16)


def test_plan_says_when_the_batch_would_be_refused_at_launch():
    """A plan that 'fits' must not hide that the run's own batch check refuses it on this many ranks."""
    cfg = compose_cfg(["cluster=910b_64g", "cluster.nodes=2", "engine=zero2", "distill.model_level.batch_size=16"])
    layerwise, model_level = plan_run(cfg)  # 16 ranks: 16 sequences, micro-batch 2 per rank does not divide 1
    assert model_level["batch_problem"] is not None
    assert "distill.model_level.micro_batch_size=2" in model_level["batch_problem"]
    assert "multiple of 32" in model_level["batch_problem"]
    cfg = compose_cfg(["cluster=910b_64g", "cluster.nodes=2", "engine=zero2", "distill.model_level.batch_size=32",
                       "distill.layerwise.batch_size=32"])
    assert all(stage["batch_problem"] is None for stage in plan_run(cfg))
    # engine=torch trains in one process: on 16 ranks every rank failed after loading the teacher
    cfg = compose_cfg(["cluster=910b_64g", "cluster.nodes=2", "engine=torch", "distill.model_level.batch_size=32",
                       "distill.layerwise.batch_size=32"])
    assert all("engine=torch trains in one process" in stage["batch_problem"] for stage in plan_run(cfg))


def test_plan_reads_only_the_config_of_a_checkpoint(tmp_path):
    """`plan` builds shapes, so a directory holding only config.json (a login node) is enough; training is not."""
    from transformers import AutoConfig

    from ascend_edit.config import ConfigError
    from ascend_edit.validation import check_before_load

    AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256).save_pretrained(tmp_path)
    path_overrides = ["model=hf", f"model.path={tmp_path}", "model.arch=null"]
    check_before_load(compose_cfg([*path_overrides, "task=plan"]))
    with pytest.raises((ConfigError, ValueError), match="has a config.json but no weights"):
        check_before_load(compose_cfg([*path_overrides, "task=convert"]))


def test_plan_of_the_8b_recipe_needs_no_corpus_path(tmp_path):
    """The recipe's own comment: `plan experiment=qwen3_8b_mla model.path=...` sizes the run before any corpus
    exists; training with that config still names the missing data.path in one line."""
    from transformers import AutoConfig

    from ascend_edit.config import ConfigError

    AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=128, vocab_size=256).save_pretrained(tmp_path)
    def recipe(task):
        register_configs()
        with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
            return to_typed(compose(config_name="config", overrides=[
                "experiment=qwen3_8b_mla", f"model.path={tmp_path}", f"task={task}", "output_dir=."]))

    cfg = recipe("plan")
    assert cfg.data.source == "files" and cfg.data.path is None
    assert plan_run(cfg)  # and it plans
    with pytest.raises(ConfigError, match="data.path is required when data.source=files"):
        recipe("convert")


def test_plan_takes_the_zero_bucket_sizes_the_run_gives_deepspeed():
    """docs/distributed.md shows engine.zero_options bucket sizes as the knob for comm memory; plan showed the
    default buckets whatever they were."""
    base = ["engine=zero2", "cluster=910b_64g", "cluster.nodes=2", "distill.model_level.batch_size=32",
            "distill.layerwise.batch_size=32"]
    default = plan_run(compose_cfg(base))[1]["parts_gib"]["comm buffers"]
    small = plan_run(compose_cfg([*base, "+engine.zero_options.reduce_bucket_size=1000",
                                  "+engine.zero_options.allgather_bucket_size=500"]))[1]["parts_gib"]["comm buffers"]
    assert small * GIB == pytest.approx((1000 + 500) * 2)  # bf16 elements of each bucket
    assert default > small


def test_moe_activations_follow_the_experts_implementation():
    """plan counted grouped_mm whatever engine.experts_implementation said; batched_mm gathers every token's expert
    weights (75.5 MB per token and MoE layer at Qwen3-30B-A3B's widths) and the plan still said it fit."""
    from ascend_edit.plan.memory import mlp_bytes

    a3b = ModelShape(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, vocab=151936, intermediate=6144,
                     experts=128, experts_per_token=8, expert_intermediate=768)
    grouped = mlp_bytes(a3b, 2)
    assert grouped == 4 * 128 + 8 * (2 * (2048 + 3 * 768) + 2 + 24)  # 70,352: measured 70,453 (docs/scaling.md)
    assert mlp_bytes(a3b, 2, experts="eager") == grouped + 8 * 2 * 2048  # measured 103,156
    assert mlp_bytes(a3b, 2, experts="batched_mm") == grouped + 8 * 3 * 2048 * 768 * 2  # measured 75,567,732
    assert mlp_bytes(TINY, 2, experts="batched_mm") == mlp_bytes(TINY, 2)  # a dense model has no experts
    settings = RunSettings(stage="layerwise", seq_len=4096, micro_batch=1)
    mla = dataclasses.replace(MLA, converted_layers=48)
    parts = {name: plan_stage(a3b, mla, ParamCounts(frozen=0, target=0, largest_layer=0),
                              dataclasses.replace(settings, experts=name)).parts for name in ("grouped_mm", "batched_mm")}
    assert sum(parts["batched_mm"].values()) - sum(parts["grouped_mm"].values()) >= 4096 * 8 * 3 * 2048 * 768 * 2


@pytest.mark.parametrize(("rank", "printed"), [("0", True), ("1", False)])
def test_plan_under_a_launcher_prints_once(monkeypatch, capsys, rank, printed):
    """Started under a launcher (with the job it plans for), every rank printed the same table."""
    from ascend_edit.tasks.plan import run

    monkeypatch.setenv("RANK", rank)
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", rank), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    report = run(compose_cfg([]))
    assert report["plan"] and ("plan" in capsys.readouterr().out) is printed
