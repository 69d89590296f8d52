"""The fused, chunked LM-head losses of stage 2: KD from final hidden states and cross-entropy on the data.

The model-level KD loss never materialises the full ``[tokens, vocab]`` logits (Qwen3's vocabulary has
151,936 entries: 4,096 tokens of fp32 logits are 2.3 GiB per tensor, and plain autograd keeps several).
:func:`kd_logits_loss` walks the tokens in chunks. For each chunk it computes the student's and the
teacher's logits, the chunk's loss, and the loss's gradient with respect to the student logits in closed
form; it turns that gradient at once into the gradient with respect to the student hidden states
(``g @ W``) and, when the lm_head trains, accumulates the gradient of the lm_head weight (``g^T @ h``).
Only those two gradients outlive the chunk, so backward is a multiplication by ``grad_output`` and the
extra peak memory is about three fp32 ``[chunk, vocab]`` tensors plus one in the input dtype (four fp32
for JSD): 1.0 GiB at the default chunk of 512 for Qwen3's vocabulary, against 17.4 GiB for plain
autograd over 4,096 tokens (docs/benchmarks.md, "Chunked KD loss").

Gradients of the per-token losses, with ``a = z_s / T`` the student logits over temperature ``T``,
``q = softmax(a)`` the student and ``p = softmax(z_t / T)`` the (constant) teacher distribution:

* forward KL, ``KL(p || q) = sum p (log p - log q)``:  ``dKL/da = q - p``.
* reverse KL, ``KL(q || p) = sum q (log q - log p)``:  with ``r = log q - log p``,
  ``dKL/da = q * (r - KL(q || p))``  (softmax Jacobian ``dq_i/da_j = q_i (delta_ij - q_j)``; the
  ``+1`` from differentiating ``q log q`` cancels because ``sum dq = 0``).
* JSD (beta = 1/2), ``0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2``: the loss equals
  ``0.5 sum p log p + 0.5 sum q log q - sum m log m``, whose derivative in ``q`` is
  ``0.5 (log q - log m)``; through the softmax Jacobian, with ``s = log q - log m``,
  ``dJSD/da = 0.5 * q * (s - KL(q || m))``.

The chain rule through ``a = z_s / T`` adds a factor ``1/T``, and the loss is scaled by ``T**2`` (Hinton
et al.'s scaling, which keeps gradient magnitudes roughly independent of the temperature) and divided by
the number of counted tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

KDKind = Literal["forward", "reverse", "jsd"]

KD_KINDS: tuple[str, ...] = ("forward", "reverse", "jsd")

# Measured on an H100 (benchmarks/kd_loss.py; vocab 151,936, hidden 2,048, 4,096 bf16 tokens): 512 keeps
# the extra peak memory at 5-9% of plain autograd's and is 0.57-0.88x its time; 1024 is 1-5% faster but
# doubles the memory; 256 gets slower (the lm_head is re-read by three GEMMs per chunk).
DEFAULT_CHUNK_SIZE = 512

_LOG_2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Per-chunk KD math. Each function takes the student and teacher log-probabilities of one chunk
# ([rows, K], compute dtype), consumes them (they are overwritten in place, so that a chunk holds at most
# three [rows, K] fp32 tensors, four for JSD) and returns the chunk's summed loss and, if `grad_dtype` is
# given, G = d(loss)/d(a) divided by the kind's `_GRAD_FACTOR`, in `grad_dtype`. G is written by the op
# that computes it (`out=` casts in the kernel on CUDA), so the bf16 gradient costs no separate cast pass.
# ----------------------------------------------------------------------------------------------------


def _empty_grad(like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _forward_kl_chunk(
    log_q: Tensor, log_p: Tensor, grad_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    p = log_p.exp()
    loss = log_p.sub_(log_q).mul_(p).sum()  # sum p (log p - log q)
    if grad_dtype is None:
        return loss, None
    return loss, torch.sub(log_q.exp_(), p, out=_empty_grad(p, grad_dtype))  # q - p


def _reverse_kl_chunk(
    log_q: Tensor, log_p: Tensor, grad_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    q = log_q.exp()
    ratio = log_q.sub_(log_p)  # r = log q - log p
    q_ratio = torch.mul(q, ratio, out=log_p)  # log_p's memory holds q * r
    kl_rows = q_ratio.sum(dim=-1, keepdim=True)
    if grad_dtype is None:
        return kl_rows.sum(), None
    # q (r - KL) = q r - q KL in one pass
    return kl_rows.sum(), torch.addcmul(q_ratio, q, kl_rows.neg(), out=_empty_grad(q, grad_dtype))


def _jsd_chunk(log_q: Tensor, log_p: Tensor, grad_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
    # log m = log((p + q) / 2) from the log-probabilities, so that tiny probabilities stay exact.
    log_m = torch.logaddexp(log_p, log_q).sub_(_LOG_2)
    p = log_p.exp()
    kl_pm = log_p.sub_(log_m).mul_(p).sum()  # sum p (log p - log m)
    del p
    q = torch.exp(log_q, out=log_p)  # log_p's memory is free again: it holds q from here on
    shift = log_q.sub_(log_m)  # s = log q - log m
    q_shift = torch.mul(q, shift, out=log_m)  # log m's memory holds q * s
    kl_qm_rows = q_shift.sum(dim=-1, keepdim=True)
    loss = 0.5 * (kl_pm + kl_qm_rows.sum())
    if grad_dtype is None:
        return loss, None
    # q (s - KL(q||m)) in one pass; the 0.5 is the kind's grad factor
    return loss, torch.addcmul(q_shift, q, kl_qm_rows.neg(), out=_empty_grad(q, grad_dtype))


_KD_CHUNK_FNS: dict[str, Callable[[Tensor, Tensor, torch.dtype | None], tuple[Tensor, Tensor | None]]] = {
    "forward": _forward_kl_chunk,
    "reverse": _reverse_kl_chunk,
    "jsd": _jsd_chunk,
}
# Constant factors of the gradients, applied in the GEMM epilogue instead of in a pass over [rows, V].
_GRAD_FACTOR: dict[str, float] = {"forward": 1.0, "reverse": 1.0, "jsd": 0.5}


# ----------------------------------------------------------------------------------------------------
# The same per-chunk math as one function of the two chunks' logits, compiled on CUDA. The eager path
# above makes about ten passes over [rows, V] fp32 tensors per chunk (upcasts, two log-softmaxes, the
# divergence, its gradient); compiled, the upcast, both softmax normalisers, the divergence and the
# gradient fuse into a few row reductions over the two logits in their own dtype. Forward KL writes no
# fp32 [rows, V] tensor; reverse KL and JSD keep one (their gradient needs a row sum of the same values
# first). Measured in benchmarks/kd_loss.py (`fused` rows) and docs/scaling.md.
# ----------------------------------------------------------------------------------------------------


def kd_chunk_from_logits(
    student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float, grad_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    """Summed divergence of one chunk and ``G`` (as the `_KD_CHUNK_FNS` return it) from raw logits.

    Written without in-place or ``out=`` ops so that the compiler can fuse it; the eager chunk
    functions are its reference (tests/unit/test_losses.py).
    """
    dtype = compute_dtype(student_logits.dtype)
    a = student_logits.to(dtype) / temperature
    b = teacher_logits.to(dtype) / temperature
    log_q = a - torch.logsumexp(a, dim=-1, keepdim=True)
    log_p = b - torch.logsumexp(b, dim=-1, keepdim=True)
    if kind == "forward":
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum()
        grad = log_q.exp() - p
    elif kind == "reverse":
        q = log_q.exp()
        ratio = log_q - log_p
        kl_rows = (q * ratio).sum(dim=-1, keepdim=True)
        loss = kl_rows.sum()
        grad = q * (ratio - kl_rows)
    else:  # jsd
        log_m = torch.logaddexp(log_p, log_q) - _LOG_2
        q = log_q.exp()
        shift = log_q - log_m
        kl_qm_rows = (q * shift).sum(dim=-1, keepdim=True)
        loss = 0.5 * ((log_p.exp() * (log_p - log_m)).sum() + kl_qm_rows.sum())
        grad = q * (shift - kl_qm_rows)
    return loss, (grad.to(grad_dtype) if grad_dtype is not None else None)


# One entry point per kind: the compiler keeps one cache per function, with a limit of 8 graphs each, and
# the gradient dtype (None in evaluation) and the one-row chunk (sizes 0/1 are always specialised) each
# add graphs. Measured on the CPU over six batch sizes (last chunks of 1-61 rows) with and without
# gradient: 6 / 4 / 6 graphs for forward / reverse / JSD. Past the limit the compiler runs the function
# eagerly (a warning), never fails: no fullgraph.
def _fused_forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      grad_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
    return kd_chunk_from_logits(student_logits, teacher_logits, "forward", temperature, grad_dtype)


def _fused_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      grad_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
    return kd_chunk_from_logits(student_logits, teacher_logits, "reverse", temperature, grad_dtype)


def _fused_jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               grad_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
    return kd_chunk_from_logits(student_logits, teacher_logits, "jsd", temperature, grad_dtype)


_FUSED_ENTRY = {"forward": _fused_forward_kl, "reverse": _fused_reverse_kl, "jsd": _fused_jsd}


@functools.cache
def _compiled_kd_chunk(kind: str) -> Callable:
    """The kind's chunk math compiled with the row count dynamic (the last chunk's size changes with every
    loss mask; a static graph per size would soon reach the compiler's limit)."""
    return torch.compile(_FUSED_ENTRY[kind], dynamic=True)


