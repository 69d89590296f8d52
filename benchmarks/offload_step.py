"""One optimizer step with the AdamW state in host memory: updated by the host, or streamed through the device.

Issue 10's single-device recipe (ZeRO-2 + optimizer offload) pays, once per optimizer step, the fp32
gradients' trip to the host, the host AdamW over every target parameter, and the updated weights' trip back.
This measures that boundary for N parameters (default 1.75 B: the 8B MLA targets) two ways, on the same data:

* ``host``: the work DeepSpeed's offload does (not its code, which overlaps the gradients' copy with the
  last backward) — fp32 gradients device→host (pinned), torch's fused CPU AdamW on the fp32 masters and
  moments, bf16 weights host→device;
* ``streamed``: the masters and moments stay in pinned host memory, but each chunk of them is copied to
  the device, stepped there by the fused CUDA AdamW beside the device's own fp32 gradients, cast into the
  bf16 weights, and copied back — copies in both directions overlapped with the update through three
  chunk buffers (PCIe carries 12 B per parameter each way instead of the host's memory carrying ~28 B).

Both produce the same weights (checked against each other on the first chunk). Prints one table.

    python benchmarks/offload_step.py --params 1.75e9          # one GPU
    python benchmarks/offload_step.py --params 4e6 --device cpu  # the numerics path on the CPU
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.optim.adamw import adamw

ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


def adamw_(master: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor) -> None:
    """torch's fused AdamW (functional form) on one flat fp32 tensor, CPU or CUDA kernel by the tensors'
    device; it advances `step`, the tensor's own step count, by one."""
    adamw([master], [grad], [m], [v], [], [step], fused=True, amsgrad=False, beta1=ADAMW["betas"][0],
          beta2=ADAMW["betas"][1], lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"], eps=ADAMW["eps"],
          maximize=False)


def host_step(master, m, v, step, grad_dev, param_dev, grad_host) -> None:
    grad_host.copy_(grad_dev, non_blocking=True)
    if grad_dev.is_cuda:
        torch.cuda.current_stream().synchronize()
    adamw_(master, grad_host, m, v, step)
    param_dev.copy_(master.to(param_dev.dtype), non_blocking=True)


def streamed_step(master, m, v, steps_dev, grad_dev, param_dev, buffers, chunk: int) -> None:
    """Chunks of (master, m, v) host→device, AdamW on the device, weights cast in place, states back.
    `steps_dev`: one step count per chunk (each chunk is its own fused-AdamW call, which advances it)."""
    n = master.numel()
    cuda = grad_dev.is_cuda
    copy_in = torch.cuda.Stream() if cuda else None
    copy_out = torch.cuda.Stream() if cuda else None
    compute = torch.cuda.current_stream() if cuda else None
    slots = len(buffers)
    freed = [None] * slots  # event: the slot's states are back on the host
    for index, start in enumerate(range(0, n, chunk)):
        rows = slice(start, min(start + chunk, n))
        size = rows.stop - rows.start
        slot = index % slots
        d_master, d_m, d_v = (b[:size] for b in buffers[slot])
        if cuda:
            with torch.cuda.stream(copy_in):
                if freed[slot] is not None:
                    copy_in.wait_event(freed[slot])
                for dst, src in ((d_master, master), (d_m, m), (d_v, v)):
                    dst.copy_(src[rows], non_blocking=True)
                arrived = copy_in.record_event()
            compute.wait_event(arrived)
        else:
            for dst, src in ((d_master, master), (d_m, m), (d_v, v)):
                dst.copy_(src[rows])
        adamw_(d_master, grad_dev[rows], d_m, d_v, steps_dev[index])
        param_dev[rows].copy_(d_master)
        if cuda:
            stepped = compute.record_event()
            with torch.cuda.stream(copy_out):
                copy_out.wait_event(stepped)
                for dst, src in ((master, d_master), (m, d_m), (v, d_v)):
                    dst[rows].copy_(src, non_blocking=True)
                freed[slot] = copy_out.record_event()
        else:
            for dst, src in ((master, d_master), (m, d_m), (v, d_v)):
                dst[rows].copy_(src)
    if cuda:
        torch.cuda.current_stream().wait_stream(copy_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.75e9)
    parser.add_argument("--chunk", type=float, default=32e6, help="elements per streamed chunk")
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    n, chunk, dev = int(args.params), int(args.chunk), torch.device(args.device)
    pin = dev.type == "cuda"
    torch.manual_seed(0)
    grad_dev = torch.randn(n, device=dev) * 1e-3
    param_dev = torch.zeros(n, device=dev, dtype=torch.bfloat16)
    state = {name: torch.empty(n, pin_memory=pin) for name in ("master", "m", "v")}
    grad_host = torch.empty(n, pin_memory=pin)

    def reset(states) -> None:
        states["master"].normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        states["m"].zero_()
        states["v"].zero_()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    # host: the step tensor lives on the host; streamed: on the device (fused CUDA AdamW wants it there)
    reset(state)
    step_host = torch.zeros((), dtype=torch.float32)
    times = []
    for _ in range(args.repeats + 1):
        sync()
        t = time.perf_counter()
        host_step(state["master"], state["m"], state["v"], step_host, grad_dev, param_dev, grad_host)
        sync()
        times.append(time.perf_counter() - t)
    results["host AdamW (the work of DeepSpeed's offload)"] = times[1:]
    host_weights = param_dev[:chunk].clone()
    host_steps = int(step_host)

    reset(state)
    steps_dev = [torch.zeros((), dtype=torch.float32, device=dev) for _ in range(0, n, chunk)]
    buffers = [[torch.empty(chunk, device=dev) for _ in range(3)] for _ in range(args.slots)]
    times = []
    for _ in range(args.repeats + 1):
        sync()
        t = time.perf_counter()
        streamed_step(state["master"], state["m"], state["v"], steps_dev, grad_dev, param_dev, buffers, chunk)
        sync()
        times.append(time.perf_counter() - t)
    results[f"streamed ({args.slots} x {chunk / 1e6:.0f} M-element chunks)"] = times[1:]
    assert all(int(step) == host_steps for step in steps_dev)
    # fused AdamW's CPU and CUDA kernels round differently in the last bits; the bf16 weights agree
    torch.testing.assert_close(param_dev[:chunk].float(), host_weights.float(), rtol=1e-2, atol=1e-5)

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"\n{n / 1e6:,.0f} M parameters, {name}, {torch.get_num_threads()} host threads")
    print(f"{'boundary step':45s} {'min s':>7s} {'median s':>8s} {'max s':>7s}")
    for label, ts in results.items():
        ts = sorted(ts)
        print(f"{label:45s} {ts[0]:7.3f} {ts[len(ts) // 2]:8.3f} {ts[-1]:7.3f}")


if __name__ == "__main__":
    main()
