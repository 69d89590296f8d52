"""Op A (sliding window + sink tokens) as a Triton flash-attention kernel, forward and backward (CUDA).

Serves the plain self-attention layout of training and prefill -- queries are the keys, positions
``0..s-1`` in every row, no packed documents -- where a key's position is its index. Then the
visibility rule ``j <= i and (i - j < window or j < sinks)`` is pure index arithmetic inside the
kernel (no position tensors are read). Other layouts (packed documents, caches, head dims that are
not a power of two) go to the ``flex`` backend, logged once.

Work split (FlashAttention-2 structure, exp2 with log2(e) folded into the scale). A query block
``[m0, m0 + BM)`` walks, in this order,

1. the sink keys, when its band does not reach them: one narrow tile of ``SINK_BN`` keys (16 for
   up to 16 sinks) instead of a whole key block -- the 4 sinks of the target shape would otherwise
   cost a 64- or 128-wide tile per query block; the tile applies the whole rule;
2. the window's far edge: the one or two key blocks the first rows reach only in part (masked);
3. the interior: key blocks every row sees whole -- no mask is computed at all;
4. the diagonal: the key blocks the causal edge cuts (masked).

Loop bounds come from the window, so blocks that are wholly invisible are never visited, and a
sink key inside the band is visited only by the band (each key block is visited once), so it counts
once. The backward recomputes probabilities from the saved base-2 log-sum-exp: ``delta =
rowsum(dO * O)`` by a small preprocess kernel, a dQ kernel with the forward's iteration, and a
dK/dV kernel per key block over the query blocks that see it, with the same edge / interior /
edge split. The dK/dV programs of the key block holding the sinks see every later query block
(about 7x the work of the others at the target shape), so that grid is laid out heads-first: those
programs start in the first wave instead of trailing at the end of the launch.

Every kernel takes a :class:`KernelConfig`: tile sizes, warps, pipeline stages, and three switches --
``tma`` (Q/K/V/dO tiles through Hopper TMA descriptors), ``one_loop`` (steps 2-4 as one loop whose
tiles decide at run time whether to mask, so one software pipeline runs through the band instead of
three short ones that each fill and drain; it also needs fewer registers) and, for dK/dV only,
``atomic_dq`` (dQ added there with fp32 atomics, 5 matmuls per tile instead of 4 + 3 in two kernels).
:class:`Variant` bundles the three kernels' configs; ``DEFAULT_VARIANT`` is what the registry path
runs. ``benchmarks/swa_sweep.py`` times each config on the target GPU (one fixed config per kernel,
no autotuning at run time: the choice is made once, by the sweep, and recorded here).

GQA: query head ``h`` reads KV head ``h // group``; with groups, dK / dV are accumulated per query
head in fp32 and summed over the group afterwards; without (group 1) they are stored directly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from ..contract import sliding_window_contract
from ..masks import TensorKeyedCache

try:  # host-side TMA descriptors (Triton >= 3.3); without them the TMA configs fall back to pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "DEFAULT_VARIANT",
    "KernelConfig",
    "Variant",
    "attention",
    "fits_triton_kernel",
    "launch_delta",
    "launch_dkdv",
    "launch_dq",
    "launch_forward",
    "sliding_window_attention",
]

log = logging.getLogger(__name__)
LOG2E = 1.4426950408889634
_PLAIN: TensorKeyedCache[bool] = TensorKeyedCache(max_entries=8)
_logged: set[str] = set()


@dataclass(frozen=True)
class KernelConfig:
    """One kernel's launch parameters: ``block_m`` query rows x ``block_n`` key rows per tile."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False  # load Q/K/V/dO tiles through TMA descriptors (Hopper); needs s % both blocks == 0
    # dK/dV kernel only: also compute dQ there, added to an fp32 buffer with atomics (FlashAttention-2's
    # original backward: 5 matmuls per tile instead of 4 + 3 in two kernels, at the price of the
    # atomic traffic and a summation order that varies from run to run); the dQ kernel is then skipped.
    atomic_dq: bool = False
    # Walk the edge and interior tiles in one loop that decides per tile at run time whether to mask,
    # instead of three loops: one software pipeline with no drain between edge, interior and edge.
    one_loop: bool = False

    def label(self) -> str:
        extra = (" tma" if self.tma else "") + (" atomic-dq" if self.atomic_dq else "")
        extra += " one-loop" if self.one_loop else ""
        return f"{self.block_m}x{self.block_n} w{self.warps} s{self.stages}{extra}"


