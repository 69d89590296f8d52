"""A deterministic, rank-sharded batch sampler that resumes exactly where it stopped.

Every batch is a pure function of ``(seed, epoch, position)``: epoch ``e`` shuffles the dataset
with a generator seeded ``seed + e``, cuts the permutation into global batches (the last,
incomplete one is dropped so every rank runs the same number of steps), and rank ``r`` takes
the ``r``-th contiguous slice of ``global_batch_size // world_size`` indices of each global
batch. Resuming therefore needs only ``(epoch, position)``, and because that state counts
*global* steps it stays valid when a run is resumed on a different number of ranks.

Checkpointing caveat: the state counts batches this sampler has *handed out*. A ``DataLoader``
with worker processes fetches batches ahead of the training step, so save
``state_at_step(steps_trained)`` rather than ``state_dict()`` in that case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)  # a stateful object: equal only to itself
class ResumableDistributedSampler:
    """Yields, for each training step, the list of dataset indices this rank loads.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``. One pass over ``iter(sampler)``
    covers the rest of the current epoch, then the state moves to the next epoch.
    """

    dataset_len: int
    global_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    epoch: int = field(default=0, init=False)
    position: int = field(default=0, init=False)  # global steps already handed out in this epoch
    _order_epoch: int | None = field(default=None, init=False, repr=False)
    _order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.global_batch_size < 1 or self.global_batch_size % self.world_size != 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"world_size={self.world_size}"
            )
        if self.dataset_len < self.global_batch_size:
            raise ValueError(
                f"dataset of {self.dataset_len} samples is smaller than one global batch of {self.global_batch_size}"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch_size

    def indices(self, epoch: int, position: int) -> list[int]:
        """This rank's indices for global step ``position`` of ``epoch`` (no state change)."""
        if not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"position {position} outside the epoch's {self.steps_per_epoch} steps")
        start = position * self.global_batch_size + self.rank * self.local_batch_size
        return self._epoch_order(epoch)[start : start + self.local_batch_size].tolist()

    def state_at_step(self, global_step: int) -> dict[str, int]:
        """The state after ``global_step`` steps from the start of training (epoch 0, position 0)."""
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        epoch, position = divmod(global_step, self.steps_per_epoch)
        return self._state(epoch, position)

    def state_dict(self) -> dict[str, int]:
        """``(epoch, position)`` plus the settings a resumed sampler must share."""
        self._roll_over_finished_epoch()
        return self._state(self.epoch, self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state made for another dataset, batch or seed."""
        for key in ("dataset_len", "global_batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this sampler has {getattr(self, key)}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        self._roll_over_finished_epoch()

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        self._roll_over_finished_epoch()
        return self.steps_per_epoch - self.position

    def __iter__(self) -> Iterator[list[int]]:
        self._roll_over_finished_epoch()
        epoch = self.epoch
        while self.epoch == epoch and self.position < self.steps_per_epoch:
            batch = self.indices(self.epoch, self.position)
            self.position += 1  # advanced before yielding: the state counts batches handed out
            yield batch
        self._roll_over_finished_epoch()

    def _state(self, epoch: int, position: int) -> dict[str, int]:
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "global_batch_size": self.global_batch_size,
        }

    def _roll_over_finished_epoch(self) -> None:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.dataset_len, generator=generator)
            else:
                self._order = torch.arange(self.dataset_len)
            self._order_epoch = epoch
        return self._order