def use_fused_kd(device: torch.device, dtypes: tuple[torch.dtype, ...], top_k: int | None) -> bool:
    """The compiled chunk math runs on CUDA for full-vocabulary KD with bf16/fp16/fp32 heads (`dtypes`:
    the student's and the teacher's; Triton kernels — the CPU and the NPU take the eager path: no
    compiler for it there)."""
    return device.type == "cuda" and top_k is None and torch.float64 not in dtypes and _has_triton()


@functools.cache
def _has_triton() -> bool:
    """Inductor's CUDA kernels are Triton kernels; without it the eager path runs."""
    return importlib.util.find_spec("triton") is not None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (what gradcheck needs)."""
    return torch.promote_types(dtype, torch.float32)


def _log_probs(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """``log_softmax(hidden @ weight.T / T)`` in the compute dtype, holding at most two [rows, V] tensors.

    The product is taken in the inputs' dtype (as a model's lm_head would) and freed as soon as it is
    upcast; the scaling happens in place on the fp32 copy.
    """
    logits = (hidden @ weight.T).to(compute_dtype(weight.dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------------
# The chunked autograd.Function shared by the KD loss and the chunked cross-entropy.
# ----------------------------------------------------------------------------------------------------


class _ChunkObjective:
    """One loss evaluated chunk by chunk on the student logits ``hidden @ weight.T``.

    ``__call__(rows, hidden, weight, need_grad)`` gets the chunk's rows (a slice into the counted tokens)
    and student hidden states; it returns the chunk's summed, unscaled loss and ``G`` with
    ``d(loss_sum) / d(student_logits) = grad_factor * G`` in the weight's dtype (``None`` unless asked).
    It computes the logits itself so that it can free each [rows, V] tensor as soon as it is used.
    """

    grad_factor: float = 1.0

    def __call__(
        self, rows: slice, hidden: Tensor, weight: Tensor, need_grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """``loss_scale * sum over chunks of objective(hidden[chunk])``, with its gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [N, H], rows that count
        weight: Tensor,  # [V, H]
        objective: _ChunkObjective,
        loss_scale: float,
        chunk_size: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
    ) -> Tensor:
        grad_scale = loss_scale * objective.grad_factor
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
        grad_weight = torch.zeros_like(weight) if need_grad_weight else None
        need_grad = need_grad_hidden or need_grad_weight
        total = torch.zeros((), dtype=compute_dtype(weight.dtype), device=hidden.device)
        # Inputs are validated to share one dtype; autocast would re-cast the products and cannot write
        # into preallocated outputs.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, min(start + chunk_size, hidden.shape[0]))
                chunk_hidden = hidden[rows]
                loss_sum, grad_logits = objective(rows, chunk_hidden, weight, need_grad)
                total += loss_sum
                if grad_logits is None:
                    continue
                if grad_hidden is not None:
                    # alpha scales in the GEMM epilogue (fp32), so bf16 gradients are rounded once.
                    rows_grad = grad_hidden[rows]
                    torch.addmm(rows_grad, grad_logits, weight, beta=0, alpha=grad_scale, out=rows_grad)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, chunk_hidden, alpha=grad_scale)
                del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * loss_scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


