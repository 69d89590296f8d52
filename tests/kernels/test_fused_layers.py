"""Fused decoder-layer ops by module swapping (``ascend_edit/models/fused_layers.py``).

"NPU" here is ``NpuStandIn`` -- labelled stand-ins of the documented torch_npu / MindSpeed ops
(``tests/kernels/npu_standin.py``), not Ascend hardware: the tests check which kernels the
default recipe resolves and that swapped models compute what the originals compute.
"""
from __future__ import annotations

import copy

import pytest
import torch
from ascend_edit.kernels import fused_reference
from ascend_edit.kernels.npu import fused_ops

from ascend_edit.attention import rope
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.fused_layers import FusedOpsConfig, FusedRMSNorm, FusedSwiGLUMLP, install_fused_ops
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model

from .npu_standin import NpuStandIn

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def eager_rope_after_each_test():
    yield
    rope.set_rope_kernel(None)  # the rotary choice is process-wide: never leak it into other tests


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> NpuStandIn:
    return NpuStandIn().install(monkeypatch, mindspeed=True)


def _student(kind: str) -> torch.nn.Module:
    teacher = tiny_model("qwen3")
    if kind == "teacher":
        return teacher
    target = TargetConfig(
        kind=kind, init="random",
        gate_swa=GateSWAConfig(window=5, sink_tokens=2, full_every=2),
        mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    )  # fmt: skip
    torch.manual_seed(0)
    return edit_model(teacher, build_plan(teacher.config.num_hidden_layers, target), target).eval()


def _count(model: torch.nn.Module, suffix: str) -> int:
    return sum(type(m).__name__.endswith(suffix) for m in model.modules())


@pytest.mark.parametrize("kind", ["teacher", "gate_swa", "mla"])
def test_default_recipe_on_a_stand_in_npu_swaps_in_the_fused_entries(kind: str, stand_in: NpuStandIn) -> None:
    model = _student(kind)
    original = copy.deepcopy(model)
    norms, mlps = _count(model, "RMSNorm"), _count(model, "MLP")
    keys = set(model.state_dict())

    chosen = install_fused_ops(model, FusedOpsConfig(), device_type="npu")

    assert chosen == {"rms_norm": "npu", "rotary_embedding": "npu", "swiglu": "npu"}
    fused_norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused_norms) == norms and all(m.kernel is fused_ops.rms_norm for m in fused_norms)
    assert _count(model, "MLP") == mlps and all(
        m.kernel is fused_ops.swiglu for m in model.modules() if isinstance(m, FusedSwiGLUMLP))
    assert set(model.state_dict()) == keys, "swapping must not rename parameters (checkpoints, export)"

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL)
    called = set(stand_in.ops_called())
    assert {"npu_rms_norm", "npu_swiglu"} <= called
    if kind != "teacher":  # converted attention applies RoPE through the chosen kernel
        assert "npu_rotary_mul" in called


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["on-cpu", "on-gpu"])
def test_default_recipe_on_cpu_and_cuda_keeps_the_existing_paths(device_type: str) -> None:
    model = _student("gate_swa")
    before = [type(m) for m in model.modules()]
    assert install_fused_ops(model, FusedOpsConfig(), device_type=device_type) == {}
    assert [type(m) for m in model.modules()] == before
    assert rope._rope_kernel is None


def test_backends_are_overridable_in_config(stand_in: NpuStandIn) -> None:
    model = _student("mla")
    cfg = FusedOpsConfig(rotary_embedding="mindspeed", swiglu="eager")
    chosen = install_fused_ops(model, cfg, device_type="npu")
    assert chosen == {"rms_norm": "npu", "rotary_embedding": "mindspeed", "swiglu": "eager"}
    assert all(m.kernel is fused_reference.swiglu for m in model.modules() if isinstance(m, FusedSwiGLUMLP))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 9)))
    assert "npu_rotary_position_embedding" in stand_in.ops_called()


def test_forced_on_cpu_uses_the_eager_references() -> None:
    model = _student("gate_swa")
    original = copy.deepcopy(model)
    chosen = install_fused_ops(model, FusedOpsConfig(enabled="on"), device_type="cpu")
    assert chosen == {"rms_norm": "eager", "rotary_embedding": "eager", "swiglu": "eager"}
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (FusedOpsConfig(enabled="yes"), "model.fused_ops.enabled must be one of"),
        (FusedOpsConfig(rms_norm="apex"), "model.fused_ops.rms_norm must be one of"),
    ],
)
def test_bad_config_names_the_key(cfg: FusedOpsConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        install_fused_ops(_student("teacher"), cfg, device_type="npu")
