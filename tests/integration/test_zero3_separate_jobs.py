"""Under ZeRO-3 the jobs that start from a saved converted model load it partitioned, as the conversion loads
its teacher: `ascend-edit eval` and `ascend-edit export` run as separate jobs, and a stage-2-only conversion
(`distill.stage=model_level distill.init_from=...`). Their results equal the whole-model path's.

One tiny Qwen3-MoE teacher (vocab 2,048 and expert FFN 512: embeddings, LM head and experts above DeepSpeed's
persistence threshold) and one converted model of it (MLA in every layer), run by tests/helpers/
zero3_separate_jobs.py and zero3_stage2_only.py as 1 and 2 ranks (gloo, CPU; torchrun's environment, forked
by tests/helpers/cli_runner.py). Same values
through the same arithmetic, so everything is compared for exact equality (tolerance 0; files byte for byte).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers.cli_runner import run_cli
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed")

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold (see test_zero3_handoff)
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("moe_teacher"), arch="qwen3_moe", vocab_size=2048,
                                moe_intermediate_size=512)


@pytest.fixture(scope="module")
def converted(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher with the stage-2 run's MLA targets (random, seeded), saved whole: stage 1's result stand-in."""
    from ascend_edit.models.checkpoint import save_converted
    from ascend_edit.models.loading import load_teacher
    from ascend_edit.models.surgery import build_plan, edit_model
    from tests.helpers.zero3_stage2_only import stage2_overrides
    from tests.unit.test_config_cli import compose_typed

    out = tmp_path_factory.mktemp("converted") / "stage-layerwise"
    cfg = compose_typed(stage2_overrides(teacher, out, out))
    model, tokenizer = load_teacher(cfg.model)
    target = dataclasses.replace(cfg.target, init="random")
    torch.manual_seed(1)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    return save_converted(model, cfg.target, out, tokenizer)


def torchrun(world: int, helper: str, *args: Path) -> None:
    """`torchrun --nproc_per_node WORLD -m HELPER ARGS`, as ranks forked from a preloaded interpreter with the
    environment torchrun gives them (tests/helpers/cli_runner.py)."""
    proc = run_cli(list(map(str, args)), module=helper, world=world, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# ~20 s each on 2 shared CPU cores (1 and 2 processes alike).
# world 1 in the slow tier (CI time); world 2 is the partitioned case the separate jobs exist for.
@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.slow), 2], ids=["world1", "world2"])
def jobs(request, teacher: Path, converted: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp(f"separate_jobs_world{request.param}")
    torchrun(request.param, "tests.helpers.zero3_separate_jobs", teacher, converted, out)
    return request.param, out


def test_separate_eval_equals_the_whole_model_eval(jobs):
    _, out = jobs
    got, want = (json.loads((out / name / "eval.json").read_text()) for name in ("eval-partitioned", "eval-whole"))
    assert got.pop("zero3_partitioned") == {"student": True, "teacher": True}
    assert "zero3_partitioned" not in want
    for results in (got, want):
        results.pop("seconds")
    assert got == want and got["quality"]["python_docs"]["64"]["student"]["ppl"] > 0


def test_separate_export_is_byte_identical(jobs):
    _, out = jobs
    whole, part = out / "export-whole", out / "export-partitioned"
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in part.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name


def test_no_rank_holds_a_parameter_whole_after_the_partitioned_load(jobs):
    world, out = jobs
    records = [json.loads((out / f"load-rank{rank}.json").read_text()) for rank in range(world)]
    for record in records:
        assert record["world"] == world
        for param in record["params"]:
            assert param["resident"] == 0, param  # nothing outside the partitions
            assert param["partition"] == math.ceil(param["full"] / world), param  # this rank's share only
    full = sum(p["full"] for p in records[0]["params"])
    # one tensor (or one teacher attention while the targets are built) at a time, never the model
    assert PERSISTENCE_THRESHOLD < records[0]["largest_gathered"] < full // 4
    assert records[0]["gathered_equals_whole"]  # the weights came through unchanged


# Two conversions per run: ~20 s with 1 process, ~25 s with 2 (2 shared CPU cores).
@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["world1", "world2"])
def stage2_runs(request, teacher: Path, converted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp(f"stage2_world{request.param}")
    torchrun(request.param, "tests.helpers.zero3_stage2_only", teacher, converted, out)
    return {"whole_teacher": out / "whole_teacher", "partitioned": out / "partitioned"}


@pytest.mark.parametrize("path", ["converted/model.safetensors", "metrics.jsonl"])
def test_stage2_only_partitioned_files_are_identical(stage2_runs, path):
    assert (stage2_runs["partitioned"] / path).read_bytes() == (stage2_runs["whole_teacher"] / path).read_bytes()


def test_stage2_only_starts_partitioned_with_equal_results(stage2_runs):
    got, want = (json.loads((stage2_runs[mode] / "report.json").read_text())
                 for mode in ("partitioned", "whole_teacher"))
    assert got["results"] == want["results"] and "after_layerwise" in got["results"]  # the loaded stage-1 weights
    assert got["histories"] == want["histories"] and got["histories"]["model_level"]
    held, reference = got["zero3"]["stage_start"]["model_level"], want["zero3"]["stage_start"]["model_level"]
    # After loading the saved weights, before the engine: partitions plus the plain converted attentions only.
    assert held["largest"] < PERSISTENCE_THRESHOLD and held["values"] < held["full_values"] // 10, held
    assert reference["values"] == reference["full_values"]  # the whole-teacher path, measured the same way


def cli_eval(checkpoint: Path, teacher: Path, out: Path, engine: str) -> dict:
    from tests.helpers.zero3_separate_jobs import eval_overrides

    args = [a for a in eval_overrides(teacher, checkpoint, out, engine) if a != "task=eval"]
    proc = run_cli(["eval", *args], timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


def test_separate_eval_of_an_exported_checkpoint_loads_it_partitioned(tmp_path: Path):
    """A native (deepseek_v3) export of a dense conversion, evaluated by `ascend-edit eval engine=zero3` in one
    process (a DeepSpeed world of one): transformers' `from_pretrained` loads it into partitions."""
    from ascend_edit.config import MLAConfig, ModelConfig, TargetConfig
    from ascend_edit.models.export import export_converted
    from ascend_edit.models.loading import load_teacher
    from ascend_edit.models.surgery import build_plan, edit_model, unwrap_targets

    teacher = make_tiny_checkpoint(tmp_path / "teacher", arch="qwen3", vocab_size=2048)
    model, tokenizer = load_teacher(ModelConfig(source="hf", path=str(teacher), dtype="fp32"))
    target = TargetConfig(kind="mla", init="random", mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8,
                                                                   qk_nope_head_dim=8, v_head_dim=16))
    torch.manual_seed(0)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    exported = export_converted(unwrap_targets(model), tmp_path / "hf", tokenizer=tokenizer)
    assert exported.format == "deepseek_v3"
    got = cli_eval(exported.directory, teacher, tmp_path / "eval-partitioned", "zero3")
    want = cli_eval(exported.directory, teacher, tmp_path / "eval-whole", "torch")
    assert got.pop("zero3_partitioned") == {"student": True, "teacher": True}
    for results in (got, want):
        results.pop("seconds")
    assert got == want