@dataclass
class _KDObjective(_ChunkObjective):
    teacher_hidden: Tensor  # [N, H_t] counted rows, constant
    teacher_weight: Tensor  # [V, H_t], constant
    kind: str
    temperature: float
    top_k: int | None
    fused: bool = False  # the compiled chunk math (`use_fused_kd`); full vocabulary only

    @property
    def grad_factor(self) -> float:  # type: ignore[override]
        return _GRAD_FACTOR[self.kind] / self.temperature  # chain rule through a = z_s / T

    def __call__(
        self, rows: slice, hidden: Tensor, weight: Tensor, need_grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        chunk_fn = _KD_CHUNK_FNS[self.kind]
        teacher_hidden = self.teacher_hidden[rows]
        if self.top_k is None and self.fused:
            chunk = _compiled_kd_chunk(self.kind)
            return chunk(hidden @ weight.T, teacher_hidden @ self.teacher_weight.T, self.temperature,
                         weight.dtype if need_grad else None)
        if self.top_k is None:
            log_q = _log_probs(hidden, weight, self.temperature)
            log_p = _log_probs(teacher_hidden, self.teacher_weight, self.temperature)
            return chunk_fn(log_q, log_p, weight.dtype if need_grad else None)
        # Top-k: both distributions live on the teacher's k most likely tokens, each renormalised there.
        dtype = compute_dtype(weight.dtype)
        teacher_logits = teacher_hidden @ self.teacher_weight.T
        top_idx = teacher_logits.topk(self.top_k, dim=-1).indices  # [rows, k]
        teacher_top = teacher_logits.gather(-1, top_idx).to(dtype)
        del teacher_logits
        student_top = (hidden @ weight.T).gather(-1, top_idx).to(dtype)
        log_p = torch.log_softmax(teacher_top / self.temperature, dim=-1)
        log_q = torch.log_softmax(student_top / self.temperature, dim=-1)
        loss, grad_top = chunk_fn(log_q, log_p, dtype if need_grad else None)
        if grad_top is None:
            return loss, None
        grad = torch.zeros(hidden.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
        return loss, grad.scatter_(-1, top_idx, grad_top.to(weight.dtype))


@dataclass
class _CrossEntropyObjective(_ChunkObjective):
    labels: Tensor  # [N] int64 counted rows

    def __call__(
        self, rows: slice, hidden: Tensor, weight: Tensor, need_grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        labels = self.labels[rows].unsqueeze(-1)
        log_q = _log_probs(hidden, weight, temperature=1.0)
        loss = -log_q.gather(-1, labels).sum()
        if not need_grad:
            return loss, None
        grad = log_q.exp_()  # softmax - onehot(label)
        grad.scatter_add_(-1, labels, torch.full(labels.shape, -1.0, dtype=grad.dtype, device=grad.device))
        del log_q
        return loss, grad.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Validation shared by the chunked loss and its plain-autograd reference (tests/helpers/kd_reference.py).
# ----------------------------------------------------------------------------------------------------


@dataclass
class KDRows:
    student: Tensor  # [n, H] counted rows
    teacher: Tensor  # [n, H_t] counted rows, detached
    weight: Tensor  # [V, H]
    teacher_weight: Tensor  # [V, H_t], detached


def check_kd_options(kind: str, temperature: float, top_k: int | None, chunk_size: int, vocab: int) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD kind {kind!r}; expected one of {KD_KINDS}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an int in [1, vocab={vocab}], got {top_k!r}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _flatten_counted_rows(mask: Tensor | None, lead_shape: torch.Size, *tensors: Tensor) -> list[Tensor]:
    """Flatten ``[..., D]`` tensors to ``[tokens, D]`` and keep the rows where ``mask`` is True."""
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    if mask is None:
        return flat
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = token counts), got dtype {mask.dtype}")
    if mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token shape {tuple(lead_shape)}")
    keep = mask.reshape(-1).to(flat[0].device)
    return [t[keep] for t in flat]


def prepare_kd_rows(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor | None,
    mask: Tensor | None,
) -> KDRows:
    teacher_weight = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
    if lm_head_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError(
            f"lm_head weights must be [vocab, hidden], got student {tuple(lm_head_weight.shape)} "
            f"and teacher {tuple(teacher_weight.shape)}"
        )
    if lm_head_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {lm_head_weight.shape[0]} vs {teacher_weight.shape[0]}"
        )
    if student_hidden.dim() < 2 or student_hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} must be [..., hidden] with hidden = "
            f"lm_head_weight.shape[1] = {lm_head_weight.shape[1]}"
        )
    if teacher_hidden.dim() < 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must be [..., hidden] with hidden = "
            f"teacher lm_head weight.shape[1] = {teacher_weight.shape[1]}"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student and teacher token shapes differ: {tuple(student_hidden.shape[:-1])} vs "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )
    if student_hidden.dtype != lm_head_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise ValueError(
            "hidden states and their lm_head weight must share a dtype: student "
            f"{student_hidden.dtype}/{lm_head_weight.dtype}, teacher {teacher_hidden.dtype}/{teacher_weight.dtype}"
        )
    student, teacher = _flatten_counted_rows(
        mask, student_hidden.shape[:-1], student_hidden, teacher_hidden.detach()
    )
    return KDRows(student, teacher, lm_head_weight, teacher_weight.detach())


