"""A stage checkpoint of a bf16 run, exported in fp32: the trained fp32 masters go into an fp32 model, not
into the run's bf16 one widened afterwards (which held their bf16 rounding, at twice the size)."""
from __future__ import annotations

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
