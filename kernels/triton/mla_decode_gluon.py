"""Op B's decode split pass as a Hopper (sm_90) Gluon kernel: TMA ring + warpgroup MMA, swap-AB.

Why a second kernel beside ``mla_decode.py``'s Triton ones: Nsight Compute showed their split pass
latency-bound (two 255-register programs per SM, one tile buffer each, ``mma.sync`` re-reading the
query block from shared memory for every tile), 65-67 % of the copy bandwidth against the 70 % goal.
``tl.dot`` gave no layout that uses wgmma for 32 heads without padding or stalls. Gluon lets the
kernel say exactly what runs where:

* **A loader warp** (a warp-specialised partition) streams the cache through ``STAGES`` shared-memory
  slots with TMA bulk copies, signalling ``ready[slot]`` by bytes arrived and waiting on
  ``empty[slot]``: the next tiles are always in flight while the current one is computed.
* **One compute warpgroup**, swap-AB: cache rows are the MMA's M side (64 per tile, what wgmma
  needs), query rows (heads x query positions, 16 or 32) the N side, so no row is padding.
  ``scores^T [T, N] = latent [T, c] . q_latent^T + k_rope [T, r] . q_rope^T`` (both operands in
  shared memory), an online softmax down each column, ``P^T`` to shared memory, and
  ``acc^T [c, N] += latent^T [c, T] . P^T`` (the latent tile read transposed from the same slot).
  The column sums stay per thread until the end (one cross-warp reduction per tile: the max).

Outputs are the split pass's partials in the layout of ``mla_decode._launch`` (normalised, 16-bit,
with their log2-domain max and sum), merged by the same combine kernel.

Scope: 16-bit inputs, ``c`` in {64, 128, 256, 512}, ``r`` in {32, 64}, 16 or 32 query rows per
batch element, NVIDIA sm_90, latent and k_rope contiguous in ``[b * t, c]`` / ``[b * t, r]`` with 16-byte aligned
rows. :func:`supported` says whether a call fits; the caller falls back to the Triton kernels.
Status: see docs/benchmarks.md (H200 numbers are recorded there; the CPU can compile this kernel for
sm_90 but not run it).
"""
from __future__ import annotations

import functools

try:  # Gluon ships with Triton >= 3.5 (the "gpu" extra); absent on most CPU machines
    import triton
    from triton.compiler.errors import CompilationError
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:  # pragma: no cover - depends on the machine
    triton = gluon = gl = None

import torch

BLOCK_T = 64  # cache rows per tile: the M of one warpgroup MMA
LOADER_REGS = gl.constexpr(24) if gl is not None else 24  # registers per thread of the loader warp (it only issues TMA copies)


def gluon_available() -> bool:
    return gluon is not None


@functools.cache
def _major(device_index: int | None) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


class Unsupported(Exception):
    """The Gluon split pass cannot take this call (the message says why); the caller runs another kernel."""


def device_reason(device: torch.device) -> str | None:
    """None if the Gluon split pass runs on ``device``, else why not."""
    if gluon is None:
        return "Gluon (triton.experimental.gluon) is not installed"
    # ROCm reports MI200 / MI300 as capability 9.x too: the kernel is NVIDIA-only (TMA, wgmma)
    if device.type != "cuda" or torch.version.hip is not None or _major(device.index) != 9:
        return "the Gluon MLA decode kernel is written for NVIDIA sm_90 (Hopper)"
    return None


