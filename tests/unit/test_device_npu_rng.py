"""NPU generator state in checkpoints, with a STAND-IN ``torch.npu`` (not Ascend hardware).

The stand-in implements the documented torch_npu generator API (the torch.cuda one:
``get_rng_state_all`` / ``set_rng_state_all`` of per-card uint8 tensors) over CPU generators.
"""
from __future__ import annotations

import sys
import types

import torch

from ascend_edit import device as dev


class _NpuGeneratorsStandIn:
    """TEST DOUBLE of torch.npu's RNG API: two cards, each a CPU torch.Generator."""

    def __init__(self) -> None:
        self.cards = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]

    def is_available(self) -> bool:
        return True

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.cards]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for g, s in zip(self.cards, states):
            g.set_state(s)

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.rand(4, generator=g) for g in self.cards])


def test_npu_rng_state_round_trips(monkeypatch) -> None:
    npu = _NpuGeneratorsStandIn()
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    state = dev.rng_state()
    assert len(state["npu"]) == 2 and all(s.dtype == torch.uint8 for s in state["npu"])
    first = npu.draw()
    dev.set_rng_state(state)
    assert torch.equal(npu.draw(), first)


def test_no_npu_state_without_torch_npu(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert "npu" not in dev.rng_state()
    assert "torch_npu" not in sys.modules  # saving a checkpoint never imports torch_npu
