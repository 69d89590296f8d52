"""engine.kind=torch with engine.offload_optimizer=true: AdamW's fp32 masters and moments in host memory,
gradients accumulated in fp32 on the device, the same trajectory as the on-device fp32-master engine.

On the CPU the chunks are stepped in place (no streams); the device path's streams and pinned buffers
run only on an accelerator (tests/kernels/test_offload_streams.py, skipped without one)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ascend_edit.config import ConfigError, EngineConfig, StageConfig
from ascend_edit.train.checkpoint_io import load_trainable_file
from ascend_edit.train.engine import TorchEngine
from ascend_edit.train.offload import StreamedOffloadAdamW, clip_gradients
from ascend_edit.train.precision import Precision

BF16 = Precision(compute=torch.bfloat16, device_type="cpu")


class TwoLayers(nn.Module):
    """A frozen bf16 layer feeding two trainable ones (one with a bias: several tensors, several sizes)."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.frozen = nn.Linear(width, width, bias=False)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, 5, bias=False)
        self.to(torch.bfloat16)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.second(torch.relu(self.first(self.frozen(x))))


def objective(model, batch):
    loss = (model(batch["x"]).float() - batch["y"]).pow(2).mean()
    return loss, {"loss": float(loss.detach())}


def batches(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(6, 24, generator=g).bfloat16(), "y": torch.randn(6, 5, generator=g)}
            for _ in range(count)]


def make(offload: bool, chunk: int | None = None, grad_clip: float = 1.0, lr: float = 1e-3,
         fill: float | None = None):
    torch.manual_seed(0)
    model = TwoLayers()
    if fill is not None:  # every trainable weight 1.0: one bf16 ulp is 2**-7
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(fill)
    params = [p for p in model.parameters() if p.requires_grad]
    stage = StageConfig(steps=10, lr=lr, warmup_steps=0, min_lr_ratio=1.0, batch_size=2, weight_decay=0.1)
    engine = TorchEngine(model, objective, params, stage,
                         EngineConfig(grad_clip=grad_clip, offload_optimizer=offload), accumulation=2, precision=BF16)
    if chunk is not None:
        engine.optimizer.chunk_elements = chunk
    return model, engine


def train(engine: TorchEngine, data: list[dict], steps: int) -> list[float]:
    norms = []
    for step in range(steps):
        for batch in data[2 * step: 2 * step + 2]:
            loss, _ = engine.forward(batch)
            engine.backward(loss)
            engine.micro_step()
        norms.append(engine.step())
    return norms


def weights(engine: TorchEngine) -> list[torch.Tensor]:
    if isinstance(engine.optimizer, StreamedOffloadAdamW):
        return [m.clone() for m in engine.optimizer.masters()]
    return [p.detach().float().clone() for p in engine.params]


@pytest.mark.parametrize("chunk", [None, 7])  # 7: every tensor split into uneven chunks
def test_offloaded_masters_follow_the_on_device_fp32_masters(chunk):
    """Same fused AdamW, same fp32 gradients summed over the micro-batches, same clipping: the masters
    agree with the on-device engine's fp32 parameters to fp32 rounding, and the bf16 weights the forward
    reads are their rounding."""
    data = batches(8)
    _, plain = make(offload=False)
    model, offloaded = make(offload=True, chunk=chunk)
    norms_plain, norms_offloaded = train(plain, data, 4), train(offloaded, data, 4)
    assert norms_offloaded == pytest.approx(norms_plain, rel=1e-5)
    for ours, reference in zip(weights(offloaded), weights(plain), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for p, master in zip(offloaded.params, offloaded.optimizer.masters(), strict=True):
        assert p.dtype == torch.bfloat16 and p.grad is None  # the forward's dtype; gradients live in fp32
        assert torch.equal(p.detach(), master.bfloat16())
    assert model.frozen.weight.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in offloaded.optimizer.masters())


def test_fp32_accumulation_keeps_what_bf16_accumulation_rounds_away():
    """Two micro-batch gradients, 1.0 and 2**-9: their bf16 sum rounds back to 1.0, the fp32 accumulator
    keeps it."""
    param = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    optimizer = StreamedOffloadAdamW([param], lr=1e-3)
    for value in (1.0, 2.0**-9):
        (param.float() * value).sum().backward()
    assert param.grad is None
    assert torch.equal(optimizer.grads[0], torch.full((4,), 1.0 + 2.0**-9))
    assert torch.tensor(1.0, dtype=torch.bfloat16) + torch.tensor(2.0**-9, dtype=torch.bfloat16) == 1.0


