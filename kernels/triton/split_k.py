"""What the split-K ("flash-decoding") decode kernels share: the split plan and the pass that merges splits.

A decode query is a few rows against a long cache, too little work per row to fill a GPU; the decode kernels
(``mla_decode``, ``gqa_decode``) cut the key axis into splits, each program reduces one split with an online
softmax and stores its output normalised by its own sum plus ``(max, sum)`` in the log2 domain, and
:func:`merge_splits_kernel` combines the splits with log-sum-exp weights. The launch-side helpers here are plain
Python (host time before a decode launch is latency).

Triton is imported here only for the merge kernel; without Triton the plan helpers still import.
"""
from __future__ import annotations

import functools
import math

import torch

try:  # Triton is an optional dependency ("gpu" extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["MIN_SPLIT_LEN", "max_shared_memory", "merge_splits_kernel", "next_pow2", "num_splits", "sm_count",
           "split_len"]

# Splits shorter than this would cost more in partial-result traffic than they win in occupancy.
MIN_SPLIT_LEN = 64
SPLIT_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def next_pow2(n: int) -> int:
    """Plain Python: triton.next_power_of_2 goes through Triton's JIT call path (about 8 us a call on
    a CPU here; six calls made up a third of the launch's host time), and decode pays host time
    before every step."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int | None) -> int:
    """Cached: decode calls this every step, and the host time before the launch counts in latency."""
    index = torch.cuda.current_device() if device_index is None else device_index
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=16)
def max_shared_memory(device_index: int | None) -> int | None:
    """Shared memory one program may use on this GPU (opt-in maximum, bytes); None where torch does not report it."""
    index = torch.cuda.current_device() if device_index is None else device_index
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def split_len(kv_len: int, wanted_splits: int) -> int:
    """Keys per split for about ``wanted_splits`` splits: a multiple of :data:`MIN_SPLIT_LEN`."""
    return math.ceil(math.ceil(kv_len / wanted_splits) / MIN_SPLIT_LEN) * MIN_SPLIT_LEN


@functools.lru_cache(maxsize=256)
def num_splits(
    programs_per_split: int, block_m: int, kv_len: int, row_bytes: int, c: int, sm_count: int
) -> tuple[int, int]:
    """``(num_splits, split_len)`` minimising a small cost model of the split pass.

    Programs run in waves of one per SM (most configurations fill an SM's registers or shared
    memory); each program streams ``split_len`` cache rows and, when the key axis is split,
    writes partials (counted as fp32 here) that the combine pass reads back. More splits fill
    the GPU better but add partial traffic and a wave-quantisation tail.
    """
    best: tuple[float, int, int] | None = None
    for wanted in SPLIT_CANDIDATES:
        length = split_len(kv_len, wanted)
        splits = math.ceil(kv_len / length)
        waves = math.ceil(programs_per_split * splits / sm_count)
        partial_bytes = 2 * block_m * c * 4 if splits > 1 else 0
        cost = waves * (length * row_bytes + partial_bytes)
        if best is None or cost < best[0]:
            best = (cost, splits, length)
        if length == MIN_SPLIT_LEN:
            break
    assert best is not None
    return best[1], best[2]


if triton is not None:

    @triton.jit
    def merge_splits_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr,
        stride_ob, stride_oh, stride_os, stride_oc,
        H, M, NUM_SPLITS,
        C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, WAIT_PRIMARY: tl.constexpr = False,
    ):  # fmt: skip
        """One program per (row, batch): rows ``m = s_idx * H + h_idx`` of partials ``[b, M, splits, C]``.

        ``WAIT_PRIMARY``: launched as a programmatic dependent launch (``launch_pdl=True``) of the split pass,
        so it may start before that pass ends; ``griddepcontrol.wait`` then holds it until every split
        program's partials are visible."""
        if WAIT_PRIMARY:
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        part = (pid_b * M + row) * NUM_SPLITS + offs_s
        split_max = tl.load(max_ptr + part, mask=s_ok, other=float("-inf"))
        split_sum = tl.load(sum_ptr + part, mask=s_ok, other=0.0)
        # Each split's share of the softmax mass; its partial is already divided by its own sum.
        weight = tl.exp2(split_max - tl.max(split_max, 0)) * split_sum  # padding splits: exp2(-inf) == 0
        total = tl.sum(weight, 0)
        acc = tl.load(acc_ptr + part[:, None] * C + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        out = tl.sum(acc.to(tl.float32) * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
        out = tl.where(total > 0, out, 0.0)  # no visible key at all -> zeros
        h_idx = row % H
        s_idx = row // H
        tl.store(
            out_ptr + pid_b * stride_ob + h_idx * stride_oh + s_idx * stride_os + offs_c * stride_oc,
            out.to(out_ptr.dtype.element_ty),
            mask=c_ok,
        )
else:  # pragma: no cover - depends on the machine
    merge_splits_kernel = None
