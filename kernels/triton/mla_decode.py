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
  ``mma.sync`` path and reloads the whole query block from shared memory for every tile. It runs
  everywhere Triton does.
* ``"gluon"`` (``mla_decode_gluon.py``, sm_90 only): swap-AB, cache rows on the M side, fed by a TMA
  loader warp; see below.

Options of the rows kernel (flags of the same kernel, so the numerics tests cover them):

* ``tma``: latent and k_rope tiles arrive through TMA tensor descriptors (host-side
  ``TensorDescriptor``; sm_90+, 16-byte aligned base and strides, else pointer loads are used):
  one bulk copy per tile instead of per-thread ``cp.async`` address arithmetic, and Triton's
  pipeliner waits on mbarriers. Tiles are not masked at the split's end: rows of the next split
  arrive as cache data and ``k_pos = -1`` gives them ``p = 0``, as for empty slots (the cache must
  hold finite values there, as it must for empty slots already); rows past ``t`` arrive as zeros.
* ``maxnreg``: a register cap for ptxas, so two 8-warp programs can share an SM.
* ``lazy_rescale``, ``pdl``, ``pipeline_all``, ``evict_first``: see :class:`DecodeConfig`.

Removed on 2026-12-04 (session 16), after the Gluon kernel superseded them: a Triton swap-AB
formulation (``kernel="keys"``, with ``v_split`` and a register-``prefetch`` variant that made an
illegal memory access on an H200) and ``fuse_combine`` (the last split program merging the partials
behind an atomic counter; wrong outputs with TMA and 128-row tiles on an H200). Their measurements stay
in ``docs/benchmarks.md``; the code is in the history before that date.

The Gluon formulation is the production default since 2026-12-04: a TMA loader warp feeds one wgmma
warpgroup in swap-AB form, 78-79 % of the copy bandwidth at the shape below (0.0905-0.0913 ms). Calls it
cannot take run ``ROWS_CONFIG``. What follows is the history of the Triton split pass that led to it.

