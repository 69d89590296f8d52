"""GQA decode attention (one query per row, query heads packed per KV group): a split-K Triton kernel.

**Forward only** (decode is inference; the op has no autograd formula).

    ascend_edit::gqa_decode(q [b, hk, g, d], k [b, hk, t, d], v [b, hk, t, dv], mask, scale) -> [b, hk, g, dv]

``g`` is the number of query heads sharing one KV head (4 for Qwen3-8B); ``mask`` is ``None``, or
broadcastable as ``[b, 1, 1, t]`` (one row per batch element, shared by every head), either boolean
(True = visible) or additive float (-inf = hidden; any stride on the batch and key axes, e.g. a
``[..., :slots]`` view of a 16-aligned buffer). ``q, k, v`` may have any strides (the packed query view,
caches sliced from longer ones); one whose last dim is not unit-stride is copied first. fp16 / bf16 / fp32.

Why a kernel: a decode step's attention reads the whole cache once and is memory-bound. Fused SDPA
kernels give each (batch, KV head) one program, so at batch 1 only ``hk`` = 8 programs scan the cache
and most SMs idle (26 us a layer on an H200 at 1K keys, for ~1 us of bytes). Here the key axis is cut
into ``num_splits`` chunks ("flash-decoding") so that ``b * hk * num_splits`` programs fill the GPU;
each program reads its chunk of K and V once for all ``g`` query rows of the group.

Per program (batch, KV head, split): the ``g`` query rows are padded to ``BLOCK_G = 16`` (``tl.dot``
needs 16 rows; the padding costs MMA work, not memory traffic); for each ``BLOCK_T`` tile of keys,
``scores = q . k^T`` scaled into the log2 domain plus the mask (also in log2 units), an online
softmax (fp32), and ``acc += p @ v``. Each split stores its output normalised by its own softmax sum
(fp32: with g rows the partials are a few hundred KB at most, noise next to the cache) plus its
``(max, sum)``; ``split_k.merge_splits_kernel`` (shared with the MLA decode op) merges them with
log-sum-exp weights (its partial layout ``[b, rows, splits, dv]`` and row -> output mapping fit as they
are, with the group's rows as its "heads" and the KV heads as its "query positions"). With one split the
split pass writes the output itself and there is no second launch.

**Rows whose keys are all hidden** (bool False / additive -inf everywhere, or ``t == 0``) **produce
zeros**, not NaN (SDPA's math backend gives NaN there). A finite large negative additive value (e.g.
``finfo.min``) is a bias, as in SDPA; in fp32 it overflows to -inf in the log2 domain and hides the key.

Triton is imported here and in ``split_k`` (the shared split plan and merge kernel) only; without Triton
the op and its fake impl still register, so graphs containing ``ascend_edit::gqa_decode`` trace on CPU. Under ``TRITON_INTERPRET=1``
the op also gets a CPU implementation (Triton's interpreter runs the kernels: numerics tests only).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

# Shared with the MLA decode op: the split cost model, the cached SM count and the merge kernel.
from . import split_k

try:  # Triton is an optional dependency ("gpu" extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["DEFAULT_CONFIG", "FP32_CONFIG", "GqaDecodeConfig", "MAX_GROUP", "gqa_decode", "split_plan",
           "stages_that_fit", "triton_available"]

MAX_GROUP = 16  # query heads per KV head: one tl.dot row block
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class GqaDecodeConfig:
    """Launch choices of the split pass (every choice computes the same result). ``num_splits=None``:
    the cost model picks; ``programs_per_sm`` is how many programs the cost model packs per SM."""

    block_t: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    num_splits: int | None = None

    def __post_init__(self) -> None:
        if self.block_t < 16 or self.block_t & (self.block_t - 1):
            raise ValueError(f"GqaDecodeConfig.block_t must be a power of two >= 16; got {self.block_t}")
        if self.num_warps not in (1, 2, 4, 8) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"GqaDecodeConfig: num_warps must be 1/2/4/8, num_stages and programs_per_sm >= 1; "
                             f"got {self.num_warps}, {self.num_stages}, {self.programs_per_sm}")  # fmt: skip
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"GqaDecodeConfig.num_splits must be None (cost model) or >= 1; got {self.num_splits}")

    def label(self) -> str:
        split = "auto" if self.num_splits is None else str(self.num_splits)
        return f"T{self.block_t} w{self.num_warps} s{self.num_stages} x{self.programs_per_sm} splits={split}"


# 16-bit inputs: 64-key tiles of K and V (16 KB each at d = 128) arrive as 16-byte cp.async copies; 4 warps
# cover the 16 x 64 score tile and the 16 x 128 accumulator. Compiled for sm_90 on a CPU (ptxas, bf16, d = 128,
# two stages): 90 registers, 38 KB of shared memory, no spills, so several programs fit an SM (the cost model
# counts 2). Three stages: in `benchmarks/gqa_decode_bench.py --sweep` on an H200, faster than two in 7 of its 8
# shapes (batch 1 and 8; 1K rings to 32K full layers; up to 9 % less time, 1 % more in the eighth) and the fastest
# of the swept configurations at 8K and 32K keys; docs/benchmarks.md. Three stages of bf16 K and V tiles at d = 128
# take 96 KB of shared memory: more than GPUs with ~100 KB per program allow, so `_launch` drops stages there
# (`stages_that_fit`).
DEFAULT_CONFIG = GqaDecodeConfig()
# fp32 inputs (tests, debugging): twice the bytes per tile, so half the keys per tile.
FP32_CONFIG = GqaDecodeConfig(block_t=32)


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _gqa_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr, out_ptr,
        stride_qb, stride_qh, stride_qg,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_mb, stride_mt,
        stride_ob, stride_oh, stride_og,
        G, M, T, SPLIT_LEN, NUM_SPLITS, qk_scale_log2,
        D: tl.constexpr, DV: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        MASK_KIND: tl.constexpr, DIRECT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_split = tl.program_id(0)
        # 64-bit batch / head offsets: b * hk * t * d passes 2**31 elements at large batches over long caches.
        pid_h = tl.program_id(1).to(tl.int64)
        pid_b = tl.program_id(2).to(tl.int64)

        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        # D, DV compile-time: with D == BLOCK_D the column masks fold away and rows load as 16-byte vectors.
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = tl.load(
            q_ptr + pid_b * stride_qb + pid_h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_G, BLOCK_D]; padding rows are zeros (scores 0, never stored)
        k_base = k_ptr + pid_b * stride_kb + pid_h * stride_kh
        v_base = v_ptr + pid_b * stride_vb + pid_h * stride_vh
        mask_base = mask_ptr + pid_b * stride_mb

        # A finite initial max keeps fully hidden tiles NaN-free: exp2(-inf - (-1e30)) == 0.
        run_max = tl.full([BLOCK_G], -1.0e30, tl.float32)
        run_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)

        t_begin = pid_split * SPLIT_LEN
        t_end = tl.minimum(t_begin + SPLIT_LEN, T)  # a tile may overhang the split: mask, not double-count
        for start in range(0, SPLIT_LEN, BLOCK_T):
            offs_t = t_begin + start + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_end
            k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale_log2
            if MASK_KIND == 1:  # bool: True = visible
                keep = tl.load(mask_base + offs_t * stride_mt, mask=t_ok, other=0) != 0
                visible = t_ok & keep
            elif MASK_KIND == 2:  # additive, in the log2 domain like the scores; -inf stays -inf
                bias = tl.load(mask_base + offs_t * stride_mt, mask=t_ok, other=0.0).to(tl.float32)
                scores += bias[None, :] * 1.4426950408889634
                visible = t_ok
            else:
                visible = t_ok
            scores = tl.where(visible[None, :], scores, float("-inf"))

            new_max = tl.maximum(run_max, tl.max(scores, 1))
            rescale = tl.exp2(run_max - new_max)
            p = tl.exp2(scores - new_max[:, None])
            run_sum = run_sum * rescale + tl.sum(p, 1)
            v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_dv[None, :],
                        mask=t_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_DV]
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            run_max = new_max

        # Normalised by the split's own sum (bounded like the output); nothing visible -> 0.
        acc = acc / tl.where(run_sum > 0, run_sum, 1.0)[:, None]
        if DIRECT:  # one split: this is the output
            tl.store(
                out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_g[:, None] * stride_og + offs_dv[None, :],
                acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :],
            )  # fmt: skip
        else:  # partials [b, M = hk * g, NUM_SPLITS(, DV)], the MLA combine kernel's layout
            part = (pid_b * M + pid_h * G + offs_g) * NUM_SPLITS + pid_split
            tl.store(acc_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])
            tl.store(max_ptr + part, run_max, mask=g_ok)
            tl.store(sum_ptr + part, run_sum, mask=g_ok)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    """One-line ValueErrors; shapes and dtypes only, so the fake impl runs the same checks while tracing."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gqa_decode: q, k, v must be 4-D [b, hk, g|t, d]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    b, hk, g, d = q.shape
    t = k.shape[2]
    if k.shape[:2] != (b, hk) or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"gqa_decode: shapes do not match: q {tuple(q.shape)} (b, hk, g, d), k {tuple(k.shape)} "
                         f"(b, hk, t, d), v {tuple(v.shape)} (b, hk, t, dv)")  # fmt: skip
    if g > MAX_GROUP:
        raise ValueError(f"gqa_decode: at most {MAX_GROUP} query heads per KV head (q's dim 2); got {g}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"gqa_decode: q, k, v must share one dtype of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")  # fmt: skip
    if not (q.device == k.device == v.device):
        raise ValueError(f"gqa_decode: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, b) \
                or mask.shape[3] != t:
            raise ValueError(f"gqa_decode: mask must be [1 or b, 1, 1, t] = [.., 1, 1, {t}] (one row per batch "
                             f"element, shared by the heads); got {tuple(mask.shape)}")  # fmt: skip
        if mask.dtype != torch.bool and mask.dtype not in _DTYPES:
            raise ValueError(f"gqa_decode: mask must be bool (True = visible) or additive fp16/bf16/fp32; got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"gqa_decode: mask on {mask.device}, q on {q.device}")


def split_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               config: GqaDecodeConfig | None = None) -> tuple[int, int]:
    """``(num_splits, split_len)`` of a launch (shapes only): the config's count, or the cost model's."""
    b, hk, g, d = q.shape
    t, dv = k.shape[2], v.shape[3]
    config = config or _default_config(q.dtype, q.device, d, dv)
    if config.num_splits is not None:
        split_len = split_k.split_len(t, config.num_splits)
        return math.ceil(t / split_len), split_len
    sm_count = split_k.sm_count(q.device.index) if q.device.type == "cuda" else 4  # 4: interpreter
    row_bytes = (d + dv) * k.element_size()
    # g rows of partials per program (the cost model counts them as fp32, as they are stored)
    return split_k.num_splits(b * hk, g, t, row_bytes, dv, sm_count * config.programs_per_sm)


SHARED_MEMORY_MARGIN = 8 << 10  # bytes kept free for the compiler's own scratch (layout conversions, barriers)


def stages_that_fit(config: GqaDecodeConfig, d: int, dv: int, element_size: int, limit: int | None) -> GqaDecodeConfig:
    """``config`` with at most as many pipeline stages as fit ``limit`` bytes of shared memory per program (at least
    one): each stage holds a ``block_t``-key tile of K and of V; the query block is resident once."""
    if limit is None:
        return config
    stage = config.block_t * (split_k.next_pow2(d) + split_k.next_pow2(dv)) * element_size
    fixed = MAX_GROUP * split_k.next_pow2(d) * element_size + SHARED_MEMORY_MARGIN
    stages = config.num_stages
    while stages > 1 and fixed + stages * stage > limit:
        stages -= 1
    return config if stages == config.num_stages else dataclasses.replace(config, num_stages=stages)


@functools.lru_cache(maxsize=32)
def _default_config(dtype: torch.dtype, device: torch.device, d: int, dv: int) -> GqaDecodeConfig:
    """The launch configuration when none is given: :data:`FP32_CONFIG` for fp32 inputs, else :data:`DEFAULT_CONFIG`,
    with the stages this GPU's shared memory holds. Cached: every decode step of every layer asks."""
    config = FP32_CONFIG if dtype == torch.float32 else DEFAULT_CONFIG
    if device.type != "cuda":
        return config
    return stages_that_fit(config, d, dv, dtype.itemsize, split_k.max_shared_memory(device.index))


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    config: GqaDecodeConfig | None = None,
) -> torch.Tensor:
    """Both passes with ``config`` (default :data:`DEFAULT_CONFIG`, :data:`FP32_CONFIG` for fp32 inputs)."""
    if triton is None:
        raise RuntimeError("the gqa_decode kernel needs Triton (pip install 'ascend_edit[gpu]')")
    _check_inputs(q, k, v, mask)
    # The kernel addresses the last dim with unit stride (16-byte vector loads); anything else is copied.
    # Decode's tensors (the packed query view, the caches) already are; this only guards other callers.
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous() for x in (q, k, v))
    b, hk, g, d = q.shape
    t, dv = k.shape[2], v.shape[3]
    config = config or _default_config(q.dtype, q.device, d, dv)
    out = torch.empty((b, hk, g, dv), dtype=q.dtype, device=q.device)
    if t == 0 or b * hk * g * dv == 0:
        return out.zero_()  # no key at all: every row is all-hidden
    num_splits, split_len = split_plan(q, k, v, config)
    direct = num_splits == 1
    shape = (b, hk * g, num_splits)
    # One split writes the output itself; unused partial arguments get `out` (never read or written).
    partial_acc = out if direct else torch.empty((*shape, dv), dtype=torch.float32, device=q.device)
    partial_max = out if direct else torch.empty(shape, dtype=torch.float32, device=q.device)
    partial_sum = out if direct else torch.empty(shape, dtype=torch.float32, device=q.device)
    if mask is None:
        mask_kind, mask_arg, stride_mb, stride_mt = _MASK_NONE, q, 0, 0  # q: a valid pointer, never read
    else:
        mask_kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADDITIVE
        mask_arg, stride_mb, stride_mt = mask, (mask.stride(0) if mask.shape[0] > 1 else 0), mask.stride(3)
    _gqa_decode_split_kernel[(num_splits, hk, b)](
        q, k, v, mask_arg, partial_acc, partial_max, partial_sum, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_mb, stride_mt,
        out.stride(0), out.stride(1), out.stride(2),
        g, hk * g, t, split_len, num_splits, scale * _LOG2E,
        D=d, DV=dv, BLOCK_G=MAX_GROUP, BLOCK_T=config.block_t,
        BLOCK_D=max(16, split_k.next_pow2(d)), BLOCK_DV=max(16, split_k.next_pow2(dv)),
        MASK_KIND=mask_kind, DIRECT=direct, INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        # The shared merge: its "heads" H are the group's g rows (stride of out's dim 2), its "query positions"
        # the KV heads (stride of out's dim 1); row m = kv_head * g + group_row, as the split pass stores.
        split_k.merge_splits_kernel[(hk * g, b)](
            partial_acc, partial_max, partial_sum, out,
            out.stride(0), out.stride(2), out.stride(1), out.stride(3),
            g, hk * g, num_splits,
            C=dv, BLOCK_S=split_k.next_pow2(num_splits), BLOCK_C=split_k.next_pow2(dv),
        )  # fmt: skip
    return out


@torch.library.custom_op("ascend_edit::gqa_decode", mutates_args=(), device_types="cuda")
def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """Decode attention of ``q [b, hk, g, d]`` over ``k, v [b, hk, t, d|dv]``: ``[b, hk, g, dv]``, forward only."""
    return _launch(q, k, v, mask, scale)


@gqa_decode.register_fake
def _gqa_decode_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    _check_inputs(q, k, v, mask)
    return q.new_empty((*q.shape[:3], v.shape[3]))


if _INTERPRET and triton is not None:  # numerics tests on CPU: Triton's interpreter runs the kernels
    gqa_decode.register_kernel("cpu")(lambda q, k, v, mask, scale: _launch(q, k, v, mask, scale))
