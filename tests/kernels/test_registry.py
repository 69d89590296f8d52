"""Kernel registry: auto choice per device, explicit overrides, clear errors, logging once."""
from __future__ import annotations

import logging
import sys

import pytest
from ascend_edit.kernels import (
    MLA_ABSORBED_ATTENTION,
    SLIDING_WINDOW_ATTENTION,
    KernelUnavailableError,
    available_backends,
    flex,
    fused_reference,
    ops,
    reference,
    registry,
    resolve,
    sdpa,
)
from ascend_edit.kernels.npu import fused_ops, fusion_attention, infer_attention
from ascend_edit.kernels.registry import RMS_NORM, ROTARY_EMBEDDING, SWIGLU
from ascend_edit.kernels.triton import mla_decode


@pytest.fixture
def packages(monkeypatch: pytest.MonkeyPatch):
    """Pretend a chosen set of optional packages is installed (find_spec is the registry's only probe)."""

    def install(*names: str) -> None:
        monkeypatch.setattr(registry, "_has_package", lambda name: name in names)

    return install


@pytest.mark.parametrize(
    ("op", "device_type", "needs_grad", "installed", "expected"),
    [
        (SLIDING_WINDOW_ATTENTION, "cpu", True, (), sdpa.sliding_window_attention),
        (SLIDING_WINDOW_ATTENTION, "cpu", False, (), sdpa.sliding_window_attention),
        (SLIDING_WINDOW_ATTENTION, "cuda", True, (), flex.sliding_window_attention),
        (SLIDING_WINDOW_ATTENTION, "cuda", False, (), flex.sliding_window_attention),
        (SLIDING_WINDOW_ATTENTION, "npu", True, ("torch_npu",), fusion_attention.sliding_window_attention),
        (MLA_ABSORBED_ATTENTION, "cpu", False, ("triton",), reference.mla_absorbed_attention),
        (MLA_ABSORBED_ATTENTION, "cuda", False, ("triton",), mla_decode.mla_absorbed_attention),
        (MLA_ABSORBED_ATTENTION, "cuda", True, ("triton",), reference.mla_absorbed_attention),
        (MLA_ABSORBED_ATTENTION, "cuda", False, (), reference.mla_absorbed_attention),
        (MLA_ABSORBED_ATTENTION, "npu", False, ("torch_npu",), infer_attention.mla_absorbed_attention),
        (MLA_ABSORBED_ATTENTION, "npu", True, ("torch_npu",), reference.mla_absorbed_attention),
        (RMS_NORM, "npu", True, ("torch_npu",), fused_ops.rms_norm),
        (ROTARY_EMBEDDING, "npu", True, ("torch_npu", "mindspeed"), fused_ops.rotary_embedding),
        (SWIGLU, "npu", True, ("torch_npu",), fused_ops.swiglu),
        (RMS_NORM, "cpu", True, ("torch_npu",), fused_reference.rms_norm),
        (ROTARY_EMBEDDING, "cuda", True, ("torch_npu", "mindspeed"), fused_reference.rotary_embedding),
        (SWIGLU, "cuda", False, (), fused_reference.swiglu),
    ],
)
def test_auto_choice(op, device_type, needs_grad, installed, expected, packages) -> None:
    packages(*installed)
    assert resolve(op, device_type=device_type, needs_grad=needs_grad) is expected


@pytest.mark.parametrize("needs_grad", [True, False])
def test_cuda_sliding_window_prefers_triton_when_installed(needs_grad, packages) -> None:
    # By name only: importing the Triton module needs Triton, which CPU machines lack.
    packages("triton")
    assert registry._auto_choice(SLIDING_WINDOW_ATTENTION, "cuda", needs_grad) == "triton"
    packages()
    assert registry._auto_choice(SLIDING_WINDOW_ATTENTION, "cuda", needs_grad) == "flex"


def test_explicit_backend_overrides_auto() -> None:
    assert resolve(SLIDING_WINDOW_ATTENTION, "eager", device_type="cpu", needs_grad=True) is (
        reference.sliding_window_attention
    )
    assert resolve(SLIDING_WINDOW_ATTENTION, "sdpa", device_type="cuda", needs_grad=True) is (
        sdpa.sliding_window_attention
    )


