"""Op A (sliding window + sink tokens) as a Triton flash-attention kernel, forward and backward (CUDA).

Serves the plain self-attention layout of training and prefill -- queries are the keys, positions
``0..s-1`` in every row, no packed documents -- where a key's position is its index. Then the
visibility rule is pure index arithmetic inside the kernel (no position tensors are read), and
each query block visits only

* the key blocks of its band: ``[first row - window + 1, last row]``, and
* key block 0 once more for the sink tokens when the band does not reach it.

Every visited block applies the whole rule ``j <= i and (i - j < window or j < sinks)``, so a key
that is both a sink and inside the window counts once. The backward is FlashAttention-2's: a
dK/dV kernel over key blocks (a key block holding sinks also visits every later query block) and
a dQ kernel with the forward's iteration, both recomputing probabilities from the saved
log-sum-exp. Other layouts (packed documents, caches, head dims that are not a power of two,
more sinks than a key block) go to the ``flex`` backend, logged once.

Grid: (query or key blocks, batch * heads). GQA: query head ``h`` reads KV head ``h // group``;
dK / dV are accumulated per query head in fp32 and summed over the group afterwards.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import triton
import triton.language as tl

from ..masks import TensorKeyedCache
from ..reference import check_sliding_window_inputs

__all__ = ["fits_triton_kernel", "sliding_window_attention"]

log = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
_PLAIN: TensorKeyedCache[bool] = TensorKeyedCache(max_entries=8)
_logged: set[str] = set()


@triton.jit
def _visible(i, j, S, window, sinks, HAS_WINDOW: tl.constexpr):
    vis = (j <= i) & (i < S) & (j < S)
    if HAS_WINDOW:
        vis = vis & (((i - j) < window) | (j < sinks))
    return vis


@triton.jit
def _full_key_blocks(m0, lo, hi, window, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[start, end) of the key blocks every query row m0..m0+BM-1 sees whole (no rule to apply):
    behind the first row (causal) and, with a window, within reach of the last row."""
    end = ((m0 + 1) // BN) * BN
    start = lo
    if HAS_WINDOW:
        start = tl.maximum(lo, tl.cdiv(m0 + BM - window, BN) * BN)
    start = tl.minimum(start, hi)
    end = tl.maximum(tl.minimum(end, hi), start)
    return start, end


@triton.jit
def _full_query_blocks(n0, lo, hi, window, sinks, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[start, end) of the query blocks that see key rows n0..n0+BN-1 whole: at or after the
    block's last key and, with a window, close enough for the first key. None for sink blocks."""
    start = tl.minimum(tl.cdiv(n0 + BN - 1, BM) * BM, hi)
    start = tl.maximum(start, lo)
    end = hi
    if HAS_WINDOW:
        reach = n0 + window - BM  # the last query block start whose last row is within the window
        end = tl.where(reach >= 0, (reach // BM) * BM + BM, 0)
        end = tl.where(n0 < sinks, 0, end)  # sink blocks: the tail queries see only some of their keys
        end = tl.minimum(end, hi)
    end = tl.maximum(end, start)
    return start, end


@triton.jit
def _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, bh, sqs, start_m, offs_n, S, window, sinks, scale_log2,
                D: tl.constexpr, BM: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    qt = tl.load(Q + q_base + offs_m[None, :] * sqs + offs_d[:, None], mask=offs_m[None, :] < S, other=0.0)
    do = tl.load(DO + q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
    st = tl.dot(k, qt) * scale_log2  # [BN, BM]: scores transposed
    pt = tl.exp2(st - lse[None, :])
    if MASK:
        vis = _visible(offs_m[None, :], offs_n[:, None], S, window, sinks, HAS_WINDOW)
        pt = tl.where(vis, pt, 0.0)
    else:  # rows past S read zeros (do = 0) but exp2 of them is not 0: keep them out of dk explicitly
        pt = tl.where(offs_m[None, :] < S, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window, sinks, scale_log2,
               D: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr):
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kt = tl.load(K + k_base + offs_n[None, :] * sks + offs_d[:, None], mask=offs_n[None, :] < S, other=0.0)
    s = tl.dot(q, kt) * scale_log2
    if MASK:  # blocks wholly inside the band skip the rule (see _full_key_blocks)
        vis = _visible(offs_m[:, None], offs_n[None, :], S, window, sinks, HAS_WINDOW)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    v = tl.load(V + v_base + offs_n[:, None] * svs + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def _swa_fwd(Q, K, V, O, LSE, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
             H, GROUP, S, window, sinks, scale_log2,
             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, S)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pid_m * BM - window + 1, 0)
        lo = (lo // BN) * BN
        # Sink blocks the band does not reach: visited for the sinks alone (the rule masks the rest).
        for start_n in range(0, tl.minimum(tl.cdiv(sinks, BN) * BN, lo), BN):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_base, v_base, sks, svs, start_n, offs_m, S,
                                       window, sinks, scale_log2, D, BN, HAS_WINDOW, True)
    full_lo, full_hi = _full_key_blocks(pid_m * BM, lo, hi, window, BM, BN, HAS_WINDOW)
    for start_n in range(lo, full_lo, BN):  # the window's lower edge
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window,
                                   sinks, scale_log2, D, BN, HAS_WINDOW, True)
    for start_n in range(full_lo, full_hi, BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window,
                                   sinks, scale_log2, D, BN, HAS_WINDOW, False)
    for start_n in range(full_hi, hi, BN):  # the diagonal
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window,
                                   sinks, scale_log2, D, BN, HAS_WINDOW, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < S)
    tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_safe), mask=offs_m < S)  # base-2 log-sum-exp of scaled scores


@triton.jit
def _dq_block(dq, q, do, lse, delta, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window, sinks,
              scale_log2, D: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kt = tl.load(K + k_base + offs_n[None, :] * sks + offs_d[:, None], mask=offs_n[None, :] < S, other=0.0)
    vt = tl.load(V + v_base + offs_n[None, :] * svs + offs_d[:, None], mask=offs_n[None, :] < S, other=0.0)
    s = tl.dot(q, kt) * scale_log2
    p = tl.exp2(s - lse[:, None])
    if MASK:
        vis = _visible(offs_m[:, None], offs_n[None, :], S, window, sinks, HAS_WINDOW)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, vt)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt))


