"""Benchmark: the attention kernels of ``ascend_edit.kernels`` against SDPA baselines (CUDA).

1. Sliding-window attention (op A) with 4 sink tokens, forward + backward, bf16, B=1, H=32, D=128,
   S=8192, W=1024: the ``triton`` kernel vs ``flex`` (block-sparse) vs ``sdpa`` with a dense mask vs
   SDPA full causal (flash, the baseline a sliding window should beat). Target: triton >= 1.3x flex.
2. Absorbed MLA decode (op B), bf16, B=32, s=1, context 8192, c=512, r=64, H=32 and 128:
   ``triton`` split-K kernel vs the ``eager`` reference, with GQA decode through SDPA
   (32 query heads, 8 KV heads, D=128) as the bandwidth-bound baseline.
0. Device-to-device copy bandwidth (``dst.copy_(src)`` of 2 GiB, read + write bytes / time): the
   practical ceiling the decode rows are compared with (target: MLA decode >= 70 % of it).

Metrics
  * time: median of ``--iters`` runs after warm-up, CUDA events.
  * effective TFLOP/s (op A): only visible (query, key) pairs P count. Forward = 4*P*D*H
    (two matmuls, 2 flops per multiply-add); forward + backward = 3.5x forward (the backward
    is counted as 2.5x the forward, FlashAttention's convention). For S=8192, W=1024,
    P = sum_i min(i + 1, W) = S*W - W*(W-1)/2; causal P = S*(S+1)/2.
  * GB/s (decode): bytes of the KV cache that must be read once -- latent + k_rope for MLA,
    K + V for GQA -- divided by the time. At ~3 TB/s the MLA floor is ~0.1 ms.

    pip install --no-deps --no-build-isolation -e .   # makes ascend_edit.kernels importable
    python benchmarks/attention_kernels.py             # CUDA, full sizes
    python benchmarks/attention_kernels.py --small     # CPU smoke test of the script (eager/sdpa only)
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ascend_edit.kernels import MLA_ABSORBED_ATTENTION, SLIDING_WINDOW_ATTENTION, available_backends, resolve


@dataclass
class Row:
    case: str
    backend: str
    ms: float
    rate: str  # "TFLOP/s" or "GB/s" figure, formatted
    note: str = ""

    def cells(self) -> str:
        return f"| {self.case} | {self.backend} | {self.ms:.3f} | {self.rate} | {self.note} |"


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Op A: sliding-window attention, forward + backward
# ---------------------------------------------------------------------------------------------


def visible_pairs(seq: int, window: int, sinks: int = 0) -> int:
    """Visible (query, key) pairs of causal attention over ``seq`` tokens with ``window`` (0 = all)
    and ``sinks`` kept first tokens (counted only where they lie outside the window)."""
    if window == 0 or window >= seq:
        return seq * (seq + 1) // 2
    band = seq * window - window * (window - 1) // 2
    return band + sum(min(sinks, i - window + 1) for i in range(window, seq))


def bench_copy(args: argparse.Namespace, device: torch.device) -> tuple[Row, float]:
    """Device-to-device copy: (row, GB/s counting the bytes read and written)."""
    numel = (2 << 30) // 2 if not args.small else (8 << 20) // 2
    src = torch.randn(numel, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), args.warmup, args.iters)
    rate = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    row = Row(f"device copy {src.numel() * src.element_size() >> 20} MiB", "torch copy_", ms, f"{rate:.0f} GB/s",
              "read + write bytes")
    print(row.cells(), flush=True)
    return row, rate


def bench_sliding_window(args: argparse.Namespace, device: torch.device) -> list[Row]:
    b, h, s, d, w = 1, args.heads, args.seq, args.head_dim, args.window
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    grad_out = torch.randn(b, h, s, d, generator=gen).to(device, dtype)
    pos = torch.arange(s, device=device)[None]
    scale = 1.0 / math.sqrt(d)

    sinks = args.sinks

    def swa(backend: str) -> Callable[[], torch.Tensor]:
        fn = resolve(SLIDING_WINDOW_ATTENTION, backend, device_type=device.type, needs_grad=True)
        return lambda: fn(q, k, v, q_pos=pos, k_pos=pos, window=w, sink_tokens=sinks, scale=scale)

    def causal_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    candidates: dict[str, Callable[[], torch.Tensor]] = {}
    if device.type == "cuda":
        candidates[f"flex W={w} sinks={sinks}"] = swa("flex")
        if "triton" in available_backends(SLIDING_WINDOW_ATTENTION, "cuda"):
            candidates[f"triton W={w} sinks={sinks}"] = swa("triton")
    candidates[f"sdpa dense mask W={w} sinks={sinks}"] = swa("sdpa")
    candidates["sdpa full causal (baseline)"] = causal_sdpa

    rows = []
    reference_out = None
    flex_ms = None
    for label, forward in candidates.items():
        def step(forward: Callable[[], torch.Tensor] = forward) -> None:
            torch.autograd.grad(forward(), (q, k, v), grad_out)

        with torch.no_grad():
            out = forward()
        note = ""
        if "causal" not in label:  # flex and SDPA-band compute the same thing: show how close
            if reference_out is None:
                reference_out = out.float()
            else:
                note = f"max abs diff vs flex {(out.float() - reference_out).abs().max().item():.1e}"
        ms = median_ms(step, args.warmup, args.iters)
        if label.startswith("flex"):
            flex_ms = ms
        elif flex_ms is not None and "causal" not in label:
            note = f"{note}; {flex_ms / ms:.2f}x flex" if note else f"{flex_ms / ms:.2f}x flex"
        pairs = visible_pairs(s, w, sinks) if "causal" not in label else visible_pairs(s, 0)
        tflops = 3.5 * 4 * pairs * d * h * b / (ms * 1e-3) / 1e12
        rows.append(Row(f"SWA fwd+bwd S={s} H={h} D={d}", label, ms, f"{tflops:.1f} TFLOP/s", note))
        print(rows[-1].cells(), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Op B: absorbed MLA decode
# ---------------------------------------------------------------------------------------------


def bench_mla_decode(args: argparse.Namespace, device: torch.device, copy_rate: float) -> list[Row]:
    b, t, c, r = args.batch, args.context, args.latent, args.rope
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    latent = torch.randn(b, t, c, generator=gen).to(device, dtype)
    k_rope = torch.randn(b, t, r, generator=gen).to(device, dtype)
    k_pos = torch.arange(t, device=device).repeat(b, 1)
    q_pos = k_pos[:, -1:].contiguous()
    cache_bytes = latent.numel() * latent.element_size() + k_rope.numel() * k_rope.element_size()
    scale = 1.0 / math.sqrt(128 + r)  # DeepSeek-V3: softmax scale of the qk_nope + qk_rope head dim

    rows = []
    backends = ["triton", "eager"] if device.type == "cuda" else ["eager"]
    for heads in args.mla_heads:
        q_latent = torch.randn(b, heads, 1, c, generator=gen).to(device, dtype)
        q_rope = torch.randn(b, heads, 1, r, generator=gen).to(device, dtype)
        outputs = {}
        for backend in backends:
            fn = resolve(MLA_ABSORBED_ATTENTION, backend, device_type=device.type, needs_grad=False)

            def step(fn: Callable[..., torch.Tensor] = fn, q_latent: torch.Tensor = q_latent,
                     q_rope: torch.Tensor = q_rope) -> torch.Tensor:
                return fn(q_latent, q_rope, latent, k_rope, q_pos=q_pos, k_pos=k_pos, scale=scale)

            with torch.no_grad():
                outputs[backend] = step().float()
                ms = median_ms(step, args.warmup, args.iters)
            rate = cache_bytes / (ms * 1e-3) / 1e9
            rows.append(Row(f"MLA decode B={b} H={heads} ctx={t} c={c} r={r}", backend, ms, f"{rate:.0f} GB/s",
                            f"{100 * rate / copy_rate:.0f} % of copy"))  # fmt: skip
        if "triton" in outputs:  # the timed kernel must also be right at this size
            from ascend_edit.kernels.triton.mla_decode import tuned_config

            diff = (outputs["triton"] - outputs["eager"]).abs().max().item()
            rows[-len(backends)].note += f"; max abs diff vs eager {diff:.1e}; {tuned_config(c, r, heads)}"
        for row in rows[-len(backends) :]:
            print(row.cells(), flush=True)

    # GQA decode baseline: 32 query heads over 8 KV heads of D=128, one new token, whole context visible.
    kv_heads, q_heads, d = 8, 32, 128
    q = torch.randn(b, q_heads, 1, d, generator=gen).to(device, dtype)
    k = torch.randn(b, kv_heads, t, d, generator=gen).to(device, dtype)
    v = torch.randn(b, kv_heads, t, d, generator=gen).to(device, dtype)
    kv_bytes = 2 * k.numel() * k.element_size()
    with torch.no_grad():
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.warmup, args.iters)
    rows.append(Row(f"GQA decode B={b} Hq={q_heads} Hkv={kv_heads} D={d} ctx={t}", "sdpa (baseline)", ms,
                    f"{kv_bytes / (ms * 1e-3) / 1e9:.0f} GB/s"))  # fmt: skip
    print(rows[-1].cells(), flush=True)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| case | backend | ms | rate | note |", "| --- | --- | ---: | ---: | --- |"]
    lines += [r.cells() for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test of this script)")
    parser.add_argument("--only", choices=("swa", "mla", "all"), default="all")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the sliding-window case")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        parser.error("no CUDA device: run with --small for a CPU smoke test")
    sizes = (
        {"heads": 4, "seq": 256, "head_dim": 32, "window": 64, "batch": 2, "context": 512, "latent": 64,
         "rope": 16, "mla_heads": [4]}
        if args.small
        else {"heads": 32, "seq": 8192, "head_dim": 128, "window": 1024, "batch": 32, "context": 8192,
              "latent": 512, "rope": 64, "mla_heads": [32, 128]}
    )  # fmt: skip
    for name, value in sizes.items():
        setattr(args, name, value)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    copy_row, copy_rate = bench_copy(args, device)
    rows: list[Row] = [copy_row]
    if args.only in ("swa", "all"):
        rows += bench_sliding_window(args, device)
    if args.only in ("mla", "all"):
        rows += bench_mla_decode(args, device, copy_rate)
    table = markdown(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(f"device: {name}; torch {torch.__version__}\n\n{table}\n")


if __name__ == "__main__":
    main()