def shape_reason(rows: int, c: int, r: int, dtype: torch.dtype) -> str | None:
    """None if the kernel is compiled for these sizes (query rows per batch element, latent and rope widths)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs 16-bit inputs, got {dtype}"
    if rows not in (16, 32):
        return f"needs 16 or 32 query rows per batch element, got {rows}"
    if c not in (64, 128, 256, 512) or r not in (32, 64):  # block shapes are powers of two
        return f"needs c in (64, 128, 256, 512) and r in (32, 64), got c={c}, r={r}"
    return None


def supported(q_latent: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> str | None:
    """None if the Gluon split pass can take this call, else why not (for the caller's log)."""
    b, h, s, c = q_latent.shape
    reason = device_reason(q_latent.device) or shape_reason(h * s, c, k_rope.shape[-1], q_latent.dtype)
    if reason is not None:
        return reason
    for name, x in (("latent", latent), ("k_rope", k_rope)):
        bt = x.shape[0] * x.shape[1]
        if x.stride(-1) != 1 or x.stride(0) != x.shape[1] * x.stride(1) or x.data_ptr() % 16 or \
                x.stride(1) * x.element_size() % 16 or bt == 0:
            return f"needs {name} contiguous over [b * t] with 16-byte aligned rows"
    return None


if gluon is not None:

    @gluon.jit
    def _loader(q_desc, qr_desc, lat_desc, kr_desc, q_smem, qr_smem, lat_smem, kr_smem, q_bar, ready, empty,
                q_row, kv_row, n_tiles, BLOCK_T: gl.constexpr, STAGES: gl.constexpr):
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + qr_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        tma.async_copy_global_to_shared(qr_desc, [q_row, 0], q_bar, qr_smem)
        for i in range(n_tiles):
            slot = i % STAGES
            # The first pass over the ring waits on the parity before the barrier's first phase: no wait.
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), lat_desc.block_type.nbytes + kr_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(lat_desc, [kv_row + i * BLOCK_T, 0], ready.index(slot),
                                            lat_smem.index(slot))
            tma.async_copy_global_to_shared(kr_desc, [kv_row + i * BLOCK_T, 0], ready.index(slot),
                                            kr_smem.index(slot))

    @gluon.jit
    def _compute(q_smem, qr_smem, lat_smem, kr_smem, p_smem, q_bar, ready, empty,
                 k_pos_ptr, stride_kpb, stride_kpt, q_pos_ptr, stride_qpb, stride_qps,
                 acc_ptr, max_ptr, sum_ptr, pid_b, pid_split, t_begin, t_end, n_tiles,
                 H, S, M, NUM_SPLITS, qk_scale_log2,
                 BLOCK_T: gl.constexpr, N: gl.constexpr, C: gl.constexpr, STAGES: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        per_key: gl.constexpr = gl.SliceLayout(1, mma)
        per_query: gl.constexpr = gl.SliceLayout(0, mma)

        n = gl.arange(0, N, layout=per_query)  # query row of the kernel's q block: n = h * S + s
        h_idx = n // S
        s_idx = n % S
        q_pos = gl.load(q_pos_ptr + pid_b * stride_qpb + s_idx * stride_qps)
        offs_t = gl.arange(0, BLOCK_T, layout=per_key)

        # A finite initial max keeps fully masked tiles NaN-free: exp2(-inf - (-1e30)) == 0.
        run_max = gl.full([N], -1.0e30, gl.float32, per_query)
        sums = gl.zeros([BLOCK_T, N], gl.float32, mma)  # per-thread column sums, reduced once at the end
        acc = gl.zeros([C, N], gl.float32, mma)
        mbarrier.wait(q_bar, 0)
        for i in range(n_tiles):
            slot = i % STAGES
            t = t_begin + i * BLOCK_T + offs_t
            k_pos = gl.load(k_pos_ptr + pid_b * stride_kpb + t * stride_kpt, mask=t < t_end, other=-1)
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            lat = lat_smem.index(slot)
            scores = warpgroup_mma(lat, q_smem.permute((1, 0)), gl.zeros([BLOCK_T, N], gl.float32, mma),
                                   use_acc=False, is_async=True)
            scores = warpgroup_mma(kr_smem.index(slot), qr_smem.permute((1, 0)), scores, is_async=True)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores,))
            visible = (k_pos[:, None] >= 0) & (k_pos[:, None] <= q_pos[None, :])
            scores = gl.where(visible, scores * qk_scale_log2, float("-inf"))
            new_max = gl.maximum(run_max, gl.max(scores, axis=0))
            rescale = gl.exp2(run_max - new_max)
            p = gl.exp2(scores - new_max[None, :])
            sums = sums * rescale[None, :] + p
            acc = acc * rescale[None, :]
            run_max = new_max
            p_smem.store(p.to(p_smem.dtype))
            fence_async_shared()
            acc = warpgroup_mma(lat.permute((1, 0)), p_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(slot), count=1)

        total = gl.sum(sums, axis=0)
        acc = acc / gl.where(total > 0, total, 1.0)[None, :]
        # partials are [B, M, NUM_SPLITS(, C)] with m = s * H + h, as the Triton split pass writes them
        part = (pid_b * M + s_idx * H + h_idx) * NUM_SPLITS + pid_split
        gl.store(max_ptr + part, run_max)
        gl.store(sum_ptr + part, total)
        store: gl.constexpr = gl.BlockedLayout([8, 1], [32, 1], [1, 4], [0, 1])  # c fastest: 16-byte stores
        out = gl.convert_layout(acc.to(acc_ptr.dtype.element_ty), store)
        c_idx = gl.arange(0, C, layout=gl.SliceLayout(1, store))
        part_s = gl.convert_layout(part, gl.SliceLayout(0, store))
        gl.store(acc_ptr + part_s[None, :] * C + c_idx[:, None], out)

    @gluon.jit
    def _mla_decode_wgmma_kernel(
        q_desc, qr_desc, lat_desc, kr_desc,
        k_pos_ptr, stride_kpb, stride_kpt, q_pos_ptr, stride_qpb, stride_qps,
        acc_ptr, max_ptr, sum_ptr,
        H, S, M, T, SPLIT_LEN, NUM_SPLITS, qk_scale_log2,
        BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        N: gl.constexpr = q_desc.block_type.shape[0]
        C: gl.constexpr = q_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        pid_split = gl.program_id(0)
        pid_b = gl.program_id(1)

        q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
        qr_smem = gl.allocate_shared_memory(dtype, qr_desc.block_type.shape, qr_desc.layout)
        lat_smem = gl.allocate_shared_memory(dtype, [STAGES] + lat_desc.block_type.shape, lat_desc.layout)
        kr_smem = gl.allocate_shared_memory(dtype, [STAGES] + kr_desc.block_type.shape, kr_desc.layout)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, N], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_T, N], p_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)

        t_begin = pid_split * SPLIT_LEN
        t_end = gl.minimum(t_begin + SPLIT_LEN, T)
        n_tiles = gl.cdiv(t_end - t_begin, BLOCK_T)
        gl.warp_specialize(
            [
                (_compute, (q_smem, qr_smem, lat_smem, kr_smem, p_smem, q_bar, ready, empty,
                            k_pos_ptr, stride_kpb, stride_kpt, q_pos_ptr, stride_qpb, stride_qps,
                            acc_ptr, max_ptr, sum_ptr, pid_b, pid_split, t_begin, t_end, n_tiles,
                            H, S, M, NUM_SPLITS, qk_scale_log2, BLOCK_T, N, C, STAGES)),
                (_loader, (q_desc, qr_desc, lat_desc, kr_desc, q_smem, qr_smem, lat_smem, kr_smem, q_bar,
                           ready, empty, pid_b * N, pid_b * T + t_begin, n_tiles, BLOCK_T, STAGES)),
            ],
            [1],
            [LOADER_REGS],
        )