def test_an_update_below_one_bf16_ulp_is_kept_in_the_master():
    _, engine = make(offload=True, lr=1e-4, grad_clip=0.0, fill=1.0)
    before = [p.detach().clone() for p in engine.params]
    masters_before = weights(engine)
    train(engine, batches(2), 1)
    moved = [not torch.equal(a, b) for a, b in zip(weights(engine), masters_before)]
    assert all(moved)  # every master moved by ~lr
    assert all(torch.equal(p.detach(), b) for p, b in zip(engine.params, before))  # bf16 weights did not


def test_resume_restores_masters_and_moments_exactly(tmp_path):
    data = batches(8)
    _, straight = make(offload=True, chunk=7)
    train(straight, data, 4)
    _, first = make(offload=True, chunk=7)
    train(first, data[:4], 2)
    first.save(tmp_path)
    saved = load_trainable_file(tmp_path)
    assert all(t.dtype == torch.float32 for t in saved.values())  # the masters, not their bf16 rounding
    _, resumed = make(offload=True, chunk=7)
    resumed.load(tmp_path)
    assert resumed.scheduler.last_epoch == 2
    train(resumed, data[4:], 2)
    for ours, reference in zip(weights(resumed), weights(straight), strict=True):
        assert torch.equal(ours, reference)


def test_a_non_finite_gradient_skips_the_update_and_clears_the_accumulators():
    _, engine = make(offload=True)
    masters = weights(engine)
    loss, _ = engine.forward(batches(1)[0])
    engine.backward(loss * float("nan"))
    assert not math.isfinite(engine.step())
    assert all(torch.equal(a, b) for a, b in zip(weights(engine), masters))
    assert all(float(g.abs().sum()) == 0.0 for g in engine.optimizer.grads)
    assert engine.scheduler.last_epoch == 0


def test_clip_gradients_matches_torch():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g) * 4, torch.randn(7, generator=g)]
    params = [nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert clip_gradients(grads, 1.0) == pytest.approx(expected, rel=1e-6)
    for p, t in zip(params, grads):
        torch.testing.assert_close(t, p.grad)
    assert clip_gradients([torch.tensor([float("inf")])], 1.0) == float("inf")


def test_checkpoints_of_the_two_torch_optimizers_do_not_mix(tmp_path):
    _, plain = make(offload=False)
    _, offloaded = make(offload=True)
    assert plain.describe() != offloaded.describe()


def test_config_rules():
    EngineConfig(kind="torch", offload_optimizer=True)  # accepted: the streamed offload
    with pytest.raises(ConfigError, match="engine.offload_optimizer needs engine.zero_stage>=1"):
        EngineConfig(kind="deepspeed", zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="no fp16 loss scaling"):
        TorchEngine(TwoLayers(), objective, [nn.Parameter(torch.zeros(2))], StageConfig(steps=1, lr=1e-3, warmup_steps=0),
                    EngineConfig(offload_optimizer=True), accumulation=1,
                    precision=Precision(compute=torch.float16, device_type="cuda"))


def test_the_single_tensor_adamw_of_devices_without_the_fused_kernel_agrees():
    """An NPU has no fused AdamW kernel in torch: the streamed step takes the single-tensor form there (step
    count on the host). Checked on the CPU against the fused kernel."""
    data = batches(4)
    _, fused = make(offload=True, chunk=7)
    _, single = make(offload=True, chunk=7)
    single.optimizer.fused = False
    train(fused, data, 2)
    train(single, data, 2)
    for ours, reference in zip(weights(single), weights(fused), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_a_parameter_without_a_gradient_is_not_stepped():
    """As torch's AdamW skips a parameter whose .grad is None: no weight decay, no momentum, no step count."""
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = StreamedOffloadAdamW([used, unused], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        (used * 2.0).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(used.detach(), torch.ones(3))
    assert torch.equal(unused.detach(), torch.ones(3))
    assert float(optimizer.state[used]["step"]) == 2.0 and float(optimizer.state[unused]["step"]) == 0.0
