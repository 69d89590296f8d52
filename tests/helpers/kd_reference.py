"""Plain-autograd reference of the chunked KD loss: the ground truth for tests and the benchmark baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ascend_edit.distill.chunked_kd import (
    DEFAULT_CHUNK_SIZE,
    KDKind,
    check_kd_options,
    compute_dtype,
    prepare_kd_rows,
    zero_loss,
)

_LOG_2 = math.log(2.0)


def kd_logits_loss_naive(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    kind: KDKind = "forward",
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mask: Tensor | None = None,
    teacher_lm_head_weight: Tensor | None = None,
) -> Tensor:
    """Same loss as :func:`kd_logits_loss` with plain autograd over the full logits.

    The reference for tests and the benchmark baseline; ``chunk_size`` is accepted and ignored so that
    both functions can be swapped. Memory grows as several fp32 ``[tokens, V]`` tensors.
    """
    rows = prepare_kd_rows(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight, mask)
    check_kd_options(kind, temperature, top_k, chunk_size, vocab=lm_head_weight.shape[0])
    n_tokens = rows.student.shape[0]
    if n_tokens == 0:
        return zero_loss(rows.student, rows.weight)
    dtype = compute_dtype(lm_head_weight.dtype)
    student_logits = (rows.student @ rows.weight.T).to(dtype) / temperature
    with torch.no_grad():
        teacher_logits_raw = rows.teacher @ rows.teacher_weight.T
        top_idx = teacher_logits_raw.topk(top_k, dim=-1).indices if top_k is not None else None
        teacher_logits = teacher_logits_raw.to(dtype) / temperature
    if top_idx is not None:
        student_logits = student_logits.gather(-1, top_idx)
        teacher_logits = teacher_logits.gather(-1, top_idx)
    log_q = torch.log_softmax(student_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    # F.kl_div(input=log b, target=log a, log_target=True) is the elementwise a * (log a - log b).
    if kind == "forward":
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse":
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logaddexp(log_p, log_q) - _LOG_2
        per_token = 0.5 * (
            F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        )
    return per_token.mean() * temperature**2
