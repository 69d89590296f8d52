"""The fused decoder-layer ops on Ascend NPUs: torch_npu's ``npu_rms_norm``, ``npu_rotary_mul``,
``npu_swiglu``, and MindSpeed's ``npu_rotary_position_embedding``.

Same signatures as :mod:`..fused_reference`. Each adapter checks the documented constraints
first and, where they are not met, computes the eager reference instead and logs the reason once
(see ``docs/npu.md`` for the constraints and their sources):

* ``npu_rms_norm(x, gamma, epsilon)`` -> ``(y, rstd)``: gamma must have x's dtype (cast here);
  fp16 / bf16 / fp32; 1-8 dims.
* ``npu_rotary_mul(x, r1, r2)`` (rotate-half mode) and MindSpeed's
  ``npu_rotary_position_embedding(x, cos, sin, mode=0)``: 4-D x in layout BNSD, BSND or SBND with
  cos / sin broadcast as B1SD / BS1D / SB1D; D even and < 896; B and N < 1000; B * N <= 1024 when
  cos / sin need a gradient; and (older releases) not B * N > 8 * S in BNSD. The project's q / k are
  ``proj(x).view(b, s, h, d).transpose(1, 2)`` -- BSND storage seen as BNSD -- so such views go to the
  op as BSND with BS1D cos / sin (no copy, and the BNSD-only B * N > 8 * S limit, which single-token
  decode would hit, does not apply); a contiguous BNSD tensor goes as BNSD with B1SD cos / sin.
* ``npu_swiglu(x, dim=-1)`` = ``silu(first half) * second half``: takes the gate and up halves as one
  contiguous tensor, so the adapter concatenates them (one write of the MLP activation; the fused
  kernel saves the separate silu output and its backward bookkeeping).
"""
from __future__ import annotations

import torch

from ..fused_reference import rms_norm as rms_norm_reference
from ..fused_reference import rotary_embedding as rotary_reference
from ..fused_reference import swiglu as swiglu_reference
from ._torch_npu import import_mindspeed_rotary, import_torch_npu, log_once

__all__ = ["rms_norm", "rotary_embedding", "rotary_embedding_mindspeed", "rotary_unfit_reason", "swiglu"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROTARY_MAX_HEAD_DIM = 896  # exclusive
ROTARY_MAX_BATCH_HEADS = 1000  # exclusive, each of B and N
ROTARY_MAX_GRAD_BATCH_HEADS = 1024  # B * N, when cos / sin need a gradient


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype not in FLOAT_DTYPES or not 2 <= x.dim() <= 8:  # the op documents 2-8 dims
        log_once(f"rms:{x.dtype}:{x.dim()}", "npu_rms_norm: eager fallback for dtype %s, %d dims", x.dtype, x.dim())
        return rms_norm_reference(x, weight, eps)
    return import_torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def _as_bsnd(x: torch.Tensor) -> bool:
    """Whether ``x [b, h, s, d]`` is a transposed view of contiguous ``[b, s, h, d]`` storage."""
    return x.dim() == 4 and x.transpose(1, 2).is_contiguous()


def rotary_unfit_reason(x: torch.Tensor, cos: torch.Tensor) -> str | None:
    """Why the rotary ops cannot take ``x [b, h, s, d]`` (None: they can)."""
    if x.dim() != 4 or cos.dim() != 3:
        return "inputs are not x [b, h, s, d] with cos / sin [b, s, d]"
    b, h, s, d = x.shape
    if x.dtype not in FLOAT_DTYPES:
        return f"dtype {x.dtype}"
    if d % 2 or d >= ROTARY_MAX_HEAD_DIM:
        return f"head dim {d} (must be even and < {ROTARY_MAX_HEAD_DIM})"
    if b >= ROTARY_MAX_BATCH_HEADS or h >= ROTARY_MAX_BATCH_HEADS:
        return f"batch {b} / heads {h} (each must be < {ROTARY_MAX_BATCH_HEADS})"
    if cos.requires_grad and b * h > ROTARY_MAX_GRAD_BATCH_HEADS:
        return f"B*N = {b * h} > {ROTARY_MAX_GRAD_BATCH_HEADS} with a gradient for cos / sin"
    if not _as_bsnd(x) and b * h > 8 * s:
        return f"B*N = {b * h} > 8*S = {8 * s} in layout BNSD"
    return None


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused, name: str) -> torch.Tensor:
    reason = rotary_unfit_reason(x, cos)
    if reason is not None:
        log_once(f"{name}:{reason}", "%s: eager fallback because of %s", name, reason)
        return rotary_reference(x, cos, sin)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the ops take cos / sin in x's dtype
    if _as_bsnd(x):  # BSND input with BS1D cos / sin: the storage as it is, no copy
        return fused(x.transpose(1, 2), cos.unsqueeze(2), sin.unsqueeze(2)).transpose(1, 2)
    return fused(x.contiguous(), cos.unsqueeze(1), sin.unsqueeze(1))  # BNSD with B1SD cos / sin


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rotary(x, cos, sin, lambda a, c, s: import_torch_npu().npu_rotary_mul(a, c, s), "npu_rotary_mul")


def rotary_embedding_mindspeed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    def fused(a, c, s):
        return import_mindspeed_rotary().npu_rotary_position_embedding(a, c, s, mode=0)  # 0: rotate-half

    return _rotary(x, cos, sin, fused, "npu_rotary_position_embedding")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype not in FLOAT_DTYPES or gate.numel() == 0:
        log_once(f"swiglu:{gate.dtype}", "npu_swiglu: eager fallback for shapes %s / %s", gate.shape, up.shape)
        return swiglu_reference(gate, up)
    return import_torch_npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)
