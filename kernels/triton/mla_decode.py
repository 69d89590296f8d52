"""Op B (absorbed MLA attention) for decode: split-K ("flash-decoding") Triton kernels.

**Forward only.** Decode is inference; there is no backward, and calling the op on inputs that
require grad while grad mode is on raises. The registry picks this backend only when no
gradient is needed; training uses the eager reference (or the naive, non-absorbed MLA path).

Why a kernel: the absorbed form reads the whole latent cache (``[b, t, c + r]``) once per step
and is memory-bound. The eager reference materialises fp32 scores and probabilities for every
head and reads the cache several times; these kernels read each latent tile once for a block of
query rows (all heads of a batch share the latent) and keep scores on chip.

Algorithm (per batch element): query rows ``m = s_idx * h + h_idx`` (all heads and the few query
positions) are tiled; the key axis ``t`` is cut into ``num_splits`` chunks so that short queries
over long contexts still fill the GPU. Each program loops over its chunk in ``BLOCK_T`` tiles:
``scores = q_latent . latent + q_rope . k_rope`` (scaled into the log2 domain), masked by
positions (``0 <= k_pos <= q_pos``), an online softmax, and ``acc += p @ latent`` -- the same
tile serves as key and value. Each chunk stores its output normalised by its own softmax sum (in
the input dtype for 16-bit inputs, so the partials cost half the traffic of fp32), plus its
``(max, sum)``; a combine kernel merges the chunks with the usual log-sum-exp weights. Rows with
no visible key produce zeros.

Two formulations of the split pass (:class:`DecodeConfig`, ``kernel=``):

* ``"rows"``: query rows on the matmul's M side, ``[BLOCK_M, c] @ [c, BLOCK_T]``. With 32 heads
  M is 32, below the 64 rows a Hopper warpgroup MMA (wgmma) needs, so it runs on the older
  ``mma.sync`` path and reloads the whole query block from shared memory for every tile.
* ``"keys"`` (swap-AB): cache rows on the M side, ``scores^T = latent [BLOCK_T, c] @ q^T [c, BLOCK_H]``
  and ``acc^T [c, BLOCK_H] += latent^T @ p^T``. M is ``BLOCK_T`` and ``c`` = 512, so with
  ``BLOCK_T = 64`` both matmuls use wgmma with both operands in shared memory whatever the head
  count; the heads are the N side (16..128). ``V_SPLIT = 2`` gives each of two programs half of
  ``c`` to accumulate (both still read the whole tile for the scores, the second read mostly
  from L2 as the pair is launched side by side): half the accumulator registers, the same
  shared memory.

Options of both formulations (flags of the same kernels, so the numerics tests cover them):

* ``tma``: latent and k_rope tiles arrive through TMA tensor descriptors (host-side
  ``TensorDescriptor``; sm_90+, 16-byte aligned base and strides, else pointer loads are used):
  one bulk copy per tile instead of per-thread ``cp.async`` address arithmetic, and Triton's
  pipeliner waits on mbarriers. Tiles are not masked at the split's end: rows of the next split
  arrive as cache data and ``k_pos = -1`` gives them ``p = 0``, as for empty slots (the cache must
  hold finite values there, as it must for empty slots already); rows past ``t`` arrive as zeros.
* ``fuse_combine``: no combine launch. After storing its partial, each split program bumps an
  arrival counter for its (batch, row block) with an acq_rel atomic (after a CTA barrier, so all
  its threads' stores are published); the program that arrives last merges the partials (``.cg``
  loads, from L2) and writes the output. The counters are zeroed per call (a memset).
* ``maxnreg``: a register cap for ptxas, so two 8-warp programs can share an SM.

A third formulation, ``"gluon"`` (``mla_decode_gluon.py``, sm_90 only), is the production default since
2026-12-04: a TMA loader warp feeds one wgmma warpgroup in swap-AB form, 78-79 % of the copy bandwidth at the
shape below (0.0905-0.0913 ms). Calls it cannot take run ``ROWS_CONFIG``. What follows is the history of the
Triton split pass that led to it.

Status (H200, bf16, B=32, H=32, context 8192, c=512, r=64; ``docs/benchmarks.md``): the
``rows`` configuration (``ROWS_CONFIG``) takes 0.1084-0.1087 ms of GPU time, 65-67 % of the device copy bandwidth (the goal is
70 %). Nsight Compute on the split pass: 0.104 ms at 2.97 TB/s DRAM, 255 registers per thread and 115 KB of
shared memory per program (two programs, 8 warps, per SM: 12.5 % occupancy), the issue slots 20 % busy and
no warp eligible 78 % of cycles -- latency-bound, a third of the stall on shared-memory operands. Read from
its sm_90 code (ptxas on a CPU): one shared-memory tile buffer per program at two stages (two
programs per SM give the only overlap), 76 ``cp.async`` per thread per tile, and an mma.sync layout
with the four warps side by side on the key axis, so every warp re-reads the whole 32 KB query block
from shared memory for every tile. ``tma``, ``fuse_combine`` and ``maxnreg`` were added against
those costs; ``benchmarks/mla_decode_sweep.py --set pipeline --isolate`` times them. ``benchmarks/mla_decode_sweep.py`` times every
candidate configuration in one run and prints the fastest; :data:`DEFAULT_CONFIG` is the
production choice. What the compiler makes of each candidate for sm_90 (checked with ptxas on a
CPU machine, not timed): ``rows`` with ``block_m=64, pad_rows=True`` and 32-row tiles uses wgmma
for both matmuls with three stages in 185 KB; ``keys`` with 64-row tiles uses wgmma for both but
only two stages fit (Triton then fetches the next tile after computing this one, so there is no
load/compute overlap inside a program); ``keys`` with 32-row tiles runs the scores on mma.sync
and ``p @ latent`` on wgmma with up to four stages.

Triton is imported here and in ``split_k``; this module is imported lazily by the registry. On a
machine without Triton the custom op and its fake impl still register, so graphs that contain
``ascend_edit::mla_decode`` can be traced on CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..contract import mla_contract
from . import mla_decode_gluon, split_k

try:  # Triton is an optional dependency ("gpu" extra)
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    TensorDescriptor = None

__all__ = ["DEFAULT_CONFIG", "ROWS_CONFIG", "DecodeConfig", "mla_absorbed_attention", "mla_decode", "set_default_config",
           "triton_available", "tuned_config"]

_LOG2E = 1.4426950408889634
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch choices of the split pass; every choice computes the same result.

    ``block_m`` is the number of query rows per program (rows: the M side, 16..64; keys: the N
    side, 16..128); it shrinks to fit small head counts unless ``pad_rows``. ``num_splits=None`` lets the cost model
    in :func:`split_k.num_splits` choose; an explicit count is used as given (capped by the context).
    """

    kernel: str = "rows"  # "rows" | "keys" | "gluon" (sm_90 only: mla_decode_gluon.py)
    block_t: int = 64
    block_m: int = 32
    v_split: int = 1  # keys only: programs sharing one row block, each accumulating c / v_split
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None
    prefetch: bool = False  # keys only: fetch the next tile into registers (use num_stages=1)
    pad_rows: bool = False  # keep block_m even above the row count (rows: 64 rows reach wgmma)
    # Programs resident per SM (shared memory / registers allow it): the split cost model fills
    # sm_count x this many slots per wave. 2 for configurations under half an SM's shared memory.
    programs_per_sm: int = 1
    # Load the latent and k_rope tiles through TMA tensor descriptors (asynchronous bulk
    # copies into shared memory, pipelined with mbarriers instead of per-thread cp.async address
    # arithmetic). Falls back to pointer loads where the cache's strides or base are not 16-byte
    # aligned (a TMA requirement).
    tma: bool = False
    # The last split program of each (batch, row block) to finish merges the partials
    # (an atomic counter orders them), so there is no second kernel launch.
    fuse_combine: bool = False
    # Register cap per thread passed to ptxas (None: up to 255). 128 lets two 8-warp programs share
    # an SM's 64K registers (they otherwise take 255 and run one per SM), at the risk of spills.
    maxnreg: int | None = None
    # rows only: rescale the accumulator only when a row's running max grows by more than 2^8 (a stale max
    # is exact after normalisation), instead of on every tile.
    lazy_rescale: bool = False
    # rows only: launch the combine as a programmatic dependent launch (sm_90+): it is queued while the
    # split pass runs and waits on griddepcontrol for its partials, instead of launching after it.
    pdl: bool = False
    # warps per program of the combine kernel (one program per query row and batch element)
    merge_warps: int = 4
    # rows only: pipeline every load of the key loop (k_pos too), not only the matmul operands
    # (tl.range(num_stages=num_stages)); and stream the cache past L2 (evict_first) so that the partials
    # and queries stay there.
    pipeline_all: bool = False
    evict_first: bool = False

    def __post_init__(self) -> None:
        if self.kernel not in ("rows", "keys", "gluon"):
            raise ValueError(f"DecodeConfig.kernel must be 'rows', 'keys' or 'gluon'; got {self.kernel!r}")
        if self.kernel == "gluon" and (self.block_t != 64 or self.num_warps != 4 or self.tma or self.fuse_combine
                                       or self.maxnreg is not None or self.num_stages > 2):
            raise ValueError("DecodeConfig(kernel='gluon') is one warpgroup over 64-row TMA tiles: block_t=64, "
                             "num_warps=4, num_stages <= 2 (the ring's slots), no tma/fuse_combine/maxnreg flags")
        if self.kernel == "rows" and self.prefetch:
            raise ValueError("DecodeConfig.prefetch applies to kernel='keys' only")
        if self.kernel != "rows" and (self.lazy_rescale or self.pdl or self.pipeline_all or self.evict_first):
            raise ValueError("DecodeConfig.lazy_rescale, pdl, pipeline_all and evict_first apply to kernel='rows' only")
        if self.pdl and self.fuse_combine:
            raise ValueError("DecodeConfig.pdl launches the combine kernel, which fuse_combine removes")
        if self.prefetch and (self.tma or self.fuse_combine):
            raise ValueError("DecodeConfig.prefetch cannot be combined with tma or fuse_combine")
        if self.v_split not in (1, 2) or (self.kernel == "rows" and self.v_split != 1):
            raise ValueError(f"DecodeConfig.v_split must be 1 (rows) or 1/2 (keys); got {self.v_split}")
        for name in ("block_t", "block_m"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two >= 16; got {value}")
        if self.merge_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.merge_warps must be 1..16, a power of two; got {self.merge_warps}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig: num_warps must be 1..16, a power of two, and num_stages >= 1; "
                             f"got {self.num_warps}, {self.num_stages}")  # fmt: skip
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"DecodeConfig.maxnreg must be None or 24..255; got {self.maxnreg}")
        if self.programs_per_sm < 1:
            raise ValueError(f"DecodeConfig.programs_per_sm must be >= 1; got {self.programs_per_sm}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits must be None (cost model) or >= 1; got {self.num_splits}")

    def label(self) -> str:
        split = "auto" if self.num_splits is None else str(self.num_splits)
        vs = (f" v{self.v_split}" + (" prefetch" if self.prefetch else "")) if self.kernel == "keys" else ""
        vs += " pad" if self.pad_rows else ""
        vs += " tma" if self.tma else ""
        vs += " fused" if self.fuse_combine else ""
        vs += f" r{self.maxnreg}" if self.maxnreg else ""
        vs += " lazy" if self.lazy_rescale else ""
        vs += " pdl" if self.pdl else ""
        vs += f" merge-w{self.merge_warps}" if self.merge_warps != 4 else ""
        vs += " pipe-all" if self.pipeline_all else ""
        vs += " evict-first" if self.evict_first else ""
        return (f"{self.kernel} M{self.block_m} T{self.block_t}{vs} w{self.num_warps} s{self.num_stages} "
                f"splits={split}")  # fmt: skip