@dataclass(frozen=True)
class Variant:
    """The configs of the forward, the dQ and the dK/dV kernels."""

    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig

    def label(self) -> str:
        dq = "in dkdv" if self.dkdv.atomic_dq else self.dq.label()
        return f"fwd {self.fwd.label()}; dq {dq}; dkdv {self.dkdv.label()}"


# Production default (``benchmarks/swa_sweep.py`` prints the line to put here after a GPU sweep).
# Hopper wgmma wants >= 64 rows per warpgroup on the left operand: the forward and dQ tiles put
# 128 query rows there, the dK/dV tiles 128 key rows. One loop: compiled for sm_90 (ptxas -v), the
# three-loop dK/dV kernel spills and ptxas serialises its wgmmas (C7515); the one-loop form does
# neither, and the forward / dQ kernels drop from ~235 to ~170 registers per thread.
# Chosen by benchmarks/swa_sweep.py on one H200 (2026-12-02, B=1 H=32 S=8192 D=128 W=1024, 4 sinks, bf16):
# fastest per kernel without TMA, 1.646 ms forward + backward = 1.55x flex_attention (2.556 ms) in the same run.
DEFAULT_VARIANT = Variant(fwd=KernelConfig(64, 64, 4, 3, one_loop=True), dq=KernelConfig(128, 64, 8, 3),
                          dkdv=KernelConfig(64, 128, 8, 3, one_loop=True))  # fmt: skip

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU interpreter (tests)

# How a tile applies the visibility rule: not at all (interior), always (edges), or as a runtime
# ``needs_mask`` says (``one_loop`` configs walk edges and interior in a single loop).
NO_MASK: tl.constexpr = tl.constexpr(0)
MASKED: tl.constexpr = tl.constexpr(1)
MASK_IF: tl.constexpr = tl.constexpr(2)


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _visible(i, j, S, window, sinks, HAS_WINDOW: tl.constexpr, EVEN: tl.constexpr):
    vis = j <= i
    if not EVEN:  # rows / keys past the sequence end exist only in a ragged last block
        vis = vis & (i < S) & (j < S)
    if HAS_WINDOW:
        vis = vis & (((i - j) < window) | (j < sinks))
    return vis


@triton.jit
def _program_block(H, GROUP, ROWS: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """This program's (batch, head) slice ``bh`` of ``[b * H, S]``, the slice of ``[b * H // GROUP, S]``
    its KV head is in (query head h reads KV head h // GROUP), and its block of ``ROWS`` rows (first
    row, rows). The grid is (blocks, b * H), or (b * H, blocks) with ``HEADS_FIRST``."""
    if HEADS_FIRST:
        bh = tl.program_id(0)
        pid = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1)
    kv_slice = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    row0 = pid * ROWS
    return bh, kv_slice, row0, row0 + tl.arange(0, ROWS)


@triton.jit
def _tile(X, XD, slice_idx, row0, S, ROWS: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr,
          EVEN: tl.constexpr):  # fmt: skip
    """Rows ``row0 .. row0 + ROWS - 1`` of one (batch, head) slice of a contiguous ``[b, h, S, D]``
    tensor as a ``[ROWS, D]`` tile; rows past ``S`` read zeros. ``XD`` is the TMA descriptor of the
    tensor viewed as ``[b * h * S, D]`` (used when ``TMA``; then ``S`` is a multiple of ``ROWS``)."""
    row0 = tl.multiple_of(row0, ROWS)
    if TMA:
        tile = XD.load([slice_idx * S + row0, 0])
    else:
        rows = row0 + tl.arange(0, ROWS)
        ptrs = X + slice_idx.to(tl.int64) * S * D + rows[:, None] * D + tl.arange(0, D)[None, :]
        if EVEN:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < S, other=0.0)
    return tile