def zero_loss(hidden: Tensor, weight: Tensor) -> Tensor:
    """A zero that stays on the graph (all tokens masked): backward gives zero gradients, not an error."""
    return (hidden.sum() + weight.sum()).to(compute_dtype(weight.dtype)) * 0.0


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def kd_logits_loss(
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
    fused: bool | None = None,
) -> Tensor:
    """Model-level KD loss from final hidden states, chunked over tokens (no full logits in memory).

    Args:
        student_hidden: ``[..., H]`` final (post-norm) student hidden states; may require grad.
        teacher_hidden: ``[..., H_t]`` teacher hidden states, same leading shape; treated as a constant.
        lm_head_weight: ``[V, H]`` student lm_head weight (no bias, as in Qwen/Llama). Its gradient is
            computed only if it requires grad; with bf16 weights it is accumulated across chunks in bf16
            (one rounding per chunk). Under ZeRO-3 pass the gathered weight.
        kind: ``"forward"`` = KL(teacher || student), ``"reverse"`` = KL(student || teacher),
            ``"jsd"`` = Jensen-Shannon divergence with beta = 1/2.
        temperature: both logits are divided by it; the loss is multiplied by ``temperature**2``
            (Hinton scaling: keeps gradient magnitudes comparable across temperatures).
        top_k: if set, both distributions are restricted to the teacher's ``top_k`` most likely tokens
            per position (chosen on the raw teacher logits) and each is renormalised over those tokens
            with a softmax of the gathered logits; student logits outside them get zero gradient.
        chunk_size: tokens per chunk; the extra memory is about 3.5 (JSD: 4) fp32 ``[chunk_size, V]``
            tensors plus the returned gradients.
        mask: bool tensor of the leading shape; True = the token counts. ``None`` counts all tokens.
        teacher_lm_head_weight: ``[V, H_t]`` teacher lm_head; defaults to ``lm_head_weight`` (shared head).
            The teacher side never receives gradient, even when it shares the student's weight.
        fused: the per-chunk math compiled into a few fused kernels (`kd_chunk_from_logits`); ``None``:
            where `use_fused_kd` allows it (CUDA, full vocabulary). The eager path is the reference.

    Returns:
        fp32 scalar (fp64 for fp64 inputs): the mean over counted tokens of the per-token divergence,
        times ``temperature**2``. Logits are products in the input dtype; softmaxes, divergences and
        gradients are computed in fp32 per chunk. With no counted token the loss is a graph-connected 0.
    """
    rows = prepare_kd_rows(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight, mask)
    check_kd_options(kind, temperature, top_k, chunk_size, vocab=lm_head_weight.shape[0])
    n_tokens = rows.student.shape[0]
    if n_tokens == 0:
        return zero_loss(rows.student, rows.weight)
    if fused is None:
        fused = use_fused_kd(rows.student.device, (rows.weight.dtype, rows.teacher_weight.dtype), top_k)
    objective = _KDObjective(rows.teacher, rows.teacher_weight, kind, float(temperature), top_k, fused)
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedLMHeadLoss.apply(
        rows.student,
        rows.weight,
        objective,
        float(temperature) ** 2 / n_tokens,
        chunk_size,
        grad_enabled and rows.student.requires_grad,
        grad_enabled and rows.weight.requires_grad,
    )


