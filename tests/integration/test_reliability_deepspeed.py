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
    from ascend_edit.train.precision import Precision
    from tests.unit.test_engine import STAGE, TokenDataset, ToyLM
    from tests.unit.test_reliability_checkpoints import CountingObjective, nan_gradient

    seed_everything(0)
    bf16 = sys.argv[3] == "bf16"  # a bf16 module: DeepSpeed wraps the optimizer in its 16-bit one
    model = ToyLM(dropout=0.0).to(torch.bfloat16 if bf16 else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = EngineConfig(kind="deepspeed", zero_stage=int(sys.argv[1]))
    precision = Precision(torch.bfloat16, "cpu") if bf16 else None
    engine = DeepSpeedEngine(model, CountingObjective(on_step={4: nan_gradient}), params, STAGE, cfg, 2, 2, 1,
                             resolve_device("cpu", dtype=sys.argv[3]), precision=precision)
    run = StageRun("toy", STAGE.steps, 2, ResumableDistributedSampler(20, 4), TokenDataset(), torch.device("cpu"),
                   log_every=0)
    history = train_stage(engine, run)
    state = engine.optimizer.state_dict()
    steps = sorted({int(v["step"]) for v in state["state"].values()}) if "state" in state else None
    print("RESULT", json.dumps({"skipped": run.skipped_steps, "lr": [h["lr"] for h in history],
                                "finite": all(bool(torch.isfinite(p).all()) for p in engine.model.parameters()),
                                "adam_steps": steps}))
""")


@pytest.mark.parametrize(("zero_stage", "dtype"), [(0, "fp32"), (0, "bf16"), (2, "fp32"), (3, "fp32")])
def test_deepspeed_skips_a_nan_gradient_step(zero_stage: int, dtype: str, tmp_path: Path):
    """bf16 ZeRO-0 once logged the withheld step as a normal one with norm 0.0 (the norm of the zeroed
    gradients it steps on): no skip counted, so a stage of NaN gradients 'finished' without updates."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    port = 29600 + zero_stage + 10 * (dtype == "bf16")
    done = subprocess.run([sys.executable, str(script), str(zero_stage), str(port), dtype], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result["skipped"] == [4] and result["finite"]
    assert result["lr"][3] == result["lr"][4]  # the schedule did not advance on the skipped step
    if result["adam_steps"] is not None:  # ZeRO 1-3 wrap the optimizer state differently
        assert result["adam_steps"] == [7]


ZERO0_EXPORT = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from pathlib import Path
    import torch
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from ascend_edit.config import EngineConfig
    from ascend_edit.device import resolve_device
    from ascend_edit.train.checkpoint_io import read_trainable_weights, write_manifest
    from ascend_edit.train.engine import DeepSpeedEngine
    from ascend_edit.train.precision import Precision
    from tests.unit.test_engine import STAGE, ToyLM, next_token_loss

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
    torch.manual_seed(0)
    model = ToyLM(dropout=0.0)
    if sys.argv[4] == "tied":  # frozen tied embeddings (tie_word_embeddings): DeepSpeed keeps the alias
        model.embed.weight = model.head.weight
        model.head.weight.requires_grad_(False)
    model = model.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = DeepSpeedEngine(model, next_token_loss, params, STAGE, EngineConfig(kind="deepspeed", zero_stage=0),
                             1, 4, 1, resolve_device("cpu"), precision=Precision(dtype, "cpu"))
    batch = {"input_ids": torch.randint(0, 16, (4, 9))}
    for _ in range(3):
        loss, _ = engine.forward(batch); engine.backward(loss); engine.micro_step()
    directory = Path(sys.argv[3]); engine.save(directory); write_manifest(directory)
    masters = getattr(engine.optimizer, "fp32_groups", None)
    expected = [t.float() for t in (masters[0] if masters else params)]
    read = read_trainable_weights(directory)
    print("RESULT", json.dumps({"names": list(read), "exact": [bool(torch.equal(a, b)) for a, b in
                                                                 zip(read.values(), expected)],
                                "dtypes": sorted({str(t.dtype) for t in read.values()})}))
""")


@pytest.mark.parametrize(("dtype", "tied"), [("fp32", ""), ("bf16", ""), ("fp32", "tied"), ("bf16", "tied")])
def test_a_zero0_checkpoint_is_read_with_its_fp32_masters(dtype: str, tied: str, tmp_path: Path):
    """ZeRO-0 writes no optimizer partitions: DeepSpeed's consolidation failed on it (TypeError), so its stage
    checkpoints could not be exported. A bf16 module's weights come from its optimizer's fp32 masters."""
    script = tmp_path / "run.py"
    script.write_text(ZERO0_EXPORT)
    root = Path(__file__).resolve().parents[2]
    port = 29640 + (dtype == "bf16") + 2 * bool(tied)
    done = subprocess.run([sys.executable, str(script), dtype, str(port), str(tmp_path / "ck"), tied or "untied"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result["names"] == (["head.bias"] if tied else ["embed.weight", "head.weight", "head.bias"])
    assert all(result["exact"]) and result["dtypes"] == ["torch.float32"]