def test_unknown_op_lists_valid_ops() -> None:
    expected = "unknown kernel op 'swa'.*'sliding_window_attention'.*'mla_absorbed_attention'"
    with pytest.raises(ValueError, match=expected):
        resolve("swa", device_type="cpu", needs_grad=False)


def test_unknown_backend_lists_valid_backends() -> None:
    with pytest.raises(ValueError, match="unknown backend 'fa3'.*'eager', 'sdpa', 'flex', 'npu'"):
        resolve(SLIDING_WINDOW_ATTENTION, "fa3", device_type="cpu", needs_grad=False)


@pytest.mark.parametrize(
    ("op", "backend", "device_type", "needs_grad", "installed", "message"),
    [
        (MLA_ABSORBED_ATTENTION, "triton", "cpu", False, ("triton",), "runs only on cuda"),
        (MLA_ABSORBED_ATTENTION, "triton", "cuda", False, (), "'triton' is not installed"),
        (MLA_ABSORBED_ATTENTION, "triton", "cuda", True, ("triton",), "forward-only"),
        (SLIDING_WINDOW_ATTENTION, "flex", "cpu", True, (), "runs only on cuda"),
        (SLIDING_WINDOW_ATTENTION, "npu", "cpu", True, ("torch_npu",), "runs only on npu"),
        (SLIDING_WINDOW_ATTENTION, "auto", "npu", True, (), "'torch_npu' is not installed"),
        (MLA_ABSORBED_ATTENTION, "npu", "npu", True, ("torch_npu",), "forward-only"),
        (ROTARY_EMBEDDING, "mindspeed", "npu", True, ("torch_npu",), "'mindspeed' is not installed"),
        (RMS_NORM, "npu", "cuda", True, ("torch_npu",), "runs only on npu"),
        (SLIDING_WINDOW_ATTENTION, "triton", "cuda", True, (), "'triton' is not installed"),
        (SLIDING_WINDOW_ATTENTION, "triton", "cpu", True, ("triton",), "runs only on cuda"),
    ],
)
def test_backend_unavailable_here_is_a_clear_error(op, backend, device_type, needs_grad, installed, message, packages):
    packages(*installed)
    with pytest.raises(KernelUnavailableError, match=message):
        resolve(op, backend, device_type=device_type, needs_grad=needs_grad)


def test_available_backends(packages) -> None:
    packages()  # no optional package installed
    assert ops() == (SLIDING_WINDOW_ATTENTION, MLA_ABSORBED_ATTENTION, RMS_NORM, ROTARY_EMBEDDING, SWIGLU)
    assert available_backends(SLIDING_WINDOW_ATTENTION) == ("eager", "sdpa", "flex", "npu", "triton")
    assert available_backends(MLA_ABSORBED_ATTENTION) == ("eager", "triton", "npu")
    assert available_backends(ROTARY_EMBEDDING) == ("eager", "npu", "mindspeed")
    assert available_backends(ROTARY_EMBEDDING, "npu") == ("eager",)  # neither package installed
    assert available_backends(SLIDING_WINDOW_ATTENTION, "cpu") == ("eager", "sdpa")
    assert available_backends(SLIDING_WINDOW_ATTENTION, "cuda") == ("eager", "sdpa", "flex")
    assert available_backends(MLA_ABSORBED_ATTENTION, "cuda") == ("eager",)
    with pytest.raises(ValueError, match="unknown kernel op"):
        available_backends("nope")


def test_choice_is_logged_once_per_op_and_backend(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_logged", set())
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        for _ in range(3):
            resolve(SLIDING_WINDOW_ATTENTION, device_type="cpu", needs_grad=True)
        resolve(MLA_ABSORBED_ATTENTION, device_type="cpu", needs_grad=True)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "kernel: sliding_window_attention -> sdpa (device=cpu, needs_grad=True)",
        "kernel: mla_absorbed_attention -> eager (device=cpu, needs_grad=True)",
    ]


def test_resolving_imports_neither_torch_npu_nor_triton_for_cpu_backends(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    resolve(SLIDING_WINDOW_ATTENTION, device_type="cpu", needs_grad=True)
    resolve(MLA_ABSORBED_ATTENTION, device_type="cpu", needs_grad=True)
    for op in (RMS_NORM, ROTARY_EMBEDDING, SWIGLU):
        resolve(op, device_type="cpu", needs_grad=True)
    assert "torch_npu" not in sys.modules and "mindspeed" not in sys.modules
