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
``--budget-s`` caps the whole run: variants not reached in time are listed as skipped. ``--set``
picks the candidate list (``full``, ``refine`` = ``--refine``, ``pipeline``: TMA loads, register
caps; ``gluon``: the Hopper Gluon split pass against the Triton one). ``--isolate`` runs each configuration after the first in its own process
(after compiling all of them in parallel processes), so a fault that poisons the CUDA context --
an illegal memory access -- costs only that configuration's rows. The last lines printed are a
short table of the fastest correct variants.

    python benchmarks/mla_decode_sweep.py --out sweep.json                      # one H200: < 4 min
    python benchmarks/mla_decode_sweep.py --set pipeline --isolate --heads 32 --budget-s 180 --out p.json
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
from typing import Any

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
    # rows variants: deeper pipelines, 16-row blocks (two programs per batch share tiles via L2)
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=8, num_stages=4),  # 150 KB, 176 regs
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=3),  # 113 KB: 2 per SM
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2),  # 115 KB: 2 per SM
    DecodeConfig(kernel="rows", block_t=32, block_m=16, num_warps=4, num_stages=4),  # 131 KB, 182 regs
    DecodeConfig(kernel="rows", block_t=64, block_m=16, num_warps=4, num_stages=3),  # 169 KB, 168 regs
    DecodeConfig(kernel="rows", block_t=64, block_m=64, pad_rows=True, num_warps=8, num_stages=2),  # 222 KB
)
SPLITS: tuple[int | None, ...] = (None, 4, 8, 16)  # None: the module's cost model
# --refine: around the shipped configuration (two programs per SM won the first sweep), smaller tiles
# that may let three share an SM, and split counts near 8.
REFINE_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=2, programs_per_sm=3),
    DecodeConfig(kernel="rows", block_t=16, block_m=32, num_warps=4, num_stages=4, programs_per_sm=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=3, programs_per_sm=1),
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=2, num_stages=3, programs_per_sm=2),
)
REFINE_SPLITS: tuple[int | None, ...] = (None, 8, 12, 16)
# --set pipeline: attacks on the ~40 us between the shipped 0.114 ms and the copy floor (0.071 ms).
# The shipped kernel holds one 64-row tile per program (one shared-memory buffer at 2 stages), spends
# its 128 threads on 76 cp.async address computations per tile, and its mma.sync layout (warps side
# by side on the key axis) re-reads the whole 32 KB query block from shared memory in every warp for
# every tile; a second launch merges the splits. Candidates: TMA bulk copies (no per-thread address
# work; the pipeliner waits on mbarriers), more tiles in flight per SM (smaller tiles with more
# stages at two programs per SM, or 8 warps capped at 128 registers so two fit). (The swap-AB "keys"
# kernel and the fused combine this set also timed were removed on 2026-12-04; docs/benchmarks.md.)
# Notes: ptxas for sm_90 on a CPU (bf16, H=32): shared memory / registers / stack bytes; "2/SM" where two
# programs fit in 228 KB and 64K registers. Ordered by promise: --budget-s cuts the tail.
PIPELINE_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,  # the baseline, measured in the same run: 112.5 KB, 255 regs, 0 stack; 2/SM
    # TMA, same tiles as the baseline: 112.5 KB, 255 regs, 856 B stack; 2/SM
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, programs_per_sm=2, tma=True),
    # TMA, 32-row tiles, two in flight: 110.5 KB, 255 regs, 232 B stack; 2/SM
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=3, programs_per_sm=2, tma=True),
    # 8 warps capped at 128 registers (two programs per SM): 112.5 / 110.5 KB, 504 / 360 B stack
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=2, programs_per_sm=2, tma=True,
                 maxnreg=128),  # fmt: skip
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=8, num_stages=3, programs_per_sm=2, tma=True,
                 maxnreg=128),  # fmt: skip
    # 16-row tiles, four in flight: 109.6 KB, 255 regs, 96 B stack; 2/SM
    DecodeConfig(kernel="rows", block_t=16, block_m=32, num_warps=4, num_stages=5, programs_per_sm=2, tma=True),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=2, programs_per_sm=2, maxnreg=128),
    # one program per SM, deeper: 185 / 146.8 KB
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=3, tma=True),
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=8, num_stages=4, tma=True),
)
# 16 splits would compile every kernel twice (a count divisible by 16 is a separate specialisation)
PIPELINE_SPLITS: tuple[int | None, ...] = (None, 4, 8, 12)
# --set lazy: the accumulator rescaled only when a row's running max grows by more than 2^8 (a [32, 512]
# fp32 multiply per tile in every program otherwise), on the shipped tiling and two neighbours.
LAZY_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,
    dataclasses.replace(mla_decode.ROWS_CONFIG, lazy_rescale=True),
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=3, programs_per_sm=2, lazy_rescale=True),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=3, lazy_rescale=True),
)
LAZY_SPLITS: tuple[int | None, ...] = (None, 8)
# --set pdl: the combine launched as a programmatic dependent launch of the split pass (queued while it runs)
PDL_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,
    dataclasses.replace(mla_decode.ROWS_CONFIG, pdl=True),
    dataclasses.replace(mla_decode.ROWS_CONFIG, pdl=True, lazy_rescale=True),
)
PDL_SPLITS: tuple[int | None, ...] = (8, 12, 16)
# --set merge: warps per program of the combine kernel (one program per query row and batch element)
MERGE_CONFIGS: tuple[DecodeConfig, ...] = tuple(
    dataclasses.replace(mla_decode.ROWS_CONFIG, merge_warps=w, pdl=pdl) for w in (4, 1, 2, 8) for pdl in (False, True))
