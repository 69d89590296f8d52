"""Sweep: tile configs of the Triton sliding-window kernel against flex_attention (issue 14 GPU goal).

Target shape: B=1, H=32, D=128, S=8192, window 1024, 4 sink tokens, bf16, forward + backward; goal
Triton >= 1.3x flex_attention's throughput. One process measures, in order:

1. baselines: flex_attention (``kernels/flex.py``, compiled, block mask with the sinks), SDPA with a
   dense mask and SDPA full causal (flash; the rate a window kernel could reach);
2. every kernel config on its own -- forward, dQ, dK/dV (``KernelConfig`` in
   ``kernels/triton/sliding_window.py``) -- timed and checked against the baseline's output / grads;
3. whole variants forward + backward through autograd: the production default, the fastest
   correct config of each kernel put together, and the fastest one without TMA loads.

Timing: median of ``--iters`` calls after ``--warmup``, CUDA events (``attention_kernels.median_ms``).
Rates: effective TFLOP/s with ``benchmarks/attention_kernels.py``'s definition (visible pairs P,
forward + backward = 3.5 x 4*P*D*H). Correctness: max abs diff against flex (GPU) or the eager
fp32 reference (CPU), "ok" when every element is within bf16 test tolerance (2e-2 abs + 2e-2 rel),
the tolerance of ``tests/kernels/test_triton_sliding_window.py``; SDPA's own diff to flex is printed
as the yardstick. Configs that fail to compile (e.g. shared memory) are listed as failed, not fatal.
The last line is ``BEST: ...``; ``--out`` gets everything as JSON (rewritten after each phase).
While flex compiles, ``--jobs`` worker processes compile the kernel configs into Triton's on-disk
cache (they share the GPU, so every timing starts after they finish); ``--time-limit`` skips the
configs left when it runs out, so one call stays bounded.

    python benchmarks/swa_sweep.py --out $OUT/swa_sweep.json                    # CUDA, ~2 min
    TRITON_INTERPRET=1 python benchmarks/swa_sweep.py --device cpu --tiny       # CPU, correctness only
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from ascend_edit.kernels import reference, sdpa
from ascend_edit.kernels.triton import sliding_window as sw
from attention_kernels import median_ms, visible_pairs  # same directory: timing and FLOP definitions

KC = sw.KernelConfig

# GPU configs (block_m, block_n, warps, stages[, tma]). Hopper: wgmma takes 64 rows per warpgroup on
# the left operand (query rows in fwd / dQ, key rows in dK/dV); 228 KB shared memory per SM bounds
# tiles x stages (the largest ones may fail to compile and are then listed as failed).
O = {"one_loop": True}  # most configs: edges and interior in one pipelined loop (fewer registers, see sw)
T = {"tma": True, "one_loop": True}
GPU_FWD = [KC(128, 64, 8, 3), KC(128, 64, 8, 3, tma=True), KC(128, 128, 8, 2, tma=True),
           KC(128, 64, 8, 2, **O), KC(128, 64, 8, 3, **O), KC(128, 64, 8, 4, **O), KC(128, 128, 8, 2, **O),
           KC(128, 128, 8, 3, **O), KC(64, 64, 4, 3, **O),
           KC(128, 64, 8, 3, **T), KC(128, 64, 8, 4, **T), KC(128, 128, 8, 2, **T), KC(128, 128, 8, 3, **T)]
GPU_DQ = [KC(128, 64, 8, 3), KC(128, 64, 8, 3, tma=True),
          KC(128, 64, 8, 2, **O), KC(128, 64, 8, 3, **O), KC(128, 32, 8, 3, **O), KC(128, 128, 8, 2, **O),
          KC(64, 64, 4, 3, **O),
          KC(128, 64, 8, 2, **T), KC(128, 64, 8, 3, **T), KC(128, 32, 8, 3, **T), KC(128, 32, 8, 4, **T)]
GPU_DKDV = [KC(64, 128, 8, 2), KC(64, 128, 8, 2, tma=True),
            KC(64, 128, 8, 2, **O), KC(64, 128, 8, 3, **O), KC(32, 128, 8, 3, **O), KC(32, 128, 8, 4, **O),
            KC(64, 64, 4, 3, **O),
            KC(64, 128, 8, 2, **T), KC(64, 128, 8, 3, **T), KC(32, 128, 8, 3, **T),
            # dQ in the same kernel through atomics (then no dQ kernel runs; compared with dq + dkdv)
            KC(64, 128, 8, 2, atomic_dq=True, **O), KC(32, 128, 8, 3, atomic_dq=True, **O),
            KC(64, 128, 8, 2, atomic_dq=True, **T), KC(32, 128, 8, 3, atomic_dq=True, **T)]
# CPU interpreter: small tiles so every loop of the kernels runs several times on the tiny shape.
TINY_FWD = [KC(32, 16, 4, 2), KC(32, 64, 4, 2, True), KC(32, 16, 4, 2, one_loop=True)]
TINY_DQ = [KC(32, 16, 4, 2), KC(64, 32, 4, 2, True, one_loop=True)]
TINY_DKDV = [KC(16, 32, 4, 2), KC(32, 64, 4, 2, True), KC(16, 32, 4, 2, atomic_dq=True)]

TOL = {"atol": 2e-2, "rtol": 2e-2}


def kernel_inputs(sizes: dict[str, int], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """q, k, v, dO and the forward's out / lse / delta (default forward) for one-kernel runs."""
    h, s, d = sizes["heads"], sizes["seq"], sizes["head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, h, s, d, generator=gen).to(device, dtype) for _ in range(4))
    w, sinks, scale = sizes["window"], sizes["sinks"], 1.0 / math.sqrt(d)
    out, lse = sw.launch_forward(q, k, v, w, sinks, scale, sw.DEFAULT_VARIANT.fwd)
    return {"q": q, "k": k, "v": v, "do": do, "lse": lse, "delta": sw.launch_delta(out, do), "window": w,
            "sinks": sinks, "scale": scale}  # fmt: skip


def run_kernel(kind: str, cfg: sw.KernelConfig, x: dict[str, Any]) -> tuple[torch.Tensor | None, ...]:
    """One launch of one kernel: (out,) / (dq,) / (dk, dv, dq or None)."""
    q, k, v, w, sinks, scale = x["q"], x["k"], x["v"], x["window"], x["sinks"], x["scale"]
    if kind == "fwd":
        return sw.launch_forward(q, k, v, w, sinks, scale, cfg)[:1]
    if kind == "dq":
        return (sw.launch_dq(q, k, v, x["do"], x["lse"], x["delta"], w, sinks, scale, cfg),)
    return sw.launch_dkdv(q, k, v, x["do"], x["lse"], x["delta"], w, sinks, scale, cfg)


def precompile(job: tuple[list[tuple[str, sw.KernelConfig]], dict[str, int], str]) -> int:
    """Worker process: launch each config once so Triton's on-disk cache holds its binary; the main
    process then loads instead of compiling (compiling ~40 configs one by one would take minutes)."""
    todo, sizes, device = job
    x = kernel_inputs(sizes, torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    done = 0
    for kind, cfg in todo:
        try:
            run_kernel(kind, cfg, x)
            done += 1
        except Exception:  # noqa: BLE001 - the main process runs it again and records the error
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, bool]:
    """(max abs diff, within the bf16 tolerance everywhere)."""
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    ok = bool(torch.isfinite(got).all() and (diff <= TOL["atol"] + TOL["rtol"] * want.abs()).all())
    return diff.max().item(), ok


class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.results: dict[str, Any] = {"baselines": [], "kernels": {"fwd": [], "dq": [], "dkdv": []},
                                        "variants": []}  # fmt: skip
        self.started = time.monotonic()
        b, h, s, d = 1, args.heads, args.seq, args.head_dim
        self.shape = (b, h, s, d)
        self.window, self.sinks = args.window, args.sinks
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.q, self.k, self.v = (torch.randn(b, h, s, d, generator=gen).to(self.device, self.dtype).requires_grad_()
                                  for _ in range(3))  # fmt: skip
        self.grad_out = torch.randn(b, h, s, d, generator=gen).to(self.device, self.dtype)
        self.pos = torch.arange(s, device=self.device)[None]
        self.scale = 1.0 / math.sqrt(d)
        self.pairs = visible_pairs(s, self.window, self.sinks) * b * h
        self.flex_ms: float | None = None
        self.ref: dict[str, torch.Tensor] = {}
        self.ref_name = ""

    # -- helpers ---------------------------------------------------------------------------------

    def time_ms(self, fn: Callable[[], object]) -> float:
        return median_ms(fn, self.args.warmup, self.args.iters)

    def fwd_bwd(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = forward()
        grads = torch.autograd.grad(out, (self.q, self.k, self.v), self.grad_out)
        return out.detach(), grads

    def step(self, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: torch.autograd.grad(forward(), (self.q, self.k, self.v), self.grad_out)

    def tflops(self, ms: float) -> float:
        return 3.5 * 4 * self.pairs * self.shape[3] / (ms * 1e-3) / 1e12

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.args.time_limit

    def save(self) -> None:
        if self.args.out:
            with open(self.args.out, "w") as handle:
                json.dump(self.results, handle, indent=1)

    def swa_kwargs(self) -> dict[str, Any]:
        return {"q_pos": self.pos, "k_pos": self.pos, "window": self.window, "sink_tokens": self.sinks,
                "scale": self.scale}  # fmt: skip

    # -- phase 1 ---------------------------------------------------------------------------------

    def baselines(self, before_timing: Callable[[], None] = lambda: None) -> None:
        """Outputs (and compiles) first, then ``before_timing`` (waits for the compile workers, which
        share the GPU), then the timings."""
        q, k, v = self.q, self.k, self.v
        candidates: dict[str, Callable[[], torch.Tensor]] = {}
        if self.device.type == "cuda":
            from ascend_edit.kernels import flex

            candidates["flex"] = lambda: flex.sliding_window_attention(q, k, v, **self.swa_kwargs())
        else:  # flex has no CPU backward: the eager fp32 reference is the ground truth here
            candidates["eager reference"] = lambda: reference.sliding_window_attention(q, k, v, **self.swa_kwargs())
        candidates["sdpa dense mask"] = lambda: sdpa.sliding_window_attention(q, k, v, **self.swa_kwargs())
        rows: dict[str, dict[str, Any]] = {}
        for name, forward in candidates.items():
            rows[name] = row = {"name": name}
            try:
                out, grads = self.fwd_bwd(forward)
                if not self.ref:
                    self.ref = dict(zip(("out", "dq", "dk", "dv"), (out, *grads)))
                    self.ref_name = name
                else:
                    row.update(self.check({"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}))
            except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, the sweep goes on
                row["error"] = error_line(exc)
        before_timing()
        for name, forward in candidates.items():
            row = rows[name]
            if "error" not in row:
                try:
                    row["ms"] = self.time_ms(self.step(forward))
                    row["tflops"] = self.tflops(row["ms"])
                    if name == "flex":
                        self.flex_ms = row["ms"]
                except Exception as exc:  # noqa: BLE001
                    row["error"] = error_line(exc)
            self.results["baselines"].append(row)
            self.save()
        if self.device.type == "cuda":  # the rate a window kernel could reach, measured on full causal
            ms = self.time_ms(self.step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               scale=self.scale)))  # fmt: skip
            s, b, h = self.shape[2], self.shape[0], self.shape[1]
            causal = 3.5 * 4 * visible_pairs(s, 0) * b * h * self.shape[3] / (ms * 1e-3) / 1e12
            self.results["baselines"].append({"name": "sdpa full causal (flash)", "ms": ms, "tflops": causal})
        self.save()

    def check(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        diffs = {}
        ok = True
        for name, got in tensors.items():
            diff, good = compare(got, self.ref[name])
            diffs[f"diff_{name}"] = diff
            ok &= good
        return {**diffs, "ok": ok}

    # -- phase 2 ---------------------------------------------------------------------------------

    def kernels(self) -> None:
        x = {"q": self.q.detach(), "k": self.k.detach(), "v": self.v.detach(), "do": self.grad_out.contiguous(),
             "window": self.window, "sinks": self.sinks, "scale": self.scale}  # fmt: skip
        out, x["lse"] = sw.launch_forward(x["q"], x["k"], x["v"], self.window, self.sinks, self.scale,
                                          sw.DEFAULT_VARIANT.fwd)  # fmt: skip
        x["delta"] = sw.launch_delta(out, x["do"])
        self.results["delta_ms"] = self.time_ms(lambda: sw.launch_delta(out, x["do"]))
        names = {"fwd": ("out",), "dq": ("dq",), "dkdv": ("dk", "dv", "dq")}  # dkdv's dq: only with atomic_dq
        for kind, configs in (("fwd", self.args.fwd), ("dq", self.args.dq), ("dkdv", self.args.dkdv)):
            for cfg in configs:
                row: dict[str, Any] = {"config": asdict(cfg), "label": cfg.label()}
                if self.out_of_time():
                    row["error"] = "skipped: --time-limit reached"
                else:
                    try:
                        got = run_kernel(kind, cfg, x)
                        row.update(self.check({n: t for n, t in zip(names[kind], got) if t is not None}))
                        row["ms"] = self.time_ms(lambda kind=kind, cfg=cfg: run_kernel(kind, cfg, x))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: listed, not fatal
                        row["error"] = error_line(exc)
                self.results["kernels"][kind].append(row)
                self.save()

    def fastest(self, kind: str, tma: bool | None = None, atomic: bool = False) -> tuple[sw.KernelConfig, float] | None:
        """The fastest correct config of one kernel (and its ms), optionally restricted in TMA use."""
        rows = [r for r in self.results["kernels"][kind] if r.get("ok") and "ms" in r
                and (tma is None or r["config"]["tma"] == tma) and r["config"]["atomic_dq"] == atomic]  # fmt: skip
        if not rows:
            return None
        best = min(rows, key=lambda r: r["ms"])
        return KC(**best["config"]), best["ms"]

    def fastest_variant(self, tma: bool | None) -> sw.Variant | None:
        """Fastest forward plus the faster backward: dQ kernel + dK/dV kernel, or dK/dV with atomic dQ."""
        fwd, dq, dkdv = self.fastest("fwd", tma), self.fastest("dq", tma), self.fastest("dkdv", tma)
        fused = self.fastest("dkdv", tma, atomic=True)
        if fwd is None:
            return None
        if dq and dkdv and (fused is None or dq[1] + dkdv[1] <= fused[1]):
            return sw.Variant(fwd[0], dq[0], dkdv[0])
        if fused:
            return sw.Variant(fwd[0], sw.DEFAULT_VARIANT.dq, fused[0])
        return None

    # -- phase 3 ---------------------------------------------------------------------------------

    def variants(self) -> None:
        named = {"default": sw.DEFAULT_VARIANT}
        for name, tma in (("fastest per kernel", None), ("fastest per kernel, no TMA", False)):
            variant = self.fastest_variant(tma)
            if variant is not None and variant not in named.values():
                named[name] = variant
        # the plain two-kernel backward too, when atomics won above (a deterministic alternative)
        fwd, dq, dkdv = self.fastest("fwd"), self.fastest("dq"), self.fastest("dkdv")
        if fwd and dq and dkdv and sw.Variant(fwd[0], dq[0], dkdv[0]) not in named.values():
            named["fastest per kernel, dQ kernel"] = sw.Variant(fwd[0], dq[0], dkdv[0])
        for name, variant in named.items():
            row: dict[str, Any] = {"name": name, "label": variant.label(), "variant": asdict(variant)}

            def forward(variant: sw.Variant = variant) -> torch.Tensor:
                return sw.attention(self.q, self.k, self.v, window=self.window, sink_tokens=self.sinks,
                                    scale=self.scale, variant=variant)  # fmt: skip

            try:
                out, grads = self.fwd_bwd(forward)
                row.update(self.check({"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}))
                row["ms"] = self.time_ms(self.step(forward))
                row["tflops"] = self.tflops(row["ms"])
                if self.flex_ms:
                    row["x_flex"] = self.flex_ms / row["ms"]
            except Exception as exc:  # noqa: BLE001
                row["error"] = error_line(exc)
            self.results["variants"].append(row)
            self.save()

    # -- report ----------------------------------------------------------------------------------

    def report(self) -> None:
        b, h, s, d = self.shape
        print(f"\nSWA fwd+bwd B={b} H={h} S={s} D={d} W={self.window} sinks={self.sinks} {self.dtype}; "
              f"reference for diffs: {self.ref_name}")  # fmt: skip
        print("\n| baseline | ms | eff. TFLOP/s | max abs diff out/dq/dk/dv |\n|---|---:|---:|---|")
        for r in self.results["baselines"]:
            print(f"| {r['name']} | {fmt(r.get('ms'))} | {fmt(r.get('tflops'), 1)} | {diffs(r)} |")
        print(f"\ndelta preprocess: {fmt(self.results.get('delta_ms'))} ms")
        for kind in ("fwd", "dq", "dkdv"):
            print(f"\n| {kind} config | ms | max abs diff | ok |\n|---|---:|---|---|")
            for r in self.results["kernels"][kind]:
                print(f"| {r['label']} | {fmt(r.get('ms'))} | {diffs(r)} | {r.get('ok', '')} |")
        print("\n| variant | ms | eff. TFLOP/s | x flex | max abs diff out/dq/dk/dv | ok |")
        print("|---|---:|---:|---:|---|---|")
        for r in self.results["variants"]:
            print(f"| {r['name']}: {r['label']} | {fmt(r.get('ms'))} | {fmt(r.get('tflops'), 1)} | "
                  f"{fmt(r.get('x_flex'), 2)} | {diffs(r)} | {r.get('ok', '')} |")  # fmt: skip
        good = [r for r in self.results["variants"] if r.get("ok") and "ms" in r]
        flag = ""
        if not good:  # still name the fastest, flagged: the tolerance compares two bf16 results
            good = [r for r in self.results["variants"] if "ms" in r]
            flag = " (NOT within tolerance: compare its diffs with sdpa's above before using it)"
        if not good:
            self.results["best"] = None
            self.save()
            print("BEST: none (no variant ran)")
            return
        best = min(good, key=lambda r: r["ms"])
        v = best["variant"]
        line = ("DEFAULT_VARIANT = Variant(fwd=KernelConfig(" + cfg_args(v["fwd"]) + "), dq=KernelConfig("
                + cfg_args(v["dq"]) + "), dkdv=KernelConfig(" + cfg_args(v["dkdv"]) + "))")  # fmt: skip
        self.results["best"] = {**best, "default_line": line}
        self.save()
        print(f"\nset in kernels/triton/sliding_window.py:\n    {line}")
        x = f"{best['x_flex']:.2f}x flex (goal >= 1.3x)" if "x_flex" in best else "flex not measured"
        print(f"BEST: {best['name']}: {best['label']}: {best['ms']:.3f} ms, {best['tflops']:.1f} TFLOP/s, {x}{flag}")


def error_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def diffs(r: dict[str, Any]) -> str:
    if "error" in r:
        return r["error"]
    return " / ".join(f"{r[k]:.1e}" for k in ("diff_out", "diff_dq", "diff_dk", "diff_dv") if k in r)


def cfg_args(c: dict[str, Any]) -> str:
    extra = "".join(f", {flag}=True" for flag in ("tma", "atomic_dq", "one_loop") if c[flag])
    return f"{c['block_m']}, {c['block_n']}, {c['warps']}, {c['stages']}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shape and configs (CPU interpreter check)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=180.0,
                        help="seconds after which remaining kernel configs are skipped (keeps one call bounded)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--jobs", type=int, help="processes that compile the kernel configs in parallel while "
                        "the baselines run (default: 12 on CUDA, none on CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu --tiny with TRITON_INTERPRET=1)")
    if args.device == "cpu" and not (args.tiny and sw.INTERPRET):
        parser.error("--device cpu runs only as a correctness check: add --tiny and set TRITON_INTERPRET=1")
    if args.tiny:
        sizes = {"heads": 2, "seq": 192, "head_dim": 16, "window": 40, "sinks": 4}
        args.fwd, args.dq, args.dkdv = TINY_FWD, TINY_DQ, TINY_DKDV
        args.warmup, args.iters = 1, 2
    else:
        sizes = {"heads": 32, "seq": 8192, "head_dim": 128, "window": 1024, "sinks": 4}
        args.fwd, args.dq, args.dkdv = GPU_FWD, GPU_DQ, GPU_DKDV
    for name, value in sizes.items():
        setattr(args, name, value)
    args.sizes = sizes

    import triton

    sweep = Sweep(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    sweep.results["setup"] = {"device": name, "torch": torch.__version__, "triton": triton.__version__, **sizes,
                              "dtype": str(sweep.dtype), "iters": args.iters, "warmup": args.warmup}  # fmt: skip
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    pool = compiling = None
    jobs = args.jobs if args.jobs is not None else (12 if args.device == "cuda" else 0)
    if jobs > 1:  # fill Triton's cache in parallel while flex compiles
        todo = [(kind, cfg) for kind, cfgs in (("fwd", args.fwd), ("dq", args.dq), ("dkdv", args.dkdv))
                for cfg in cfgs]  # fmt: skip
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        compiling = pool.map_async(precompile, [(todo[i::jobs], sizes, args.device) for i in range(jobs)])

    def wait_for_compiles() -> None:
        if pool is None:
            return
        try:
            compiling.get(timeout=max(10.0, args.time_limit - (time.monotonic() - sweep.started)))
        except Exception as exc:  # noqa: BLE001 - compiling in the main process instead is slower, not wrong
            print(f"parallel compile did not finish ({type(exc).__name__}); compiling in this process", flush=True)
        pool.terminate()
        print(f"kernel configs compiled at {time.monotonic() - sweep.started:.0f} s", flush=True)

    sweep.baselines(before_timing=wait_for_compiles)
    print(f"baselines done at {time.monotonic() - sweep.started:.0f} s", flush=True)
    sweep.kernels()
    print(f"kernel configs done at {time.monotonic() - sweep.started:.0f} s", flush=True)
    sweep.variants()
    sweep.report()


if __name__ == "__main__":
    main()