def ce_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Cross-entropy on the data from hidden states and the lm_head, chunked like :func:`kd_logits_loss`.

    Args:
        hidden: ``[..., H]`` final hidden states.
        lm_head_weight: ``[V, H]``; its gradient is computed only if it requires grad.
        labels: int tensor of the leading shape, already aligned with ``hidden`` (shift outside:
            ``labels[t]`` is the token that follows position ``t``); ``ignore_index`` marks skipped positions.

    Returns:
        fp32 scalar: mean negative log-likelihood over the labelled positions (as
        ``F.cross_entropy(..., ignore_index=ignore_index)``); a graph-connected 0 if none is labelled.
    """
    if lm_head_weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [..., H] and lm_head_weight {tuple(lm_head_weight.shape)} [V, H]"
        )
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) dtypes differ")
    if labels.shape != hidden.shape[:-1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(hidden.shape[:-1])}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    counted = labels != ignore_index
    (rows,) = _flatten_counted_rows(counted, hidden.shape[:-1], hidden)
    flat_labels = labels.reshape(-1)[counted.reshape(-1)].long().to(hidden.device)
    if rows.shape[0] == 0:
        return zero_loss(rows, lm_head_weight)
    vocab = lm_head_weight.shape[0]
    if bool(((flat_labels < 0) | (flat_labels >= vocab)).any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedLMHeadLoss.apply(
        rows,
        lm_head_weight,
        _CrossEntropyObjective(flat_labels),
        1.0 / rows.shape[0],
        chunk_size,
        grad_enabled and rows.requires_grad,
        grad_enabled and lm_head_weight.requires_grad,
    )


