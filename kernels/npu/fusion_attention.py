"""Op A on Ascend NPUs through ``torch_npu.npu_fusion_attention`` (training and prefill).

Besides ``ascend_edit/device.py`` this is the only module that imports ``torch_npu``, and it
does so inside functions: importing this file is free on machines without CANN.

Facts this adapter relies on (torch_npu API reference for ``npu_fusion_attention`` and
``npu_fusion_attention_grad``; Huawei's own golden model of the op in ``msprobe``):

* ``atten_mask`` is bool and **True means "masked out"** (the opposite of SDPA's convention);
  shapes BNSS / B1SS / 11SS / SS.
* ``sparse_mode=0`` with an explicit mask; ``sparse_mode=2/3`` are causal aligned top-left /
  bottom-right and ``sparse_mode=4`` is a band -- all three take the *compressed* mask, a
  2048 x 2048 bool ``triu(ones, diagonal=1)``, whatever the sequence length.
* Band semantics: query ``i`` keeps key ``j`` iff ``-pre_tockens <= j - i <= next_tockens``.
  Contract A keeps ``q_pos - k_pos < window``, i.e. ``i - j <= window - 1``, hence
  **``pre_tockens = window - 1``** and ``next_tockens = 0``. Passing ``pre_tockens = window``
  (a common slip) lets every query see one token too many.
* Outputs are ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``;
  ``softmax_max`` / ``softmax_sum`` are fp32 ``[B, N, S, 8]`` (BNSD) / ``[T, N, 8]`` (TND) and
  feed ``npu_fusion_attention_grad`` together with ``attention_in`` (the forward output).
* Layout ``TND`` packs variable-length sequences; ``actual_seq_qlen`` / ``actual_seq_kvlen`` are
  cumulative lengths (lengths 2, 2, 2 -> ``[2, 4, 6]``) and masks apply per sequence.
* GQA: ``head_num`` is the number of query heads; key/value heads must divide it.

How contract A maps onto those modes (:func:`plan_fusion_attention`):

* **band / causal** (``sparse_mode`` 4 or 3, compressed mask, BNSD) when queries and keys are
  the same tokens with consecutive positions and no empty slots, and sink tokens change nothing.
  Then index distance equals position distance, so ``pre_tockens = window - 1`` is exact.
* **packed** (the same, layout TND with cumulative lengths) when segment ids are given and each
  document is one contiguous run of consecutive positions.
* **explicit** (``sparse_mode=0`` and a ``[b, 1, s, t]`` mask) for everything else: decode
  against a cache, empty slots, arbitrary positions, and sink tokens outside the window. The
  band modes cannot express kept sink tokens. (Newer torch_npu has a ``sink`` argument on the
  v2/v3 variants; it is a learned per-head sink *logit*, a different mechanism, so it is not
  used here.) Rows with no visible key are given key 0 and zeroed afterwards, so the kernel
  never sees a fully masked row.

Choosing the plan reads the ids on the host (one sync; two for packed input). The plan is
cached per identity of the id tensors, so all layers of one forward pass pay it once.

Backward runs ``npu_fusion_attention_grad`` with the saved softmax statistics. Dropout is not
used (``keep_prob=1``), so the seed/offset outputs are not carried to the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from ..masks import TensorKeyedCache, dense_visibility
from ..reference import check_sliding_window_inputs

__all__ = ["sliding_window_attention", "plan_fusion_attention", "FusionAttentionPlan", "compressed_causal_mask"]

UNLIMITED_TOKENS = 2147483647  # torch_npu's default for pre_tockens / next_tockens
COMPRESSED_MASK_SIZE = 2048
SPARSE_EXPLICIT, SPARSE_CAUSAL, SPARSE_BAND = 0, 3, 4
SOFTMAX_STAT_WIDTH = 8  # softmax_max / softmax_sum carry each row's value 8 times

_PLANS: TensorKeyedCache[FusionAttentionPlan] = TensorKeyedCache(max_entries=8)
_COMPRESSED_MASKS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class FusionAttentionPlan:
    """How one call of contract A is expressed to ``npu_fusion_attention``."""

    layout: str  # "BNSD" or "TND"
    sparse_mode: int
    pre_tockens: int
    next_tockens: int
    actual_seq_len: tuple[int, ...] | None = None  # TND: cumulative lengths, same for q and kv
    atten_mask: torch.Tensor | None = None  # explicit mode: [b, 1, s, t] bool, True = masked out
    empty_rows: torch.Tensor | None = None  # explicit mode: [b, 1, s, 1] bool, rows to zero


def _import_torch_npu() -> ModuleType:
    try:
        import torch_npu  # noqa: PLC0415 -- deliberately lazy: importing it without CANN breaks torch
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the 'npu' attention backend needs torch_npu (pip install 'ascend_edit[npu]' on a machine "
            "with the CANN toolkit); use backend 'sdpa' or 'eager' elsewhere"
        ) from exc
    return torch_npu


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048 x 2048 ``triu(ones, 1)`` bool mask that sparse modes 2/3/4 require (cached per device)."""
    mask = _COMPRESSED_MASKS.get(device)
    if mask is None:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
        mask = torch.triu(ones, diagonal=1)
        _COMPRESSED_MASKS[device] = mask
    return mask


