"""Micro-benchmark: the batch-1 GEMV kernel (``kernels/triton/gemv.py``) against torch's ``F.linear`` (cuBLAS).

For every weight matrix of an 8B-shape decode step (Qwen3-8B: hidden 4096, MLP 12288, 32 heads of 128, 8 KV
heads, vocab 151936; MLA target: query 32 x 192 = 6144, latent 512 + rope 64 = 576; the fused
projections of ``models/decode_fusion.py``), bf16, M = 1 row:

* **copy bandwidth**: ``dst.copy_(src)`` of 1 GiB, read + write bytes / time (best of 10): the ceiling.
* **time per call**: ~10 ms of GPU work is queued first, then ``--calls`` back-to-back calls between two CUDA
  events, so the events time the GPU's work and its inter-kernel gaps (as in a CUDA-graph replay), not the
  host's launch latency; median over ``--repeats``. The calls cycle through enough copies of the weight
  (> 3x a 50 MB L2) that no call finds its weight in L2, as in a decode step.
* **GB/s** = weight bytes / time; **% copy** = that over the copy bandwidth. ``max diff``: against
  ``F.linear`` in fp32 on the same inputs.
* ``gemv`` = the shipped heuristic (``choose_config``); with ``--sweep`` also ``gemv.tune`` per matrix (every
  candidate config against ``F.linear``: what ``bench_decode --decode-linears gemv`` does at start-up) and the
  fastest config (worth copying into the heuristic where it wins clearly).
* Last: the GEMM part of one MLA / GateSWA decode step at batch 1 (36 layers + lm_head) summed from the
  rows, cuBLAS unfused vs GEMV on the fused projections (tuned: the faster of kernel and cuBLAS per matrix):
  what ``--decode-linears gemv --fuse-projections`` should save in ``bench_decode``.

    python benchmarks/gemv_bench.py --sweep                      # one H200: < 1 min
    TRITON_INTERPRET=1 python benchmarks/gemv_bench.py --device cpu   # CPU smoke: tiny shapes, numerics only
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ascend_edit.kernels.triton import gemv  # noqa: E402

L2_BYTES = 50 << 20
LAYERS = 36
# name -> (N, K): the 8B shape's matrices at decode
SHAPES = {
    "q/o 4096x4096": (4096, 4096),
    "k/v 1024x4096": (1024, 4096),
    "gate/up 12288x4096": (12288, 4096),
    "down 4096x12288": (4096, 12288),
    "lm_head 151936x4096": (151936, 4096),
    "mla q 6144x4096": (6144, 4096),
    "mla kv_a 576x4096": (576, 4096),
    "mla q+kv_a 6720x4096": (6720, 4096),
    "gate+up 24576x4096": (24576, 4096),
    "swa q+k+v 6144x4096": (6144, 4096),
    "swa q+k+v+gate 6176x4096": (6176, 4096),
}
TINY_SHAPES = {"tiny 96x64": (96, 64), "tiny 37x200": (37, 200), "tiny 300x48": (300, 48)}
# GEMMs of one decode step at batch 1: (shape name, per layer count) unfused / fused, plus the lm_head once.
STEPS = {
    "MLA": ({"mla q 6144x4096": 1, "mla kv_a 576x4096": 1, "q/o 4096x4096": 1, "gate/up 12288x4096": 2,
             "down 4096x12288": 1},
            {"mla q+kv_a 6720x4096": 1, "q/o 4096x4096": 1, "gate+up 24576x4096": 1, "down 4096x12288": 1}),
    "GateSWA (headwise gate)": (
        {"q/o 4096x4096": 2, "k/v 1024x4096": 2, "gate/up 12288x4096": 2, "down 4096x12288": 1},
        {"swa q+k+v+gate 6176x4096": 1, "q/o 4096x4096": 1, "gate+up 24576x4096": 1, "down 4096x12288": 1}),
}


def copy_bandwidth(device: torch.device) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(11):
        ms = _time(lambda: dst.copy_(src), device, calls=1)
        if i:
            best = min(best, ms)
    return 2 * n / (best / 1e3)


def _time(fn, device: torch.device, calls: int) -> float:
    """ms per call for ``calls`` back-to-back calls, GPU time (GPU work queued ahead hides the launches)."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3 / calls
    return gemv.gpu_ms_per_call(fn, calls, busy_matmuls=50)  # ~10 ms of GPU work: longer than enqueuing


def measure(make_call, weights, x, device, calls: int, repeats: int) -> float:
    state = {"i": 0}

    def one():
        w = weights[state["i"] % len(weights)]
        state["i"] += 1
        return make_call(x, w)

    for _ in range(3):
        one()
    return statistics.median(_time(one, device, calls) for _ in range(repeats))


