"""Benchmark: chunked KD loss (closed-form gradients in forward) against plain autograd over full logits.

Measures loss + backward at Qwen3-like sizes (vocab 151,936, hidden 2,048, 4,096 bf16 tokens):
median wall time over timed iterations after warm-up (CUDA events on GPU) and the extra peak memory
(``torch.cuda.max_memory_allocated`` minus what the inputs held before the call). Also prints how far
the chunked loss and gradients are from the naive ones at these sizes.

    PYTHONPATH=. python benchmarks/kd_loss.py            # CUDA, full size
    PYTHONPATH=. python benchmarks/kd_loss.py --small    # CPU smoke test (seconds)

Imports the loss from ``ascend_edit.distill.chunked_kd`` and its plain-autograd reference from
``tests/helpers/kd_reference.py`` (hence ``PYTHONPATH=.``); nothing needs installing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ascend_edit.distill.chunked_kd import DEFAULT_CHUNK_SIZE, kd_logits_loss
from tests.helpers.kd_reference import kd_logits_loss_naive

GIB = 1024**3
# Targets from the task: chunked extra peak memory <= 15% of naive's, and no slower than naive.
MEMORY_TARGET = 0.15


@dataclass(frozen=True)
class Case:
    kind: str
    temperature: float = 1.0
    top_k: int | None = None
    train_head: bool = False

    @property
    def label(self) -> str:
        parts = [self.kind]
        if self.temperature != 1.0:
            parts.append(f"T={self.temperature:g}")
        if self.top_k is not None:
            parts.append(f"top{self.top_k}")
        if self.train_head:
            parts.append("+W grad")
        return " ".join(parts)


CASES = (
    Case("forward"),
    Case("reverse"),
    Case("jsd"),
    Case("forward", temperature=2.0),
    Case("forward", top_k=64),
    Case("forward", train_head=True),
)


@dataclass
class Inputs:
    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    weight: torch.Tensor


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    generator = torch.Generator(device="cpu").manual_seed(0)
    # Logit std ~1 (like a trained head on normed states); the teacher is a perturbed student, so the
    # two distributions are close, as in distillation.
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device, dtype)
    student = torch.randn(tokens, hidden, generator=generator)
    teacher = student + 0.5 * torch.randn(tokens, hidden, generator=generator)
    return Inputs(student.to(device, dtype).requires_grad_(True), teacher.to(device, dtype), weight)


eager_chunks = functools.partial(kd_logits_loss, fused=False)
fused_chunks = functools.partial(kd_logits_loss, fused=True)


def loss_and_backward(loss_fn: Callable, inputs: Inputs, case: Case, chunk_size: int) -> torch.Tensor:
    inputs.student_hidden.grad = None
    inputs.weight.grad = None
    inputs.weight.requires_grad_(case.train_head)
    loss = loss_fn(
        inputs.student_hidden,
        inputs.teacher_hidden,
        inputs.weight,
        kind=case.kind,
        temperature=case.temperature,
        top_k=case.top_k,
        chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach()


def measure(loss_fn: Callable, inputs: Inputs, case: Case, chunk_size: int, warmup: int, iters: int):
    """Returns (median ms, extra peak GiB or None on CPU)."""
    device = inputs.weight.device
    for _ in range(warmup):
        loss_and_backward(loss_fn, inputs, case, chunk_size)
    times_ms = []
    extra_peak = None
    if device.type == "cuda":
        inputs.student_hidden.grad = None
        inputs.weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held_before = torch.cuda.memory_allocated()
        loss_and_backward(loss_fn, inputs, case, chunk_size)
        torch.cuda.synchronize()
        extra_peak = (torch.cuda.max_memory_allocated() - held_before) / GIB
        for _ in range(iters):
            inputs.student_hidden.grad = None
            inputs.weight.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss_and_backward(loss_fn, inputs, case, chunk_size)
            end.record()
            torch.cuda.synchronize()
            times_ms.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start_s = time.perf_counter()
            loss_and_backward(loss_fn, inputs, case, chunk_size)
            times_ms.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times_ms), extra_peak


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def agreement(inputs: Inputs, case: Case, chunk_size: int, chunked: Callable | None = None) -> str:
    """Chunked (eager chunks unless `chunked` says otherwise) vs naive: relative error of the loss and of
    the largest gradient entries."""
    results = []
    for loss_fn in (chunked or eager_chunks, kd_logits_loss_naive):
        loss = loss_and_backward(loss_fn, inputs, case, chunk_size)
        grads = [inputs.student_hidden.grad.clone()]
        if case.train_head:
            grads.append(inputs.weight.grad.clone())
        results.append((loss, grads))
    (loss_c, grads_c), (loss_n, grads_n) = results
    parts = [f"loss {loss_n.item():.5f} vs {loss_c.item():.5f} (rel {max_relative_error(loss_c, loss_n):.1e})"]
    names = ["d hidden", "d W"]
    parts += [f"{n} rel {max_relative_error(c, r):.1e}" for n, c, r in zip(names, grads_c, grads_n)]
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny CPU smoke test")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --small)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-sizes", default="256,512,1024,2048")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the compiled chunk math (default: on CUDA)")
    args = parser.parse_args()
    if args.small:
        args.tokens, args.hidden, args.vocab = 300, 64, 4099
        args.chunk_sizes, args.warmup, args.iters = "64,128", 1, 3
        device = torch.device(args.device or "cpu")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chunk_sizes = [int(size) for size in args.chunk_sizes.split(",")]
    if args.fused is None:
        args.fused = device.type == "cuda"
    dtype = torch.bfloat16

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}")
    print(
        f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, {dtype}; loss + backward; "
        f"median of {args.iters} after {args.warmup} warm-up; default chunk_size {DEFAULT_CHUNK_SIZE}"
    )
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, dtype, device)

    header = f"| {'case':<18} | {'method':<13} | {'ms':>8} | {'extra peak GiB':>14} | {'ms / naive':>10} | {'mem / naive':>11} |"
    print()
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    agreements = []
    for case in CASES:
        naive_ms, naive_mem = measure(kd_logits_loss_naive, inputs, case, DEFAULT_CHUNK_SIZE, args.warmup, args.iters)
        rows = [("naive", naive_ms, naive_mem)]
        for chunk_size in chunk_sizes:
            ms, mem = measure(eager_chunks, inputs, case, chunk_size, args.warmup, args.iters)
            rows.append((f"chunked {chunk_size}", ms, mem))
        if args.fused and case.top_k is None:  # the compiled chunk math (CUDA's default), warm-up compiles
            ms, mem = measure(fused_chunks, inputs, case, DEFAULT_CHUNK_SIZE, args.warmup, args.iters)
            rows.append((f"fused {DEFAULT_CHUNK_SIZE}", ms, mem))
        for method, ms, mem in rows:
            mem_cell = f"{mem:.3f}" if mem is not None else "n/a"
            mem_ratio = f"{mem / naive_mem:.3f}" if mem is not None and naive_mem else "n/a"
            print(
                f"| {case.label:<18} | {method:<13} | {ms:>8.2f} | {mem_cell:>14} | "
                f"{ms / naive_ms:>10.2f} | {mem_ratio:>11} |"
            )
        agreements.append(f"{case.label}: {agreement(inputs, case, DEFAULT_CHUNK_SIZE)}")
        if args.fused and case.top_k is None:
            agreements.append(f"{case.label}, fused: {agreement(inputs, case, DEFAULT_CHUNK_SIZE, fused_chunks)}")
    print()
    print(f"chunked (chunk_size {DEFAULT_CHUNK_SIZE}) vs naive at these sizes:")
    for line in agreements:
        print("  " + line)
    if device.type == "cuda":
        print(f"\ntargets: extra peak <= {MEMORY_TARGET:.0%} of naive, ms / naive <= 1.00")


if __name__ == "__main__":
    main()
