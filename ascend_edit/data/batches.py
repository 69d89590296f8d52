"""Batches of tensors from a packed dataset: the train loop's micro-batches and fixed evaluation sets."""
from __future__ import annotations

from typing import Protocol

import torch


class PackedSequences(Protocol):
    """A training or held-out set as the loop reads it: its length and one packed sequence by index
    (PackedDataset, MixedDataset, MappedPackedDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """Stack dataset items into one batch of tensors on `device`."""
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def batches_of(dataset, indices: range, batch_size: int, device) -> list[dict]:
    """Fixed evaluation / calibration batches of consecutive sequences."""
    return [collate(dataset, list(indices[i:i + batch_size]), device) for i in range(0, len(indices), batch_size)]
