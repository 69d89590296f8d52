"""Eager PyTorch ground truth for every attention kernel (the ``eager`` backend).

This file is the specification. Every other backend is tested against these functions, so they
favour clarity over speed: scores are materialised, the softmax runs in fp32, and GQA is done by
repeating the KV heads.

Two ops
-------
A. :func:`sliding_window_attention` -- causal attention by *positions*, optionally restricted
   to a sliding window with kept sink tokens and to packed-document segments::

       q [b, h, s, d], k [b, hk, t, d], v [b, hk, t, dv]   (h % hk == 0)
       q_pos [b, s] int64, k_pos [b, t] int64              (k_pos < 0: empty cache slot)
       -> out [b, h, s, dv]

   Key ``j`` is visible to query ``i`` iff ``k_pos >= 0``, ``k_pos <= q_pos``, and
   (``window == 0`` or ``q_pos - k_pos < window`` or ``k_pos < sink_tokens``), and the
   segment ids match when given (see ``kernels/masks.py``). A query with no visible key
   outputs zeros (never NaN) and passes zero gradient.

B. :func:`mla_absorbed_attention` -- DeepSeek-style MLA in its absorbed (decode) form::

       q_latent [b, h, s, c]  (query already multiplied by the key up-projection)
       q_rope   [b, h, s, r]
       latent   [b, t, c]     (the compressed KV cache, shared by all heads)
       k_rope   [b, t, r]     (the decoupled RoPE key, shared by all heads)
       scores = (q_latent . latent + q_rope . k_rope) * scale          [b, h, s, t]
       out_latent = softmax(scores) @ latent                            [b, h, s, c]

   Visibility is op A's rule with ``window = 0`` and no segments.
"""
from __future__ import annotations

import torch

from .masks import dense_visibility

__all__ = [
    "sliding_window_attention",
    "mla_absorbed_attention",
    "check_sliding_window_inputs",
    "check_mla_inputs",
    "masked_softmax",
]


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
) -> None:
    """Raise ``ValueError`` naming the first way the inputs break contract A (metadata only, no sync)."""
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
) -> None:
    """Raise ``ValueError`` naming the first way the inputs break contract B (metadata only)."""
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


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over the last dim restricted to ``visible``; rows with nothing visible give 0.

    Masked entries get the most negative finite fp32 value rather than ``-inf``: a row with no
    visible key then yields a finite uniform distribution, which the final multiply by
    ``visible`` turns into zeros -- with finite (zero) gradients, where ``-inf`` would give NaN
    in both passes. In a row with a visible key the masked entries underflow to exactly 0.
    """
    scores = scores.float().masked_fill(~visible, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * visible


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    scale: float,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Op A, eager: see the module docstring for the contract. Returns ``[b, h, s, dv]`` in ``q.dtype``."""
    check_sliding_window_inputs(
        q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg
    )
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [b, h, t, d]: query head i reads kv head i // group
    v = v.repeat_interleave(group, dim=1)  # [b, h, t, dv]
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k.float()) * scale
    vis = dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    probs = masked_softmax(scores, vis[:, None])  # [b, h, s, t] fp32
    out = torch.einsum("bhst,bhtd->bhsd", probs, v.float())
    return out.to(q.dtype)


def mla_absorbed_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Op B, eager: see the module docstring for the contract. Returns ``[b, h, s, c]`` in ``q_latent.dtype``."""
    check_mla_inputs(q_latent, q_rope, latent, k_rope, q_pos=q_pos, k_pos=k_pos)
    scores = torch.einsum("bhsc,btc->bhst", q_latent.float(), latent.float())
    scores = scores + torch.einsum("bhsr,btr->bhst", q_rope.float(), k_rope.float())
    vis = dense_visibility(q_pos, k_pos, window=0, sink_tokens=0)
    probs = masked_softmax(scores * scale, vis[:, None])  # [b, h, s, t] fp32
    out = torch.einsum("bhst,btc->bhsc", probs, latent.float())
    return out.to(q_latent.dtype)
