"""Sweep: launch configurations of the Triton MLA decode kernel (``kernels/triton/mla_decode.py``).

One run times every candidate :class:`DecodeConfig` at the issue-14 shape -- bf16, B=32, s=1,
context 8192, latent c=512, rope r=64, H=32 (the goal row) and H=128 (secondary) -- against the
measured device-to-device copy bandwidth, checks each against the eager reference, and prints
the fastest correct one. The production choice is ``DEFAULT_CONFIG`` in that module: copy the
constructor call printed on the ``BEST:`` line there.

Measurements
  * copy bandwidth: ``dst.copy_(src)`` of 2 GiB, read + write bytes / time (the goal's ceiling).
  * kernel ms: median of ``--iters`` calls after ``--warmup``, CUDA events around each call, with
    a GPU sleep queued before the start event so the events time the GPU work and not the host's
    launch latency. ``wall ms``: the same calls timed the way ``benchmarks/attention_kernels.py``
    does (start event, call, end event, synchronise), which includes the host's launch gap (that
    script also goes through the registry and the custom op, which adds a little more).
  * GB/s: latent + k_rope bytes (read once) / kernel time; % of copy against the copy row.
  * max diff: max abs difference to the eager reference computed in fp32 from the same inputs;
    a variant counts only if it is finite and below ``--tol`` (1e-2 in bf16).

A variant that fails to compile or launch (e.g. too much shared memory) is listed with its error.
``--budget-s`` caps the whole run: variants not reached in time are listed as skipped.

    python benchmarks/mla_decode_sweep.py --out sweep.json                      # one H200: < 4 min
    TRITON_INTERPRET=1 python benchmarks/mla_decode_sweep.py --device cpu --tiny  # CPU: numerics only

The CPU run goes through Triton's interpreter (numpy; it cannot compute in bf16, so ``--tiny``
uses fp16 there) and only checks that every variant is correct; its times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from ascend_edit.kernels import reference
from ascend_edit.kernels.triton import mla_decode
from ascend_edit.kernels.triton.mla_decode import DecodeConfig

# Kernel configurations, most promising first (the budget may cut the tail). Each is compiled
# once per head count; split counts are runtime arguments and cost no extra compilation. Picked
# from ptxas reports for sm_90 made on a CPU machine (registers, spills, shared memory <= 227 KB,
# whether Triton emitted wgmma and cp.async pipelining); left out: variants over the shared-memory
# limit and those spilling heavily. Notes give shared memory / registers per thread (H=32).
KERNEL_CONFIGS: tuple[DecodeConfig, ...] = (
    # production before this sweep: mma.sync, q reloaded from shared memory per tile; 189 KB, 179 regs
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=3),
    # 32 heads padded to 64 rows: wgmma for both matmuls, 2-3 tiles in flight; 185 / 222 KB, 244 regs
    DecodeConfig(kernel="rows", block_t=32, block_m=64, pad_rows=True, num_warps=8, num_stages=3),
    DecodeConfig(kernel="rows", block_t=32, block_m=64, pad_rows=True, num_warps=8, num_stages=4),
    # swap-AB: scores by mma.sync (M=32), p @ latent by wgmma (M=512); 150 KB
    DecodeConfig(kernel="keys", block_t=32, block_m=32, num_warps=4, num_stages=4),
    DecodeConfig(kernel="keys", block_t=32, block_m=32, num_warps=8, num_stages=4),
    # 113 KB, 255 regs x 128 threads: two programs per SM, one tile in flight each
    DecodeConfig(kernel="keys", block_t=32, block_m=32, num_warps=4, num_stages=3),
    # swap-AB with 64-row tiles: wgmma for both, but only two stages fit (no load/compute overlap
    # inside a program: the next tile is fetched after this one is computed); 189 KB
    DecodeConfig(kernel="keys", block_t=64, block_m=32, num_warps=4, num_stages=2),
    DecodeConfig(kernel="keys", block_t=64, block_m=32, num_warps=8, num_stages=2),
    DecodeConfig(kernel="keys", block_t=64, block_m=32, v_split=2, num_warps=4, num_stages=2),
    # (The prefetch variants -- next tile fetched into registers during this one's softmax -- are not
    # swept: on the H200, 2026-12-02, they hit an illegal memory access that poisoned the CUDA context
    # for every later variant. The interpreter tests pass, so the fault is a GPU-only bug not yet found.)
    # rows variants: deeper pipelines, 16-row blocks (two programs per batch share tiles via L2)
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=8, num_stages=4),  # 150 KB, 176 regs
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=3),  # 113 KB: 2 per SM
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2),  # 115 KB: 2 per SM
    DecodeConfig(kernel="rows", block_t=32, block_m=16, num_warps=4, num_stages=4),  # 131 KB, 182 regs
    DecodeConfig(kernel="rows", block_t=64, block_m=16, num_warps=4, num_stages=3),  # 169 KB, 168 regs
    DecodeConfig(kernel="rows", block_t=64, block_m=64, pad_rows=True, num_warps=8, num_stages=2),  # 222 KB
    # for 128 heads (at 32 heads they shrink to an earlier entry and are skipped as duplicates)
    DecodeConfig(kernel="keys", block_t=32, block_m=64, num_warps=8, num_stages=4),  # 189 KB
    DecodeConfig(kernel="keys", block_t=64, block_m=64, num_warps=8, num_stages=2),  # 230 KB
)
SPLITS: tuple[int | None, ...] = (None, 4, 8, 16)  # None: the module's cost model
# --refine: around the shipped configuration (two programs per SM won the first sweep), smaller tiles
# that may let three share an SM, and split counts near 8.
REFINE_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.DEFAULT_CONFIG,
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=2, programs_per_sm=3),
    DecodeConfig(kernel="rows", block_t=16, block_m=32, num_warps=4, num_stages=4, programs_per_sm=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=3, programs_per_sm=1),
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=2, num_stages=3, programs_per_sm=2),
)
REFINE_SPLITS: tuple[int | None, ...] = (None, 8, 12, 16)


@dataclasses.dataclass
class Result:
    heads: int
    config: DecodeConfig
    label: str = ""  # the block sizes actually launched (a block shrinks for few heads)
    ms: float = math.nan  # kernel time (queue primed)
    wall_ms: float = math.nan  # per-call events incl. launch gaps, as in attention_kernels.py
    gbps: float = math.nan
    pct_copy: float = math.nan
    max_diff: float = math.nan
    ok: bool = False
    error: str = ""

    def row(self) -> str:
        def cell(value: float, spec: str) -> str:
            return format(value, spec) if math.isfinite(value) else "-"  # "-": not measured (CPU, failure)

        note = self.error or ("" if self.ok else "WRONG")
        return (f"| {self.heads} | {self.label} | {cell(self.ms, '.4f')} | {cell(self.wall_ms, '.4f')} | "
                f"{cell(self.gbps, '.0f')} | {cell(self.pct_copy, '.1f')} | {cell(self.max_diff, '.1e')} | {note} |")  # fmt: skip

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["config"] = dataclasses.asdict(self.config)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def config_call(config: DecodeConfig) -> str:
    """The constructor call to paste as ``DEFAULT_CONFIG`` (only the fields that differ from defaults)."""
    default = DecodeConfig()
    fields = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
              if getattr(config, f.name) != getattr(default, f.name) or f.name == "kernel"]  # fmt: skip
    return f"DecodeConfig({', '.join(fields)})"


_BUSY: list[torch.Tensor] = []


def _gpu_busy() -> None:
    """Queue ~0.5 ms of GPU work (a 1 GiB device copy at ~4 TB/s) so the start event fires only after
    the host has enqueued the timed call; public ops only (it also evicts L2, so the call starts cold)."""
    if not _BUSY:
        _BUSY.extend(torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(2))
    _BUSY[0].copy_(_BUSY[1])


def gpu_ms(fn: Callable[[], object], warmup: int, iters: int, primed: bool) -> float:
    """Median milliseconds of ``fn`` between CUDA events. ``primed``: queue ~0.5 ms of GPU work
    first so the host has enqueued the whole call before the start event fires."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if primed:  # ~0.5 ms of GPU work queued first: far more than the host needs to launch fn
            _gpu_busy()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written (as attention_kernels.py)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), warmup, iters, primed=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(b: int, heads: int, t: int, c: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Decode inputs: one new token per sequence at the end of a fully visible ``t``-token cache."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    k_pos = torch.arange(t, device=device).repeat(b, 1)
    return {
        "q_latent": torch.randn(b, heads, 1, c, generator=gen).to(device, dtype),
        "q_rope": torch.randn(b, heads, 1, r, generator=gen).to(device, dtype),
        "latent": torch.randn(b, t, c, generator=gen).to(device, dtype),
        "k_rope": torch.randn(b, t, r, generator=gen).to(device, dtype),
        "q_pos": k_pos[:, -1:].contiguous(),
        "k_pos": k_pos,
        "scale": 1.0 / math.sqrt(128 + r),  # DeepSeek-V3: scale of the qk_nope + qk_rope head dim
    }


def run_variant(
    inp: dict, expected: torch.Tensor, result: Result, args: argparse.Namespace, cache_bytes: int, copy_gbps: float
) -> Result:
    """Check ``result.config`` against ``expected`` and time it (CUDA); fills in and returns ``result``."""
    config = result.config
    args_ = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])

    def step() -> torch.Tensor:
        return mla_decode._launch(*args_, config=config)

    try:
        with torch.no_grad():
            out = step().float()
            result.max_diff = (out - expected).abs().max().item()
            result.ok = bool(torch.isfinite(out).all()) and result.max_diff < args.tol
            if inp["latent"].device.type == "cuda":
                result.ms = gpu_ms(step, args.warmup, args.iters, primed=True)
                result.wall_ms = gpu_ms(step, 2, args.iters, primed=False)
                result.gbps = cache_bytes / (result.ms * 1e-3) / 1e9
                result.pct_copy = 100 * result.gbps / copy_gbps
    except Exception as exc:  # compile/launch failures are results of the sweep, not crashes
        result.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    parser.add_argument("--heads", type=int, nargs="+", help="head counts (default 32 128; tiny: 3 20)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-2, help="max abs diff to the eager reference")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new variants after this")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--refine", action="store_true", help="only the configurations near the shipped one")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny with TRITON_INTERPRET=1)")
    if device.type == "cpu" and not args.tiny:
        parser.error("--device cpu runs Triton's interpreter: add --tiny")
    if not mla_decode.triton_available():
        parser.error("Triton is not installed (pip install 'ascend_edit[gpu]')")
    began = time.perf_counter()

    if args.tiny:  # c, r powers of two as in the real model; fp16: the interpreter has no bf16
        b, t, c, r, dtype, heads_list = 2, 150, 64, 16, torch.float16, args.heads or [3, 20]
        configs, splits = KERNEL_CONFIGS, (3,)  # 3 splits: uneven last split, partials combined
    else:
        b, t, c, r, dtype, heads_list = 32, 8192, 512, 64, torch.bfloat16, args.heads or [32, 128]
        configs, splits = (REFINE_CONFIGS, REFINE_SPLITS) if args.refine else (KERNEL_CONFIGS, SPLITS)
    variants = [dataclasses.replace(cfg, num_splits=n) for cfg in configs for n in splits]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    import triton  # noqa: PLC0415 - present: checked above

    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    copy_gbps = copy_bandwidth(device, 2 << 30, args.warmup, args.iters) if device.type == "cuda" else math.nan
    print(f"device copy: {copy_gbps:.0f} GB/s (read + write)" if device.type == "cuda" else "CPU: correctness only",
          flush=True)  # fmt: skip

    results: list[Result] = []
    for heads in heads_list:
        inp = make_inputs(b, heads, t, c, r, dtype, device)
        cache_bytes = sum(inp[n].numel() * inp[n].element_size() for n in ("latent", "k_rope"))
        fp32 = {n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in inp.items()}
        with torch.no_grad():
            expected = reference.mla_absorbed_attention(
                fp32["q_latent"], fp32["q_rope"], fp32["latent"], fp32["k_rope"],
                q_pos=inp["q_pos"], k_pos=inp["k_pos"], scale=inp["scale"],
            ).float()  # fmt: skip
        goal = f"; 70 % of copy = {cache_bytes / (0.7 * copy_gbps * 1e9) * 1e3:.4f} ms" if device.type == "cuda" else ""
        print(f"B={b} H={heads} ctx={t} c={c} r={r} {dtype}: cache {cache_bytes / 1e6:.1f} MB{goal}", flush=True)
        # The first head count (the goal row) may use 70 % of the budget, the others share the rest.
        index = heads_list.index(heads)
        share = 1.0 if len(heads_list) == 1 else 0.7 + 0.3 * index / (len(heads_list) - 1)
        deadline = args.budget_s * share
        seen: set[str] = set()
        for config in variants:
            effective = mla_decode.tuned_config(c, r, heads, config)  # the block actually launched
            if effective in seen:
                continue  # e.g. a 64-row block that shrinks to 32 rows for 32 heads
            seen.add(effective)
            if time.perf_counter() - began > deadline:
                results.append(Result(heads, config, effective, error="skipped: --budget-s reached"))
                continue
            res = run_variant(inp, expected, Result(heads, config, effective), args, cache_bytes, copy_gbps)
            results.append(res)
            print(res.row(), flush=True)
        del inp, expected, fp32
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "copy_gbps": copy_gbps,
            "shape": {"b": b, "t": t, "c": c, "r": r, "dtype": str(dtype)}}  # fmt: skip
    sys.exit(report(results, heads_list, copy_gbps, timed=device.type == "cuda", meta=meta, out=args.out))