@triton.jit
def _swa_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                H, GROUP, S, window, sinks, scale_log2, scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row = offs_m[:, None] < S
    q_off = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]  # q, do and dq share one layout
    q = tl.load(Q + q_off, mask=row, other=0.0)
    do = tl.load(DO + q_off, mask=row, other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    dq = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, S)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pid_m * BM - window + 1, 0)
        lo = (lo // BN) * BN
        for start_n in range(0, tl.minimum(tl.cdiv(sinks, BN) * BN, lo), BN):
            dq = _dq_block(dq, q, do, lse, delta, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window,
                           sinks, scale_log2, D, BN, HAS_WINDOW, True)
    full_lo, full_hi = _full_key_blocks(pid_m * BM, lo, hi, window, BM, BN, HAS_WINDOW)
    for start_n in range(lo, full_lo, BN):
        dq = _dq_block(dq, q, do, lse, delta, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window, sinks,
                       scale_log2, D, BN, HAS_WINDOW, True)
    for start_n in range(full_lo, full_hi, BN):
        dq = _dq_block(dq, q, do, lse, delta, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window, sinks,
                       scale_log2, D, BN, HAS_WINDOW, False)
    for start_n in range(full_hi, hi, BN):
        dq = _dq_block(dq, q, do, lse, delta, K, V, k_base, v_base, sks, svs, start_n, offs_m, S, window, sinks,
                       scale_log2, D, BN, HAS_WINDOW, True)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row)


@triton.jit
def _swa_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sgb, sgh, sgs,
                  H, GROUP, S, window, sinks, scale_log2, scale,
                  D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    col = offs_n[:, None] < S
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=col, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=col, other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    lo = (pid_n * BN // BM) * BM  # causal: no query before the block's first key
    hi = S
    if HAS_WINDOW:
        if pid_n * BN >= sinks:  # no sink in this block: only the band's queries see it
            hi = tl.minimum(S, pid_n * BN + BN + window - 1)
    q_base = b * sqb + h * sqh
    full_lo, full_hi = _full_query_blocks(pid_n * BN, lo, hi, window, sinks, BM, BN, HAS_WINDOW)
    for start_m in range(lo, full_lo, BM):  # the diagonal
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, bh, sqs, start_m, offs_n, S, window, sinks,
                             scale_log2, D, BM, HAS_WINDOW, True)
    for start_m in range(full_lo, full_hi, BM):
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, bh, sqs, start_m, offs_n, S, window, sinks,
                             scale_log2, D, BM, HAS_WINDOW, False)
    for start_m in range(full_hi, hi, BM):  # the window's far edge, and the sinks' tail queries
        dk, dv = _dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, bh, sqs, start_m, offs_n, S, window, sinks,
                             scale_log2, D, BM, HAS_WINDOW, True)
    g_off = b * sgb + h * sgh + offs_n[:, None] * sgs + offs_d[None, :]
    tl.store(DK + g_off, dk * scale, mask=col)
    tl.store(DV + g_off, dv, mask=col)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU interpreter (tests): first config, no tuning


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


