"""Op A on Ascend NPUs through ``torch_npu.npu_fusion_attention`` (training and prefill).

Facts this adapter relies on (torch_npu API reference for ``npu_fusion_attention`` and
``npu_fusion_attention_grad``; see ``docs/npu.md`` for the list with sources):

* ``atten_mask`` is bool and **True means "masked out"** (the opposite of SDPA's convention).
* ``sparse_mode`` 2 / 3 are causal aligned top-left / bottom-right, 4 is a band
  ``-pre_tockens <= j - i <= next_tockens``; all three take the *compressed* 2048 x 2048
  ``triu(ones, 1)`` mask whatever the sequence length, so no ``[s, t]`` mask exists.
  Contract A keeps ``q_pos - k_pos < window``, hence ``pre_tockens = window - 1``, ``next_tockens = 0``.
* Outputs ``(out, softmax_max, softmax_sum, ...)``; the statistics are fp32 ``[B, N, S, 8]`` (BNSD) /
  ``[T, N, 8]`` (TND): row max of the scaled scores and row sum of ``exp(score - max)``.
  ``npu_fusion_attention_grad`` recomputes the probabilities from the statistics it is given and
  ``rowsum(dy * attention_in)`` from the forward output it is given.
* Layout ``TND`` packs variable-length sequences (``actual_seq_qlen`` / ``actual_seq_kvlen``
  cumulative); masks and sparse modes apply per sequence.
* One head dim D for query, key and value (older releases' contract; see "head dims" below).

Plans (:func:`plan_fusion_attention`), chosen from the ids once per forward (cached per tensor identity):

* **causal / band** -- ``sparse_mode`` 3 or 4, compressed mask, BNSD (or TND for packed documents),
  when queries are the keys with consecutive positions and sink tokens change nothing.
* **band + sinks** (GateSWA's default: window < sequence, ``sink_tokens > 0``) -- two fused passes:
  the band (``sparse_mode=4``, ``pre_tockens=window-1``) over all keys, and a *sink pass* of the
  queries at distance >= window from the sequence start against the first ``sink_tokens`` keys.
  In the sink pass, query row ``r`` is the token at position ``window + r`` and may see sink key
  ``j`` iff ``window + r - j >= window``, i.e. ``j <= r``: exactly top-left causal, so it runs as
  ``sparse_mode=2`` with the compressed mask -- again no mask tensor of the sequence's size. The two
  key sets are disjoint (band: distance < window; sink pass: distance >= window), so the first
  ``sink + window`` queries, where sinks also lie inside the band, count each key once. The two
  results are merged with their softmax statistics (log-sum-exp), and the backward runs
  ``npu_fusion_attention_grad`` for each pass with the *merged* statistics and output -- the way
  ring attention merges blocks.
* **explicit** -- ``sparse_mode=0`` with a ``[b, 1, s, t]`` mask, for anything else (arbitrary
  positions, empty slots, documents not starting at position 0 with sinks). Chosen with a logged
  reason; rows with no visible key see key 0 and are zeroed afterwards.

Decode (few queries against a longer cache, no gradient) goes to the fused *inference* op
(:mod:`.infer_attention`).

Head dims: when ``v``'s head dim differs from ``q``/``k``'s (MLA's decompressed 192 / 128), the
narrower side is zero-padded to the wider (zero q/k columns add nothing to the scores, zero value
columns produce output columns that are cut off) -- the contract then holds on every release.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..contract import sliding_window_contract
from ..masks import TensorKeyedCache, dense_visibility
from ._torch_npu import import_torch_npu, log_once

__all__ = [
    "DECODE_MAX_QUERIES",
    "FusionAttentionPlan",
    "SinkPass",
    "compressed_causal_mask",
    "plan_fusion_attention",
    "sliding_window_attention",
]

UNLIMITED_TOKENS = 2147483647  # torch_npu's default for pre_tockens / next_tockens
COMPRESSED_MASK_SIZE = 2048
SPARSE_EXPLICIT, SPARSE_CAUSAL_TOP_LEFT, SPARSE_CAUSAL, SPARSE_BAND = 0, 2, 3, 4
SOFTMAX_STAT_WIDTH = 8  # softmax_max / softmax_sum carry each row's value 8 times
DECODE_MAX_QUERIES = 16  # up to this many queries against a longer cache, without grad: inference op

_PLANS: TensorKeyedCache[FusionAttentionPlan] = TensorKeyedCache(max_entries=8)
_COMPRESSED_MASKS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class SinkPass:
    """The second pass of the band + sinks plan: which query rows meet which sink keys.

    BNSD: rows ``window:`` of every batch row against keys ``:num_sinks``. TND: token indices
    (``q_index``, ``k_index``) into the packed tokens plus the cumulative lengths of the pieces.
    """

    num_sinks: int
    q_index: torch.Tensor | None = None  # TND only
    k_index: torch.Tensor | None = None
    q_seq_len: tuple[int, ...] | None = None
    k_seq_len: tuple[int, ...] | None = None


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
    sink_pass: SinkPass | None = None  # band + sinks: the second pass


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The 2048 x 2048 ``triu(ones, 1)`` bool mask that sparse modes 2/3/4 require (cached per device)."""
    mask = _COMPRESSED_MASKS.get(device)
    if mask is None:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
        mask = torch.triu(ones, diagonal=1)
        _COMPRESSED_MASKS[device] = mask
    return mask


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def plan_fusion_attention(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> FusionAttentionPlan:
    """Choose causal / band / band + sinks / explicit for these ids (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _build_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg)
    return _PLANS.get_or_build(
        (q_pos, k_pos, q_seg, k_seg),
        (window, sink_tokens),
        lambda: _build_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg),
    )


# npu_fusion_attention's varlen (TND) mode takes at most this many sequences per call (actual_seq_qlen's length).
TND_MAX_SEQUENCES = 1024


def _build_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg) -> FusionAttentionPlan:
    s = q_pos.shape[1]
    t = k_pos.shape[1]
    facts = _layout_facts(q_pos, k_pos, sink_tokens, q_seg, k_seg) if s == t else None
    cum = _cumulative_run_lengths(q_seg) if facts is not None and facts["plain"] and q_seg is not None else None
    if cum is not None and len(cum) > TND_MAX_SEQUENCES:
        reason = f"{len(cum):,} packed documents in one call (TND takes at most {TND_MAX_SEQUENCES:,})"
    elif facts is not None and facts["plain"]:
        packed = q_seg is not None
        layout = "TND" if packed else "BNSD"
        if window == 0 or window >= s:  # every visible distance is <= s - 1: the window cuts nothing
            return FusionAttentionPlan(layout, SPARSE_CAUSAL, UNLIMITED_TOKENS, 0, actual_seq_len=cum)
        band = (layout, SPARSE_BAND, window - 1, 0)  # keeps i - j <= window - 1
        if sink_tokens == 0 or facts["no_sinks"]:
            return FusionAttentionPlan(*band, actual_seq_len=cum)
        if facts["starts_at_zero"]:
            sink_pass = _tnd_sink_pass(cum, window, sink_tokens, q_pos.device) if cum is not None else (
                SinkPass(num_sinks=min(sink_tokens, s)))
            if sink_pass is None:  # no document longer than the window: the band is everything
                return FusionAttentionPlan(*band, actual_seq_len=cum)
            return FusionAttentionPlan(*band, actual_seq_len=cum, sink_pass=sink_pass)
        reason = "some rows / documents start past position 0 while holding sink tokens"
    elif s != t:
        reason = "queries and keys differ (attention against a cache)"
    else:
        reason = "positions are not one consecutive run per row / document, or a key slot is empty"
    log_once(
        f"explicit:{reason}",
        "npu_fusion_attention: dense [b, 1, s, t] mask (sparse_mode=0) because %s",
        reason,
        level=logging.WARNING,
    )
    return _explicit_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg)


def _explicit_plan(q_pos, k_pos, window, sink_tokens, q_seg, k_seg) -> FusionAttentionPlan:
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


def _layout_facts(q_pos, k_pos, sink_tokens, q_seg, k_seg) -> dict[str, bool]:
    """Facts about the ids that decide the plan, fetched in one host sync.

    plain: queries are the keys, no empty slot, positions consecutive within each row (each
    document when segment ids are given, documents being contiguous non-repeating runs);
    no_sinks: no key holds a sink position; starts_at_zero: each row / document starts at 0.
    """
    steps = k_pos[:, 1:] - k_pos[:, :-1]
    if q_seg is None or k_seg is None:
        run_start = torch.zeros_like(k_pos, dtype=torch.bool)
        run_start[:, 0] = True
        plain = [(steps == 1).all()]
    else:
        run_start = torch.ones_like(k_seg, dtype=torch.bool)
        run_start[:, 1:] = k_seg[:, 1:] != k_seg[:, :-1]
        plain = [
            (q_seg == k_seg).all(),
            ((steps == 1) | run_start[:, 1:]).all(),
            (k_seg[:, 1:] >= k_seg[:, :-1]).all(),  # a document id never comes back later in the row
        ]
    plain += [(q_pos == k_pos).all(), (k_pos >= 0).all()]
    checks = torch.stack([
        torch.stack(plain).all(),
        (k_pos >= sink_tokens).all(),
        (k_pos[run_start] == 0).all(),
    ]).tolist()  # the one host sync of the plan
    return {"plain": checks[0], "no_sinks": checks[1], "starts_at_zero": checks[2]}


def _cumulative_run_lengths(seg: torch.Tensor) -> tuple[int, ...]:
    """Cumulative lengths of the documents of ``seg`` ``[b, s]`` flattened batch-major (TND order)."""
    b, s = seg.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=seg.device)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()
    ends = torch.cat([start_idx[1:], start_idx.new_tensor([b * s])])
    return tuple(ends.tolist())


def _tnd_sink_pass(cum: tuple[int, ...], window: int, sink_tokens: int, device: torch.device) -> SinkPass | None:
    """Sink pass of packed documents: in each document longer than the window, its tokens from
    ``window`` on meet its first ``sink_tokens`` tokens (documents start at position 0)."""
    q_index: list[int] = []
    k_index: list[int] = []
    q_cum: list[int] = []
    k_cum: list[int] = []
    for start, end in zip((0, *cum[:-1]), cum):
        length = end - start
        if length <= window:
            continue
        q_index.extend(range(start + window, end))
        k_index.extend(range(start, start + min(sink_tokens, length)))
        q_cum.append(len(q_index))
        k_cum.append(len(k_index))
    if not q_index:
        return None
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return SinkPass(
        num_sinks=sink_tokens,
        q_index=as_index(q_index),
        k_index=as_index(k_index),
        q_seq_len=tuple(q_cum),
        k_seq_len=tuple(k_cum),
    )


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake impls so graphs can be traced around them.
# --------------------------------------------------------------------------------------------


def _pass_options(q, atten_mask, layout, sparse_mode, pre, nxt, seq_q, seq_kv) -> dict[str, Any]:
    """The keyword arguments ``npu_fusion_attention`` and its grad share: which keys a pass sees, no dropout.

    TND: ``softmax_layout="TND"`` asks for the statistics token-major, ``[T, N, 8]``, which the band + sink merge
    indexes by token; without it the documented default is head-major per sequence ("NTD"), which that indexing
    would silently misread (TorchNPU 7.2.0 / CANN 8.3.RC1 and later take the argument)."""
    extra = {"softmax_layout": "TND"} if layout == "TND" else {}
    return {**extra,
        "atten_mask": atten_mask if sparse_mode == SPARSE_EXPLICIT else compressed_causal_mask(q.device),
        "keep_prob": 1.0,
        "pre_tockens": pre,
        "next_tockens": nxt,
        "actual_seq_qlen": seq_q,
        "actual_seq_kvlen": seq_kv,
        "sparse_mode": sparse_mode,
    }


def _fa_forward(q, k, v, atten_mask, scale, layout, sparse_mode, pre, nxt, seq_q, seq_kv):
    """One ``npu_fusion_attention`` call -> ``(out, softmax_max, softmax_sum)``; q/k/v in ``layout``."""
    outputs = import_torch_npu().npu_fusion_attention(
        q,
        k,
        v,
        q.shape[1],  # head_num: N is dim 1 in both BNSD and TND
        layout,
        scale=scale,
        **_pass_options(q, atten_mask, layout, sparse_mode, pre, nxt, seq_q, seq_kv),
    )
    return outputs[0], outputs[1], outputs[2]


def _fa_backward(dy, q, k, v, out, softmax_max, softmax_sum, atten_mask, scale, layout, sparse_mode, pre, nxt,
                 seq_q, seq_kv):  # fmt: skip
    """One ``npu_fusion_attention_grad`` call -> ``(dq, dk, dv)``."""
    grads = import_torch_npu().npu_fusion_attention_grad(
        q,
        k,
        v,
        dy,
        q.shape[1],
        layout,
        softmax_max=softmax_max,
        softmax_sum=softmax_sum,
        attention_in=out,
        scale_value=scale,
        **_pass_options(q, atten_mask, layout, sparse_mode, pre, nxt, seq_q, seq_kv),
    )
    return grads[0], grads[1], grads[2]


def _stat_shape(q: torch.Tensor) -> tuple[int, ...]:
    return (*q.shape[:-1], SOFTMAX_STAT_WIDTH)  # [B, N, S, 8] or [T, N, 8]


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
    """Single pass: ``npu_fusion_attention`` -> ``(out, softmax_max, softmax_sum)``."""
    return _fa_forward(q, k, v, atten_mask, scale, layout, sparse_mode, pre_tockens, next_tockens,
                       actual_seq_len, actual_seq_len)


@npu_swa.register_fake
def _npu_swa_fake(q, k, v, atten_mask, scale, layout, sparse_mode, pre_tockens, next_tockens, actual_seq_len):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    stats = _stat_shape(q)
    return out, q.new_empty(stats, dtype=torch.float32), q.new_empty(stats, dtype=torch.float32)


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
    return _fa_backward(grad_out, q, k, v, out, softmax_max, softmax_sum, atten_mask, scale, layout, sparse_mode,
                        pre_tockens, next_tockens, actual_seq_len, actual_seq_len)


@npu_swa_backward.register_fake
def _npu_swa_backward_fake(grad_out, q, k, v, *args: Any):
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


# -- band + sinks: two passes merged by log-sum-exp ------------------------------------------


def _rows(x: torch.Tensor, layout: str, window: int, q_index: torch.Tensor | None) -> torch.Tensor:
    """The sink pass's query rows of a query-shaped tensor (out, dy, statistics)."""
    if layout == "BNSD":
        return x[:, :, window:]
    assert q_index is not None, "the TND layout's sink pass selects rows by index"
    return x.index_select(0, q_index)


def _keys(x: torch.Tensor, layout: str, num_sinks: int, k_index: torch.Tensor | None) -> torch.Tensor:
    if layout == "BNSD":
        return x[:, :, :num_sinks]
    assert k_index is not None, "the TND layout's sink pass selects keys by index"
    return x.index_select(0, k_index)


def _put_rows(full: torch.Tensor, rows: torch.Tensor, layout: str, window: int, q_index, *, add: bool):
    """``full`` with the sink-pass rows replaced by (or increased by) ``rows`` (out of place)."""
    if layout == "BNSD":
        full = full.clone()
        if add:
            full[:, :, window:] += rows
        else:
            full[:, :, window:] = rows
        return full
    return full.index_add(0, q_index, rows) if add else full.index_copy(0, q_index, rows)


def _add_keys(full: torch.Tensor, part: torch.Tensor, layout: str, num_sinks: int, k_index) -> torch.Tensor:
    if layout == "BNSD":
        full = full.clone()
        full[:, :, :num_sinks] += part
        return full
    return full.index_add(0, k_index, part)


@torch.library.custom_op("ascend_edit::npu_swa_sinks", mutates_args=())
def npu_swa_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    layout: str,
    window: int,
    actual_seq_len: list[int] | None,
    num_sinks: int,
    sink_q_index: torch.Tensor | None,
    sink_k_index: torch.Tensor | None,
    sink_q_seq_len: list[int] | None,
    sink_k_seq_len: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Band pass + sink pass, merged -> ``(out, softmax_max, softmax_sum)`` of the union of both key sets."""
    out, row_max, row_sum = _fa_forward(q, k, v, None, scale, layout, SPARSE_BAND, window - 1, 0,
                                        actual_seq_len, actual_seq_len)
    q_s = _rows(q, layout, window, sink_q_index).contiguous()
    k_s = _keys(k, layout, num_sinks, sink_k_index).contiguous()
    v_s = _keys(v, layout, num_sinks, sink_k_index).contiguous()
    out_s, max_s, sum_s = _fa_forward(q_s, k_s, v_s, None, scale, layout, SPARSE_CAUSAL_TOP_LEFT, UNLIMITED_TOKENS,
                                      0, sink_q_seq_len, sink_k_seq_len)
    # log-sum-exp merge of the rows both passes computed: weights are each pass's share of the total mass.
    max_b = _rows(row_max, layout, window, sink_q_index)
    sum_b = _rows(row_sum, layout, window, sink_q_index)
    new_max = torch.maximum(max_b, max_s)
    mass_b = sum_b * torch.exp(max_b - new_max)
    mass_s = sum_s * torch.exp(max_s - new_max)
    total = mass_b + mass_s
    out_b = _rows(out, layout, window, sink_q_index).float()
    merged = out_b * (mass_b / total)[..., :1] + out_s.float() * (mass_s / total)[..., :1]
    out = _put_rows(out, merged.to(out.dtype), layout, window, sink_q_index, add=False)
    row_max = _put_rows(row_max, new_max, layout, window, sink_q_index, add=False)
    row_sum = _put_rows(row_sum, total, layout, window, sink_q_index, add=False)
    return out, row_max, row_sum


@npu_swa_sinks.register_fake
def _npu_swa_sinks_fake(q, k, v, *args: Any):
    stats = _stat_shape(q)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(stats, dtype=torch.float32), q.new_empty(
        stats, dtype=torch.float32)


@torch.library.custom_op("ascend_edit::npu_swa_sinks_backward", mutates_args=())
def npu_swa_sinks_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_max: torch.Tensor,
    softmax_sum: torch.Tensor,
    scale: float,
    layout: str,
    window: int,
    actual_seq_len: list[int] | None,
    num_sinks: int,
    sink_q_index: torch.Tensor | None,
    sink_k_index: torch.Tensor | None,
    sink_q_seq_len: list[int] | None,
    sink_k_seq_len: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both passes' ``npu_fusion_attention_grad`` with the merged statistics and output, summed."""
    dq, dk, dv = _fa_backward(grad_out, q, k, v, out, softmax_max, softmax_sum, None, scale, layout, SPARSE_BAND,
                              window - 1, 0, actual_seq_len, actual_seq_len)
    rows = lambda x: _rows(x, layout, window, sink_q_index).contiguous()
    keys = lambda x: _keys(x, layout, num_sinks, sink_k_index).contiguous()
    dq_s, dk_s, dv_s = _fa_backward(rows(grad_out), rows(q), keys(k), keys(v), rows(out), rows(softmax_max),
                                    rows(softmax_sum), None, scale, layout, SPARSE_CAUSAL_TOP_LEFT,
                                    UNLIMITED_TOKENS, 0, sink_q_seq_len, sink_k_seq_len)
    dq = _put_rows(dq, dq_s, layout, window, sink_q_index, add=True)
    dk = _add_keys(dk, dk_s, layout, num_sinks, sink_k_index)
    dv = _add_keys(dv, dv_s, layout, num_sinks, sink_k_index)
    return dq, dk, dv


@npu_swa_sinks_backward.register_fake
def _npu_swa_sinks_backward_fake(grad_out, q, k, v, *args: Any):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sinks_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, scale, layout, window, seq_len, num_sinks, q_index, k_index, q_lens, k_lens = inputs
    out, softmax_max, softmax_sum = output
    ctx.save_for_backward(q, k, v, out, softmax_max, softmax_sum, q_index, k_index)
    ctx.params = (scale, layout, window, seq_len, num_sinks)
    ctx.lens = (q_lens, k_lens)
    ctx.mark_non_differentiable(softmax_max, softmax_sum)


def _sinks_backward(ctx: Any, grad_out: torch.Tensor, _grad_max: Any, _grad_sum: Any) -> tuple[Any, ...]:
    q, k, v, out, softmax_max, softmax_sum, q_index, k_index = ctx.saved_tensors
    dq, dk, dv = npu_swa_sinks_backward(
        grad_out.contiguous(), q, k, v, out, softmax_max, softmax_sum, *ctx.params, q_index, k_index, *ctx.lens
    )
    return (dq, dk, dv) + (None,) * 9


npu_swa_sinks.register_autograd(_sinks_backward, setup_context=_sinks_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point (contract A)
# --------------------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _pad_head_dims(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One head dim for q, k and v (zero padding; see the module docstring). Returns v's original dim."""
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    return q, k, v, dv


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
    """Op A via ``npu_fusion_attention`` (contract in ``kernels/reference.py``). Returns ``[b, h, s, dv]``."""
    b, h, s, _ = q.shape
    t = k.shape[2]
    # The fused inference op takes fp16 / bf16 only; fp32 decodes through npu_fusion_attention below.
    if s < t and s <= DECODE_MAX_QUERIES and q_seg is None and not _needs_grad(q, k, v) and q.dtype != torch.float32:
        from .infer_attention import sliding_window_decode

        return sliding_window_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens,
                                     scale=scale)
    plan = plan_fusion_attention(q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg)
    q, k, v, dv = _pad_head_dims(q, k, v)
    if plan.layout == "TND":
        # [b, n, s, d] -> [b * s, n, d]: tokens batch-major, matching the cumulative lengths.
        q_in, k_in, v_in = (x.transpose(1, 2).reshape(b * x.shape[2], x.shape[1], x.shape[3]) for x in (q, k, v))
    else:
        q_in, k_in, v_in = q.contiguous(), k.contiguous(), v.contiguous()
    seq_len = None if plan.actual_seq_len is None else list(plan.actual_seq_len)
    if plan.sink_pass is not None:
        sp = plan.sink_pass
        out, _, _ = npu_swa_sinks(
            q_in, k_in, v_in, float(scale), plan.layout, window, seq_len, sp.num_sinks, sp.q_index, sp.k_index,
            None if sp.q_seq_len is None else list(sp.q_seq_len),
            None if sp.k_seq_len is None else list(sp.k_seq_len),
        )  # fmt: skip
    else:
        out, _, _ = npu_swa(
            q_in, k_in, v_in, plan.atten_mask, float(scale), plan.layout, plan.sparse_mode, plan.pre_tockens,
            plan.next_tockens, seq_len,
        )  # fmt: skip
    if plan.layout == "TND":
        out = out.reshape(b, s, h, out.shape[-1]).transpose(1, 2)
    if plan.empty_rows is not None:
        out = out.masked_fill(plan.empty_rows, 0.0)
    return out[..., :dv]
