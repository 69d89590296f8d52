"""Rotary position embedding helpers in the Hugging Face (rotate-half) layout.

HF rotary modules return cos/sin of shape [b, s, head_dim] laid out as [f_0..f_{d/2-1}, f_0..f_{d/2-1}]:
dimension i is paired with i + d/2 and rotated at frequency f_i = theta^(-2i/d).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# A fused rotary kernel (NPU), chosen once per run by ascend_edit.models.fused_layers; None: eager.
_rope_kernel = None


def set_rope_kernel(kernel) -> None:
    """Route `apply_rope` through `kernel(x, cos, sin)` (same contract), or back to eager with None."""
    global _rope_kernel
    _rope_kernel = kernel


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, h, s, d]; cos/sin: [b, s, d] (broadcast over heads)."""
    if _rope_kernel is not None:
        return _rope_kernel(x, cos, sin)
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def leading_rope(cos: torch.Tensor, sin: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for a `rope_dim`-wide rotary part: the teacher's rope_dim/2 highest frequencies.

    The high frequencies carry relative position; the low ones barely rotate over typical
    distances and are moved to the position-free (nope) part by the MLA warm start. The kept set
    f_i = theta^(-2i/d), i < r/2, equals a width-r rotary embedding with theta' = theta^(r/d), so a
    converted model exports as native `deepseek_v3` with that rope_theta.
    """
    head_dim = cos.shape[-1]
    if rope_dim > head_dim:
        raise ValueError(f"qk_rope_head_dim={rope_dim} exceeds the teacher head_dim={head_dim}")
    half_c, half_s = cos[..., : rope_dim // 2], sin[..., : rope_dim // 2]
    return torch.cat((half_c, half_c), dim=-1), torch.cat((half_s, half_s), dim=-1)


def select_rope(cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for a rotary part whose pair j rotates at the teacher's frequency `index[j]` (any subset,
    repeats allowed: a frequency can carry two directions across KV heads). `index` is a device tensor."""
    c, s = cos.index_select(-1, index), sin.index_select(-1, index)
    return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)


def rope_dims(head_dim: int, frequencies) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher head dims feeding the MLA rotary part (in MLA's order) and the rest (the nope part).

    `frequencies`: the teacher frequency index of each MLA rotary pair (an int r means the r/2 highest
    frequencies, `leading_rope`'s choice). A frequency listed twice feeds two pairs; the nope part is the
    dims of the frequencies not listed."""
    kept = torch.arange(frequencies // 2) if isinstance(frequencies, int) else torch.as_tensor(list(frequencies), dtype=torch.long)
    rope = torch.cat([kept, kept + head_dim // 2])
    mask = torch.ones(head_dim, dtype=torch.bool)
    mask[rope] = False
    return rope, mask.nonzero().squeeze(-1)
