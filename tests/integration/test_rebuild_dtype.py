"""A stage checkpoint of a bf16 run, exported in fp32: the trained fp32 masters go into an fp32 model, not
into the run's bf16 one widened afterwards (which held their bf16 rounding, at twice the size)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ascend_edit.tasks.convert import run
from ascend_edit.train.checkpoint_io import read_trainable_weights
from ascend_edit.train.rebuild import rebuild_from_engine_checkpoint
from tests.unit.test_config_cli import compose_typed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp32_rebuild_of_a_bf16_run_keeps_the_masters(tmp_path):
    out = tmp_path / "run"
    cfg = compose_typed([
        "model=qwen3_tiny", "model.dtype=bf16", "device=cpu", "device.dtype=bf16", "device.threads=1",
        "target=mla", "target.mla.kv_lora_rank=32", "target.mla.qk_rope_head_dim=8",
        "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16", "data=synthetic", "data.seq_len=32", "data.synthetic_sequences=8", "data.eval_sequences=2",
        "eval.batch_size=2", "eval.suite=false", "engine.compile=off", "export.enabled=false",
        "target.calibration_batches=1", "distill.stage=layerwise",
        *(f"distill.layerwise.{key}" for key in ("steps=2", "batch_size=2", "warmup_steps=0", "lr=1e-2")),
        f"output_dir={out}"])
    run(cfg)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), out / ".hydra" / "config.yaml")
    checkpoint = out / "checkpoints" / "step-layerwise-2"
    trained = read_trainable_weights(checkpoint)
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in trained.values())  # finer than bf16

    wide, _ = rebuild_from_engine_checkpoint(checkpoint, torch.float32)
    own = dict(wide.named_parameters())
    assert all(torch.equal(own[name], value) for name, value in trained.items())
    narrow, _ = rebuild_from_engine_checkpoint(checkpoint)  # the run's own dtype
    assert next(narrow.parameters()).dtype == torch.bfloat16


def test_a_budget_runs_stage_checkpoint_is_rebuilt_with_its_saved_ranks(tmp_path):
    """target.mla.kv_budget (spectrum allocation): the rebuild measured ranks again without the run's
    calibration data, chose others, and refused the checkpoint blaming an unchanged config.yaml."""
    out = tmp_path / "run"
    cfg = compose_typed(["experiment=tiny", "target.mla.kv_budget=0.5", "target.mla.rank_multiple=1",
                         "eval.suite=false", "export.enabled=false", "distill.stage=layerwise", f"output_dir={out}"])
    report = run(cfg)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), out / ".hydra" / "config.yaml")
    steps = cfg.distill.layerwise.steps
    saved = json.loads((out / "stage-layerwise" / "ascend_edit.json").read_text())["plan"]
    assert report["plan"] == saved  # report.json names the ranks the budget chose, too
    rebuilt, _ = rebuild_from_engine_checkpoint(out / "checkpoints" / f"step-layerwise-{steps}")
    ranks = [layer.self_attn.target.kv_lora_rank for layer in rebuilt.model.layers]
    assert ranks == [entry[2] for entry in saved]
