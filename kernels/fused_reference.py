"""Eager references for the fused decoder-layer ops (the ``eager`` backend and the specification).

Three ops, each in the form the decoder layers already compute them:

* :func:`rms_norm` -- ``weight * (x * rsqrt(mean(x^2) + eps))``, normalised in fp32, as the
  Hugging Face RMSNorm modules (Llama, Qwen2/3 incl. Qwen3's per-head q/k norms, DeepSeek-V3).
* :func:`rotary_embedding` -- rotate-half RoPE of ``x [b, h, s, d]`` with ``cos`` / ``sin``
  ``[b, s, d]`` (broadcast over heads), as ``ascend_edit.attention.rope.apply_rope`` and transformers'
  ``apply_rotary_pos_emb`` (the teacher's, in ``models/fused_attention.py``), in the same operation
  order, so swapping it in is exact; MLA's decoupled rope part is the same op on its
  ``[b, h, s, r]`` / ``[b, 1, s, r]`` slices.
* :func:`swiglu` -- ``silu(gate) * up``, the gated MLP activation.

The NPU backends (:mod:`.npu.fused_ops`) are tested against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "rotary_embedding", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; returns ``weight * normalised.to(x.dtype)`` like the HF modules."""
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    normalised = x.float() * torch.rsqrt(variance + eps)
    return weight * normalised.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, h, s, d]``; cos / sin ``[b, s, d]`` in the rotate-half layout."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