def plan_fusion_attention(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> FusionAttentionPlan:
    """Choose band / causal / packed / explicit for these ids (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _build_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg)
    return _PLANS.get_or_build(
        (q_pos, k_pos, q_seg, k_seg),
        (window, sink_tokens),
        lambda: _build_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg),
    )


def _build_plan(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None,
    k_seg: torch.Tensor | None,
) -> FusionAttentionPlan:
    s, t = q_pos.shape[1], k_pos.shape[1]
    if s == t and _is_plain_self_attention(q_pos, k_pos, window, sink_tokens, q_seg, k_seg):
        # Every visible distance is <= s - 1, so a window of s or more cuts nothing.
        if window == 0 or window >= s:
            mode, pre, nxt = SPARSE_CAUSAL, UNLIMITED_TOKENS, 0
        else:
            mode, pre, nxt = SPARSE_BAND, window - 1, 0  # keeps i - j <= window - 1
        if q_seg is None:
            return FusionAttentionPlan("BNSD", mode, pre, nxt)
        return FusionAttentionPlan("TND", mode, pre, nxt, actual_seq_len=_cumulative_run_lengths(q_seg))
    vis = dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    empty_rows = ~vis.any(dim=-1, keepdim=True)  # [b, s, 1]
    vis[..., :1] |= empty_rows  # a fully masked row is undefined in the kernel: see key 0, zero later
    return FusionAttentionPlan(
        "BNSD",
        SPARSE_EXPLICIT,
        UNLIMITED_TOKENS,
        UNLIMITED_TOKENS,
        atten_mask=~vis[:, None],  # torch_npu: True = masked out
        empty_rows=empty_rows[:, None],
    )


def _is_plain_self_attention(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None,
    k_seg: torch.Tensor | None,
) -> bool:
    """True when index distance equals position distance and the band modes express contract A.

    Queries and keys must be the same tokens (equal ids), no key slot empty, positions
    consecutive (within each document when segment ids are given, documents being contiguous,
    non-repeating runs), and kept sink tokens must not reach past the window.
    """
    steps = k_pos[:, 1:] - k_pos[:, :-1]
    checks = [(q_pos == k_pos).all(), (k_pos >= 0).all()]
    if q_seg is None or k_seg is None:
        checks.append((steps == 1).all())
    else:
        new_run = k_seg[:, 1:] != k_seg[:, :-1]
        checks += [
            (q_seg == k_seg).all(),
            ((steps == 1) | new_run).all(),
            (k_seg[:, 1:] >= k_seg[:, :-1]).all(),  # a document id never comes back later in the row
        ]
    sinks_can_matter = 0 < window < q_pos.shape[1] and sink_tokens > 0
    if sinks_can_matter:
        checks.append((k_pos >= sink_tokens).all())  # no sink token among these keys
    return bool(torch.stack(checks).all().item())  # the one host sync of the plan


def _cumulative_run_lengths(seg: torch.Tensor) -> tuple[int, ...]:
    """Cumulative lengths of the documents of ``seg`` ``[b, s]`` flattened batch-major (TND order)."""
    b, s = seg.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=seg.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()
    ends = torch.cat([start_idx[1:], start_idx.new_tensor([b * s])])
    return tuple(ends.tolist())


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake impls so graphs can be traced around them.
# --------------------------------------------------------------------------------------------


def _mask_for(sparse_mode: int, atten_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return atten_mask if sparse_mode == SPARSE_EXPLICIT else compressed_causal_mask(device)


@torch.library.custom_op("ascend_edit::npu_swa", mutates_args=())
def npu_swa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    atten_mask: torch.Tensor | None,
    scale: float,
    layout: str,
    sparse_mode: int,
    pre_tockens: int,
    next_tockens: int,
    actual_seq_len: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``npu_fusion_attention`` forward -> ``(out, softmax_max, softmax_sum)``; q/k/v in ``layout``."""
    torch_npu = _import_torch_npu()
    outputs = torch_npu.npu_fusion_attention(
        q,
        k,
        v,
        q.shape[1],  # head_num: N is dim 1 in both BNSD and TND
        layout,
        atten_mask=_mask_for(sparse_mode, atten_mask, q.device),
        scale=scale,
        keep_prob=1.0,
        pre_tockens=pre_tockens,
        next_tockens=next_tockens,
        actual_seq_qlen=actual_seq_len,
        actual_seq_kvlen=actual_seq_len,
        sparse_mode=sparse_mode,
    )
    out, softmax_max, softmax_sum = outputs[0], outputs[1], outputs[2]
    return out, softmax_max, softmax_sum


@npu_swa.register_fake
def _npu_swa_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    atten_mask: torch.Tensor | None,
    scale: float,
    layout: str,
    sparse_mode: int,
    pre_tockens: int,
    next_tockens: int,
    actual_seq_len: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    stat_shape = (*q.shape[:-1], SOFTMAX_STAT_WIDTH)  # [B, N, S, 8] or [T, N, 8]
    return out, q.new_empty(stat_shape, dtype=torch.float32), q.new_empty(stat_shape, dtype=torch.float32)


@torch.library.custom_op("ascend_edit::npu_swa_backward", mutates_args=())
def npu_swa_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_max: torch.Tensor,
    softmax_sum: torch.Tensor,
    atten_mask: torch.Tensor | None,
    scale: float,
    layout: str,
    sparse_mode: int,
    pre_tockens: int,
    next_tockens: int,
    actual_seq_len: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``npu_fusion_attention_grad`` -> ``(dq, dk, dv)``."""
    torch_npu = _import_torch_npu()
    grads = torch_npu.npu_fusion_attention_grad(
        q,
        k,
        v,
        grad_out,
        q.shape[1],
        layout,
        atten_mask=_mask_for(sparse_mode, atten_mask, q.device),
        softmax_max=softmax_max,
        softmax_sum=softmax_sum,
        attention_in=out,
        scale_value=scale,
        keep_prob=1.0,
        pre_tockens=pre_tockens,
        next_tockens=next_tockens,
        actual_seq_qlen=actual_seq_len,
        actual_seq_kvlen=actual_seq_len,
        sparse_mode=sparse_mode,
    )
    return grads[0], grads[1], grads[2]


@npu_swa_backward.register_fake
def _npu_swa_backward_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, atten_mask, scale, layout, sparse_mode, pre, nxt, seq_len = inputs
    out, softmax_max, softmax_sum = output
    ctx.save_for_backward(q, k, v, out, softmax_max, softmax_sum, atten_mask)
    ctx.params = (scale, layout, sparse_mode, pre, nxt, seq_len)
    ctx.mark_non_differentiable(softmax_max, softmax_sum)


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_max: Any, _grad_sum: Any) -> tuple[Any, ...]:
    q, k, v, out, softmax_max, softmax_sum, atten_mask = ctx.saved_tensors
    dq, dk, dv = npu_swa_backward(
        grad_out.contiguous(), q, k, v, out, softmax_max, softmax_sum, atten_mask, *ctx.params
    )
    return dq, dk, dv, None, None, None, None, None, None, None


npu_swa.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point (contract A)
# --------------------------------------------------------------------------------------------


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
    """Op A via ``npu_fusion_attention`` (contract in ``kernels/reference.py``). Returns ``[b, h, s, dv]``."""
    check_sliding_window_inputs(
        q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg
    )
    plan = plan_fusion_attention(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    b, h, s, _ = q.shape
    if plan.layout == "TND":
        # [b, n, s, d] -> [b * s, n, d]: tokens batch-major, matching the cumulative lengths.
        q_in, k_in, v_in = (x.transpose(1, 2).reshape(b * x.shape[2], x.shape[1], x.shape[3]) for x in (q, k, v))
    else:
        q_in, k_in, v_in = q.contiguous(), k.contiguous(), v.contiguous()
    out, _, _ = npu_swa(
        q_in,
        k_in,
        v_in,
        plan.atten_mask,
        float(scale),
        plan.layout,
        plan.sparse_mode,
        plan.pre_tockens,
        plan.next_tockens,
        None if plan.actual_seq_len is None else list(plan.actual_seq_len),
    )
    if plan.layout == "TND":
        out = out.reshape(b, s, h, out.shape[-1]).transpose(1, 2)
    if plan.empty_rows is not None:
        out = out.masked_fill(plan.empty_rows, 0.0)
    return out
