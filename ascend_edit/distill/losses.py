"""Stateless stage-1 and weak-feature losses: activation matching and cosine feature matching.

The fused, chunked KD and cross-entropy losses on the LM head live in `chunked_kd.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ActivationLossKind = Literal["mse", "nmse", "cosine"]
ACTIVATION_LOSS_KINDS: tuple[str, ...] = ("mse", "nmse", "cosine")


def _masked_token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a ``[...]`` per-token tensor over tokens where ``mask`` is True."""
    if mask is None:
        return per_token.mean()
    if mask.dtype != torch.bool or mask.shape != per_token.shape:
        raise ValueError(
            f"mask must be a bool tensor of the token shape {tuple(per_token.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    mask = mask.to(per_token.device)
    # Dividing by max(count, 1) keeps an all-masked batch at a graph-connected 0 instead of NaN.
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def feature_cosine_loss(
    student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], mask: Tensor | None = None
) -> Tensor:
    """Weak feature matching: mean over layers of the token-mean of ``1 - cos(student, teacher)``.

    Each pair is ``[..., H]``; cosine is taken over ``H`` in fp32; teacher states are constants.
    ``mask`` (bool, the leading shape; True = counts) selects tokens. Range [0, 2].
    """
    if len(student_states) != len(teacher_states):
        raise ValueError(f"got {len(student_states)} student states but {len(teacher_states)} teacher states")
    if len(student_states) == 0:
        raise ValueError("feature_cosine_loss needs at least one layer's states")
    per_layer = []
    for layer, (student, teacher) in enumerate(zip(student_states, teacher_states)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"layer {layer}: student state {tuple(student.shape)} and teacher state "
                f"{tuple(teacher.shape)} differ in shape"
            )
        if torch.is_grad_enabled() and student.requires_grad:
            # Recomputed in backward from the 16-bit states themselves: autograd would otherwise keep the fp32
            # copies and the norms of every matched layer until backward (4 [tokens, hidden] 16-bit units per
            # layer, 18 GiB over Qwen3-8B's 36 layers at 4 x 4,096 tokens); the states are kept anyway.
            per_layer.append(checkpoint(_cosine_distance, student, teacher.detach(), mask, use_reentrant=False))
        else:
            per_layer.append(_cosine_distance(student, teacher.detach(), mask))
    return torch.stack(per_layer).mean()


def _cosine_distance(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Token-mean of ``1 - cos(student, teacher)`` over the last dim, in fp32."""
    return _masked_token_mean(1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1), mask)


def activation_loss(
    pred: Tensor, target: Tensor, kind: ActivationLossKind = "mse", mask: Tensor | None = None
) -> Tensor:
    """Stage-1 activation matching of one layer's output ``pred`` against the teacher's ``target``.

    Computed in fp32; ``target`` is a constant. ``mask`` (bool, ``pred.shape[:-1]``) selects tokens.

    * ``"mse"``: mean over counted tokens and features of ``(pred - target)**2``.
    * ``"nmse"``: that MSE divided by the mean of ``target**2`` over the same elements — scale-free, so
      layers with large activations do not dominate a sum over layers (call it once per layer).
    * ``"cosine"``: token-mean of ``1 - cos(pred, target)`` over the feature dim.
    """
    if kind not in ACTIVATION_LOSS_KINDS:
        raise ValueError(f"unknown activation loss kind {kind!r}; expected one of {ACTIVATION_LOSS_KINDS}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 1:
        raise ValueError("activation_loss needs tensors with a feature dimension")
    pred32, target32 = pred.float(), target.detach().float()
    if kind == "cosine":
        return _masked_token_mean(1.0 - F.cosine_similarity(pred32, target32, dim=-1), mask)
    squared_error = _masked_token_mean((pred32 - target32).square().mean(-1), mask)
    if kind == "mse":
        return squared_error
    target_power = _masked_token_mean(target32.square().mean(-1), mask)
    # An all-zero target would make NMSE undefined; the floor turns it into a (huge) plain MSE instead.
    return squared_error / target_power.clamp(min=torch.finfo(torch.float32).tiny)
