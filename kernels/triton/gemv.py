"""Skinny GEMM ("GEMV") for decode: ``y = x @ W^T (+ b)`` for ``x`` of at most 8 rows. **Forward only.**

Why a kernel: at batch 1 a decode step is a chain of matrix-vector products, each reading its weight
once; the time is the weight bytes over the achieved bandwidth. cuBLAS reads the 8B shape's weights at
about 74 % of the device copy bandwidth at M = 1 (``docs/benchmarks.md``, the compiled decode step);
this kernel is built for bandwidth alone:

* the output features ``N`` are cut into many programs of ``BLOCK_N`` weight rows; each streams its
  ``[BLOCK_N, BLOCK_K]`` weight tiles along ``K`` with unmasked, 16-byte vector loads (the tail block
  re-reads the last row instead of masking, so no load loses its width; only the store is masked) and
  an ``evict_first`` hint (each weight byte is read once; the input row stays in L1/L2);
* one row (``M = 1``): the products accumulate elementwise in an fp32 ``[BLOCK_N, BLOCK_K]`` register
  tile and are reduced once at the end (no per-tile cross-thread reduction); 2..8 rows: ``tl.dot`` with
  the rows padded to 16 (the MMA's minimum; the padding costs MMA work, never memory traffic);
* ``prefetch`` (one row, ``K`` a multiple of ``BLOCK_K``): the next weight tile is loaded into registers
  before this one is reduced, two tiles in flight per program (Triton's pipeliner stages only loads that
  feed ``tl.dot``, so ``num_stages`` does nothing for the one-row loop; compiled for sm_90 on a CPU with
  ptxas: 16-byte loads throughout, no spills, <= 128 registers at 4 warps for every candidate);
* where ``N / BLOCK_N`` programs cannot fill the SMs (small ``N``), split-K: each split writes fp32
  partials and a second tiny pass sums them **in a fixed order** (plus the bias) and casts. fp32 atomics
  would need a zeroed fp32 buffer and a cast pass anyway (a 16-bit output cannot be atomically
  accumulated in fp32), so they would cost the same launches and make the result depend on the order
  programs finish in; the two-pass sum is deterministic. The heuristic prefers narrower row blocks
  (down to 4 rows) over splitting, so the second pass runs only for small ``N``.

:func:`choose_config` picks a :class:`GemvConfig` from ``(M, N, K)`` and the SM count; :func:`tune` times the
:data:`CANDIDATES` against ``F.linear`` for one shape (on CUDA, outside any graph capture) and
:func:`set_config` makes its choice the one used for that ``(M, N, K)``; an explicit config overrides both
(``benchmarks/gemv_bench.py`` prints them all). The op ``ascend_edit::gemv`` is a
``torch.library`` custom op with a fake implementation, as ``ascend_edit::mla_decode``, so a compiled
decode step (``torch.compile(fullgraph=True, mode="reduce-overhead")``) keeps it as one node and CUDA
graphs capture its launches. Triton is imported here and nowhere else; without Triton the op and its
fake still register, so graphs containing it trace on CPU. Under ``TRITON_INTERPRET=1`` the op also
gets a CPU implementation (Triton's interpreter runs the kernel on CPU tensors: numerics tests only).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from . import split_k

try:  # Triton is an optional dependency ("gpu" extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

__all__ = ["MAX_ROWS", "CANDIDATES", "GemvConfig", "choose_config", "gemv", "gemv_linear", "gpu_ms_per_call",
           "set_config", "split_for", "triton_available", "tune"]

MAX_ROWS = 8  # more rows than this: a GEMM library is the better tool
# Programs per SM the heuristic aims for: 4-warp programs with a 16 KB tile each, several resident per
# SM, keep enough loads in flight to cover DRAM latency.
_PROGRAMS_PER_SM = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch choices; every choice computes the same result up to fp32 summation order.

    ``split_k`` = number of K chunks (1: no second pass). ``block_n`` >= 16 when the rows go through
    ``tl.dot`` (M > 1).
    """

    block_n: int = 8
    block_k: int = 1024
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    # One row, K a multiple of block_k: load the next weight tile into registers before reducing this one
    # (two tiles in flight per program; Triton's pipeliner stages only loads that feed tl.dot).
    prefetch: bool = False

    def label(self) -> str:
        return (f"n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}"
                + (" pf" if self.prefetch else ""))


def triton_available() -> bool:
    return triton is not None


