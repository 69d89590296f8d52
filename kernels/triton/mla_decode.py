"""Op B (absorbed MLA attention) for decode: a split-K ("flash-decoding") Triton kernel.

**Forward only.** Decode is inference; there is no backward, and calling the op on inputs that
require grad while grad mode is on raises. The registry picks this backend only when no
gradient is needed; training uses the eager reference (or the naive, non-absorbed MLA path).

Why a kernel: the absorbed form reads the whole latent cache (``[b, t, c + r]``) once per step
and is memory-bound. The eager reference materialises fp32 scores and probabilities for every
head and reads the cache several times; this kernel reads each latent tile once for a block of
query rows (all heads of a batch share the latent) and keeps scores in registers.

Algorithm (per batch element):

1. Query rows ``m = s_idx * h + h_idx`` (all heads and the few query positions) are tiled by
   ``BLOCK_M``; the key axis ``t`` is cut into ``num_splits`` chunks so that short queries over
   long contexts still fill the GPU. Each program loops over its chunk in ``BLOCK_T`` tiles:
   ``scores = q_latent @ latent_tile^T + q_rope @ k_rope_tile^T`` (scaled into the log2
   domain), masked by positions (``0 <= k_pos <= q_pos``), an online softmax, and
   ``acc += p @ latent_tile`` -- the same tile serves as key and value.
2. A combine kernel merges the per-chunk ``(acc, max, sum)`` with the usual log-sum-exp
   rescaling. Rows with no visible key produce zeros.

Status (H100, bf16, B=32, context 8192, c=512, r=64; ``docs/benchmarks.md``): 0.34 ms at 32
heads, 6x faster than the eager reference but about 3x off the ~0.1 ms needed to read the cache
once; 0.57 ms at 128 heads, where four 32-row blocks each stream the latent (through L2). Not
yet tried: 64-row warpgroup tiles with the output dim split across warpgroups, fp8/bf16
partials, a persistent grid.

Triton is imported here and nowhere else; this module is imported lazily by the registry. On a
machine without Triton the custom op and its fake impl still register, so graphs that contain
``ascend_edit::mla_decode`` can be traced on CPU.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from ..reference import check_mla_inputs

try:  # Triton is an optional dependency ("gpu" extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["mla_absorbed_attention", "mla_decode", "triton_available", "tuned_config"]

# Splits shorter than this would cost more in partial-result traffic than they win in occupancy.
_MIN_SPLIT_LEN = 64
_LOG2E = 1.4426950408889634


def triton_available() -> bool:
    return triton is not None


def _block_m(rows: int) -> int:
    """Query rows per program: tl.dot needs >= 16; 32 rows share each latent tile."""
    return 16 if rows <= 16 else 32


def tuned_config(c: int, r: int, rows: int) -> str | None:
    """The autotuner's choice for latent dim ``c``, rope dim ``r`` and ``rows`` = heads x query
    length (for benchmark reports); None before the first call with those sizes."""
    if triton is None:
        return None
    for key, config in _mla_decode_split_kernel_tuned.cache.items():
        if tuple(key[:3]) == (c, r, _block_m(rows)):
            return str(config)
    return None


if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(
        q_lat_ptr, q_rope_ptr, lat_ptr, k_rope_ptr, q_pos_ptr, k_pos_ptr,
        acc_ptr, max_ptr, sum_ptr,
        stride_qlb, stride_qlh, stride_qls, stride_qlc,
        stride_qrb, stride_qrh, stride_qrs, stride_qrr,
        stride_lb, stride_lt, stride_lc,
        stride_krb, stride_krt, stride_krr,
        stride_qpb, stride_qps, stride_kpb, stride_kpt,
        H, M, T, SPLIT_LEN, NUM_SPLITS, qk_scale_log2,
        C: tl.constexpr, R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # C and R are compile-time: with C == BLOCK_C the column masks fold away and the latent
        # rows load as 16-byte vectors (a runtime bound would force element-wise loads).
        pid_m = tl.program_id(0)  # fastest: programs sharing a latent tile run together (L2 reuse)
        pid_split = tl.program_id(1)
        pid_b = tl.program_id(2)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query row = s_idx * H + h_idx
        row_ok = rows < M
        h_idx = rows % H
        s_idx = rows // H
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c_ok = offs_c < C
        r_ok = offs_r < R

        q_lat = tl.load(
            q_lat_ptr + pid_b * stride_qlb + h_idx[:, None] * stride_qlh + s_idx[:, None] * stride_qls
            + offs_c[None, :] * stride_qlc,
            mask=row_ok[:, None] & c_ok[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_C]
        q_rope = tl.load(
            q_rope_ptr + pid_b * stride_qrb + h_idx[:, None] * stride_qrh + s_idx[:, None] * stride_qrs
            + offs_r[None, :] * stride_qrr,
            mask=row_ok[:, None] & r_ok[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_R]
        q_pos = tl.load(q_pos_ptr + pid_b * stride_qpb + s_idx * stride_qps, mask=row_ok, other=-1)

        # A finite initial max keeps fully masked tiles NaN-free: exp2(-inf - (-1e30)) == 0.
        run_max = tl.full([BLOCK_M], -1.0e30, tl.float32)
        run_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)

        t_begin = pid_split * SPLIT_LEN
        for tile in range(0, tl.cdiv(SPLIT_LEN, BLOCK_T)):  # only the last split runs past T
            offs_t = t_begin + tile * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            k_pos = tl.load(k_pos_ptr + pid_b * stride_kpb + offs_t * stride_kpt, mask=t_ok, other=-1)
            lat = tl.load(
                lat_ptr + pid_b * stride_lb + offs_t[:, None] * stride_lt + offs_c[None, :] * stride_lc,
                mask=t_ok[:, None] & c_ok[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_C]: key (with k_rope) and value at once
            k_rope = tl.load(
                k_rope_ptr + pid_b * stride_krb + offs_t[:, None] * stride_krt + offs_r[None, :] * stride_krr,
                mask=t_ok[:, None] & r_ok[None, :], other=0.0,
            )  # [BLOCK_T, BLOCK_R]
            scores = tl.dot(q_lat, tl.trans(lat), input_precision=INPUT_PRECISION)
            scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=INPUT_PRECISION)
            scores = scores * qk_scale_log2
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))

            new_max = tl.maximum(run_max, tl.max(scores, 1))
            rescale = tl.exp2(run_max - new_max)
            p = tl.exp2(scores - new_max[:, None])
            run_sum = run_sum * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=INPUT_PRECISION)
            run_max = new_max

        part = (pid_b * M + rows) * NUM_SPLITS + pid_split  # partials: [B, M, NUM_SPLITS(, C)]
        tl.store(acc_ptr + part[:, None] * C + offs_c[None, :], acc, mask=row_ok[:, None] & c_ok[None, :])
        tl.store(max_ptr + part, run_max, mask=row_ok)
        tl.store(sum_ptr + part, run_sum, mask=row_ok)

    # Measured on an H100 (docs/benchmarks.md): autotuning BLOCK_M in {16, 32, 64} as well
    # never chose 16 or 64 and made the tuner's pick noisier, so BLOCK_M follows the row count.
    _mla_decode_split_kernel_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_T": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 16}, num_warps=4, num_stages=4),
        ],
        key=["C", "R", "BLOCK_M"],  # Triton adds the tensor dtypes to the key
    )(_mla_decode_split_kernel)

    @triton.jit
    def _mla_decode_combine_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr,
        stride_ob, stride_oh, stride_os, stride_oc,
        H, M, NUM_SPLITS,
        C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        part = (pid_b * M + row) * NUM_SPLITS + offs_s
        split_max = tl.load(max_ptr + part, mask=s_ok, other=float("-inf"))
        split_sum = tl.load(sum_ptr + part, mask=s_ok, other=0.0)
        weight = tl.exp2(split_max - tl.max(split_max, 0))  # padding splits: exp2(-inf) == 0
        total = tl.sum(weight * split_sum, 0)
        acc = tl.load(acc_ptr + part[:, None] * C + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
        out = tl.where(total > 0, out, 0.0)  # no visible key at all -> zeros
        h_idx = row % H
        s_idx = row // H
        tl.store(
            out_ptr + pid_b * stride_ob + h_idx * stride_oh + s_idx * stride_os + offs_c * stride_oc,
            out.to(out_ptr.dtype.element_ty),
            mask=c_ok,
        )


_SPLIT_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@functools.lru_cache(maxsize=256)
def _num_splits(
    programs_per_split: int, block_m: int, kv_len: int, row_bytes: int, c: int, sm_count: int
) -> tuple[int, int]:
    """``(num_splits, split_len)`` minimising a small cost model of the split pass.

    Programs run in waves of one per SM (the fp32 accumulator of a 32-row block fills most of
    an SM's registers); each program streams ``split_len`` cache rows and, when the key axis is
    split, writes fp32 partials that the combine pass reads back. More splits fill the GPU
    better but add partial traffic and a wave-quantisation tail.
    """
    best: tuple[float, int, int] | None = None
    for wanted in _SPLIT_CANDIDATES:
        split_len = math.ceil(math.ceil(kv_len / wanted) / _MIN_SPLIT_LEN) * _MIN_SPLIT_LEN
        splits = math.ceil(kv_len / split_len)
        waves = math.ceil(programs_per_split * splits / sm_count)
        partial_bytes = 2 * block_m * c * 4 if splits > 1 else 0
        cost = waves * (split_len * row_bytes + partial_bytes)
        if best is None or cost < best[0]:
            best = (cost, splits, split_len)
        if split_len == _MIN_SPLIT_LEN:
            break
    assert best is not None
    return best[1], best[2]


def _launch(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Run both passes. ``num_splits`` overrides the cost model (for tuning experiments)."""
    if triton is None:
        raise RuntimeError("the 'triton' MLA decode backend needs Triton (pip install 'ascend_edit[gpu]')")
    b, h, s, c = q_latent.shape
    r, t = q_rope.shape[-1], latent.shape[1]
    out = torch.empty((b, h, s, c), dtype=q_latent.dtype, device=q_latent.device)
    if t == 0 or b == 0 or h * s == 0:
        return out.zero_()
    rows = h * s
    block_m = _block_m(rows)
    row_blocks = triton.cdiv(rows, block_m)
    sm_count = (
        torch.cuda.get_device_properties(q_latent.device).multi_processor_count
        if q_latent.device.type == "cuda"
        else 4  # Triton's CPU interpreter
    )
    row_bytes = (c + r) * latent.element_size()
    if num_splits is None:
        num_splits, split_len = _num_splits(b * row_blocks, block_m, t, row_bytes, c, sm_count)
    else:
        split_len = math.ceil(math.ceil(t / num_splits) / _MIN_SPLIT_LEN) * _MIN_SPLIT_LEN
        num_splits = math.ceil(t / split_len)
    partial_acc = torch.empty((b, rows, num_splits, c), dtype=torch.float32, device=out.device)
    partial_max = torch.empty((b, rows, num_splits), dtype=torch.float32, device=out.device)
    partial_sum = torch.empty_like(partial_max)

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # CPU interpreter cannot benchmark configs
    split_kernel = _mla_decode_split_kernel if interpreting else _mla_decode_split_kernel_tuned
    fixed = {"BLOCK_T": 32} if interpreting else {}
    split_kernel[(row_blocks, num_splits, b)](
        q_latent, q_rope, latent, k_rope, q_pos, k_pos,
        partial_acc, partial_max, partial_sum,
        *q_latent.stride(), *q_rope.stride(), *latent.stride(), *k_rope.stride(),
        *q_pos.stride(), *k_pos.stride(),
        h, rows, t, split_len, num_splits, scale * _LOG2E,
        C=c,
        R=r,
        BLOCK_M=block_m,
        BLOCK_C=triton.next_power_of_2(c),
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        INPUT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
        **fixed,
    )  # fmt: skip
    _mla_decode_combine_kernel[(rows, b)](
        partial_acc, partial_max, partial_sum, out,
        *out.stride(),
        h, rows, num_splits,
        C=c,
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_C=triton.next_power_of_2(c),
    )  # fmt: skip
    return out


@torch.library.custom_op("ascend_edit::mla_decode", mutates_args=(), device_types="cuda")
def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA attention, forward only: ``[b, h, s, c]`` (see :func:`mla_absorbed_attention`)."""
    return _launch(q_latent, q_rope, latent, k_rope, q_pos, k_pos, scale)


@mla_decode.register_fake
def _mla_decode_fake(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q_latent.new_empty(q_latent.shape)


def mla_absorbed_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Op B via the Triton decode kernel (contract in ``kernels/reference.py``). **Forward only.**

    Best for short queries (decode, ``s`` of a few tokens) over long caches; any ``s`` is
    correct. Raises ``RuntimeError`` if a gradient could be needed.
    """
    check_mla_inputs(q_latent, q_rope, latent, k_rope, q_pos=q_pos, k_pos=k_pos)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_latent, q_rope, latent, k_rope)):
        raise RuntimeError(
            "the 'triton' MLA decode kernel is forward-only (decode is inference); run it under "
            "torch.no_grad() or resolve the op with needs_grad=True to get a differentiable backend"
        )
    return mla_decode(q_latent, q_rope, latent, k_rope, q_pos, k_pos, float(scale))
