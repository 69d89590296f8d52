"""Micro-benchmark: decode attention of one GateSWA / GQA layer (``kernels/triton/gqa_decode.py``) on CUDA.

The 8B shape (Qwen3-8B: 8 KV heads of 128, 4 query heads per KV head), bf16, one query per row, an additive
bf16 mask shared by the heads (a ``[..., :t]`` view of a 16-aligned buffer, as the ring cache makes it), at
batch 1 and 8 over t = 1028 / 1078 (sliding ring: sinks + window) and 8192 / 32768 keys (full layers):

* **sdpa**: ``F.scaled_dot_product_attention`` with the query heads packed per KV group (default backends).
* **reduce**: ``torch.compile``'d ``reduction_decode_attention`` (``ascend_edit.attention.gate_swa``).
* **kernel**: ``torch.ops.ascend_edit.gqa_decode`` (the split count from its cost model is shown).
* **floor**: (K + V + mask bytes) / the device copy bandwidth (``dst.copy_(src)`` of 1 GiB, read + write,
  measured in this process).

Time per call is GPU time: ~10 ms of GPU work is queued first, then 36 back-to-back calls (one per layer of
a decode step) between two CUDA events (``gemv.gpu_ms_per_call``), so launch overhead is hidden as in a
CUDA-graph replay; median of ``--repeats``. The calls cycle through copies of K / V / mask totalling > 3x a
50 MB L2 (at most 36, like the layers of a step), so no call finds its cache in L2. ``diff``: max |x - sdpa|.
``--sweep`` also times a few kernel launch configurations per shape.

    python benchmarks/gqa_decode_bench.py            # one H200: about 1-2 min (mostly inductor compiles)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

L2_BYTES = 50 << 20
LAYERS = 36
KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128
BATCHES = (1, 8)
KEYS = (1028, 1078, 8192, 32768)
# Kernel launch configurations --sweep times (GqaDecodeConfig fields); the cost model's split count unless given.
SWEEP_CONFIGS = [
    dict(block_t=32), dict(block_t=128), dict(num_warps=8), dict(num_stages=3), dict(block_t=128, num_warps=8),
    dict(programs_per_sm=1), dict(programs_per_sm=4), dict(num_splits=4), dict(num_splits=8), dict(num_splits=32),
]


def copy_bandwidth(gpu_ms_per_call) -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = min(gpu_ms_per_call(lambda: dst.copy_(src), 1, busy_matmuls=5) for _ in range(10))
    return 2 * n / (best / 1e3)


def make_cache(b: int, t: int, copies: int, gen: torch.Generator, device: str):
    """``copies`` of (k, v, additive bf16 mask); every row sees its first key and ~80 % of the rest."""
    out = []
    for _ in range(copies):
        k = torch.randn(b, KV_HEADS, t, HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)
        v = torch.randn(b, KV_HEADS, t, HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)
        hidden = torch.rand(b, 1, 1, t, generator=gen, device=device) < 0.2
        hidden[..., 0] = False
        buffer = torch.zeros(b, 1, 1, -(-t // 16) * 16, device=device, dtype=torch.bfloat16)  # 16-aligned rows
        out.append((k, v, buffer[..., :t].masked_fill_(hidden, float("-inf"))))
    return out


def timed(fn, caches, q, timer) -> float:
    """Median ms per call of ``fn(q, k, v, mask)`` cycling through ``caches`` (``timer(one) -> ms per call``)."""
    state = [0]

    def one():
        k, v, mask = caches[state[0] % len(caches)]
        state[0] += 1
        fn(q, k, v, mask)

    for _ in range(3):
        one()
    return timer(one)


def run_shape(b: int, t: int, variants: dict, timer, bandwidth: float, gen: torch.Generator, device: str,
              sweep: list | None) -> str:
    """One table row (and, with ``sweep``, a row per launch configuration appended to it)."""
    from ascend_edit.kernels.triton import gqa_decode

    nbytes = 2 * b * KV_HEADS * t * HEAD_DIM * 2 + b * t * 2  # K + V + the mask row, bf16
    caches = make_cache(b, t, min(LAYERS, max(1, math.ceil(3 * L2_BYTES / nbytes))), gen, device)
    q = torch.randn(b, KV_HEADS, GROUP, HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)
    floor_us = nbytes / bandwidth * 1e6
    k0, v0, m0 = caches[0]
    want = variants["sdpa"](q, k0, v0, m0).float()
    us, diff = {}, {}
    for name, fn in variants.items():
        if fn is None:
            us[name] = diff[name] = math.nan
            continue
        diff[name] = (fn(q, k0, v0, m0).float() - want).abs().max().item()
        us[name] = timed(fn, caches, q, timer) * 1e3
    splits, split_len = gqa_decode.split_plan(q, k0, v0)
    if sweep is not None:
        scale = HEAD_DIM**-0.5
        for fields in SWEEP_CONFIGS:
            cfg = gqa_decode.GqaDecodeConfig(**fields)
            fn = lambda q, k, v, m, cfg=cfg: gqa_decode._launch(q, k, v, m, scale, cfg)  # noqa: E731
            try:
                cfg_diff = (fn(q, k0, v0, m0).float() - want).abs().max().item()
                cfg_us = timed(fn, caches, q, timer) * 1e3
                n, _ = gqa_decode.split_plan(q, k0, v0, cfg)
                sweep.append(f"b={b} t={t:>5} {cfg.label():<30} ({n:>2} splits) {cfg_us:>7.2f} us "
                             f"{100 * floor_us / cfg_us:>5.1f} %floor diff {cfg_diff:.1e}")
            except Exception as err:  # noqa: BLE001  a config this device cannot run: its row says so
                sweep.append(f"b={b} t={t:>5} {cfg.label():<30} failed: {type(err).__name__}: {str(err)[:100]}")
    return (f"{b:>2} {t:>6} {nbytes / 1e6:>7.2f} {floor_us:>7.2f} | {us['sdpa']:>7.2f} {us['reduce']:>7.2f} "
            f"{us['kernel']:>7.2f} {100 * floor_us / us['kernel']:>6.1f} {us['sdpa'] / us['kernel']:>6.2f} | "
            f"{diff['reduce']:>8.1e} {diff['kernel']:>8.1e} | {splits} x {split_len}")  # fmt: skip


def variants(no_reduce: bool) -> dict:
    from ascend_edit.attention.gate_swa import reduction_decode_attention

    scale = HEAD_DIM**-0.5
    return {
        "sdpa": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale),
        "reduce": None if no_reduce else torch.compile(
            lambda q, k, v, m: reduction_decode_attention(q, k, v, m, scale), dynamic=False, fullgraph=True),
        "kernel": lambda q, k, v, m: torch.ops.ascend_edit.gqa_decode(q, k, v, m, scale),
    }


HEADER = (f"{'b':>2} {'t':>6} {'MB':>7} {'floor':>7} | {'sdpa':>7} {'reduce':>7} {'kernel':>7} {'%floor':>6} "
          f"{'x sdpa':>6} | {'diff red':>8} {'diff ker':>8} | splits x keys")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=LAYERS, help="back-to-back calls per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="also time a few kernel launch configurations")
    p.add_argument("--no-reduce", action="store_true", help="skip the compiled reduction variant (no compiles)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gqa_decode_bench: needs a CUDA GPU (numerics on CPU: tests/kernels/test_triton_gqa_decode.py)")
    from ascend_edit.kernels.triton import gemv, gqa_decode, split_k

    if not gqa_decode.triton_available():
        raise SystemExit("gqa_decode_bench: needs Triton (pip install 'ascend_edit[gpu]')")

    def timer(one) -> float:
        return statistics.median(gemv.gpu_ms_per_call(one, args.calls, busy_matmuls=50) for _ in range(args.repeats))

    bandwidth = copy_bandwidth(gemv.gpu_ms_per_call)
    print(f"device {torch.cuda.get_device_name()}, {split_k.sm_count(torch.cuda.current_device())} SMs, copy "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s; hk={KV_HEADS} g={GROUP} d={HEAD_DIM} bf16, additive bf16 mask; "
          f"GPU us per call ({args.calls} calls back to back, median of {args.repeats})")  # fmt: skip
    print(HEADER)
    gen = torch.Generator(device="cuda").manual_seed(0)
    fns = variants(args.no_reduce)
    sweep: list | None = [] if args.sweep else None
    with torch.no_grad():
        for b in BATCHES:
            for t in KEYS:
                torch.compiler.reset()  # the reduction compiles afresh for each static shape (no recompile limit)
                print(run_shape(b, t, fns, timer, bandwidth, gen, "cuda", sweep), flush=True)
                torch.cuda.empty_cache()
    if sweep:
        print("sweep (kernel launch configurations):")
        print("\n".join("  " + r for r in sweep))


if __name__ == "__main__":
    main()
