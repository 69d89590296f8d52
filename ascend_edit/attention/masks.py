"""Attention masks from token positions, and normalisation of the masks transformers passes in."""
from __future__ import annotations

import torch

from ascend_edit.kernels.masks import dense_visibility


def visible_by_position(
    q_pos: torch.Tensor, k_pos: torch.Tensor, *, window: int = 0, sink_tokens: int = 0
) -> torch.Tensor:
    """Boolean [b, 1, s, t] mask (True = attend) from q_pos [b, s] and k_pos [b, t]: the kernels'
    visibility rule (causal by position, window, sinks; k_pos < 0 marks an empty slot), with a head dim."""
    return dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens)[:, None]


def as_bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers passes a bool mask (True = attend) for sdpa and an additive float mask for eager."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def to_sdpa_mask(visible: torch.Tensor) -> torch.Tensor:
    """SDPA's bool mask, with fully-masked rows opened on their first key to avoid NaN (their output is
    multiplied away or belongs to padding)."""
    empty = ~visible.any(dim=-1, keepdim=True)
    # Branch-free (no host sync): decode steps stay capturable by torch.compile / CUDA graphs.
    return torch.cat([visible[..., :1] | empty, visible[..., 1:]], dim=-1)


def packed_segments(positions: torch.Tensor) -> torch.Tensor:
    """Document ids [b, s] of a packed row: a new document starts wherever positions do not step by 1
    (the same rule transformers uses to detect packed sequences)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts.long().cumsum(-1)