def report(
    results: list[Result], heads_list: list[int], copy_gbps: float, *, timed: bool, meta: dict, out: str | None
) -> int:
    """Print the sorted table and the BEST line, write the JSON; the exit status (1: nothing correct)."""
    header = "| H | variant | kernel ms | wall ms | GB/s | % of copy | max diff | note |\n|---|---|---:|---:|---:|---:|---:|---|"
    print(f"\nAll variants, fastest first (device copy {copy_gbps:.0f} GB/s):\n{header}")
    order = sorted(results, key=lambda x: (x.heads, not x.ok, x.ms if math.isfinite(x.ms) else math.inf))
    for res in order:
        print(res.row())

    summary: dict[str, object] = {}
    for heads in heads_list:
        good = [x for x in results if x.heads == heads and x.ok]
        if not good:
            continue
        best = min(good, key=lambda x: x.ms) if timed else good[0]
        # Prefer the cost model's split count (it adapts to batch size and context length) when it
        # is within 3 % of the fastest fixed count: a fixed count would apply to every shape.
        auto = [x for x in good if x.config == dataclasses.replace(best.config, num_splits=None)]
        if auto and auto[0].ms <= 1.03 * best.ms:
            best = auto[0]
        summary[str(heads)] = best.to_json() | {"call": config_call(best.config)}
    if out:
        with open(out, "w") as handle:
            json.dump(meta | {"results": [x.to_json() for x in results], "best": summary}, handle, indent=1)
    wrong = [x for x in results if not x.ok and not x.error]
    if wrong:
        print(f"{len(wrong)} variant(s) gave wrong results: see the WRONG rows above")
    primary = summary.get(str(heads_list[0]))
    for heads in heads_list[1:]:  # what the production choice would cost at the other head counts
        if str(heads) in summary and timed:
            best = summary[str(heads)]
            print(
                f"best at H={heads}: {best['label']} {best['ms'] or 0:.4f} ms ({best['pct_copy'] or 0:.1f} % of copy)"
            )
        same = [x for x in results if x.heads == heads and primary and x.ok and x.label and
                dataclasses.asdict(x.config) == primary["config"]]  # fmt: skip
        if same and timed:
            print(f"H={heads_list[0]}'s best at H={heads}: {same[0].label} {same[0].ms:.4f} ms "
                  f"({same[0].pct_copy:.1f} % of copy)")  # fmt: skip
    if primary is None:
        print("BEST: none (no variant was correct)")
        return 1
    if not timed:
        ran = [x for x in results if not x.error]
        print(f"BEST: n/a on CPU (correctness only): {sum(x.ok for x in ran)}/{len(ran)} variants correct")
        return 0 if all(x.ok for x in ran) else 1
    print(f"BEST: H={heads_list[0]} {primary['label']}: {primary['ms'] or 0:.4f} ms kernel / "
          f"{primary['wall_ms'] or 0:.4f} ms wall, {primary['pct_copy'] or 0:.1f} % of copy, "
          f"max diff {primary['max_diff']:.1e} -> DEFAULT_CONFIG = {primary['call']}")  # fmt: skip
    if primary["config"]["num_splits"] is not None:
        print("note: the best uses a fixed split count; as DEFAULT_CONFIG it applies to every batch size and "
              "context (the cost model, num_splits=None, adapts)")  # fmt: skip
    return 0


if __name__ == "__main__":
    main()
