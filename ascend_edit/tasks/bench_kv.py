"""`ascend-edit bench_kv`: KV-cache bytes per token and decode speed, teacher vs converted, in one run.

One edited model holds both attentions of every converted layer (`EditedAttention`), so the teacher and
the converted model are measured on the same weights, card and process: `set_mode` switches between
them. Weights are random (target init is forced to `random`): speed and memory do not depend on them,
and real-shape configs (`model=qwen3_0p6b_shape`, `model=qwen3_8b_shape`) need no download.

For every batch size and context: a fresh transformers `StaticCache` of `context` + the decode steps
(preallocated, fixed size: the bounded ring for sliding layers, latent + RoPE key for MLA) driven by
`models.static_decode.StaticDecoder`, the same loop as `bench_decode` — on CUDA the decode step is
captured once as a CUDA graph and replayed, elsewhere it runs eagerly. A chunked prefill of `context`
random tokens (`prefill_chunk` at a time, logits for the last position only), `warmup_tokens` untimed
greedy decode steps (at least three on CUDA: two eager ones, then the capture), then `decode_tokens`
timed ones. Reported per cell: KV bytes per token the cache holds for `context` tokens (a growing
layer's share of its preallocated buffers, a ring whole), prefill seconds, decode milliseconds per step
and decode tokens/s (batch / median step time), and peak device memory. For fresh processes per model,
repeats with spread, the floor and the largest batch that fits, use `bench_decode`. A cell that runs out of memory is recorded as
`oom` and the run goes on. Output: a rich table, `bench_kv.csv` and `bench_kv.png` in the run directory.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from ascend_edit.attention.cache_layers import StaticSinkWindowLayer
from ascend_edit.config import BenchKVConfig, RootConfig
from ascend_edit.device import (
    DeviceInfo,
    memory_stats,
    reset_peak_memory,
    resolve_device,
    seed_everything,
    synchronize,
)
from ascend_edit.eval.kv import kv_layout, total_bytes
from ascend_edit.models.loading import TORCH_DTYPES, load_teacher
from ascend_edit.models.static_decode import EAGER_STEPS_BEFORE_CAPTURE, StaticDecoder
from ascend_edit.models.surgery import build_plan, edit_model, set_mode

log = logging.getLogger(__name__)

MODES = ("teacher", "converted")
CSV_FILE, PLOT_FILE = "bench_kv.csv", "bench_kv.png"


@dataclass
class Cell:
    model: str  # teacher | converted
    batch: int
    context: int
    status: str = "ok"  # ok | oom | error: ...
    bytes_per_value: int = 0  # the cache's element size: the model's dtype (fp32 doubles a 16-bit server's bytes)
    kv_bytes_per_token: float = float("nan")  # measured, per sequence, all layers
    kv_bytes_per_token_accounted: float = float("nan")  # from the layer layout (eval/kv.py)
    prefill_s: float = float("nan")
    decode_ms_per_step: float = float("nan")  # median over the timed steps
    decode_ms_mean: float = float("nan")
    decode_tokens_per_s: float = float("nan")
    peak_gib: float = float("nan")


class StepClock:
    """Marks on the device's own timeline: CUDA/NPU events, so CPU launches and GPU work stay overlapped as in
    real decoding (a synchronize per step would serialise them); wall time on the CPU."""

    def __init__(self, device: DeviceInfo):
        self.events = getattr(torch, device.type).Event if device.type != "cpu" else None
        self.marks: list = []

    def mark(self) -> None:
        if self.events is None:
            self.marks.append(time.perf_counter())
        else:
            event = self.events(enable_timing=True)
            event.record()
            self.marks.append(event)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronize the device first)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.events is None:
            return [1e3 * (b - a) for a, b in pairs]
        return [a.elapsed_time(b) for a, b in pairs]


def held_cache_bytes(cache, context: int, max_len: int) -> int:
    """Key/value (or latent/rope) bytes a static cache holds for `context` tokens: a growing layer's share
    `context / max_len` of its preallocated buffers, a ring's slots up to `context` (the whole ring once the
    context fills it; a ring cut to a cache shorter than its window holds no more than the context either)."""
    total = 0.0
    for layer in cache.layers:
        size = sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
        if isinstance(layer, StaticSinkWindowLayer):
            total += size * min(layer.num_slots, context) / layer.num_slots
        else:
            total += size * context / max_len
    return round(total)


def decode_path(device: DeviceInfo) -> str:
    """How the decode step runs: replayed as a CUDA graph on CUDA (as `bench_decode`), eagerly elsewhere."""
    return "cuda_graph" if device.type == "cuda" else "eager"


@torch.no_grad()
def measure(model: PreTrainedModel, device: DeviceInfo, batch: int, context: int, bench: BenchKVConfig,
            generator: torch.Generator) -> dict:
    """Prefill `context` random tokens in chunks into a static cache, then time greedy decode steps.

    The step time is the median over the timed steps, which keeps a stray host-side pause from counting as
    decode cost.
    """
    path = decode_path(device)
    warmup = max(bench.warmup_tokens, EAGER_STEPS_BEFORE_CAPTURE + 1) if path == "cuda_graph" else bench.warmup_tokens
    max_len = context + warmup + bench.decode_tokens + 2
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device.torch_device)
    decoder = StaticDecoder(model, batch, max_len, mode=path)
    reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    decoder.prefill(ids, chunk=bench.prefill_chunk)
    synchronize(device)
    prefill_s = time.perf_counter() - started
    kv_bytes = held_cache_bytes(decoder.cache, context, max_len)
    for _ in range(warmup):  # kernel selection, autotuning; on CUDA the capture
        decoder.step()
    clock = StepClock(device)
    for _ in range(bench.decode_tokens):
        clock.mark()
        decoder.step()
    clock.mark()
    synchronize(device)
    steps_ms = clock.intervals_ms()
    median_ms = statistics.median(steps_ms)
    return {"kv_bytes_per_token": kv_bytes / (batch * context), "prefill_s": prefill_s,
            "decode_ms_per_step": median_ms, "decode_ms_mean": statistics.fmean(steps_ms),
            "decode_tokens_per_s": batch * 1e3 / median_ms, "peak_gib": memory_stats(device)["peak_gib"]}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_cells(model: PreTrainedModel, device: DeviceInfo, bench: BenchKVConfig, bytes_per_value: int,
              seed: int) -> list[Cell]:
    layouts = {"teacher": kv_layout(model, "teacher"), "converted": kv_layout(model, "student")}
    cells = []
    for batch in bench.batch_sizes:
        for context in bench.contexts:
            for mode in MODES:
                set_mode(model, "teacher" if mode == "teacher" else "student")
                cell = Cell(mode, batch, context, bytes_per_value=bytes_per_value)
                cell.kv_bytes_per_token_accounted = total_bytes(layouts[mode], context, bytes_per_value) / context
                try:
                    generator = torch.Generator().manual_seed(seed + context + batch)
                    for key, value in measure(model, device, batch, context, bench, generator).items():
                        setattr(cell, key, value)
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    cell.status = "oom" if _is_oom(err) else f"error: {str(err).splitlines()[0][:120]}"
                    log.warning("%s batch %d context %d: %s", mode, batch, context, cell.status)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                cells.append(cell)
                log.info("%s", cell)
    return cells


def run(cfg: RootConfig) -> dict:
    device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
    seed_everything(cfg.device.seed)
    if cfg.target.kind == "gate_swa" and cfg.target.gate_swa.full_by_sensitivity:
        raise ValueError("bench_kv needs a fixed plan: give target.gate_swa.full_layers or full_every "
                         "(full_by_sensitivity measures layers on data)")
    model, _ = load_teacher(cfg.model, device=device.torch_device)
    target = dataclasses.replace(cfg.target, init="random")  # speed and memory do not depend on the weights
    with torch.device(device.torch_device):
        edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    model.eval().requires_grad_(False)
    bytes_per_value = next(model.parameters()).element_size()
    cells = run_cells(model, device, cfg.bench_kv, bytes_per_value, cfg.device.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{model.config.model_type} {model.config.num_hidden_layers}L h{model.config.hidden_size} "
             f"-> {target.kind}, {TORCH_DTYPES[cfg.model.dtype]}, {device.name}, static cache, "
             f"{decode_path(device)} decode step")
    write_csv(cells, out_dir / CSV_FILE)
    plot(cells, out_dir / PLOT_FILE, title)
    print_table(Console(width=max(Console().width, 140)), cells, title)  # ten columns: never cut
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"device": device.name, "title": title, "cells": [dataclasses.asdict(c) for c in cells],
            "csv": str(out_dir / CSV_FILE), "plot": str(out_dir / PLOT_FILE)}


def _speedup(cells: list[Cell], cell: Cell) -> str:
    base = next((c for c in cells if c.model == "teacher" and c.batch == cell.batch and c.context == cell.context),
                None)
    if base is None or cell.model == "teacher" or base.status != "ok" or cell.status != "ok":
        return ""
    return f"{cell.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x"


def print_table(console: Console, cells: list[Cell], title: str) -> None:
    table = Table(title=f"KV cache and decode: {title}")
    bits = {8 * c.bytes_per_value for c in cells}
    cache = f" ({bits.pop()}-bit)" if len(bits) == 1 else ""
    for col in ("batch", "context", "model", f"KV bytes/token{cache}", "KV MiB/seq", "prefill s", "decode ms/step",
                "decode tok/s", "vs teacher", "peak GiB"):
        table.add_column(col, justify="right")
    for c in cells:
        if c.status != "ok":
            table.add_row(str(c.batch), f"{c.context:,}", c.model, f"{c.kv_bytes_per_token_accounted:,.0f}*",
                          "", "", "", c.status, "", "")
            continue
        table.add_row(str(c.batch), f"{c.context:,}", c.model, f"{c.kv_bytes_per_token:,.0f}",
                      f"{c.kv_bytes_per_token * c.context / 2**20:,.1f}", f"{c.prefill_s:.2f}",
                      f"{c.decode_ms_per_step:.2f}", f"{c.decode_tokens_per_s:,.1f}", _speedup(cells, c),
                      f"{c.peak_gib:.1f}")
    console.print(table)
    if any(c.status != "ok" for c in cells):
        console.print("* accounted from the layer layout (the cell did not run)")
    if any(c.bytes_per_value == 4 for c in cells):
        console.print("KV bytes: fp32 cache (the model's dtype); a 16-bit server holds half")


def write_csv(cells: list[Cell], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Cell)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for cell in cells:
            writer.writerow(dataclasses.asdict(cell))


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """Decode tokens/s and KV MiB per sequence against context, teacher vs converted, one line per batch."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"teacher": "tab:gray", "converted": "tab:blue"}
    markers = "osD^v<>"
    for i, batch in enumerate(sorted({c.batch for c in cells})):
        for mode in MODES:
            ok = [c for c in cells if c.batch == batch and c.model == mode and c.status == "ok"]
            if not ok:
                continue
            style = dict(color=colors[mode], marker=markers[i % len(markers)], linestyle="-" if i == 0 else "--",
                         label=f"{mode}, batch {batch}")
            xs = [c.context for c in ok]
            speed.plot(xs, [c.decode_tokens_per_s for c in ok], **style)
            memory.plot(xs, [c.kv_bytes_per_token * c.context / 2**20 for c in ok], **style)
    for ax, ylabel in ((speed, "decode tokens/s"), (memory, "KV cache MiB per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    memory.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
