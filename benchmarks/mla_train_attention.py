"""Which attention kernel should MLA training use on CUDA? Forward + backward at the recipes' shapes.

The converted MLA attention (naive, non-absorbed form: training and prefill) has query/key head dim
``qk_nope + rope`` (192 for the 8B/30B recipes) and value head dim ``v_head_dim`` (128). PyTorch's SDPA
flash backend needs one head dim for q, k and v, so with 192/128 SDPA falls to another backend. This
script times, in one process and on the same inputs, causal attention forward + backward through:

  * ``sdpa-auto``: what ``F.scaled_dot_product_attention`` picks by itself (today's path);
  * ``sdpa-<backend>``: each SDPA backend forced (efficient, cudnn), where it accepts the shapes;
  * ``sdpa-flash-padv``: flash with v zero-padded to the q/k head dim, output sliced back (the padded
    columns of the output are exact zeros, their gradient is dropped by the slice);
  * ``flex``: compiled flex_attention with a causal block mask.

Each row gives median ms over ``--iters`` after warm-up, effective TFLOP/s (causal: half of
``4·b·h·s²·(dqk+dv)/2`` forward, 2.5× that for backward), and the max abs difference of the output and
of dq against ``sdpa-auto``.

    python benchmarks/mla_train_attention.py                        # GPU: 8B recipe shape, micro-batch 1 and 2
    python benchmarks/mla_train_attention.py --device cpu --tiny    # CPU: numerics only, times mean nothing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def flash_padded_v(q, k, v, scale):
    pad = q.shape[-1] - v.shape[-1]
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=scale)
    return out[..., : v.shape[-1]]


def make_cases(device: str):
    cases = {"sdpa-auto": lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)}

    def forced(backend):
        def run(q, k, v, s):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)
        return run

    cases["sdpa-efficient"] = forced(SDPBackend.EFFICIENT_ATTENTION)
    if device == "cuda":
        cases["sdpa-cudnn"] = forced(SDPBackend.CUDNN_ATTENTION)

        def flash_pad(q, k, v, s):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return flash_padded_v(q, k, v, s)
        cases["sdpa-flash-padv"] = flash_pad
    else:
        cases["sdpa-math-padv"] = lambda q, k, v, s: flash_padded_v(q, k, v, s)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
        masks = {}

        def run_flex(q, k, v, s):
            key = (q.shape[0], q.shape[2])
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], q.shape[2],
                                               device=device)
            return flex(q, k, v, block_mask=masks[key], scale=s)
        cases["flex"] = run_flex
    except ImportError:
        pass
    return cases


def time_case(fn, q, k, v, scale, grad, iters, warmup, device):
    def once():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, scale)
        out.backward(grad)
        return out

    for _ in range(warmup):
        once()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = once()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach(), q.grad.detach().clone()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dqk", type=int, default=192)
    parser.add_argument("--dv", type=int, default=128)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads, seq = (2, 64) if args.tiny else (args.heads, args.seq)
    rows = []
    torch.manual_seed(0)
    for b in (int(x) for x in args.batches.split(",")):
        q = torch.randn(b, heads, seq, args.dqk, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, heads, seq, args.dqk, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, heads, seq, args.dv, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, heads, seq, args.dv, device=device, dtype=dtype)
        scale = args.dqk ** -0.5
        flops = 2 * b * heads * seq * seq * (args.dqk + args.dv) / 2 * 3.5  # causal; fwd + 2.5x bwd
        ref_out = ref_dq = None
        for name, fn in make_cases(device).items():
            try:
                seconds, out, dq = time_case(fn, q, k, v, scale, grad, 2 if args.tiny else args.iters,
                                             1 if args.tiny else 3, device)
            except Exception as err:  # noqa: BLE001 - a backend refusing the shapes is a result
                rows.append({"batch": b, "case": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            if ref_out is None:
                ref_out, ref_dq = out.float(), dq.float()
            row = {"batch": b, "case": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                   "out_diff": float((out.float() - ref_out).abs().max()),
                   "dq_diff": float((dq.float() - ref_dq).abs().max())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mla_train_attention.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
         "shape": {"heads": heads, "seq": seq, "dqk": args.dqk, "dv": args.dv}, "rows": rows}, indent=2))
    print(f"\nMLA training attention, causal fwd+bwd, H={heads} S={seq} dqk={args.dqk} dv={args.dv} ({dtype})")
    print(f"{'b':>2s} {'case':18s} {'ms':>8s} {'TFLOP/s':>8s} {'out diff':>9s} {'dq diff':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:2d} {r['case']:18s} {r['error'][:70]}")
        else:
            print(f"{r['batch']:2d} {r['case']:18s} {r['ms']:8.2f} {r['tflops']:8.1f} {r['out_diff']:9.1e}"
                  f" {r['dq_diff']:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
