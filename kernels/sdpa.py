"""Op A through ``torch.nn.functional.scaled_dot_product_attention`` with a dense boolean mask.

Works forward and backward on every device PyTorch supports, which makes it the CPU default.
The mask is ``[b, 1, s, t]`` bool, built from positions by ``kernels/masks.py``; SDPA's fused
kernels skip no work for it, so on CUDA a sliding window costs as much as full attention (see
``docs/benchmarks.md``): prefer ``flex`` there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import sliding_window_contract
from .masks import dense_visibility

__all__ = ["sliding_window_attention"]


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
    """Op A via SDPA (contract in ``kernels/reference.py``). Returns ``[b, h, s, dv]``."""
    vis = dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    # A row with no visible key would make SDPA's softmax NaN (forward and backward). Let such
    # rows see key 0 instead -- a finite, throw-away result -- and zero them afterwards; the
    # zeroing also stops any gradient from flowing through the stand-in key.
    empty_rows = ~vis.any(dim=-1, keepdim=True)  # [b, s, 1]
    vis[..., :1] |= empty_rows
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=vis[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.masked_fill(empty_rows[:, None], 0.0)