# --set loop: every load of the key loop pipelined (k_pos too), and the cache streamed past L2. Written in
# session 11 after its device time ran out: numerics checked on the CPU interpreter only, not yet timed.
LOOP_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,
    dataclasses.replace(mla_decode.ROWS_CONFIG, pipeline_all=True),
    dataclasses.replace(mla_decode.ROWS_CONFIG, evict_first=True),
    dataclasses.replace(mla_decode.ROWS_CONFIG, pipeline_all=True, evict_first=True),
)
# --set gluon: the Hopper Gluon split pass (kernels/triton/mla_decode_gluon.py: a TMA loader warp feeding one
# wgmma warpgroup, swap-AB) against the shipped Triton configuration. One program per SM (192 KB at 2 slots).
GLUON_CONFIGS: tuple[DecodeConfig, ...] = (
    mla_decode.ROWS_CONFIG,
    DecodeConfig(kernel="gluon", block_t=64, block_m=32, num_warps=4, num_stages=2, merge_warps=2),
    DecodeConfig(kernel="gluon", block_t=64, block_m=32, num_warps=4, num_stages=1, merge_warps=2),
)
CONFIG_SETS = {"full": (KERNEL_CONFIGS, SPLITS), "refine": (REFINE_CONFIGS, REFINE_SPLITS),
               "pipeline": (PIPELINE_CONFIGS, PIPELINE_SPLITS), "lazy": (LAZY_CONFIGS, LAZY_SPLITS),
               "pdl": (PDL_CONFIGS, PDL_SPLITS), "merge": (MERGE_CONFIGS, (None, 8)),
               "loop": (LOOP_CONFIGS, (None, 8)), "gluon": (GLUON_CONFIGS, (None, 4, 5, 8))}  # fmt: skip


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
    """Decode inputs: one new token per sequence at the end of a fully visible ``t``-token cache.
    Drawn on ``device`` (seeded, so isolated child processes see the same values): 150 M draws on
    the host would cost each child seconds."""
    gen = torch.Generator(device=device).manual_seed(0)
    k_pos = torch.arange(t, device=device).repeat(b, 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return {
        "q_latent": randn(b, heads, 1, c),
        "q_rope": randn(b, heads, 1, r),
        "latent": randn(b, t, c),
        "k_rope": randn(b, t, r),
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    parser.add_argument("--heads", type=int, nargs="+", help="head counts (default 32 128; tiny: 3 20)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-2, help="max abs diff to the eager reference")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new variants after this")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--set", choices=sorted(CONFIG_SETS), default="full", help="which candidate list to sweep")
    parser.add_argument("--refine", action="store_true", help="same as --set refine")
    parser.add_argument("--isolate", action="store_true",
                        help="run every configuration after the first in its own process, so one that faults "
                             "(an illegal memory access poisons the CUDA context) loses only its own rows")  # fmt: skip
    # internal: one isolated configuration (--isolate starts these)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-splits", help=argparse.SUPPRESS)
    parser.add_argument("--copy-gbps", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def _config_json(config: DecodeConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def _result_from_json(data: dict) -> Result:
    fields: dict[str, Any] = {k: (math.nan if v is None and k in ("ms", "wall_ms", "gbps", "pct_copy", "max_diff")
                                  else v) for k, v in data.items() if k != "config"}  # fmt: skip
    return Result(config=DecodeConfig(**data["config"]), **fields)


def _child_cmd(config: DecodeConfig, splits: tuple[int | None, ...], heads: int, args: argparse.Namespace,
               copy_gbps: float, out: str) -> list[str]:  # fmt: skip
    return [sys.executable, __file__, "--device", args.device, "--heads", str(heads), "--iters", str(args.iters),
            "--warmup", str(args.warmup), "--tol", str(args.tol), "--out", out, "--copy-gbps", str(copy_gbps),
            "--child-config", _config_json(config), "--child-splits", json.dumps(list(splits)),
            *(["--tiny"] if args.tiny else [])]  # fmt: skip


def precompile(jobs: list[tuple[DecodeConfig, tuple[int | None, ...], int]], args: argparse.Namespace,
               timeout_s: float) -> None:  # fmt: skip
    """Compile the isolated configurations in parallel child processes (one launch per split count
    fills Triton's on-disk cache), so the timed children, run one at a time, do not compile. A child
    that faults here costs nothing: its timed run reports the error."""
    import subprocess  # noqa: PLC0415 - only the isolating parent needs it

    began = time.perf_counter()
    procs = [subprocess.Popen([*_child_cmd(cfg, splits, heads, args, math.nan, "/dev/null"), "--compile-only"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cfg, splits, heads in jobs]  # fmt: skip
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - began)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"precompiled {len(jobs)} isolated configuration(s) in {time.perf_counter() - began:.0f} s", flush=True)


def run_isolated(config: DecodeConfig, splits: tuple[int | None, ...], heads: int, args: argparse.Namespace,
                 copy_gbps: float, timeout_s: float) -> list[Result]:  # fmt: skip
    """Time ``config`` at every split count in a child process; a crash there becomes an error row."""
    import subprocess  # noqa: PLC0415 - only the isolating parent needs it
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="mla_sweep_") as tmp:
        out = f"{tmp}/child.json"
        cmd = _child_cmd(config, splits, heads, args, copy_gbps, out)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            error = "" if proc.returncode == 0 else f"child rc={proc.returncode}: " + (
                (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:160])  # fmt: skip
        except subprocess.TimeoutExpired:
            error = f"child timed out after {timeout_s:.0f} s"
        try:
            with open(out) as handle:
                return [_result_from_json(x) for x in json.load(handle)]
        except (OSError, ValueError):
            first = dataclasses.replace(config, num_splits=splits[0])
            label = first.label()
            return [Result(heads, first, label, error=error or "child wrote no results")]


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.refine:
        args.set = "refine"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny with TRITON_INTERPRET=1)")
    if device.type == "cpu" and not args.tiny:
        parser.error("--device cpu runs Triton's interpreter: add --tiny")
    if not mla_decode.triton_available():
        parser.error("Triton is not installed (pip install 'ascend_edit[gpu]')")
    began = time.perf_counter()

    splits: tuple[int | None, ...]
    if args.tiny:  # c, r powers of two as in the real model; fp16: the interpreter has no bf16
        b, t, c, r, dtype, heads_list = 2, 150, 64, 16, torch.float16, args.heads or [3, 20]
        configs, splits = CONFIG_SETS[args.set][0], (3,)  # 3 splits: uneven last split, partials combined
    else:
        b, t, c, r, dtype, heads_list = 32, 8192, 512, 64, torch.bfloat16, args.heads or [32, 128]
        configs, splits = CONFIG_SETS[args.set]
    if args.child_config:  # one configuration, for an isolating parent: results as a JSON list
        configs, splits = (DecodeConfig(**json.loads(args.child_config)),), tuple(json.loads(args.child_splits))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    import triton  # noqa: PLC0415 - present: checked above

    if args.compile_only:  # fill Triton's disk cache for a later timed run of the same variants
        inp = make_inputs(b, heads_list[0], t, c, r, dtype, device)
        call = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])
        for n in splits:
            with torch.no_grad():
                mla_decode._launch(*call, config=dataclasses.replace(configs[0], num_splits=n))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return
    if args.child_config:
        copy_gbps = args.copy_gbps if args.copy_gbps is not None else math.nan
    else:
        if args.isolate and len(configs) > 1 and device.type == "cuda":  # the first one too: cached for it
            precompile([(cfg, splits, heads) for heads in heads_list for cfg in configs], args,
                       timeout_s=min(120.0, 0.5 * args.budget_s))  # fmt: skip
        print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
        copy_gbps = copy_bandwidth(device, 2 << 30, args.warmup, args.iters) if device.type == "cuda" else math.nan
        print(f"device copy: {copy_gbps:.0f} GB/s (read + write)" if device.type == "cuda" else
              "CPU: correctness only", flush=True)  # fmt: skip

    results: list[Result] = []
    for heads in heads_list:
        # The first head count (the goal row) may use 70 % of the budget, the others share the rest.
        index = heads_list.index(heads)
        share = 1.0 if len(heads_list) == 1 else 0.7 + 0.3 * index / (len(heads_list) - 1)
        deadline = args.budget_s * share
        in_process = configs if not args.isolate else configs[:1]
        inp = make_inputs(b, heads, t, c, r, dtype, device)
        cache_bytes = sum(inp[n].numel() * inp[n].element_size() for n in ("latent", "k_rope"))
        fp32 = {n: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in inp.items()}
        with torch.no_grad():
            expected = reference.mla_absorbed_attention(
                fp32["q_latent"], fp32["q_rope"], fp32["latent"], fp32["k_rope"],
                q_pos=inp["q_pos"], k_pos=inp["k_pos"], scale=inp["scale"],
            ).float()  # fmt: skip
        del fp32
        if not args.child_config:
            goal = f"; 70 % of copy = {cache_bytes / (0.7 * copy_gbps * 1e9) * 1e3:.4f} ms" if device.type == "cuda" else ""
            print(f"B={b} H={heads} ctx={t} c={c} r={r} {dtype}: cache {cache_bytes / 1e6:.1f} MB{goal}", flush=True)
        seen: set[str] = set()
        for config in configs:
            variants = [dataclasses.replace(config, num_splits=n) for n in splits]
            fresh = []
            for variant in variants:
                effective = mla_decode.tuned_config(c, r, heads, variant)  # the block actually launched
                if effective not in seen:  # e.g. a 64-row block that shrinks to 32 rows for 32 heads
                    seen.add(effective)
                    fresh.append((variant, effective))
            if not fresh:
                continue
            left = deadline - (time.perf_counter() - began)
            if left <= 0:
                results.extend(Result(heads, v, e, error="skipped: --budget-s reached") for v, e in fresh)
                continue
            if config in in_process:
                batch = []
                for variant, effective in fresh:
                    batch.append(run_variant(inp, expected, Result(heads, variant, effective), args, cache_bytes,
                                             copy_gbps))  # fmt: skip
                    if args.child_config and args.out:  # written as it goes: a later fault keeps these rows
                        with open(args.out, "w") as handle:
                            json.dump([x.to_json() for x in results + batch], handle)
            else:
                batch = run_isolated(config, tuple(v.num_splits for v, _ in fresh), heads, args, copy_gbps,
                                     timeout_s=min(60.0, left + 20.0))  # fmt: skip
            results.extend(batch)
            if not args.child_config:
                for res in batch:
                    print(res.row(), flush=True)
        del inp, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.child_config:
        if args.out:
            with open(args.out, "w") as handle:
                json.dump([x.to_json() for x in results], handle)
        return
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "copy_gbps": copy_gbps,
            "set": args.set, "shape": {"b": b, "t": t, "c": c, "r": r, "dtype": str(dtype)}}  # fmt: skip
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

    summary: dict[str, dict[str, Any]] = {}
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
            other = summary[str(heads)]
            print(
                f"best at H={heads}: {other['label']} {other['ms'] or 0:.4f} ms ({other['pct_copy'] or 0:.1f} % of copy)"
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
        ran = [x for x in results if not x.error.startswith("skipped")]  # failures count as not correct
        print(f"BEST: n/a on CPU (correctness only): {sum(x.ok for x in ran)}/{len(ran)} variants correct")
        return 0 if all(x.ok for x in ran) else 1
    print(f"BEST: H={heads_list[0]} {primary['label']}: {primary['ms'] or 0:.4f} ms kernel / "
          f"{primary['wall_ms'] or 0:.4f} ms wall, {primary['pct_copy'] or 0:.1f} % of copy, "
          f"max diff {primary['max_diff']:.1e} -> DEFAULT_CONFIG = {primary['call']}")  # fmt: skip
    if primary["config"]["num_splits"] is not None:
        print("note: the best uses a fixed split count; as DEFAULT_CONFIG it applies to every batch size and "
              "context (the cost model, num_splits=None, adapts)")  # fmt: skip
    print_short_table(results, heads_list[0], copy_gbps)
    return 0


def print_short_table(results: list[Result], heads: int, copy_gbps: float, top: int = 10) -> None:
    """The last lines of the run: the fastest correct variants at the goal's head count."""
    good = sorted((x for x in results if x.heads == heads and x.ok and math.isfinite(x.ms)), key=lambda x: x.ms)
    failed = [x for x in results if x.heads == heads and not x.ok]
    print(f"\nTop {min(top, len(good))} at H={heads} (copy {copy_gbps:.0f} GB/s; goal 70 % of copy; "
          f"{len(failed)} variant(s) failed, wrong or skipped: see above)")  # fmt: skip
    print("| kernel ms | % of copy | variant |\n|---:|---:|---|")
    for res in good[:top]:
        print(f"| {res.ms:.4f} | {res.pct_copy:.1f} | {res.label} |")


if __name__ == "__main__":
    main()
