"""Training precision: fp32 master copies of the trainable weights, bf16 forward under autocast,
fp16 loss scaling, and the one-line refusals of contradictory settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ascend_edit.config import EngineConfig, StageConfig
from ascend_edit.train.engine import TorchEngine
from ascend_edit.train.precision import Precision, frozen_dtype, resolve_precision

# A step this small is far below one bf16 ulp of a weight of 1.0 (2**-7 = 0.0078), but well above an
# fp32 ulp (2**-23): only an fp32 master can record it.
TINY_LR = 1e-4


class FrozenThenTrainable(nn.Module):
    """A frozen bf16 'teacher' layer feeding a trainable layer (held in the model's bf16)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(8, 8, bias=False)
        self.trainable = nn.Linear(8, 8, bias=False)
        nn.init.ones_(self.trainable.weight)  # 1.0: bf16 ulp 2**-7
        self.to(torch.bfloat16)
        self.frozen.requires_grad_(False)
        self.seen_dtype: torch.dtype | None = None

    def forward(self, x):
        hidden = self.frozen(x)
        out = self.trainable(hidden)
        self.seen_dtype = out.dtype  # the dtype the matmul ran in
        return out


def objective(model, batch):
    loss = model(batch["x"]).float().pow(2).mean()
    return loss, {"loss": float(loss.detach())}


def one_step(precision: Precision | None) -> tuple[FrozenThenTrainable, TorchEngine]:
    torch.manual_seed(0)
    model = FrozenThenTrainable()
    params = [model.trainable.weight]
    # sign-only update of AdamW: |delta| = lr on every weight (no warm-up, no decay)
    stage = StageConfig(steps=10, lr=TINY_LR, warmup_steps=0, min_lr_ratio=1.0, batch_size=1)
    engine = TorchEngine(model, objective, params, stage, EngineConfig(grad_clip=0.0), accumulation=1,
                         precision=precision)
    loss, _ = engine.forward({"x": torch.randn(4, 8, dtype=torch.bfloat16)})
    engine.backward(loss)
    engine.step()
    return model, engine


def test_fp32_master_records_an_update_that_bf16_rounds_away():
    model, engine = one_step(Precision(compute=torch.bfloat16, device_type="cpu"))
    weight = model.trainable.weight
    assert weight.dtype == torch.float32  # the master copy, held for the stage
    assert model.frozen.weight.dtype == torch.bfloat16  # frozen weights are never copied
    assert model.seen_dtype == torch.bfloat16  # the forward ran in bf16 under autocast
    delta = (weight.detach() - 1.0).abs()
    assert torch.all(delta > TINY_LR / 2) and torch.all(delta < TINY_LR * 2)  # the update is there, in fp32
    # The same update applied to a bf16 weight is rounded away entirely.
    assert torch.equal(weight.detach().bfloat16(), torch.ones_like(weight, dtype=torch.bfloat16))
    engine.close()  # after the stage the model holds its own dtype again (eval / export need one dtype)
    assert weight.dtype == torch.bfloat16


def test_bf16_only_update_loses_the_step():
    """The failure mode the masters prevent: AdamW on bf16 parameters leaves them unchanged."""
    model, _ = one_step(None)  # no policy: the parameters train as they are, in bf16
    assert model.trainable.weight.dtype == torch.bfloat16
    assert torch.equal(model.trainable.weight.detach(), torch.ones(8, 8, dtype=torch.bfloat16))


def test_fp16_uses_a_grad_scaler():
    precision = Precision(compute=torch.float16, device_type="cpu")
    assert precision.loss_scaling and precision.grad_scaler() is not None
    assert Precision(compute=torch.bfloat16).grad_scaler() is None


def test_resolve_precision_auto_and_refusals():
    assert resolve_precision("auto", "cuda", torch.bfloat16).compute == torch.bfloat16
    assert resolve_precision("auto", "cpu", torch.float32).compute == torch.float32
    assert resolve_precision("auto", "cpu", torch.bfloat16).compute == torch.bfloat16
    assert resolve_precision("bf16", "cpu", torch.float32).autocast
    with pytest.raises(ValueError, match="device.dtype=fp16 is not supported on the CPU"):
        resolve_precision("fp16", "cpu", torch.float32)
    with pytest.raises(ValueError, match="wider than the frozen weights"):
        resolve_precision("fp32", "cuda", torch.bfloat16)


def test_the_two_16_bit_formats_never_meet_in_one_forward():
    """bf16 autocast over fp16 weights (or the reverse) fails inside the first stage's forward (autocast's
    'Unexpected floating ScalarType'): refused in one line; `auto` over fp16 weights computes in fp16."""
    for compute, weights in (("bf16", torch.float16), ("fp16", torch.bfloat16)):
        with pytest.raises(ValueError, match="would mix two 16-bit formats"):
            resolve_precision(compute, "cuda", weights)
    assert resolve_precision("auto", "cuda", torch.float16).compute == torch.float16
    with pytest.raises(ValueError, match="model.dtype=fp16 on the CPU: device.dtype=auto"):
        resolve_precision("auto", "cpu", torch.float16)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.dtype=bf16", "device=cpu", "device.dtype=fp32"], "device.dtype=fp32 is wider than the frozen weights"),
    (["model.dtype=fp16", "device=cpu", "device.dtype=bf16"], "would mix two 16-bit formats"),
    (["engine=zero2", "device=cpu", "device.dtype=bf16"], "engine=deepspeed runs the forward in the module's own dtype"),
])
def test_precision_is_refused_before_the_teacher_loads(overrides, message):
    """The stage resolves the same rules much later (after loading, calibration and two evaluations)."""
    from ascend_edit.validation import check_run_inputs
    from tests.unit.test_validation import compose_typed

    cfg = compose_typed(["experiment=tiny", *overrides])
    with pytest.raises(ValueError, match=message):
        check_run_inputs(cfg, world_size=1)


