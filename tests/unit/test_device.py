"""The device layer on CPU, CUDA (skipped without a GPU) and NPU through a labelled stand-in.

The NPU tests inject a *test double* of `torch_npu` into sys.modules: a module object exposing the
documented surface (`torch_npu.npu.is_available`, `device_count`, `set_device`, ...). It checks our
selection logic only; nothing here has run on Ascend hardware.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from ascend_edit import device as dev


def _fake_torch_npu(available: bool = True, count: int = 8) -> types.ModuleType:
    npu = types.SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: count,
        set_device=lambda index: None,
        get_device_name=lambda index: "Ascend910B (stand-in)",
        synchronize=lambda index=None: None,
    )
    module = types.ModuleType("torch_npu")
    module.npu = npu
    return module


@pytest.fixture
def fake_npu(monkeypatch):
    module = _fake_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)
    return module


def test_cpu_resolution_and_backend():
    info = dev.resolve_device("cpu")
    assert info.type == "cpu" and info.dist_backend == "gloo"
    assert info.autocast_dtype == torch.float32  # auto dtype on CPU
    assert info.torch_device == torch.device("cpu")


def test_auto_picks_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(dev, "npu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto").type == "cpu"


def test_npu_preferred_over_cuda_with_stand_in(fake_npu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = dev.resolve_device("auto", local_rank=3)
    assert (info.type, info.index, info.dist_backend) == ("npu", 3, "hccl")
    assert info.autocast_dtype == torch.bfloat16
    assert "stand-in" in info.name


def test_npu_local_rank_beyond_visible_cards(fake_npu):
    with pytest.raises(dev.DeviceUnavailableError, match="local rank 9 has no npu card: only 8 visible"):
        dev.resolve_device("npu", local_rank=9)


def test_npu_requested_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import raises ImportError
    with pytest.raises(dev.DeviceUnavailableError, match="device=npu needs torch_npu"):
        dev.resolve_device("npu")


def test_npu_installed_but_no_card(monkeypatch):
    module = _fake_torch_npu(available=False)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)
    with pytest.raises(dev.DeviceUnavailableError, match="reports no NPU"):
        dev.resolve_device("npu")


def test_cuda_requested_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dev.DeviceUnavailableError, match="no CUDA device"):
        dev.resolve_device("cuda")


@pytest.mark.cuda
def test_cuda_device_on_gpu():
    info = dev.resolve_device("cuda")
    assert info.dist_backend == "nccl" and info.torch_device.type == "cuda"
    dev.synchronize(info)
    assert dev.memory_stats(info)["peak_gib"] >= 0


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="device must be one of"):
        dev.resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype=fp16 is not supported on CPU"):
        dev.resolve_device("cpu", dtype="fp16")


def test_seed_and_rng_state_round_trip():
    dev.seed_everything(7)
    state = dev.rng_state()
    a = torch.rand(3)
    dev.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_cpu_memory_stats_report_host_peak():
    stats = dev.memory_stats(dev.resolve_device("cpu"))
    assert stats["peak_gib"] > 0


def test_cpu_threads_beyond_usable_cpus_refused_by_name(monkeypatch):
    # 100,000 threads made the OpenMP runtime segfault on the first matmul; now refused before anything runs
    monkeypatch.setattr(dev, "usable_cpus", lambda: 4)
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"device.threads=5 is more than the 4 CPUs"):
        dev.set_cpu_threads(5)
    assert torch.get_num_threads() == before
    try:
        dev.set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        dev.set_cpu_threads(0)  # 0 keeps what is set
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