def kernel_row(rows, label, n, k, weights, x, device, sms, calls, repeats, bandwidth, t_ref, best_rows):
    """The heuristic's time and numerics for one matrix; with ``best_rows`` also gemv.tune's choice."""
    nbytes = n * k * 2
    cfg = gemv.choose_config(rows, n, k, sms)
    want = F.linear(x.float(), weights[0].float())
    diff = (gemv._launch(x, weights[0], None).float() - want).abs().max().item()
    t_gemv = measure(lambda x, w: gemv._launch(x, w, None, cfg), weights, x, device, calls, repeats)
    text = (f"{t_gemv * 1e3:>8.1f} {nbytes / t_gemv / 1e6:>6.0f} {100 * nbytes / t_gemv / 1e-3 / bandwidth:>5.1f} "
            f"{t_ref / t_gemv:>8.2f} {diff:>8.1e} | {cfg.label()}")
    if best_rows is not None:  # gemv.tune: every candidate config against F.linear, as bench_decode does
        best, t_best, t_torch = gemv.tune(rows, n, k, x.dtype, device, calls=calls, repeats=repeats)
        if best is None:
            best_rows.append(f"{label:<26} F.linear fastest ({t_torch * 1e3:.1f} us; best config {t_best * 1e3:.1f} us)")
        else:
            best_rows.append(f"{label:<26} best {best.label():<22} {t_best * 1e3:>8.1f} us "
                             f"{100 * nbytes / t_best / 1e-3 / bandwidth:>5.1f} %copy "
                             f"(heuristic {t_gemv * 1e3:.1f} us, F.linear {t_torch * 1e3:.1f} us)")
            t_gemv = min(t_gemv, t_best)
    return t_gemv, text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--rows", type=int, default=1, help="M (1..8)")
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sweep", action="store_true", help="also time every candidate config (gemv.tune; CUDA)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gemv_bench: error: --device cuda but no CUDA device (use --device cpu for the smoke run)")
    if not 1 <= args.rows <= gemv.MAX_ROWS:
        raise SystemExit(f"gemv_bench: error: --rows must be 1..{gemv.MAX_ROWS}, got {args.rows}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter (numpy) has no bf16
    shapes = SHAPES if cuda else TINY_SHAPES
    calls, repeats = (args.calls, args.repeats) if cuda else (2, 2)
    can_run_kernel = gemv.triton_available() and (cuda or gemv._INTERPRET)
    bandwidth = copy_bandwidth(device)
    sms = gemv._sm_count(device.index) if cuda else 4
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device {name}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, M={args.rows}, {dtype}")
    if not can_run_kernel:
        print("gemv kernel not run: needs Triton on CUDA, or TRITON_INTERPRET=1 on CPU")
    header = f"{'matrix':<26} {'MB':>7} | {'cuBLAS us':>9} {'GB/s':>6} {'%copy':>5} | {'gemv us':>8} {'GB/s':>6} " \
             f"{'%copy':>5} {'x cuBLAS':>8} {'max diff':>8} | config"
    print(header)
    results: dict[str, tuple[float, float]] = {}
    best_rows = []
    torch.manual_seed(0)
    for label, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(1, math.ceil(3 * L2_BYTES / nbytes)) if cuda else 1
        weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(args.rows, k, device=device, dtype=dtype)
        with torch.no_grad():
            t_ref = measure(lambda x, w: F.linear(x, w), weights, x, device, calls, repeats)
            line = f"{label:<26} {nbytes / 1e6:>7.1f} | {t_ref * 1e3:>9.1f} {nbytes / t_ref / 1e6:>6.0f} " \
                   f"{100 * nbytes / t_ref / 1e-3 / bandwidth:>5.1f} | "
            t_gemv = math.nan
            if can_run_kernel:
                try:  # a kernel that fails to compile or launch: its row says so, the other rows still run
                    t_gemv, text = kernel_row(args.rows, label, n, k, weights, x, device, sms, calls, repeats,
                                              bandwidth, t_ref, best_rows if args.sweep and cuda else None)
                    line += text
                except Exception as err:  # noqa: BLE001
                    line += f"gemv failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        print(line, flush=True)
        # tuned (--sweep): bench_decode keeps F.linear where it is faster, so the step sum takes the minimum
        results[label] = (t_ref, min(t_gemv, t_ref) if args.sweep and cuda else t_gemv)
        del weights
        if cuda:
            torch.cuda.empty_cache()
    if best_rows:
        print("sweep, fastest config per matrix:")
        print("\n".join("  " + r for r in best_rows))
    if cuda:
        lm = results["lm_head 151936x4096"]
        print(f"GEMM ms of one decode step ({LAYERS} layers + lm_head), from the rows above "
              f"(gemv: {'the best swept config' if best_rows else 'the heuristic'} per matrix):")
        for model, (unfused, fused) in STEPS.items():
            cublas = LAYERS * sum(results[s][0] * c for s, c in unfused.items()) + lm[0]
            cublas_fused = LAYERS * sum(results[s][0] * c for s, c in fused.items()) + lm[0]
            gemv_fused = LAYERS * sum(results[s][1] * c for s, c in fused.items()) + lm[1]
            wbytes = LAYERS * sum(SHAPES[s][0] * SHAPES[s][1] * 2 * c for s, c in fused.items()) + \
                SHAPES["lm_head 151936x4096"][0] * 4096 * 2
            floor = wbytes / bandwidth * 1e3
            print(f"  {model:<24} weights {wbytes / 2**30:.2f} GiB, floor {floor:.2f} ms | cuBLAS {cublas:.2f} ms "
                  f"(x{cublas / floor:.2f}) | cuBLAS fused {cublas_fused:.2f} ms (x{cublas_fused / floor:.2f}) | "
                  f"gemv fused {gemv_fused:.2f} ms (x{gemv_fused / floor:.2f})")


if __name__ == "__main__":
    main()