def test_frozen_dtype_reads_the_frozen_weights():
    model = FrozenThenTrainable()
    assert frozen_dtype(model) == torch.bfloat16


def test_fp16_loss_scale_backoff_does_not_stop_the_stage():
    """GradScaler starts at 2**16 and halves on each overflow: with a summed loss that is 7 skipped steps
    here, past engine.max_consecutive_skips=5. They are back-offs, not a broken run: the stage finishes and
    trains once the scale fits (it stopped with NonFiniteSteps before)."""
    from ascend_edit.data import ResumableDistributedSampler
    from ascend_edit.device import seed_everything
    from ascend_edit.train.loop import StageRun, train_stage
    from tests.unit.test_engine import STAGE, VOCAB, TokenDataset, ToyLM

    def summed_loss(model, batch):
        ids = batch["input_ids"]
        logits = model(ids[:, :-1]).reshape(-1, VOCAB).float()
        loss = nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum") * 50
        return loss, {"loss": float(loss.detach())}

    seed_everything(0)
    model = ToyLM(dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = TorchEngine(model, summed_loss, params, STAGE, EngineConfig(), 1,
                         precision=Precision(torch.float16, "cpu"))
    run = StageRun("toy", STAGE.steps, 1, ResumableDistributedSampler(20, 4), TokenDataset(), torch.device("cpu"),
                   log_every=0)
    history = train_stage(engine, run)
    backoffs = [row["step"] for row in history if row.get("loss_scale_backoff")]
    assert len(backoffs) > run.max_consecutive_skips  # more in a row than a NaN run may have
    assert not history[-1]["skipped"] and engine.scaler.get_scale() < 2.0**16


def test_the_torch_engines_offload_refuses_fp16_before_the_teacher_loads():
    from ascend_edit.validation import check_precision
    from tests.unit.test_validation import compose_typed

    cfg = compose_typed(["experiment=tiny", "model.dtype=fp16", "device=cuda", "device.dtype=fp16",
                         "engine.offload_optimizer=true"])
    with pytest.raises(ValueError, match="no fp16 loss scaling: use model.dtype=bf16 device.dtype=bf16"):
        check_precision(cfg)