Status (H200, bf16, B=32, H=32, context 8192, c=512, r=64; ``docs/benchmarks.md``): the
``rows`` configuration (``ROWS_CONFIG``) takes 0.1084-0.1087 ms of GPU time, 65-67 % of the device copy bandwidth (the goal is
70 %). Nsight Compute on the split pass: 0.104 ms at 2.97 TB/s DRAM, 255 registers per thread and 115 KB of
shared memory per program (two programs, 8 warps, per SM: 12.5 % occupancy), the issue slots 20 % busy and
no warp eligible 78 % of cycles -- latency-bound, a third of the stall on shared-memory operands. Read from
its sm_90 code (ptxas on a CPU): one shared-memory tile buffer per program at two stages (two
programs per SM give the only overlap), 76 ``cp.async`` per thread per tile, and an mma.sync layout
with the four warps side by side on the key axis, so every warp re-reads the whole 32 KB query block
from shared memory for every tile. ``tma`` and ``maxnreg`` were added against those costs;
``benchmarks/mla_decode_sweep.py --set pipeline --isolate`` times them. ``benchmarks/mla_decode_sweep.py``
times every candidate configuration in one run and prints the fastest; :data:`DEFAULT_CONFIG` is the
production choice. What the compiler makes of ``rows`` with ``block_m=64, pad_rows=True`` and 32-row
tiles for sm_90 (ptxas on a CPU machine, not timed): wgmma for both matmuls, three stages in 185 KB.

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

    ``block_m`` is the number of query rows per program (the M side, 16..64); it shrinks to fit small
    head counts unless ``pad_rows``. ``num_splits=None`` lets the cost model
    in :func:`split_k.num_splits` choose; an explicit count is used as given (capped by the context).
    """

    kernel: str = "rows"  # "rows" | "gluon" (sm_90 only: mla_decode_gluon.py)
    block_t: int = 64
    block_m: int = 32
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None
    pad_rows: bool = False  # keep block_m even above the row count (rows: 64 rows reach wgmma)
    # Programs resident per SM (shared memory / registers allow it): the split cost model fills
    # sm_count x this many slots per wave. 2 for configurations under half an SM's shared memory.
    programs_per_sm: int = 1
    # Load the latent and k_rope tiles through TMA tensor descriptors (asynchronous bulk
    # copies into shared memory, pipelined with mbarriers instead of per-thread cp.async address
    # arithmetic). Falls back to pointer loads where the cache's strides or base are not 16-byte
    # aligned (a TMA requirement).
    tma: bool = False
    # Register cap per thread passed to ptxas (None: up to 255). 128 lets two 8-warp programs share
    # an SM's 64K registers (they otherwise take 255 and run one per SM), at the risk of spills.
    maxnreg: int | None = None
    # rescale the accumulator only when a row's running max grows by more than 2^8 (a stale max
    # is exact after normalisation), instead of on every tile.
    lazy_rescale: bool = False
    # launch the combine as a programmatic dependent launch (sm_90+): it is queued while the
    # split pass runs and waits on griddepcontrol for its partials, instead of launching after it.
    pdl: bool = False
    # warps per program of the combine kernel (one program per query row and batch element)
    merge_warps: int = 4
    # pipeline every load of the key loop (k_pos too), not only the matmul operands
    # (tl.range(num_stages=num_stages)); and stream the cache past L2 (evict_first) so that the partials
    # and queries stay there.
    pipeline_all: bool = False
    evict_first: bool = False

    def __post_init__(self) -> None:
        if self.kernel not in ("rows", "gluon"):
            raise ValueError(f"DecodeConfig.kernel must be 'rows' or 'gluon'; got {self.kernel!r}")
        if self.kernel == "gluon" and (self.block_t != 64 or self.num_warps != 4 or self.tma
                                       or self.maxnreg is not None or self.num_stages > 2):
            raise ValueError("DecodeConfig(kernel='gluon') is one warpgroup over 64-row TMA tiles: block_t=64, "
                             "num_warps=4, num_stages <= 2 (the ring's slots), no tma/maxnreg flags")
        if self.kernel != "rows" and (self.lazy_rescale or self.pdl or self.pipeline_all or self.evict_first):
            raise ValueError("DecodeConfig.lazy_rescale, pdl, pipeline_all and evict_first apply to kernel='rows' only")
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
        vs = " pad" if self.pad_rows else ""
        vs += " tma" if self.tma else ""
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
        C: tl.constexpr, R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
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
    row_blocks = -(-rows // block_m)
    if config.num_splits is None:
        sm_count = split_k.sm_count(q_latent.device.index) if q_latent.device.type == "cuda" else 4  # 4: interpreter
        row_bytes = (c + r) * latent.element_size()
        num_splits, split_len = split_k.num_splits(b * row_blocks, block_m, t, row_bytes, c,
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
    if config.kernel == "gluon":  # nothing below (Triton arguments, descriptors) applies to it
        try:
            mla_decode_gluon.split_pass(q_latent, q_rope, latent, k_rope, q_pos, k_pos, scale * _LOG2E, split_len,
                                        num_splits, partial_acc, partial_max, partial_sum, stages=config.num_stages)
        except mla_decode_gluon.Unsupported as exc:  # raised before anything was launched
            _log_fallback(str(exc))
            return _launch(q_latent, q_rope, latent, k_rope, q_pos, k_pos, scale,
                           config=dataclasses.replace(ROWS_CONFIG, num_splits=config.num_splits))
        return _combine(partial_acc, partial_max, partial_sum, out, h, num_splits, config.merge_warps, pdl=False)
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
    lat_desc = k_rope_desc = None
    if config.tma and _tma_ok(latent) and _tma_ok(k_rope):
        lat_desc = TensorDescriptor(latent, list(latent.shape), list(latent.stride()), [1, config.block_t, block_c])
        k_rope_desc = TensorDescriptor(k_rope, list(k_rope.shape), list(k_rope.stride()), [1, config.block_t, block_r])
    _mla_decode_rows_kernel[(row_blocks, num_splits, b)](
        *common, lat_desc, k_rope_desc,
        C=c, R=r, BLOCK_M=block_m, BLOCK_T=config.block_t, BLOCK_C=block_c,
        BLOCK_R=block_r, INPUT_PRECISION=precision, USE_TMA=lat_desc is not None,
        LAZY_RESCALE=config.lazy_rescale, LAUNCH_DEPENDENTS=pdl,
        LOOP_STAGES=config.num_stages if config.pipeline_all else None,
        EVICTION="evict_first" if config.evict_first else "", **launch,
    )  # fmt: skip
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