# The Triton split pass chosen on an H200 (B=32 H=32 ctx 8192 c=512 r=64 bf16): 4 warps and 2 stages use 115 KB of
# shared memory, so two programs share an SM; with 8 splits (what the cost model picks for two per SM) the split
# pass took 0.1147 ms = 62 % of the copy bandwidth (2026-12-02), against 0.1295 ms for the former autotuner's choice
# (8 warps, 3 stages, one per SM). The combine at 2 warps per program instead of 4 took the call from 0.1129-0.1136
# to 0.1084-0.1087 ms in two runs (2026-12-03; ncu: the split pass alone is 0.104 ms). It runs wherever the Gluon
# split pass does not apply (not sm_90, other row counts or dims, fp32).
ROWS_CONFIG = DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, programs_per_sm=2,
                           merge_warps=2)
# The production choice: ONE line to change after a sweep (benchmarks/mla_decode_sweep.py prints the constructor
# call of the fastest variant on its "BEST:" line). The Gluon split pass (mla_decode_gluon.py: TMA loader warp, one
# wgmma warpgroup, swap-AB; 192 KB, one program per SM) took 0.0905-0.0913 ms at the shape above, 78-79 % of the
# copy bandwidth, against 0.1092 ms for ROWS_CONFIG in the same run (H200, 2026-12-04). Calls it cannot take fall
# back to ROWS_CONFIG (logged once per reason). A fixed configuration keeps autotuning's noise out of decode.
DEFAULT_CONFIG = DecodeConfig(kernel="gluon", block_t=64, block_m=32, num_warps=4, num_stages=2, merge_warps=2)
# fp32 inputs (tests, debugging) take twice the shared memory per tile: the bf16 choices above can
# exceed the 227 KB an sm_90 program may use. This one needs 113 KB and spills nothing (ptxas).
FP32_CONFIG = DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=8, num_stages=2)


