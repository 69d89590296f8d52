"""Non-finite steps under DeepSpeed (issue 9): a NaN gradient at step 4 is skipped by every ZeRO stage,
with no update, one fewer AdamW step and the schedule held, like the torch engine.

DeepSpeed runs in a child process (one rank, gloo on CPU) so its process group stays out of this one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from ascend_edit.config import EngineConfig
    from ascend_edit.data import ResumableDistributedSampler
    from ascend_edit.device import resolve_device, seed_everything
    from ascend_edit.train.engine import DeepSpeedEngine
    from ascend_edit.train.loop import StageRun, train_stage
    from tests.unit.test_engine import STAGE, TokenDataset, ToyLM
    from tests.unit.test_reliability_checkpoints import CountingObjective, nan_gradient

    seed_everything(0)
    model = ToyLM(dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = EngineConfig(kind="deepspeed", zero_stage=int(sys.argv[1]))
    engine = DeepSpeedEngine(model, CountingObjective(on_step={4: nan_gradient}), params, STAGE, cfg, 2, 2, 1,
                             resolve_device("cpu"))
    run = StageRun("toy", STAGE.steps, 2, ResumableDistributedSampler(20, 4), TokenDataset(), torch.device("cpu"),
                   log_every=0)
    history = train_stage(engine, run)
    state = engine.optimizer.state_dict()
    steps = sorted({int(v["step"]) for v in state["state"].values()}) if "state" in state else None
    print("RESULT", json.dumps({"skipped": run.skipped_steps, "lr": [h["lr"] for h in history],
                                "finite": all(bool(torch.isfinite(p).all()) for p in engine.model.parameters()),
                                "adam_steps": steps}))
""")


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_deepspeed_skips_a_nan_gradient_step(zero_stage: int, tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script), str(zero_stage), str(29600 + zero_stage)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result["skipped"] == [4] and result["finite"]
    assert result["lr"][3] == result["lr"][4]  # the schedule did not advance on the skipped step
    if result["adam_steps"] is not None:  # ZeRO 1-3 wrap the optimizer state differently
        assert result["adam_steps"] == [7]