# (BM, BN, warps, stages); the first entry of each list is the interpreter's.
FWD_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)])
DQ_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)])
DKDV_CONFIGS = _configs([(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3)])


def _launcher(kernel, configs: list[triton.Config]):
    """``launch(grid_fn, *args, **kwargs)``: autotuned per (S, window, D) on a GPU, fixed when interpreting."""
    if INTERPRET:
        meta = configs[0].kwargs

        def launch(grid_fn, *args, **kwargs):
            kernel[grid_fn(meta)](*args, **kwargs, **meta)

        return launch
    tuned = triton.autotune(configs=configs, key=["S", "window", "D", "HAS_WINDOW"])(kernel)

    def launch(grid_fn, *args, **kwargs):
        tuned[grid_fn](*args, **kwargs)

    return launch


_launch_fwd = _launcher(_swa_fwd, FWD_CONFIGS)
_launch_dq = _launcher(_swa_bwd_dq, DQ_CONFIGS)
_launch_dkdv = _launcher(_swa_bwd_dkdv, DKDV_CONFIGS)


class _SlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, window: int, sinks: int, scale: float):
        b, h, s, d = q.shape
        hk = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
        _launch_fwd(lambda meta: (triton.cdiv(s, meta["BM"]), b * h), q, k, v, out, lse, *q.stride()[:3],
                    *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], h, h // hk, s, window, sinks,
                    scale * LOG2E, D=d, HAS_WINDOW=window > 0)  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (window, sinks, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        window, sinks, scale = ctx.params
        b, h, s, d = q.shape
        hk = k.shape[1]
        do = grad_out.contiguous()  # q is contiguous too: the kernels index q, do and dq alike
        delta = (do.float() * out.float()).sum(-1).contiguous()  # [b, h, s]
        dq = torch.empty_like(q)
        _launch_dq(
            lambda meta: (triton.cdiv(s, meta["BM"]), b * h), q, k, v, do, dq, lse, delta, *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], h, h // hk, s, window, sinks, scale * LOG2E, scale, D=d,
            HAS_WINDOW=window > 0,
        )  # fmt: skip
        dk_h = torch.empty(b, h, s, d, device=q.device, dtype=torch.float32)  # per query head, summed below
        dv_h = torch.empty_like(dk_h)
        _launch_dkdv(
            lambda meta: (triton.cdiv(s, meta["BN"]), b * h), q, k, v, do, dk_h, dv_h, lse, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dk_h.stride()[:3], h, h // hk, s, window, sinks,
            scale * LOG2E, scale, D=d, HAS_WINDOW=window > 0,
        )  # fmt: skip
        dk = dk_h.view(b, hk, h // hk, s, d).sum(2).to(k.dtype)
        dv = dv_h.view(b, hk, h // hk, s, d).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None


def _is_plain(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Queries are the keys at positions 0..s-1 in every row (one host sync, cached per tensor identity)."""

    def build() -> bool:
        ar = torch.arange(q_pos.shape[1], device=q_pos.device)
        return bool(((q_pos == ar) & (k_pos == ar)).all())

    return _PLAIN.get_or_build((q_pos, k_pos), q_pos.shape, build)


def fits_triton_kernel(q, k, v, q_pos, k_pos, sink_tokens, q_seg) -> str | None:
    """Why this call cannot use the kernel (None: it can)."""
    d = q.shape[-1]
    if q_seg is not None:
        return "packed documents"
    if q.shape[2] != k.shape[2] or q_pos.shape != k_pos.shape:
        return "queries are not the keys (cache)"
    if d != v.shape[-1] or d < 16 or d > 256 or d & (d - 1):
        return f"head dims {d}/{v.shape[-1]} (one power of two in 16..256)"
    if not _is_plain(q_pos, k_pos):
        return "positions are not 0..s-1 in every row"
    return None


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
    """Op A via the Triton kernel (contract in ``kernels/reference.py``); other layouts via ``flex``."""
    check_sliding_window_inputs(
        q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg
    )
    reason = fits_triton_kernel(q, k, v, q_pos, k_pos, sink_tokens, q_seg)
    if reason is not None:
        if reason not in _logged:
            _logged.add(reason)
            log.info("triton sliding-window kernel: flex fallback for %s", reason)
        from ..flex import sliding_window_attention as flex_attention

        return flex_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens,
                              scale=scale, q_seg=q_seg, k_seg=k_seg)  # fmt: skip
    window = 0 if window >= q.shape[2] else window  # a window covering the sequence cuts nothing
    return _SlidingWindowAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), window, sink_tokens,
                                         float(scale))

