"""Eager PyTorch ground truth for every attention kernel (the ``eager`` backend).

This file is the specification. Every other backend is tested against these functions, so they
favour clarity over speed: scores are materialised, the softmax runs in fp32, and GQA is done by
repeating the KV heads. The input checks of both contracts live in ``kernels/contract.py``, whose
decorators every backend's entry point carries (these two included).

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

from .contract import mla_contract, sliding_window_contract
from .masks import dense_visibility

__all__ = [
    "sliding_window_attention",
    "mla_absorbed_attention",
    "masked_softmax",
]


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over the last dim restricted to ``visible``; rows with nothing visible give 0.

    Masked entries get the most negative finite fp32 value rather than ``-inf``: a row with no
    visible key then yields a finite uniform distribution, which the final multiply by
    ``visible`` turns into zeros -- with finite (zero) gradients, where ``-inf`` would give NaN
    in both passes. In a row with a visible key the masked entries underflow to exactly 0.
    """
    scores = scores.float().masked_fill(~visible, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * visible


@sliding_window_contract
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
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [b, h, t, d]: query head i reads kv head i // group
    v = v.repeat_interleave(group, dim=1)  # [b, h, t, dv]
    scores = torch.einsum("bhsd,bhtd->bhst", q.float(), k.float()) * scale
    vis = dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    probs = masked_softmax(scores, vis[:, None])  # [b, h, s, t] fp32
    out = torch.einsum("bhst,bhtd->bhsd", probs, v.float())
    return out.to(q.dtype)


@mla_contract
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
    scores = torch.einsum("bhsc,btc->bhst", q_latent.float(), latent.float())
    scores = scores + torch.einsum("bhsr,btr->bhst", q_rope.float(), k_rope.float())
    vis = dense_visibility(q_pos, k_pos, window=0, sink_tokens=0)
    probs = masked_softmax(scores * scale, vis[:, None])  # [b, h, s, t] fp32
    out = torch.einsum("bhst,btc->bhsc", probs, latent.float())
    return out.to(q_latent.dtype)