def triton_available() -> bool:
    return triton is not None


def _block_m(config: DecodeConfig, rows: int) -> int:
    """Query rows per program: tl.dot needs >= 16 on each side; no more than the rows there are
    unless the config pads (idle rows cost MMA work, not memory traffic)."""
    if config.pad_rows:
        return config.block_m
    return max(16, min(config.block_m, split_k.next_pow2(rows)))


def tuned_config(c: int, r: int, rows: int, config: DecodeConfig | None = None) -> str:
    """The configuration the decode op launches for bf16 inputs and ``rows`` = heads x query length on the
    current CUDA device (for benchmark reports): the Gluon one where it applies, else the Triton fallback."""
    config = config or (_PROCESS_CONFIG or [DEFAULT_CONFIG])[0]
    if config.kernel == "gluon":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if mla_decode_gluon.device_reason(device) or mla_decode_gluon.shape_reason(rows, c, r, torch.bfloat16):
            config = dataclasses.replace(ROWS_CONFIG, num_splits=config.num_splits)
    return dataclasses.replace(config, block_m=_block_m(config, rows)).label()


if triton is not None:

    @triton.jit
    def _mla_decode_rows_kernel(
        q_lat_ptr, q_rope_ptr, lat_ptr, k_rope_ptr, q_pos_ptr, k_pos_ptr,
        acc_ptr, max_ptr, sum_ptr,
        stride_qlb, stride_qlh, stride_qls, stride_qlc,
        stride_qrb, stride_qrh, stride_qrs, stride_qrr,
        stride_lb, stride_lt, stride_lc,
        stride_krb, stride_krt, stride_krr,
        stride_qpb, stride_qps, stride_kpb, stride_kpt,
        H, M, T, SPLIT_LEN, NUM_SPLITS, qk_scale_log2,
        lat_desc, k_rope_desc,  # TMA descriptors of latent / k_rope ([b, t, c] / [b, t, r]) or None
        counter_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_oc,  # FUSE_COMBINE only
        C: tl.constexpr, R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, FUSE_COMBINE: tl.constexpr,
        LAZY_RESCALE: tl.constexpr = False, RESCALE_LOG2: tl.constexpr = 8.0, LAUNCH_DEPENDENTS: tl.constexpr = False,
        LOOP_STAGES: tl.constexpr = None, EVICTION: tl.constexpr = "",
    ):  # fmt: skip
        # C and R are compile-time: with C == BLOCK_C the column masks fold away and the latent
        # rows load as 16-byte vectors (a runtime bound would force element-wise loads).
        if LAUNCH_DEPENDENTS:  # the combine (a programmatic dependent launch) may be scheduled now
            tl.extra.cuda.gdc_launch_dependents()
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
        t_end = tl.minimum(t_begin + SPLIT_LEN, T)  # a tile may overhang the split: mask, not double-count
        for start in tl.range(0, SPLIT_LEN, BLOCK_T, num_stages=LOOP_STAGES):
            offs_t = t_begin + start + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_end
            k_pos = tl.load(k_pos_ptr + pid_b * stride_kpb + offs_t * stride_kpt, mask=t_ok, other=-1)
            if USE_TMA:
                # Whole-tile bulk copies; rows past T (and columns past C, R) arrive as zeros. Rows
                # of the next split (t_end <= t < T) arrive as cache data: k_pos = -1 there gives
                # them p = 0, as for empty slots inside a split.
                lat = lat_desc.load([pid_b, t_begin + start, 0]).reshape(BLOCK_T, BLOCK_C)
                k_rope = k_rope_desc.load([pid_b, t_begin + start, 0]).reshape(BLOCK_T, BLOCK_R)
            else:
                lat = tl.load(
                    lat_ptr + pid_b * stride_lb + offs_t[:, None] * stride_lt + offs_c[None, :] * stride_lc,
                    mask=t_ok[:, None] & c_ok[None, :], other=0.0, eviction_policy=EVICTION,
                )  # [BLOCK_T, BLOCK_C]: key (with k_rope) and value at once
                k_rope = tl.load(
                    k_rope_ptr + pid_b * stride_krb + offs_t[:, None] * stride_krt + offs_r[None, :] * stride_krr,
                    mask=t_ok[:, None] & r_ok[None, :], other=0.0, eviction_policy=EVICTION,
                )  # [BLOCK_T, BLOCK_R]
            scores = tl.dot(q_lat, tl.trans(lat), input_precision=INPUT_PRECISION)
            scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=INPUT_PRECISION)
            scores = scores * qk_scale_log2
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))

            tile_max = tl.max(scores, 1)
            if LAZY_RESCALE:
                # Keep a stale running max until some row's max grows past it by RESCALE_LOG2 (p stays below
                # 2^RESCALE_LOG2: fine in fp32 and bf16), so the [BLOCK_M, C] accumulator is rescaled on the
                # few tiles that raise it, not on every tile. The result is the same: sums and the stored
                # max use the same reference.
                if tl.max(tile_max - run_max, 0) > RESCALE_LOG2:
                    new_max = tl.maximum(run_max, tile_max)
                    rescale = tl.exp2(run_max - new_max)
                    acc = acc * rescale[:, None]
                    run_sum = run_sum * rescale
                    run_max = new_max
                p = tl.exp2(scores - run_max[:, None])
                run_sum += tl.sum(p, 1)
                acc = tl.dot(p.to(lat.dtype), lat, acc, input_precision=INPUT_PRECISION)
            else:
                new_max = tl.maximum(run_max, tile_max)
                rescale = tl.exp2(run_max - new_max)
                p = tl.exp2(scores - new_max[:, None])
                run_sum = run_sum * rescale + tl.sum(p, 1)
                acc = acc * rescale[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=INPUT_PRECISION)
                run_max = new_max

        part = (pid_b * M + rows) * NUM_SPLITS + pid_split  # partials: [B, M, NUM_SPLITS(, C)]
        # Partials are stored normalised (acc / sum, bounded like the output) in the partial buffer's
        # dtype: 16-bit for 16-bit inputs halves that traffic. Rows with nothing visible store 0.
        acc = acc / tl.where(run_sum > 0, run_sum, 1.0)[:, None]
        tl.store(
            acc_ptr + part[:, None] * C + offs_c[None, :], acc.to(acc_ptr.dtype.element_ty),
            mask=row_ok[:, None] & c_ok[None, :],
        )  # fmt: skip
        tl.store(max_ptr + part, run_max, mask=row_ok)
        tl.store(sum_ptr + part, run_sum, mask=row_ok)
        if FUSE_COMBINE:
            # Every thread's partial stores are issued before the barrier; the counter's acq_rel
            # atomic then publishes them (release) to the program that sees the last count and
            # orders its reads after them (acquire).
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + pid_b * tl.num_programs(0) + pid_m, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS - 1:
                _mla_merge_splits(
                    acc_ptr, max_ptr, sum_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_oc,
                    pid_b, rows, row_ok, h_idx, s_idx, offs_c, c_ok, M, NUM_SPLITS, C, BLOCK_M, BLOCK_C,
                )  # fmt: skip

    @triton.jit
    def _mla_merge_splits(
        acc_ptr, max_ptr, sum_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_oc,
        pid_b, rows, row_ok, h_idx, s_idx, offs_c, c_ok, M, NUM_SPLITS,
        C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """The combine for one block of rows, inside the split pass: an online log-sum-exp merge over
        the splits' normalised partials. ``.cg`` loads read L2, where the other programs' stores are."""
        part0 = (pid_b * M + rows) * NUM_SPLITS
        mask_rc = row_ok[:, None] & c_ok[None, :]
        g_max = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, as in the split pass
        total = tl.zeros([BLOCK_M], tl.float32)
        out = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for split in range(0, NUM_SPLITS):
            part = part0 + split
            split_max = tl.load(max_ptr + part, mask=row_ok, other=-1.0e30, cache_modifier=".cg")
            split_sum = tl.load(sum_ptr + part, mask=row_ok, other=0.0, cache_modifier=".cg")
            acc = tl.load(acc_ptr + part[:, None] * C + offs_c[None, :], mask=mask_rc, other=0.0, cache_modifier=".cg")
            new_max = tl.maximum(g_max, split_max)
            rescale = tl.exp2(g_max - new_max)
            weight = tl.exp2(split_max - new_max) * split_sum  # the split's share of the softmax mass
            out = out * rescale[:, None] + acc.to(tl.float32) * weight[:, None]
            total = total * rescale + weight
            g_max = new_max
        out = out / tl.where(total > 0, total, 1.0)[:, None]  # no visible key at all -> zeros
        tl.store(
            out_ptr + pid_b * stride_ob + h_idx[:, None] * stride_oh + s_idx[:, None] * stride_os
            + offs_c[None, :] * stride_oc,
            out.to(out_ptr.dtype.element_ty), mask=mask_rc,
        )  # fmt: skip

    @triton.jit
    def _mla_keys_tile(
        lat_base, k_rope_base, k_pos_base, t0, t_end, offs_own, offs_other, own_ok, other_ok, offs_r, r_ok,
        stride_lt, stride_lc, stride_krt, stride_krr, stride_kpt,
        BLOCK_T: tl.constexpr, EVEN_C: tl.constexpr, V_SPLIT: tl.constexpr,
    ):  # fmt: skip
        """One cache tile from row ``t0``: positions (-1 past ``t_end``), the own latent columns,
        the other half's columns (V_SPLIT == 2; else the own tile again, unused) and k_rope."""
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        k_pos = tl.load(k_pos_base + offs_t * stride_kpt, mask=t_ok, other=-1)
        if EVEN_C:
            own_mask = t_ok[:, None]
            other_mask = t_ok[:, None]
        else:
            own_mask = t_ok[:, None] & own_ok[None, :]
            other_mask = t_ok[:, None] & other_ok[None, :]
        rows_base = lat_base + offs_t[:, None] * stride_lt
        lat = tl.load(rows_base + offs_own[None, :] * stride_lc, mask=own_mask, other=0.0)  # key and value
        lat_other = lat
        if V_SPLIT == 2:
            lat_other = tl.load(rows_base + offs_other[None, :] * stride_lc, mask=other_mask, other=0.0)  # key only
        k_rope = tl.load(
            k_rope_base + offs_t[:, None] * stride_krt + offs_r[None, :] * stride_krr,
            mask=t_ok[:, None] & r_ok[None, :], other=0.0,
        )  # [BLOCK_T, BLOCK_R]
        return k_pos, lat, lat_other, k_rope

    @triton.jit
    def _mla_decode_keys_kernel(
        q_lat_ptr, q_rope_ptr, lat_ptr, k_rope_ptr, q_pos_ptr, k_pos_ptr,
        acc_ptr, max_ptr, sum_ptr,
        stride_qlb, stride_qlh, stride_qls, stride_qlc,
        stride_qrb, stride_qrh, stride_qrs, stride_qrr,
        stride_lb, stride_lt, stride_lc,
        stride_krb, stride_krt, stride_krr,
        stride_qpb, stride_qps, stride_kpb, stride_kpt,
        H, M, T, SPLIT_LEN, NUM_SPLITS, qk_scale_log2,
        lat_desc, k_rope_desc,  # TMA descriptors (blocks [1, BLOCK_T, BLOCK_CV] / [1, BLOCK_T, BLOCK_R]) or None
        counter_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_oc,  # FUSE_COMBINE only
        C: tl.constexpr, R: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_R: tl.constexpr,
        V_SPLIT: tl.constexpr, PREFETCH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        USE_TMA: tl.constexpr, FUSE_COMBINE: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # Transposed ("swap-AB") tiles: cache rows are the M side of both matmuls, so M >= 64
        # whatever the head count and Hopper's wgmma applies; queries are the N side.
        pid_0 = tl.program_id(0)  # fastest: the programs that read the same latent tile run together
        pid_m = pid_0 // V_SPLIT
        pid_v = pid_0 % V_SPLIT
        pid_split = tl.program_id(1)
        pid_b = tl.program_id(2)
        EVEN_C: tl.constexpr = BLOCK_CV * V_SPLIT == C  # no column masks: 16-byte vector loads

        rows = pid_m * BLOCK_H + tl.arange(0, BLOCK_H)  # query row = s_idx * H + h_idx
        row_ok = rows < M
        h_idx = rows % H
        s_idx = rows // H
        # Columns this program accumulates ("own"); with V_SPLIT == 2 the other half of the
        # latent still enters the scores.
        offs_own = pid_v * BLOCK_CV + tl.arange(0, BLOCK_CV)
        offs_other = (1 - pid_v) * BLOCK_CV + tl.arange(0, BLOCK_CV)
        own_ok = offs_own < C
        other_ok = offs_other < C
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R

        q_base = q_lat_ptr + pid_b * stride_qlb + h_idx[None, :] * stride_qlh + s_idx[None, :] * stride_qls
        q_own = tl.load(q_base + offs_own[:, None] * stride_qlc, mask=own_ok[:, None] & row_ok[None, :], other=0.0)
        q_other = q_own  # unused unless V_SPLIT == 2
        if V_SPLIT == 2:
            q_other = tl.load(
                q_base + offs_other[:, None] * stride_qlc, mask=other_ok[:, None] & row_ok[None, :], other=0.0
            )  # [BLOCK_CV, BLOCK_H]
        q_rope = tl.load(
            q_rope_ptr + pid_b * stride_qrb + h_idx[None, :] * stride_qrh + s_idx[None, :] * stride_qrs
            + offs_r[:, None] * stride_qrr,
            mask=r_ok[:, None] & row_ok[None, :], other=0.0,
        )  # [BLOCK_R, BLOCK_H]
        q_pos = tl.load(q_pos_ptr + pid_b * stride_qpb + s_idx * stride_qps, mask=row_ok, other=-1)

        run_max = tl.full([BLOCK_H], -1.0e30, tl.float32)  # finite: fully masked tiles stay NaN-free
        run_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_CV, BLOCK_H], tl.float32)  # out^T for the own columns

        lat_base = lat_ptr + pid_b * stride_lb
        k_rope_base = k_rope_ptr + pid_b * stride_krb
        k_pos_base = k_pos_ptr + pid_b * stride_kpb
        t_begin = pid_split * SPLIT_LEN
        t_end = tl.minimum(t_begin + SPLIT_LEN, T)
        if PREFETCH:  # the first tile; each iteration then fetches the next before computing
            k_pos_nx, lat_nx, other_nx, k_rope_nx = _mla_keys_tile(
                lat_base, k_rope_base, k_pos_base, t_begin, t_end, offs_own, offs_other, own_ok, other_ok,
                offs_r, r_ok, stride_lt, stride_lc, stride_krt, stride_krr, stride_kpt,
                BLOCK_T, EVEN_C, V_SPLIT,
            )  # fmt: skip
        for start in range(0, SPLIT_LEN, BLOCK_T):  # tiles past t_end are fully masked
            if PREFETCH:
                k_pos, lat, lat_other, k_rope = k_pos_nx, lat_nx, other_nx, k_rope_nx
            elif USE_TMA:  # bulk copies; past T zeros, past t_end cache rows that k_pos = -1 masks
                t0 = t_begin + start
                offs_t = t0 + tl.arange(0, BLOCK_T)
                k_pos = tl.load(k_pos_base + offs_t * stride_kpt, mask=offs_t < t_end, other=-1)
                lat = lat_desc.load([pid_b, t0, pid_v * BLOCK_CV]).reshape(BLOCK_T, BLOCK_CV)
                lat_other = lat
                if V_SPLIT == 2:
                    lat_other = lat_desc.load([pid_b, t0, (1 - pid_v) * BLOCK_CV]).reshape(BLOCK_T, BLOCK_CV)
                k_rope = k_rope_desc.load([pid_b, t0, 0]).reshape(BLOCK_T, BLOCK_R)
            else:
                k_pos, lat, lat_other, k_rope = _mla_keys_tile(
                    lat_base, k_rope_base, k_pos_base, t_begin + start, t_end, offs_own, offs_other, own_ok,
                    other_ok, offs_r, r_ok, stride_lt, stride_lc, stride_krt, stride_krr, stride_kpt,
                    BLOCK_T, EVEN_C, V_SPLIT,
                )  # fmt: skip
            scores = tl.dot(lat, q_own, input_precision=INPUT_PRECISION)  # [BLOCK_T, BLOCK_H]
            scores += tl.dot(k_rope, q_rope, input_precision=INPUT_PRECISION)
            if V_SPLIT == 2:
                scores += tl.dot(lat_other, q_other, input_precision=INPUT_PRECISION)
            if PREFETCH:
                # Register double buffering: the next tile's loads are issued once this tile sits in
                # shared memory for the matmuls, and waited for only in the next iteration, so they
                # stream while this tile is computed. Triton's own pipelining needs one shared-memory
                # buffer per stage, and three 64-row tiles (plus q) do not fit in 227 KB.
                k_pos_nx, lat_nx, other_nx, k_rope_nx = _mla_keys_tile(
                    lat_base, k_rope_base, k_pos_base, t_begin + start + BLOCK_T, t_end, offs_own, offs_other,
                    own_ok, other_ok, offs_r, r_ok, stride_lt, stride_lc, stride_krt, stride_krr, stride_kpt,
                    BLOCK_T, EVEN_C, V_SPLIT,
                )  # fmt: skip
            scores = scores * qk_scale_log2
            visible = (k_pos[:, None] >= 0) & (k_pos[:, None] <= q_pos[None, :])
            scores = tl.where(visible, scores, float("-inf"))

            new_max = tl.maximum(run_max, tl.max(scores, 0))
            rescale = tl.exp2(run_max - new_max)
            p = tl.exp2(scores - new_max[None, :])
            run_sum = run_sum * rescale + tl.sum(p, 0)
            acc = acc * rescale[None, :] + tl.dot(tl.trans(lat), p.to(lat.dtype), input_precision=INPUT_PRECISION)
            run_max = new_max

        part = (pid_b * M + rows) * NUM_SPLITS + pid_split  # partials: [B, M, NUM_SPLITS(, C)]
        acc = acc / tl.where(run_sum > 0, run_sum, 1.0)[None, :]  # normalised partials, as in the rows kernel
        tl.store(
            acc_ptr + part[None, :] * C + offs_own[:, None], acc.to(acc_ptr.dtype.element_ty),
            mask=own_ok[:, None] & row_ok[None, :],
        )  # fmt: skip
        stats_ok = row_ok & (pid_v == 0)  # every column half computes the same statistics
        tl.store(max_ptr + part, run_max, mask=stats_ok)
        tl.store(sum_ptr + part, run_sum, mask=stats_ok)
        if FUSE_COMBINE:  # as in the rows kernel; both column halves of every split must have arrived
            tl.debug_barrier()
            counter = counter_ptr + pid_b * (tl.num_programs(0) // V_SPLIT) + pid_m
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS * V_SPLIT - 1:
                offs_c = tl.arange(0, BLOCK_C)
                _mla_merge_splits(
                    acc_ptr, max_ptr, sum_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_oc,
                    pid_b, rows, row_ok, h_idx, s_idx, offs_c, offs_c < C, M, NUM_SPLITS, C, BLOCK_H, BLOCK_C,
                )  # fmt: skip


def _tma_ok(x: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte aligned strides except a unit innermost one."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])
            and x.dim() == 3)  # fmt: skip


_FALLBACKS_LOGGED: set[str] = set()
_PROCESS_CONFIG: list[DecodeConfig] = []  # set_default_config's choice, if any


def set_default_config(config: DecodeConfig | None) -> None:
    """The configuration 16-bit calls launch in this process (None: :data:`DEFAULT_CONFIG` again). For A/B runs
    of whole models (``bench_decode --mla-decode-kernel rows``); the registry's own choice stays DEFAULT_CONFIG."""
    _PROCESS_CONFIG[:] = [config] if config is not None else []


def _log_fallback(reason: str) -> None:
    """Say once per reason why a 'gluon' configuration ran the Triton split pass instead."""
    if reason not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(reason)
        logger.warning("MLA decode: the Gluon split pass does not apply (%s); using %s", reason, ROWS_CONFIG.label())


def _launch(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Run both passes with ``config`` (default :data:`DEFAULT_CONFIG`, :data:`FP32_CONFIG` for fp32
    inputs; the sweep script passes others). ``num_splits`` overrides the config's split count."""
    if triton is None:
        raise RuntimeError("the 'triton' MLA decode backend needs Triton (pip install 'ascend_edit[gpu]')")
    if config is None:
        config = FP32_CONFIG if q_latent.element_size() > 2 else (_PROCESS_CONFIG or [DEFAULT_CONFIG])[0]
    if num_splits is not None:
        config = dataclasses.replace(config, num_splits=num_splits)
    b, h, s, c = q_latent.shape
    r, t = q_rope.shape[-1], latent.shape[1]
    out = torch.empty((b, h, s, c), dtype=q_latent.dtype, device=q_latent.device)
    if t == 0 or b == 0 or h * s == 0:
        return out.zero_()
    if config.kernel == "gluon":
        reason = mla_decode_gluon.supported(q_latent, latent, k_rope)
        if reason is not None:
            _log_fallback(reason)
            config = dataclasses.replace(ROWS_CONFIG, num_splits=config.num_splits)
    rows = h * s
    block_m = _block_m(config, rows)
    v_split = config.v_split if config.kernel == "keys" else 1
    row_blocks = -(-rows // block_m)
    if config.num_splits is None:
        sm_count = split_k.sm_count(q_latent.device.index) if q_latent.device.type == "cuda" else 4  # 4: interpreter
        row_bytes = (c + r) * latent.element_size()
        num_splits, split_len = split_k.num_splits(b * row_blocks * v_split, block_m, t, row_bytes, c,
                                            sm_count * config.programs_per_sm)
    else:
        split_len = split_k.split_len(t, config.num_splits)
        num_splits = math.ceil(t / split_len)
    # 16-bit partials for 16-bit inputs: the partial outputs are normalised, so bf16/fp16 keeps
    # them to the output's own precision while halving the split pass's extra traffic.
    partial_dtype = q_latent.dtype if q_latent.element_size() == 2 else torch.float32
    partial_acc = torch.empty((b, rows, num_splits, c), dtype=partial_dtype, device=out.device)
    partial_max = torch.empty((b, rows, num_splits), dtype=torch.float32, device=out.device)
    partial_sum = torch.empty_like(partial_max)
    if config.kernel == "gluon":  # nothing below (Triton arguments, descriptors, counters) applies to it
        try:
            mla_decode_gluon.split_pass(q_latent, q_rope, latent, k_rope, q_pos, k_pos, scale * _LOG2E, split_len,
                                        num_splits, partial_acc, partial_max, partial_sum, stages=config.num_stages)
        except mla_decode_gluon.Unsupported as exc:  # raised before anything was launched
            _log_fallback(str(exc))
            return _launch(q_latent, q_rope, latent, k_rope, q_pos, k_pos, scale,
                           config=dataclasses.replace(ROWS_CONFIG, num_splits=config.num_splits))
        return _combine(partial_acc, partial_max, partial_sum, out, h, num_splits, config.merge_warps, pdl=False)
    fuse = config.fuse_combine
    # One arrival counter per (batch, row block), zeroed per call (a memset); unfused launches pass an
    # existing buffer in its place (never read) rather than pay for an allocation and a memset.
    counter = torch.zeros((b * row_blocks,), dtype=torch.int32, device=out.device) if fuse else partial_sum

    common = (
        q_latent, q_rope, latent, k_rope, q_pos, k_pos,
        partial_acc, partial_max, partial_sum,
        *q_latent.stride(), *q_rope.stride(), *latent.stride(), *k_rope.stride(),
        *q_pos.stride(), *k_pos.stride(),
        h, rows, t, split_len, num_splits, scale * _LOG2E,
    )  # fmt: skip
    block_r = max(16, split_k.next_pow2(r))
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    # griddepcontrol: NVIDIA sm_90+ only (not the interpreter, older GPUs or ROCm); elsewhere a plain launch
    pdl = (config.pdl and q_latent.is_cuda and torch.version.hip is None
           and torch.cuda.get_device_capability(q_latent.device)[0] >= 9)
    if config.maxnreg is not None:
        launch["maxnreg"] = config.maxnreg
    block_c = split_k.next_pow2(c)
    block_cv = split_k.next_pow2(-(-c // v_split))  # the columns one program loads (keys: accumulates)
    lat_desc = k_rope_desc = None
    if config.tma and _tma_ok(latent) and _tma_ok(k_rope):
        lat_desc = TensorDescriptor(latent, list(latent.shape), list(latent.stride()), [1, config.block_t, block_cv])
        k_rope_desc = TensorDescriptor(k_rope, list(k_rope.shape), list(k_rope.stride()), [1, config.block_t, block_r])
    if config.kernel == "rows":
        _mla_decode_rows_kernel[(row_blocks, num_splits, b)](
            *common, lat_desc, k_rope_desc, counter, out, *out.stride(),
            C=c, R=r, BLOCK_M=block_m, BLOCK_T=config.block_t, BLOCK_C=block_c,
            BLOCK_R=block_r, INPUT_PRECISION=precision, USE_TMA=lat_desc is not None, FUSE_COMBINE=fuse,
            LAZY_RESCALE=config.lazy_rescale, LAUNCH_DEPENDENTS=pdl,
            LOOP_STAGES=config.num_stages if config.pipeline_all else None,
            EVICTION="evict_first" if config.evict_first else "", **launch,
        )  # fmt: skip
        if fuse:
            return out
    else:
        _mla_decode_keys_kernel[(row_blocks * v_split, num_splits, b)](
            *common, lat_desc, k_rope_desc, counter, out, *out.stride(),
            C=c, R=r, BLOCK_H=block_m, BLOCK_T=config.block_t,
            BLOCK_CV=block_cv, BLOCK_R=block_r, V_SPLIT=v_split,
            PREFETCH=config.prefetch, INPUT_PRECISION=precision,
            USE_TMA=lat_desc is not None, FUSE_COMBINE=fuse, BLOCK_C=block_c, **launch,
        )  # fmt: skip
        if fuse:
            return out
    return _combine(partial_acc, partial_max, partial_sum, out, h, num_splits, config.merge_warps, pdl)


def _combine(partial_acc: torch.Tensor, partial_max: torch.Tensor, partial_sum: torch.Tensor, out: torch.Tensor,
             h: int, num_splits: int, merge_warps: int, pdl: bool) -> torch.Tensor:
    """Merge the split pass's partials (``[b, rows, num_splits(, c)]``) into ``out``; returns ``out``."""
    b, rows, _, c = partial_acc.shape
    split_k.merge_splits_kernel[(rows, b)](
        partial_acc, partial_max, partial_sum, out,
        *out.stride(),
        h, rows, num_splits,
        C=c,
        BLOCK_S=split_k.next_pow2(num_splits),
        BLOCK_C=split_k.next_pow2(c),
        WAIT_PRIMARY=pdl,
        num_warps=merge_warps,
        **({"launch_pdl": True} if pdl else {}),
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


@mla_contract
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
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_latent, q_rope, latent, k_rope)):
        raise RuntimeError(
            "the 'triton' MLA decode kernel is forward-only (decode is inference); run it under "
            "torch.no_grad() or resolve the op with needs_grad=True to get a differentiable backend"
        )
    return mla_decode(q_latent, q_rope, latent, k_rope, q_pos, k_pos, float(scale))
