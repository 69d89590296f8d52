"""Two ZeRO-3 conversions of one tiny MoE teacher in one process group (gloo, CPU): the model gathered whole on
every rank after each stage (`partitioned_handoff=False`, the path before partitioned hand-offs), then kept
partitioned from load to the written checkpoint. tests/integration/test_zero3_handoff.py compares the two runs'
files and `report.json`.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.helpers.zero3_handoff <teacher> <out>
"""
from __future__ import annotations

import sys
from pathlib import Path

from ascend_edit.tasks.convert import run
from tests.unit.test_config_cli import compose_typed

MODES = {"gathered": False, "partitioned": True}


def overrides(teacher: Path, out_dir: Path) -> list[str]:
    return [
        "model=hf", f"model.path={teacher}", "model.dtype=fp32", "device=cpu", "device.threads=1", "engine=zero3",
        "engine.checkpoint_every=100", "target=mla_small", "target.calibration_batches=1",
        "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8", "target.mla.kv_lora_rank=32",
        "target.mla.v_head_dim=16",
        "data=files", f"data.path={teacher / 'corpus.txt'}", "data.split_on_blank_lines=true", "data.seq_len=64",
        "data.eval_sequences=4", "eval.batch_size=2",
        # a small held-out suite: its forwards run on every rank of the partitioned model
        "eval.contexts=[64]", "eval.passkey_contexts=[160]", "eval.passkey_depths=[0.5]", "eval.passkey_trials=1",
        "eval.sequences=1", "eval.domains=[in_domain]", "eval.passkey_filler=in_domain", "eval.batch_tokens=128",
        *(f"distill.{stage}.{key}" for stage in ("layerwise", "model_level")
          for key in ("steps=2", "batch_size=2", "warmup_steps=1")),
        f"output_dir={out_dir}",
    ]


def main(teacher: str, out: str) -> None:
    for mode, partitioned in MODES.items():
        out_dir = Path(out) / mode
        run(compose_typed(overrides(Path(teacher), out_dir)), partitioned_handoff=partitioned)


if __name__ == "__main__":
    main(*sys.argv[1:3])
