"""The input checks of the two attention contracts, one owner for every backend.

Contracts A (sliding window) and B (absorbed MLA) are stated in ``kernels/reference.py``. Each
backend's entry point carries the decorator of its op -- :func:`sliding_window_contract` or
:func:`mla_contract` -- which checks the call's arguments before the kernel runs, so a backend
states only its signature and its own work. The checks read metadata only (shapes, dtypes, types):
no device sync, and the same ``ValueError`` text whichever backend was called.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["sliding_window_contract", "mla_contract", "check_sliding_window_inputs", "check_mla_inputs"]

P = ParamSpec("P")
R = TypeVar("R")


def sliding_window_contract(kernel: Callable[P, R]) -> Callable[P, R]:
    """Decorator for an entry point of op A: every call is checked by :func:`check_sliding_window_inputs`."""
    return _checked_by(check_sliding_window_inputs, kernel)


def mla_contract(kernel: Callable[P, R]) -> Callable[P, R]:
    """Decorator for an entry point of op B: every call is checked by :func:`check_mla_inputs`."""
    return _checked_by(check_mla_inputs, kernel)


def _checked_by(check: Callable[..., None], kernel: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(kernel)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        check(*args, **kwargs)
        return kernel(*args, **kwargs)

    return checked


def check_sliding_window_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    **_unchecked: object,
) -> None:
    """Raise ``ValueError`` naming the first way the inputs break contract A (metadata only, no sync).

    The call's other keyword arguments (``scale``, a backend's own options) are not part of the check.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, s, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share heads and length")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    hk, t = k.shape[1], k.shape[2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    _check_ids("q_pos", q_pos, (b, s))
    _check_ids("k_pos", k_pos, (b, t))
    if (q_seg is None) != (k_seg is None):
        raise ValueError("give both q_seg and k_seg, or neither")
    if q_seg is not None and k_seg is not None:
        _check_ids("q_seg", q_seg, (b, s))
        _check_ids("k_seg", k_seg, (b, t))
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = unlimited), got {window!r}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")


def check_mla_inputs(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    **_unchecked: object,
) -> None:
    """Raise ``ValueError`` naming the first way the inputs break contract B (metadata only).

    The call's other keyword arguments (``scale``) are not part of the check.
    """
    if q_latent.dim() != 4 or q_rope.dim() != 4:
        raise ValueError(
            f"q_latent and q_rope must be 4-D [batch, heads, seq, dim]; got "
            f"{tuple(q_latent.shape)}, {tuple(q_rope.shape)}"
        )
    if latent.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(
            f"latent and k_rope must be 3-D [batch, kv_len, dim] (shared by all heads); got "
            f"{tuple(latent.shape)}, {tuple(k_rope.shape)}"
        )
    b, h, s, c = q_latent.shape
    if q_rope.shape[:3] != (b, h, s):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must match q_latent {tuple(q_latent.shape)} in [b, h, s]")
    r = q_rope.shape[3]
    t = latent.shape[1]
    if latent.shape != (b, t, c):
        raise ValueError(f"latent must be [b={b}, t, c={c}]; got {tuple(latent.shape)}")
    if k_rope.shape != (b, t, r):
        raise ValueError(f"k_rope must be [b={b}, t={t}, r={r}]; got {tuple(k_rope.shape)}")
    if not (q_latent.dtype == q_rope.dtype == latent.dtype == k_rope.dtype):
        raise ValueError(
            f"dtypes differ: q_latent {q_latent.dtype}, q_rope {q_rope.dtype}, latent {latent.dtype}, "
            f"k_rope {k_rope.dtype}"
        )
    _check_ids("q_pos", q_pos, (b, s))
    _check_ids("k_pos", k_pos, (b, t))


def _check_ids(name: str, ids: torch.Tensor, shape: tuple[int, int]) -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {type(ids).__name__}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor (int64), got {ids.dtype}")
