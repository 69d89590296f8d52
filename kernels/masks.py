"""Who may attend to whom: the visibility rule shared by every attention backend.

One predicate, :func:`visible`, states the rule on broadcastable tensors. The dense backends
(eager, SDPA, the NPU explicit-mask path) apply it to ``[b, s, 1]`` x ``[b, 1, t]`` grids; the
flex backend applies it element-wise inside a ``mask_mod``. Keeping one definition is what keeps
the backends from drifting apart at the window boundary.

The rule (contract A of ``kernels/reference.py``): key ``j`` is visible to query ``i`` iff

* ``k_pos[j] >= 0``                       (negative positions mark empty cache slots),
* ``k_pos[j] <= q_pos[i]``                (causal by position, not by index),
* ``window == 0`` or ``q_pos[i] - k_pos[j] < window`` or ``k_pos[j] < sink_tokens``
  (a window of ``w`` sees the query itself and the ``w - 1`` positions before it),
* ``q_seg[i] == k_seg[j]`` when segment ids are given (packed documents).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

__all__ = ["visible", "dense_visibility", "TensorKeyedCache"]


def visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | torch.Tensor,
    sink_tokens: int | torch.Tensor,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise visibility of key positions ``k_pos`` to query positions ``q_pos``.

    All tensor arguments broadcast against each other; the result is a bool tensor of the
    broadcast shape. ``window`` and ``sink_tokens`` may be ints or 0-d integer tensors: the
    expression has no branch on their values, so the flex backend can pass tensors and one
    compiled kernel serves every window size. (``sink_tokens = 0`` needs no special case:
    ``k_pos < 0`` keys are invisible anyway.)
    """
    causal = (k_pos >= 0) & (k_pos <= q_pos)
    in_window = (window == 0) | ((q_pos - k_pos) < window) | (k_pos < sink_tokens)
    mask = causal & in_window
    if q_seg is not None and k_seg is not None:
        mask = mask & (q_seg == k_seg)
    return mask


def dense_visibility(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Visibility matrix ``[b, s, t]`` (True = the key takes part) from ``[b, s]`` / ``[b, t]`` ids."""
    return visible(
        q_pos[:, :, None],
        k_pos[:, None, :],
        window=window,
        sink_tokens=sink_tokens,
        q_seg=None if q_seg is None else q_seg[:, :, None],
        k_seg=None if k_seg is None else k_seg[:, None, :],
    )


V = TypeVar("V")


class TensorKeyedCache(Generic[V]):
    """A small LRU cache whose keys include the *identity* of some tensors.

    Every layer of one forward pass receives the same position / segment tensors, so a value
    derived from them (a flex ``BlockMask``, an NPU call plan) can be built once per forward and
    reused by all layers. Keying on ``data_ptr()`` alone would be unsafe: a freed tensor's
    memory is reused by the next batch's positions. An entry therefore holds weak references to
    the tensors it was built from plus their in-place version counters, and is a hit only while
    those exact tensor objects are alive and unmodified.
    """

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[list[weakref.ref[torch.Tensor] | None], list[int], V]] = (
            OrderedDict())

    def get_or_build(
        self,
        tensors: Sequence[torch.Tensor | None],
        params: Hashable,
        build: Callable[[], V],
    ) -> V:
        """Return the cached value for ``(tensors, params)``, calling ``build()`` on a miss."""
        key = (tuple(None if t is None else id(t) for t in tensors), params)
        entry = self._entries.get(key)
        if entry is not None and self._still_valid(entry, tensors):
            self._entries.move_to_end(key)
            return entry[2]
        value = build()
        refs = [None if t is None else weakref.ref(t) for t in tensors]
        versions = [-1 if t is None else t._version for t in tensors]
        self._entries[key] = (refs, versions, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value

    @staticmethod
    def _still_valid(
        entry: tuple[list[weakref.ref[torch.Tensor] | None], list[int], object], tensors: Sequence[torch.Tensor | None]
    ) -> bool:
        refs, versions, _ = entry
        for ref, version, tensor in zip(refs, versions, tensors):
            if tensor is None:
                if ref is not None:
                    return False
                continue
            if ref is None or ref() is not tensor or tensor._version != version:
                return False
        return True

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