@triton.jit
def _rows(X, bh, row0, S, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """A per-row fp32 statistic (log-sum-exp, delta) of ``[b * h, S]`` for rows ``row0 ..``."""
    rows = row0 + tl.arange(0, ROWS)
    if EVEN:
        stat = tl.load(X + bh * S + rows)
    else:
        stat = tl.load(X + bh * S + rows, mask=rows < S, other=0.0)
    return stat


@triton.jit
def _interior_key_blocks(m0, lo, hi, window, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):
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
def _interior_query_blocks(n0, lo, hi, window, sinks, BM: tl.constexpr, BN: tl.constexpr,
                           HAS_WINDOW: tl.constexpr):  # fmt: skip
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
def _band_start(m0, window, BN: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First key block (a multiple of BN) any row of the query block m0.. reaches through the window."""
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(m0 - window + 1, 0) // BN) * BN
    return lo


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks, qk_scale, needs_mask,
              D: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr,
              TMA: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax. MASK: NO_MASK, MASKED, or MASK_IF (``needs_mask`` decides)."""
    k = _tile(K, KD, kv_slice, start_n, S, BN, D, TMA, EVEN)
    s = tl.dot(q, tl.trans(k))
    if MASK == NO_MASK:  # every score is visible, so the row maximum is finite: no guard, scale in one FMA
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        p = tl.exp2(s * qk_scale - m_use[:, None])
    else:
        s = s * qk_scale
        if MASK == MASKED:
            vis = _visible(offs_m[:, None], start_n + tl.arange(0, BN)[None, :], S, window, sinks, HAS_WINDOW, EVEN)
            s = tl.where(vis, s, float("-inf"))
        elif needs_mask:
            vis = _visible(offs_m[:, None], start_n + tl.arange(0, BN)[None, :], S, window, sinks, HAS_WINDOW, EVEN)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(V, VD, kv_slice, start_n, S, BN, D, TMA, EVEN)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _swa_fwd(Q, K, V, O, LSE, QD, KD, VD, H, GROUP, S, window, sinks, qk_scale,
             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SINK_BN: tl.constexpr,
             HAS_WINDOW: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr, ONE_LOOP: tl.constexpr):  # fmt: skip
    bh, kv_slice, m0, offs_m = _program_block(H, GROUP, BM, False)
    q = _tile(Q, QD, bh, m0, S, BM, D, TMA, EVEN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum(m0 + BM, S)
    lo = _band_start(m0, window, BN, HAS_WINDOW)
    if HAS_WINDOW:  # (1) sink keys the band does not reach; pointer loads (the TMA box is BN rows)
        for start_n in range(0, tl.minimum(tl.cdiv(sinks, SINK_BN) * SINK_BN, lo), SINK_BN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, K, V, kv_slice, start_n, offs_m, S, window, sinks,
                                      qk_scale, True, D, SINK_BN, HAS_WINDOW, MASKED, False, EVEN)
    mid_lo, mid_hi = _interior_key_blocks(m0, lo, hi, window, BM, BN, HAS_WINDOW)
    if ONE_LOOP:  # (2)-(4) in one pipelined loop; the edge tiles decide at run time to mask
        for start_n in range(lo, hi, BN):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                                      qk_scale, (start_n < mid_lo) | (start_n >= mid_hi), D, BN, HAS_WINDOW, MASK_IF,
                                      TMA, EVEN)  # fmt: skip
    else:
        for start_n in range(lo, mid_lo, BN):  # (2) the window's far edge
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                                      qk_scale, True, D, BN, HAS_WINDOW, MASKED, TMA, EVEN)
        for start_n in range(mid_lo, mid_hi, BN):  # (3) interior: no mask
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                                      qk_scale, False, D, BN, HAS_WINDOW, NO_MASK, TMA, EVEN)
        for start_n in range(mid_hi, hi, BN):  # (4) the diagonal
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                                      qk_scale, True, D, BN, HAS_WINDOW, MASKED, TMA, EVEN)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + bh.to(tl.int64) * S * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
    if EVEN:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
        tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_safe))  # base-2 log-sum-exp of scaled scores
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < S)
        tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_safe), mask=offs_m < S)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _swa_bwd_delta(O, DO, DELTA, S, D: tl.constexpr, BM: tl.constexpr, EVEN: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, straight from the bf16 tensors (no fp32 copies)."""
    bh = tl.program_id(1)
    m0 = tl.program_id(0) * BM
    o = _tile(O, O, bh, m0, S, BM, D, False, EVEN).to(tl.float32)
    do = _tile(DO, DO, bh, m0, S, BM, D, False, EVEN).to(tl.float32)
    rows = m0 + tl.arange(0, BM)
    if EVEN:
        tl.store(DELTA + bh * S + rows, tl.sum(o * do, 1))
    else:
        tl.store(DELTA + bh * S + rows, tl.sum(o * do, 1), mask=rows < S)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks, qk_scale, needs_mask,
             D: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr,
             TMA: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    k = _tile(K, KD, kv_slice, start_n, S, BN, D, TMA, EVEN)
    v = _tile(V, VD, kv_slice, start_n, S, BN, D, TMA, EVEN)
    s = tl.dot(q, tl.trans(k))
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK == MASKED:
        vis = _visible(offs_m[:, None], start_n + tl.arange(0, BN)[None, :], S, window, sinks, HAS_WINDOW, EVEN)
        p = tl.where(vis, p, 0.0)
    elif MASK == MASK_IF:
        if needs_mask:
            vis = _visible(offs_m[:, None], start_n + tl.arange(0, BN)[None, :], S, window, sinks, HAS_WINDOW, EVEN)
            p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _swa_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, QD, KD, VD, DOD, H, GROUP, S, window, sinks, qk_scale, scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SINK_BN: tl.constexpr,
                HAS_WINDOW: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr, ONE_LOOP: tl.constexpr):  # fmt: skip
    bh, kv_slice, m0, offs_m = _program_block(H, GROUP, BM, False)
    q = _tile(Q, QD, bh, m0, S, BM, D, TMA, EVEN)
    do = _tile(DO, DOD, bh, m0, S, BM, D, TMA, EVEN)
    # Rows past S: q = dO = 0 and lse = delta = 0, so p = 1 but ds = p * (0 - 0) = 0.
    lse = _rows(LSE, bh, m0, S, BM, EVEN)
    delta = _rows(DELTA, bh, m0, S, BM, EVEN)
    dq = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum(m0 + BM, S)
    lo = _band_start(m0, window, BN, HAS_WINDOW)
    if HAS_WINDOW:  # same order and bounds as the forward
        for start_n in range(0, tl.minimum(tl.cdiv(sinks, SINK_BN) * SINK_BN, lo), SINK_BN):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, K, V, kv_slice, start_n, offs_m, S, window, sinks, qk_scale,
                          True, D, SINK_BN, HAS_WINDOW, MASKED, False, EVEN)
    mid_lo, mid_hi = _interior_key_blocks(m0, lo, hi, window, BM, BN, HAS_WINDOW)
    if ONE_LOOP:
        for start_n in range(lo, hi, BN):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                          qk_scale, (start_n < mid_lo) | (start_n >= mid_hi), D, BN, HAS_WINDOW, MASK_IF, TMA, EVEN)
    else:
        for start_n in range(lo, mid_lo, BN):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                          qk_scale, True, D, BN, HAS_WINDOW, MASKED, TMA, EVEN)
        for start_n in range(mid_lo, mid_hi, BN):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                          qk_scale, False, D, BN, HAS_WINDOW, NO_MASK, TMA, EVEN)
        for start_n in range(mid_hi, hi, BN):
            dq = _dq_tile(dq, q, do, lse, delta, K, V, KD, VD, kv_slice, start_n, offs_m, S, window, sinks,
                          qk_scale, True, D, BN, HAS_WINDOW, MASKED, TMA, EVEN)
    dq_ptrs = DQ + bh.to(tl.int64) * S * D + offs_m[:, None] * D + tl.arange(0, D)[None, :]
    if EVEN:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < S)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, DQA, bh, start_m, offs_n, S, window, sinks, qk_scale,
               scale, needs_mask, D: tl.constexpr, BM: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr,
               TMA: tl.constexpr, EVEN: tl.constexpr, ATOMIC_DQ: tl.constexpr):  # fmt: skip
    q = _tile(Q, QD, bh, start_m, S, BM, D, TMA, EVEN)
    do = _tile(DO, DOD, bh, start_m, S, BM, D, TMA, EVEN)
    lse = _rows(LSE, bh, start_m, S, BM, EVEN)
    delta = _rows(DELTA, bh, start_m, S, BM, EVEN)
    st = tl.dot(k, tl.trans(q))  # [BN, BM]: scores transposed, keys on the wgmma's 64-row side
    pt = tl.exp2(st * qk_scale - lse[None, :])
    if MASK == MASKED:
        vis = _visible(start_m + tl.arange(0, BM)[None, :], offs_n[:, None], S, window, sinks, HAS_WINDOW, EVEN)
        pt = tl.where(vis, pt, 0.0)
    elif MASK == MASK_IF:
        if needs_mask:
            vis = _visible(start_m + tl.arange(0, BM)[None, :], offs_n[:, None], S, window, sinks, HAS_WINDOW, EVEN)
            pt = tl.where(vis, pt, 0.0)
    # Unmasked tiles never hold rows past S: they end at the last full query block (see
    # _interior_query_blocks); and such rows read dO = 0 and delta = 0, so they would add zero anyway.
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do))
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    if ATOMIC_DQ:  # this tile's share of dQ = dS @ K; relaxed: the adds need no ordering among themselves
        rows = start_m + tl.arange(0, BM)
        dq_ptrs = DQA + bh.to(tl.int64) * S * D + rows[:, None] * D + tl.arange(0, D)[None, :]
        dq_part = tl.dot(tl.trans(dst), k) * scale
        if EVEN:
            tl.atomic_add(dq_ptrs, dq_part, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq_part, mask=rows[:, None] < S, sem="relaxed")
    return tl.dot(dst, q, dk), dv


@triton.jit
def _swa_bwd_dkdv(Q, K, V, DO, DK, DV, DQA, LSE, DELTA, QD, KD, VD, DOD, H, GROUP, S, window, sinks, qk_scale,
                  scale, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  TMA: tl.constexpr, EVEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, ONE_LOOP: tl.constexpr):  # fmt: skip
    # Heads first: the long sink-block programs (key block 0) start in the first wave.
    bh, kv_slice, n0, offs_n = _program_block(H, GROUP, BN, True)
    k = _tile(K, KD, kv_slice, n0, S, BN, D, TMA, EVEN)
    v = _tile(V, VD, kv_slice, n0, S, BN, D, TMA, EVEN)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    lo = (n0 // BM) * BM  # causal: no query before the block's first key
    hi = S
    if HAS_WINDOW:
        if n0 >= sinks:  # no sink in this block: only the band's queries see it
            hi = tl.minimum(S, n0 + BN + window - 1)
    mid_lo, mid_hi = _interior_query_blocks(n0, lo, hi, window, sinks, BM, BN, HAS_WINDOW)
    if ONE_LOOP:
        for start_m in range(lo, hi, BM):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, DQA, bh, start_m, offs_n, S, window,
                                sinks, qk_scale, scale, (start_m < mid_lo) | (start_m >= mid_hi), D, BM, HAS_WINDOW,
                                MASK_IF, TMA, EVEN, ATOMIC_DQ)  # fmt: skip
    else:
        for start_m in range(lo, mid_lo, BM):  # the diagonal
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, DQA, bh, start_m, offs_n, S, window,
                                sinks, qk_scale, scale, True, D, BM, HAS_WINDOW, MASKED, TMA, EVEN, ATOMIC_DQ)
        for start_m in range(mid_lo, mid_hi, BM):  # interior: no mask
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, DQA, bh, start_m, offs_n, S, window,
                                sinks, qk_scale, scale, False, D, BM, HAS_WINDOW, NO_MASK, TMA, EVEN, ATOMIC_DQ)
        for start_m in range(mid_hi, hi, BM):  # the window's far edge, and the sinks' tail queries
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, LSE, DELTA, DQA, bh, start_m, offs_n, S, window,
                                sinks, qk_scale, scale, True, D, BM, HAS_WINDOW, MASKED, TMA, EVEN, ATOMIC_DQ)
    g_ptrs = bh.to(tl.int64) * S * D + offs_n[:, None] * D + tl.arange(0, D)[None, :]  # per query head
    if EVEN:
        tl.store(DK + g_ptrs, (dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + g_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(DK + g_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
        tl.store(DV + g_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


# ---------------------------------------------------------------------------------------------
# Launchers (also timed one by one by benchmarks/swa_sweep.py)
# ---------------------------------------------------------------------------------------------


def _sink_block(sinks: int, block_n: int) -> int:
    """Width of the sink tile: the sinks rounded up to a power of two, at least 16 (the smallest
    dot operand) and at most a key block (then the sink tiles are ordinary key blocks)."""
    return min(block_n, max(16, triton.next_power_of_2(max(sinks, 1))))


def _operands(cfg: KernelConfig, s: int, tensors_rows: list[tuple[torch.Tensor, int]]) -> tuple[list[Any], bool]:
    """What the kernel gets for ``[b, h, s, d]`` tensors: TMA descriptors of them viewed as ``[b*h*s, d]``
    with a ``[rows, d]`` box, or the tensors themselves (pointer loads) -- the latter when the config
    does not ask for TMA, Triton has no descriptors, a tile would cross the end of a sequence, or a
    base address is not 16-byte aligned (a TMA requirement). Also says which one it is."""
    tma = (cfg.tma and TensorDescriptor is not None and s % cfg.block_m == 0 and s % cfg.block_n == 0
           and all(x.data_ptr() % 16 == 0 for x, _ in tensors_rows))  # fmt: skip
    if not tma:
        return [x for x, _ in tensors_rows], False
    return [TensorDescriptor.from_tensor(x.view(-1, x.shape[-1]), [r, x.shape[-1]]) for x, r in tensors_rows], True


def _launch_opts(cfg: KernelConfig, s: int, tma: bool) -> dict[str, Any]:
    even = s % cfg.block_m == 0 and s % cfg.block_n == 0
    return {"BM": cfg.block_m, "BN": cfg.block_n, "TMA": tma, "EVEN": even, "ONE_LOOP": cfg.one_loop,
            "num_warps": cfg.warps, "num_stages": cfg.stages}  # fmt: skip


def launch_forward(q, k, v, window: int, sinks: int, scale: float, cfg: KernelConfig):
    """Output ``[b, h, s, d]`` and base-2 log-sum-exp ``[b, h, s]`` (fp32) for contiguous q, k, v;
    ``window`` 0 means causal without a window."""
    b, h, s, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    (qd, kd, vd), tma = _operands(cfg, s, [(q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n)])
    _swa_fwd[(triton.cdiv(s, cfg.block_m), b * h)](
        q, k, v, out, lse, qd, kd, vd, h, h // k.shape[1], s, window, sinks, scale * LOG2E, D=d,
        SINK_BN=_sink_block(sinks, cfg.block_n), HAS_WINDOW=window > 0, **_launch_opts(cfg, s, tma),
    )  # fmt: skip
    return out, lse


def launch_delta(out: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """``rowsum(dO * O)`` ``[b, h, s]`` in fp32 for contiguous ``out`` and ``do``."""
    b, h, s, d = out.shape
    delta = torch.empty(b, h, s, device=out.device, dtype=torch.float32)
    block = 64
    _swa_bwd_delta[(triton.cdiv(s, block), b * h)](out, do, delta, s, D=d, BM=block, EVEN=s % block == 0)
    return delta


def launch_dq(q, k, v, do, lse, delta, window: int, sinks: int, scale: float, cfg: KernelConfig):
    b, h, s, d = q.shape
    dq = torch.empty_like(q)
    tiles = [(q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n), (do, cfg.block_m)]
    (qd, kd, vd, dod), tma = _operands(cfg, s, tiles)
    _swa_bwd_dq[(triton.cdiv(s, cfg.block_m), b * h)](
        q, k, v, do, dq, lse, delta, qd, kd, vd, dod, h, h // k.shape[1], s, window, sinks, scale * LOG2E, scale,
        D=d, SINK_BN=_sink_block(sinks, cfg.block_n), HAS_WINDOW=window > 0, **_launch_opts(cfg, s, tma),
    )  # fmt: skip
    return dq


def launch_dkdv(q, k, v, do, lse, delta, window: int, sinks: int, scale: float, cfg: KernelConfig):
    """(dK, dV, dQ) -- dQ only with ``cfg.atomic_dq``, else None. dK / dV in k's dtype; with GQA
    accumulated per query head in fp32 and summed over the group."""
    b, h, s, d = q.shape
    hk = k.shape[1]
    buf_dtype = k.dtype if hk == h else torch.float32
    dk_h = torch.empty(b, h, s, d, device=q.device, dtype=buf_dtype)
    dv_h = torch.empty_like(dk_h)
    dq_acc = torch.zeros(b, h, s, d, device=q.device, dtype=torch.float32) if cfg.atomic_dq else dk_h
    tiles = [(q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n), (do, cfg.block_m)]
    (qd, kd, vd, dod), tma = _operands(cfg, s, tiles)
    _swa_bwd_dkdv[(b * h, triton.cdiv(s, cfg.block_n))](
        q, k, v, do, dk_h, dv_h, dq_acc, lse, delta, qd, kd, vd, dod, h, h // hk, s, window, sinks, scale * LOG2E,
        scale, D=d, HAS_WINDOW=window > 0, ATOMIC_DQ=cfg.atomic_dq, **_launch_opts(cfg, s, tma),
    )  # fmt: skip
    dq = dq_acc.to(q.dtype) if cfg.atomic_dq else None
    if hk == h:
        return dk_h, dv_h, dq
    dk = dk_h.view(b, hk, h // hk, s, d).sum(2).to(k.dtype)
    return dk, dv_h.view(b, hk, h // hk, s, d).sum(2).to(v.dtype), dq


class _SlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, window: int, sinks: int, scale: float, variant: Variant):
        out, lse = launch_forward(q, k, v, window, sinks, scale, variant.fwd)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (window, sinks, scale, variant)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        window, sinks, scale, variant = ctx.params
        do = grad_out.contiguous()  # q is contiguous too: the kernels index q, do and dq alike
        delta = launch_delta(out, do)
        dk, dv, dq = launch_dkdv(q, k, v, do, lse, delta, window, sinks, scale, variant.dkdv)
        if dq is None:  # not accumulated by the dK/dV kernel: the dQ kernel
            dq = launch_dq(q, k, v, do, lse, delta, window, sinks, scale, variant.dq)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, *, window: int, sink_tokens: int, scale: float, variant: Variant | None = None):
    """The kernel on the plain layout (positions 0..s-1, no checks): what the benchmark sweep times."""
    window = 0 if window >= q.shape[2] else window  # a window covering the sequence cuts nothing
    return _SlidingWindowAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), window, sink_tokens,
                                         float(scale), variant or DEFAULT_VARIANT)  # fmt: skip


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
    """Op A via the Triton kernel (contract in ``kernels/reference.py``); other layouts via ``flex``."""
    reason = fits_triton_kernel(q, k, v, q_pos, k_pos, sink_tokens, q_seg)
    if reason is not None:
        if reason not in _logged:
            _logged.add(reason)
            log.info("triton sliding-window kernel: flex fallback for %s", reason)
        from ..flex import sliding_window_attention as flex_attention

        return flex_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, sink_tokens=sink_tokens,
                              scale=scale, q_seg=q_seg, k_seg=k_seg)  # fmt: skip
    return attention(q, k, v, window=window, sink_tokens=sink_tokens, scale=scale)