@functools.lru_cache(maxsize=64)
def _shared_layout(block: tuple[int, ...], dtype) -> object:
    """The TMA/wgmma shared-memory layout of a block (cached: building one costs ~6 us of host time per call,
    a quarter of a decode step's kernel time at the goal shape)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def descriptors(q_latent, q_rope, latent, k_rope):
    """Host TMA descriptors: queries as [b * rows, c | r] blocks of one batch element's rows, the cache as
    [b * t, c | r] blocks of BLOCK_T rows."""
    b, h, s, c = q_latent.shape
    r = k_rope.shape[-1]
    rows = h * s
    dtype = gl.bfloat16 if q_latent.dtype == torch.bfloat16 else gl.float16
    q2 = q_latent.reshape(b * rows, c)  # row n = h * s_len + s
    qr2 = q_rope.reshape(b * rows, r)
    lat2 = latent.reshape(-1, c)
    kr2 = k_rope.reshape(-1, r)

    def desc(x, block):
        return GluonTensorDescriptor(x, list(x.shape), list(x.stride()), block, _shared_layout(tuple(block), dtype))

    return desc(q2, [rows, c]), desc(qr2, [rows, r]), desc(lat2, [BLOCK_T, c]), desc(kr2, [BLOCK_T, r])


_COMPILED: dict[tuple, object] = {}  # launch key -> the compiled kernel (Triton's CompiledKernel)
_FAILED: dict[tuple, str] = {}  # launch key -> why it did not compile (not retried)


def _int_facts(*values: int) -> tuple:
    """What Triton's JIT specialises an integer argument on: being 1, divisible by 16, fitting 32 bits."""
    return tuple((v == 1, v % 16 == 0, -(2**31) <= v < 2**31) for v in values)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x contiguous with a 16-byte aligned base (what a TMA descriptor needs); a copy only where x is not."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def split_pass(q_latent, q_rope, latent, k_rope, q_pos, k_pos, qk_scale_log2, split_len, num_splits,
               partial_acc, partial_max, partial_sum, stages: int = 2):
    """Launch the split pass into the partial buffers (``[b, rows, num_splits(, c)]``).

    The first call of each specialisation goes through the JIT (which compiles); later ones launch the compiled
    kernel directly, skipping the JIT's per-call dispatch (binding, the specialisation key of four descriptors),
    which on a busy host costs more than the kernel's GPU time at the goal shape. The launch key holds every fact
    the JIT specialises this kernel on (the descriptors' blocks and layouts follow from rows, c, r and the dtype;
    their shapes and strides from the integers listed), so equal keys mean the JIT would pick the same kernel.
    Decode steps repeat one key (same cache length, splits and strides)."""
    b, h, s, c = q_latent.shape
    t, r, rows = latent.shape[1], k_rope.shape[-1], h * s
    q_latent, q_rope = _aligned(q_latent), _aligned(q_rope)
    args = (*descriptors(q_latent, q_rope, latent, k_rope), k_pos, *k_pos.stride(), q_pos, *q_pos.stride(),
            partial_acc, partial_max, partial_sum, h, s, rows, t, split_len, num_splits, qk_scale_log2)
    pointers = (k_pos, q_pos, partial_acc, partial_max, partial_sum)
    key = (rows, c, r, q_latent.dtype, q_latent.device, stages, *(p.dtype for p in pointers),
           *(p.data_ptr() % 16 == 0 for p in pointers),
           _int_facts(b * rows, b * t, h, s, t, split_len, num_splits, latent.stride(1), k_rope.stride(1),
                      *k_pos.stride(), *q_pos.stride()))
    grid = (num_splits, b, 1)  # CompiledKernel launches take all three grid dimensions
    compiled = _COMPILED.get(key)
    if compiled is None:
        if key in _FAILED:
            raise Unsupported(_FAILED[key])
        try:
            _COMPILED[key] = _mla_decode_wgmma_kernel[grid](*args, BLOCK_T=BLOCK_T, STAGES=stages, num_warps=4)
        except CompilationError as exc:  # nothing was launched: the caller can run another kernel
            _FAILED[key] = f"the Gluon kernel did not compile for this call ({str(exc).strip().splitlines()[-1]})"
            raise Unsupported(_FAILED[key]) from exc
    else:
        compiled[grid](*args, BLOCK_T, stages)  # type: ignore[index]  # constexprs last, in signature order
