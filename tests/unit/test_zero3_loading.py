"""The teacher loaded ZeRO-3 partitioned (models/zero3.py): no parameter is resident after the load, calibration
and per-layer surgery gather one module at a time, and the converted result equals the whole-model conversion.

A tiny Qwen3-MoE checkpoint, DeepSpeed on the CPU with one gloo process, in a child process (DeepSpeed keeps
process-wide state; forked from a preloaded interpreter, tests/helpers/cli_runner.py): tests/helpers/zero3_conversion.py.
"""
from __future__ import annotations

import json

import pytest

from tests.helpers.cli_runner import free_port, run_cli
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("moe_teacher"), arch="qwen3_moe")
    run = run_cli([str(checkpoint), str(free_port())], module="tests.helpers.zero3_conversion", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_parameters_are_partitioned_after_load(result):
    loaded = result["loaded"]
    assert loaded["partitioned"] == loaded["parameters"] > 0  # every parameter, experts and router included
    assert loaded["resident_values"] == 0  # no rank holds a whole weight outside a gather
    assert loaded["full_values"] == loaded["whole_values"]  # the partitions describe the whole teacher
    assert result["teacher_still_partitioned"]  # calibration and surgery released what they gathered


def test_partitioned_conversion_equals_the_whole_one(result):
    # Same arithmetic on the same values (fp32, one process): equal, not merely close.
    assert result["target_names_equal"] and result["targets"] > 0
    assert result["stats_max_abs_diff"] == 0.0
    assert result["target_max_abs_diff"] == 0.0
    assert result["logits_max_abs_diff"] == 0.0 and result["logits_scale"] > 0


def test_a_zero3_engine_takes_the_partitioned_model(result):
    assert result["engine_targets_zero_params"]  # deepspeed.initialize converted the surgery's new targets
    assert 0 < result["engine_loss"] < float("inf") and 0 < result["engine_grad_norm"] < float("inf")
    assert result["whole_after_close"] and result["teacher_after_close_max_abs_diff"] == 0.0


@pytest.mark.parametrize("overrides,partitioned", [
    (["engine=zero3"], True),
    (["engine=zero3", "model.dtype=bf16"], True),
    (["engine=zero2"], False),  # ZeRO 1/2 keep frozen weights as replicas
    (["engine=zero3", "target=identity"], False),  # a deep copy of the whole attention
    (["engine=zero3", "target.mla.kv_budget=0.5"], False),  # reads every layer's weights at once
    # stage 2 alone: its saved weights are written into the partitions one tensor at a time
    (["engine=zero3", "distill.stage=model_level"], True),
    (["engine=zero3", "distill.stage=model_level", "distill.model_level.steps=0"], False),  # no engine at all
])
def test_which_runs_load_the_teacher_partitioned(overrides, partitioned):
    from ascend_edit.train.prepare import partitioned_teacher_config
    from tests.unit.test_config_cli import compose_typed

    cfg = compose_typed(["experiment=tiny", *overrides])
    config = partitioned_teacher_config(cfg)
    assert (config is not None) == partitioned
    if config is not None:
        assert config["zero_optimization"]["stage"] == 3
        assert config["bf16"]["enabled"] == (cfg.model.dtype == "bf16") and not config["fp16"]["enabled"]