def split_for(n: int, k: int, block_n: int, block_k: int, sm_count: int) -> int:
    """K splits that bring ``N / block_n`` row blocks up to ``_PROGRAMS_PER_SM`` programs per SM (as far as
    K's blocks allow), rounded so that no split is empty."""
    target = _PROGRAMS_PER_SM * sm_count
    programs = -(-n // block_n)
    if programs >= target:
        return 1
    k_blocks = -(-k // block_k)
    split = max(1, min(-(-target // programs), k_blocks))
    return -(-k_blocks // -(-k_blocks // split))


@functools.cache
def choose_config(m: int, n: int, k: int, sm_count: int) -> GemvConfig:
    """The heuristic: a ~16 KB bf16 weight tile per loop step (block_n x block_k), the widest row block
    that still gives ``_PROGRAMS_PER_SM`` programs per SM, then split-K only if even the narrowest
    (4 rows; 16 with tl.dot) gives too few programs."""
    target = _PROGRAMS_PER_SM * sm_count
    narrowest = 4 if m == 1 else 16
    widths = (32, 16, 8, 4) if m == 1 else (64, 32, 16)
    block_n = next((w for w in widths if -(-n // w) >= target), narrowest)
    tile_elems = 8192  # 16 KB of bf16 per loop step
    block_k = max(16, min(split_k.next_pow2(k), tile_elems // block_n, 2048 if m == 1 else 256))
    split = split_for(n, k, block_n, block_k, sm_count)
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=1)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1)  # the tail block re-reads the last row: loads stay unmasked
        offs_m = tl.arange(0, BLOCK_M)
        rows_m = tl.minimum(offs_m, M - 1)
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if PREFETCH:  # one row, EVEN_K: the last step re-reads its own tile (from L1/L2) instead of masking
            w = tl.load(w_ptrs + k_start, eviction_policy="evict_first")
            for k0 in range(k_start, k_end, BLOCK_K):
                w_next = tl.load(w_ptrs + tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K), eviction_policy="evict_first")
                x = tl.load(x_ptrs + k0)
                acc2 += w.to(tl.float32) * x.to(tl.float32)
                w = w_next
        else:
            for k0 in range(k_start, k_end, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
                    x = tl.load(x_ptrs + k0)
                else:
                    k_mask = (k0 + offs_k) < k_end
                    w = tl.load(w_ptrs + k0, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
                    x = tl.load(x_ptrs + k0, mask=k_mask[None, :], other=0.0)
                if USE_DOT:
                    acc += tl.dot(x, tl.trans(w), input_precision=INPUT_PRECISION)
                else:
                    acc2 += w.to(tl.float32) * x.to(tl.float32)  # x: [1, BLOCK_K], broadcast over the rows
        if USE_DOT:
            y = acc
        else:
            y = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT == 1:
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=out_mask)
        else:
            tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=out_mask)

    @triton.jit
    def _gemv_split_sum_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om,
                          HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """Sum the split-K partials in split order (deterministic), add the bias, cast."""
        pid = tl.program_id(0)
        m = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match (weight: [N, K])")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"gemv: dtypes differ: x {x.dtype}, weight {weight.dtype}, "
                         f"bias {None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} is not [{weight.shape[0]}]")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: GemvConfig | None = None) -> torch.Tensor:
    """The kernel on ``x [..., K]`` with at most ``MAX_ROWS`` rows; returns ``[..., N]`` in x's dtype."""
    if triton is None:
        raise RuntimeError("gemv: triton is not installed")
    _check(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS or m == 0:
        raise ValueError(f"gemv: {m} rows; the kernel serves 1..{MAX_ROWS} (use F.linear)")
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if config is None:
        config = _TUNED.get((m, n, k))
    if config is None:
        sms = split_k.sm_count(x.device.index) if x.device.type == "cuda" else 4  # 4: the interpreter
        config = choose_config(m, n, k, sms)
    use_dot = m > 1
    if use_dot and (config.block_n < 16 or config.block_k < 16):
        raise ValueError(f"gemv: {m} rows go through tl.dot, which needs block_n, block_k >= 16 ({config.label()})")
    k_blocks = -(-k // config.block_k)
    per_split = -(-k_blocks // config.split_k)
    split = -(-k_blocks // per_split)
    k_per_split = per_split * config.block_k
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, config.block_n), split)
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else weight, out, part,
        m, n, k, k_per_split,
        x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT=split, USE_DOT=use_dot,
        BLOCK_M=16 if use_dot else 1, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=config.prefetch and not use_dot and k % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _gemv_split_sum_kernel[(triton.cdiv(n, block), m)](
            part, bias if bias is not None else weight, out, m, n, out.stride(0),
            HAS_BIAS=bias is not None, SPLIT=split, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)


# (rows, N, K) -> the config that tune() measured fastest, used instead of the heuristic's choice.
_TUNED: dict[tuple[int, int, int], GemvConfig] = {}
# Candidates tune() times for one row (block_n, block_k, num_warps, prefetch); K splits by split_for.
# num_stages stays 1: the one-row loop has no tl.dot, so Triton's pipeliner leaves its loads alone.
CANDIDATES = ((4, 2048, 4, False), (4, 2048, 8, False), (8, 1024, 4, False), (8, 1024, 8, False),
              (16, 512, 4, False), (32, 256, 4, False), (4, 2048, 4, True), (4, 1024, 4, True),
              (8, 1024, 4, True), (8, 512, 4, True), (16, 512, 8, True))


def set_config(m: int, n: int, k: int, config: GemvConfig | None) -> None:
    """Use ``config`` for every call with (m, n, k) (``None``: back to the heuristic)."""
    if config is None:
        _TUNED.pop((m, n, k), None)
    else:
        _TUNED[(m, n, k)] = config


def _queue_busy_work(device: torch.device, matmuls: int) -> None:
    """Queue GPU work ahead of the timed calls so the host has enqueued them all before the start event fires
    (public ops only: 4096-square bf16 matmuls, about 0.2 ms each on an H100/H200). The operand is not kept:
    tuning runs inside a user's process (prepare_for_decode), which should not hold 32 MiB for it afterwards."""
    a = torch.ones(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(matmuls):
        torch.mm(a, a)


def gpu_ms_per_call(fn, calls: int, busy_matmuls: int = 20) -> float:
    """GPU ms per call of ``calls`` back-to-back calls: GPU work queued first hides the host's launches,
    so the events time the kernels and their gaps, as a CUDA-graph replay runs them."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _queue_busy_work(torch.device("cuda", torch.cuda.current_device()), busy_matmuls)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / calls


def _candidates(m: int, n: int, k: int, sm_count: int) -> list[GemvConfig]:
    out = [choose_config(m, n, k, sm_count)]
    if m == 1:
        for bn, bk, warps, prefetch in CANDIDATES:
            bk = max(16, min(bk, split_k.next_pow2(k)))
            cfg = GemvConfig(bn, bk, split_for(n, k, bn, bk, sm_count), warps, 1, prefetch)
            if cfg not in out:
                out.append(cfg)
    return out


@torch.no_grad()
def tune(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, *, calls: int = 20,
         repeats: int = 5, l2_bytes: int = 50 << 20) -> tuple[GemvConfig | None, float, float]:
    """Time the candidates and ``F.linear`` for ``m`` rows of a ``[n, k]`` weight (CUDA; outside any graph
    capture). Weights rotate through copies totalling > 3x L2, so no call finds its weight in L2 (as in a
    decode step). Returns (fastest config or ``None`` when ``F.linear`` is faster, its ms, ``F.linear``'s ms);
    a candidate that fails to compile or launch is skipped."""
    import statistics

    copies = max(1, -(-3 * l2_bytes // (n * k * torch.finfo(dtype).bits // 8)))
    weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    state = [0]

    def timed(call) -> float:
        def one():
            state[0] += 1
            call(weights[state[0] % copies])

        for _ in range(3):
            one()
        return statistics.median(gpu_ms_per_call(one, calls) for _ in range(repeats))

    torch_ms = timed(lambda w: torch.nn.functional.linear(x, w))
    best, best_ms = None, float("inf")
    for cfg in _candidates(m, n, k, split_k.sm_count(device.index)):
        try:
            ms = timed(lambda w, cfg=cfg: _launch(x, w, None, cfg))
        except Exception:  # noqa: BLE001  a config this device cannot run: not a candidate here
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    weights.clear()
    return (best if best_ms < torch_ms else None), best_ms, torch_ms


@torch.library.custom_op("ascend_edit::gemv", mutates_args=(), device_types="cuda")
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., K]`` of at most ``MAX_ROWS`` rows, forward only."""
    return _launch(x, weight, bias)


@gemv.register_fake
def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if _INTERPRET and triton is not None:  # numerics tests on CPU: Triton's interpreter runs the kernel
    gemv.register_kernel("cpu")(lambda x, weight, bias: _launch(x, weight, bias))


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through the kernel; raises if a gradient could be needed (decode is inference)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("the gemv kernel is forward-only (decode); run it under torch.no_grad()")
    return gemv(x, weight, bias)
