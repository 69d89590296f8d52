"""`ascend-edit bench_decode`: decode speed, concurrency and prefill, teacher vs converted, measured honestly.

    python -m ascend_edit.tasks.bench_decode --model qwen3_8b_shape --out DIR      # full control
    ascend-edit bench_decode model=qwen3_8b_shape target=mla                        # grid from bench_kv.*

What is measured, and how:

* **Each model in a fresh process** (`teacher` = the stock transformers model; `mla`, `gate_swa` = the
  converted models with the teacher attention removed, as exported). `--rounds 2` runs the processes a
  second time in reverse order and pools the repeats. Random weights are built directly on the device.
* **Decode step**: greedy decoding through a transformers `StaticCache` (`models.static_decode`), the step
  replayed as one graph (`--path cuda_graph`: the eager step captured once as a CUDA graph, no compile
  time; `compile`: `torch.compile(mode="reduce-overhead")`; `eager`). Every model runs the same path.
  The cache holds `context` tokens of random states (filled directly, not prefilled: step time does not
  depend on the values). Warm-up steps (capture / compile / autotune) are excluded; then `repeats` x
  `steps` timed steps with device events; the cell reports the median over repeats of the mean step time
  and the spread (min-max over repeats). tokens/s per sequence = 1000 / ms; total = batch x that.
* **Floor**: bytes a step must read (weights without the input embedding table + every cache buffer the
  step attends over) / the device's measured copy bandwidth (2 x bytes of a large `copy_` per second).
* **The anchor**: the stock teacher with its own static cache under `torch.compile(mode="reduce-overhead")`
  at `--compile-cells` (in every process, so converted models get the same treatment there; an entry
  `KIND:BxT` runs for that model only, e.g. `teacher:1x1024`). `--compile-mode max-autotune` lets inductor
  also benchmark its Triton GEMM templates against cuBLAS for the step's matmuls.
* **One compile per model and cache length**: the compiled step's graph depends on the batch and the
  static cache length only, so every compiled cell (and compiled profile) of one batch and length reuses
  one decoder, refilled in place; `--compile-cache largest` sizes one cache per batch for the largest
  context, so a model compiles once per batch (the full-attention layers then read the whole longer cache
  at shorter contexts: the cell's floor counts it, `cache_len` says it). Each compiled cell records its
  compile + warm-up time and whether it reused an already compiled step; the timed steps (and a reused
  step's warm-up) run under `torch.compiler.set_stance("fail_on_recompile")`, so a recompile fails the cell.
* **Largest batch that fits** at each context, by exact accounting: free device memory after the model is
  built, minus 1 GiB, over (cache bytes per sequence, computed from the allocated buffers' shapes, + the
  decode step's measured workspace per sequence); then verified by allocating that batch and running two
  eager steps (`--no-verify` skips it). CPU runs take the budget from `--memory-budget-gib`.
* **Prefill**: one batch-1 prompt of each `--prefill-contexts` length through the static cache (eager),
  one untimed run (kernel compile / autotune) then `--prefill-repeats` timed ones, each with a fresh
  cache: median and spread (min-max).
* **Where a step's time goes** (`--profile-cells BATCHxCONTEXT`): the decode step under `torch.profiler` (a
  few steps after warm-up): the eager step, or with `--profile-path compile` the compiled step of the cell
  (the compile cells' decoder when they share its length). Written per model: `profile-<model>-b<B>-c<C>.txt` (top
  kernels by device time) and, in the summary, device kernels per step, their summed time per step split
  into GEMM / attention / everything else. Set beside the CUDA-graph step time of the same cell (which
  has no launch gaps), it says whether the step is kernel work — large GEMMs below bandwidth, or many
  small fixed-cost kernels — or host launch overhead. On CPU the ops' own times stand in for kernels.

* **Decode-only linear rewrites** (`models.decode_fusion`, for `--transform-kinds`, default the converted
  models): `--fuse-projections` concatenates the linears that read one input; `--decode-linears gemv` runs
  the linears through the GEMV kernel at <= 8 rows (configs tuned per weight shape at start-up against
  torch's GEMM, which is kept where faster; decisions in the process log). Rows carry the label in
  `linears` and the table shows it as `mla[gemv+fused]`; run once with and once without for an A/B.

Output: `decode.csv`, `prefill.csv`, `max_batch.csv`, `profile.csv`, `summary.json`, per-process logs in
`logs/`, and a short table printed last.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

KINDS = ("teacher", "mla", "gate_swa")
PATHS = ("cuda_graph", "compile", "eager")
RESERVE_BYTES = 1 << 30  # allocator rounding, library workspaces


@dataclass
class Settings:
    model: dict  # ModelConfig fields
    targets: dict  # kind -> TargetConfig fields (init forced to random)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    device: str = "auto"
    contexts: list[int] = field(default_factory=lambda: [1024, 8192, 32768])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    steps: int = 32
    repeats: int = 5
    warmup: int = 3
    path: str = "cuda_graph"
    compile_cells: list[list] = field(default_factory=lambda: [[1, 8192]])  # [batch, context(, kind)]
    compile_kinds: list[str] = field(default_factory=lambda: list(KINDS))  # models the compile cells run for
    prefill_contexts: list[int] = field(default_factory=lambda: [8192, 32768])
    prefill_repeats: int = 3
    profile_cells: list[list[int]] = field(default_factory=list)  # [batch, context]: profile the eager step
    profile_steps: int = 5
    profile_path: str = "eager"  # or "compile": the compiled step (inductor's fused kernels)
    compile_mode: str = "reduce-overhead"
    compile_cache: str = "context"  # or "largest": one cache length per batch for every compiled cell
    compile_backend: str = "inductor"  # "aot_eager" in tests: the same graph capture, no code generation
    # Decode-only linear rewrites (models.decode_fusion) for the models in `transform_kinds`: "gemv" runs
    # every linear through the batch-1 GEMV kernel for <= 8 rows on CUDA; fuse_projections concatenates
    # the linears that read one input. Rows carry the label ("cublas", "gemv", "+fused").
    decode_linears: str = "cublas"
    fuse_projections: bool = False
    # GateSWA decode attention (models.decode_fusion.set_swa_decode_attention): "sdpa", "reductions" or "kernel"
    swa_decode_attention: str = "sdpa"
    # MLA decode attention on CUDA: "default" (the registry's kernel: the Gluon split pass on sm_90) or "rows" (the
    # Triton split pass, kernels/triton/mla_decode.py ROWS_CONFIG), for an A/B of whole models
    mla_decode_kernel: str = "default"
    transform_kinds: list[str] = field(default_factory=lambda: ["mla", "gate_swa"])
    max_batch: bool = True
    verify: bool = True
    memory_budget_gib: float | None = None  # instead of the device's free memory (CPU runs)
    rounds: int = 1
    seed: int = 1234


# ----------------------------------------------------------------------------------------------------
# Building the models
# ----------------------------------------------------------------------------------------------------
def _configs(settings: Settings, kind: str):
    from ascend_edit.config import GateSWAConfig, MLAConfig, ModelConfig, TargetConfig

    model_cfg = ModelConfig(**settings.model)
    if kind == "teacher":
        return model_cfg, None
    fields = dict(settings.targets[kind])
    fields["mla"], fields["gate_swa"] = MLAConfig(**fields["mla"]), GateSWAConfig(**fields["gate_swa"])
    return model_cfg, TargetConfig(**{**fields, "init": "random"})


def build_model(settings: Settings, kind: str, device: torch.device) -> PreTrainedModel:
    """The stock teacher, or the converted model with only its target attention (as an export holds it)."""
    from ascend_edit.attention.edited import EditedAttention
    from ascend_edit.models.loading import TORCH_DTYPES, load_teacher
    from ascend_edit.models.surgery import build_plan, decoder_layers, edit_model

    model_cfg, target = _configs(settings, kind)
    model, _ = load_teacher(model_cfg, device=device)
    if target is not None:
        with torch.device(device):
            edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
        for layer in decoder_layers(model):
            if isinstance(layer.self_attn, EditedAttention):
                layer.self_attn = layer.self_attn.target
        model.to(TORCH_DTYPES[model_cfg.dtype])
    model.eval().requires_grad_(False)
    if kind == "mla" and settings.mla_decode_kernel == "rows":
        from ascend_edit.kernels.triton import mla_decode

        mla_decode.set_default_config(mla_decode.ROWS_CONFIG)
    if kind in settings.transform_kinds:
        from ascend_edit.models.decode_fusion import (
            fuse_decode_projections,
            set_swa_decode_attention,
            use_gemv_linears,
        )

        if settings.swa_decode_attention != "sdpa":
            set_swa_decode_attention(model, settings.swa_decode_attention)
        if settings.fuse_projections:
            fuse_decode_projections(model)
        if settings.decode_linears == "gemv":  # tuned per weight shape for the decode batches (CUDA only)
            use_gemv_linears(model, tune_rows=[b for b in settings.batches if b <= 8])
    gc.collect()
    _empty_cache(device)
    return model


def linears_label(settings: Settings, kind: str) -> str:
    """How the model's linears run: "cublas" (torch's GEMMs) or "gemv", "+fused" with fused projections."""
    rows = "+rowsattn" if kind == "mla" and settings.mla_decode_kernel == "rows" else ""
    if kind not in settings.transform_kinds:
        return "cublas" + rows
    label = settings.decode_linears + ("+fused" if settings.fuse_projections else "") + rows
    if kind == "gate_swa":
        label += {"reductions": "+redattn", "kernel": "+gqakernel"}.get(settings.swa_decode_attention, "")
    return label


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the weights a decode step reads: all but the input embedding table (one row per token)."""
    embedding = model.get_input_embeddings().get_parameter("weight")
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def cache_bytes(cache) -> tuple[int, int, int]:
    """(all buffer bytes, bytes of layers that grow with max length, bytes of fixed-size rings)."""
    from ascend_edit.attention.cache_layers import StaticSinkWindowLayer

    growing = fixed = 0
    for layer in cache.layers:
        size = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values, getattr(layer, "positions", None))
                   if isinstance(t, torch.Tensor))
        if isinstance(layer, StaticSinkWindowLayer):
            fixed += size
        else:
            growing += size
    return growing + fixed, growing, fixed


def fill_cache(decoder, context: int, generator: torch.Generator | None = None) -> None:
    """Make `decoder`'s static cache hold `context` tokens of random states, without running a prefill."""
    from transformers.cache_utils import StaticLayer

    from ascend_edit.attention.cache_layers import StaticSinkWindowLayer

    decoder.prefill(torch.zeros(decoder.batch, 1, dtype=torch.long, device=decoder.device))  # lays out every layer
    for layer in decoder.cache.layers:
        layer.keys.normal_(generator=generator)
        layer.values.normal_(generator=generator)
        if isinstance(layer, StaticSinkWindowLayer):
            layer.assume_filled(context)
        elif isinstance(layer, StaticLayer):
            layer.cumulative_length.fill_(context)
    decoder.mask.fill_(1)
    decoder.position.fill_(context)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Timer:
    """Elapsed milliseconds on the device's timeline (CUDA events) or the host clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self.t0)


def copy_bandwidth(device: torch.device, warmup_s: float = 0.2) -> float:
    """Bytes per second moved by a large device copy (read + write): the best of 20 timed copies, queued back to
    back after ~`warmup_s` of untimed copies.

    The warm-up matters: a GPU that sat idle while the model was built measured 3.78 TB/s in one process and
    4.26 TB/s in another (H200, 2026-12-02), and the floor, hence every "x floor", moves with it."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    with Timer(device) as first:
        dst.copy_(src)
    for _ in range(max(1, min(1000, int(warmup_s * 1e3 / max(first.ms, 1e-3))))):
        dst.copy_(src)  # queued: the device runs them back to back
    best = math.inf
    for _ in range(20):
        with Timer(device) as t:
            dst.copy_(src)
        best = min(best, t.ms)
    del src, dst
    return 2 * n / (best / 1e3)


def restate_floors(result: dict, bandwidth_after: float) -> None:
    """Re-measured after the decode cells: the floors of the decode rows are restated against the higher of the
    two bandwidths (the stricter floor), so a slow first measurement cannot make a step look near its floor."""
    before = result["bandwidth_gb_s"] * 1e9
    result["bandwidth_after_gb_s"] = bandwidth_after / 1e9
    best = max(before, bandwidth_after)
    for row in result["decode"]:
        if row.get("floor_ms") and row.get("ms"):
            row["floor_ms"] *= before / best
            row["x_floor"] = row["ms"] / row["floor_ms"]
    result["floor_bandwidth_gb_s"] = best / 1e9


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------------------------
# One process: one model
# ----------------------------------------------------------------------------------------------------
def decode_len(settings: Settings, context: int) -> int:
    """Static cache length for a cell: the context plus every step a measurement or a profile feeds."""
    return context + max(settings.warmup, 3) + max(settings.repeats * settings.steps, settings.profile_steps) + 3


class CompiledSteps:
    """The compiled decoders of one process, one per (batch, cache length): compiled once, reused by every
    compiled cell and compiled profile of that shape (each refills the cache in place)."""

    def __init__(self, model, settings: Settings):
        self.model, self.settings = model, settings
        self.decoders: dict[tuple[int, int], Any] = {}
        self.warm: set[tuple[int, int]] = set()  # decoders whose step has compiled (later cells must reuse it)
        self.lengths: dict[int, int] = {}  # batch -> shared cache length (compile_cache="largest")

    def plan(self, cells: list[tuple[int, int]]) -> None:
        """With compile_cache="largest": one cache length per batch, for the largest context of its cells."""
        if self.settings.compile_cache == "largest":
            for batch, context in cells:
                self.lengths[batch] = max(self.lengths.get(batch, 0), decode_len(self.settings, context))

    def length(self, batch: int, context: int) -> int:
        return self.lengths.get(batch, decode_len(self.settings, context))

    def get(self, batch: int, context: int):
        from ascend_edit.models.static_decode import StaticDecoder

        key = (batch, self.length(batch, context))
        if key not in self.decoders:
            backend = self.settings.compile_backend
            self.decoders[key] = StaticDecoder(self.model, batch, key[1], mode="compile", backend=backend,
                                               compile_mode=self.settings.compile_mode if backend == "inductor" else None)
        return self.decoders[key]

    def is_warm(self, batch: int, context: int) -> bool:
        return (batch, self.length(batch, context)) in self.warm

    def mark_warm(self, batch: int, context: int) -> None:
        self.warm.add((batch, self.length(batch, context)))

    def drop(self, batch: int, context: int) -> None:
        """Forget a decoder that failed (out of memory, compile error)."""
        self.decoders.pop((batch, self.length(batch, context)), None)
        self.warm.discard((batch, self.length(batch, context)))
        gc.collect()

    def close(self, device: torch.device) -> None:
        self.decoders.clear()
        torch.compiler.reset()
        gc.collect()
        _empty_cache(device)


def measure_decode(model, settings: Settings, device, batch: int, context: int, path: str, bandwidth: float,
                   compiled: CompiledSteps | None = None) -> dict:
    from ascend_edit.models.static_decode import EAGER_STEPS_BEFORE_CAPTURE, StaticDecoder

    cell: dict[str, Any] = {"batch": batch, "context": context, "path": path, "status": "ok"}
    decoder = None
    shared = path == "compile" and compiled is not None
    try:
        if shared:
            assert compiled is not None
            cell["compile_mode"] = settings.compile_mode if settings.compile_backend == "inductor" else \
                settings.compile_backend
            reused, started = compiled.is_warm(batch, context), time.perf_counter()
            decoder = compiled.get(batch, context)
        else:
            decoder = StaticDecoder(model, batch, decode_len(settings, context), mode=path)
        max_len = decoder.max_cache_len
        fill_cache(decoder, context, torch.Generator(device=device).manual_seed(settings.seed))
        total, growing, fixed = cache_bytes(decoder.cache)
        _sync(device)
        # Workspace = what decoding needs beyond weights and cache (activations, graph pools), per sequence.
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warmup = max(settings.warmup, EAGER_STEPS_BEFORE_CAPTURE + 1) if path != "eager" else settings.warmup
        # A reused compiled step must not compile again: its warm-up runs under the public "fail_on_recompile"
        # stance (a recompile raises and the cell records the error), and so do the timed steps of every cell.
        with torch.compiler.set_stance("fail_on_recompile" if shared and reused else "default"):
            for _ in range(warmup):  # autotune, then capture / compile (compile: warm-up and recording runs)
                decoder.step()
        _sync(device)
        if shared:
            assert compiled is not None
            compiled.mark_warm(batch, context)
            cell.update(compile_s=time.perf_counter() - started, reused_compiled_step=reused)
        per_step = []
        with torch.compiler.set_stance("fail_on_recompile" if shared else "default"):
            for _ in range(settings.repeats):
                with Timer(device) as t:
                    for _ in range(settings.steps):
                        decoder.step()
                per_step.append(t.ms / settings.steps)
        ms = statistics.median(per_step)
        floor_ms = 1e3 * (weight_bytes(model) + total) / bandwidth
        cell.update(repeats_ms=per_step, ms=ms, ms_min=min(per_step), ms_max=max(per_step), tok_s_seq=1e3 / ms, tok_s_total=batch * 1e3 / ms,
                    floor_ms=floor_ms, x_floor=ms / floor_ms, cache_gib=total / 2**30,
                    cache_per_token_seq=growing / (batch * max_len), ring_per_seq=fixed / batch, max_len=max_len,
                    cache_len=max_len)
        if device.type == "cuda":
            cell["workspace_per_seq"] = max(torch.cuda.max_memory_allocated(device) - before, 0) / batch
            cell["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except (torch.OutOfMemoryError, RuntimeError, AssertionError) as err:  # compile errors derive from these
        cell["status"] = "oom" if _is_oom(err) else f"error: {str(err).splitlines()[0][:160]}"
        log.warning("decode %s: %s", cell, err)
        if shared:
            assert compiled is not None
            compiled.drop(batch, context)
    finally:
        del decoder
        if path == "compile" and not shared:
            torch.compiler.reset()
        gc.collect()
        _empty_cache(device)
    log.info("decode %s", cell)
    return cell


def measure_prefill(model, device, context: int, seed: int, repeats: int = 3) -> dict:
    from ascend_edit.models.static_decode import StaticDecoder

    row = {"context": context, "status": "ok"}
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(device)
        times = []
        for run in range(1 + repeats):  # the first run compiles / autotunes attention kernels: not timed
            decoder = StaticDecoder(model, 1, context + 2, mode="eager")
            _sync(device)
            with Timer(device) as t:
                decoder.prefill(ids)
            if run:
                times.append(t.ms / 1e3)
            del decoder
            gc.collect()
            _empty_cache(device)
        row.update(seconds=statistics.median(times), seconds_min=min(times), seconds_max=max(times),
                   repeats_s=times, tok_s=context / statistics.median(times))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        row["status"] = "oom" if _is_oom(err) else f"error: {str(err).splitlines()[0][:160]}"
    log.info("prefill %s", row)
    return row


GEMM_MARKERS = ("gemm", "gemv", "cutlass", "nvjet", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "triton_tem_")  # inductor's GEMM templates (max-autotune)
# "merge_splits": the split-K decode kernels' combine pass (MLA and GQA decode alike).
ATTENTION_MARKERS = ("attention", "attn", "flash", "fmha", "sdpa", "mla", "flex", "_fwd_kernel", "gqa_decode",
                     "merge_splits")


def kernel_class(name: str) -> str:
    lowered = name.lower()
    if any(m in lowered for m in ATTENTION_MARKERS):
        return "attention"
    if any(m in lowered for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def profile_step(model, settings: Settings, device, batch: int, context: int, out_file: Path | None,
                 compiled: CompiledSteps | None = None) -> dict:
    """The decode step under torch.profiler: device kernels per step and their time, by class. The eager step,
    or the compiled one (`compiled` given: the decoder the compiled cells of this shape use, or a new one).

    On CPU the compiled step's generated C++ kernels appear only when inductor was told to record them
    (`run_worker` does, before any compile); the ops it leaves to ATen (matmuls) appear as such."""
    from torch.profiler import ProfilerActivity, profile

    from ascend_edit.models.static_decode import StaticDecoder

    path = "compile" if compiled is not None else "eager"
    row: dict[str, Any] = {"batch": batch, "context": context, "path": path, "status": "ok",
                           "steps": settings.profile_steps}
    decoder = None
    try:
        if compiled is not None:
            decoder = compiled.get(batch, context)
        else:
            decoder = StaticDecoder(model, batch, decode_len(settings, context), mode="eager")
        fill_cache(decoder, context, torch.Generator(device=device).manual_seed(settings.seed))
        for _ in range(max(settings.warmup, 3 if compiled is not None else 2)):  # compiled: warm-up, record, replay
            decoder.step()
        _sync(device)
        on_device = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
        with profile(activities=activities) as prof:
            with Timer(device) as t:
                for _ in range(settings.profile_steps):
                    decoder.step()
            _sync(device)
        steps = settings.profile_steps
        if on_device:  # device kernels (and copies) only: the events that carry device time
            averages = prof.key_averages()
            kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = kernels or [e for e in averages if e.self_device_time_total > 0]  # older event layouts
            time_of = lambda e: e.self_device_time_total  # noqa: E731 - microseconds over all steps
        else:  # CPU: leaf aten ops' and inductor's generated kernels' own time stands in for kernels
            kernels = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 and
                       (e.key.startswith("aten::") or "cpp_fused" in e.key)]
            time_of = lambda e: e.self_cpu_time_total  # noqa: E731
        kernels.sort(key=time_of, reverse=True)
        by_class = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
        count_by_class = {"gemm": 0, "attention": 0, "other": 0}
        for e in kernels:
            by_class[kernel_class(e.key)] += time_of(e) / 1e3 / steps
            count_by_class[kernel_class(e.key)] += e.count / steps
        row.update(step_ms=t.ms / steps, kernels_per_step=sum(e.count for e in kernels) / steps,
                   kernel_ms_per_step=sum(by_class.values()), gemm_ms=by_class["gemm"],
                   attention_ms=by_class["attention"], other_ms=by_class["other"],
                   gemm_kernels=count_by_class["gemm"], attention_kernels=count_by_class["attention"],
                   other_kernels=count_by_class["other"],
                   top=[{"name": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": time_of(e) / 1e3 / steps,
                         "class": kernel_class(e.key)} for e in kernels[:30]])
        if out_file is not None:
            lines = [f"{path} decode step, batch {batch}, context {context}, {steps} steps profiled "
                     f"({'device kernels' if on_device else 'CPU aten ops, own time'}), per step:",
                     f"step {row['step_ms']:.3f} ms wall; {row['kernels_per_step']:.0f} kernels, "
                     f"{row['kernel_ms_per_step']:.3f} ms summed: GEMM {row['gemm_ms']:.3f} ms "
                     f"({row['gemm_kernels']:.0f}), attention {row['attention_ms']:.3f} ms "
                     f"({row['attention_kernels']:.0f}), other {row['other_ms']:.3f} ms ({row['other_kernels']:.0f})",
                     "", f"{'ms/step':>9} {'calls/step':>10} {'class':>9}  kernel"]
            lines += [f"{k['ms_per_step']:9.4f} {k['calls_per_step']:10.1f} {k['class']:>9}  {k['name']}"
                      for k in row["top"]]
            out_file.write_text("\n".join(lines) + "\n")
            row["file"] = out_file.name
    except (torch.OutOfMemoryError, RuntimeError, AssertionError) as err:
        row["status"] = "oom" if _is_oom(err) else f"error: {str(err).splitlines()[0][:160]}"
        log.warning("profile %s: %s", row, err)
        if compiled is not None:
            compiled.drop(batch, context)
    finally:
        del decoder
        gc.collect()
        _empty_cache(device)
    log.info("profile %s", {k: v for k, v in row.items() if k != "top"})
    return row


def max_batch_rows(model, settings: Settings, device, cells: list[dict]) -> list[dict]:
    """Largest batch per context by exact accounting of free memory, then verified by trying it."""
    from ascend_edit.models.static_decode import StaticDecoder

    ok = [c for c in cells if c["status"] == "ok"]
    if not ok:
        return []
    per_token = max(c["cache_per_token_seq"] for c in ok)
    ring = max(c["ring_per_seq"] for c in ok)
    # Per-sequence workspace from the largest batch measured (at batch 1 fixed costs would dominate it).
    largest = max(c["batch"] for c in ok)
    workspace = max((c.get("workspace_per_seq", 0.0) for c in ok if c["batch"] == largest), default=0.0)
    gc.collect()
    _empty_cache(device)
    if settings.memory_budget_gib is not None:
        free = settings.memory_budget_gib * 2**30
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        return []
    rows = []
    for context in settings.contexts:
        max_len = context + max(settings.warmup, 3) + settings.repeats * settings.steps + 2
        per_seq = per_token * max_len + ring + workspace
        batch = max(int((free - RESERVE_BYTES) // per_seq), 0) if free > RESERVE_BYTES else int(free // per_seq)
        row = {"context": context, "max_batch": batch, "method": "accounted", "per_seq_mib": per_seq / 2**20,
               "free_gib": free / 2**30, "verified": ""}
        if settings.verify and batch > 0 and device.type == "cuda" and settings.memory_budget_gib is None:
            decoder = None
            try:
                decoder = StaticDecoder(model, batch, max_len, mode="eager")
                fill_cache(decoder, context)
                decoder.step()
                decoder.step()
                _sync(device)
                row["verified"] = "ran"
            except (torch.OutOfMemoryError, RuntimeError) as err:
                row["verified"] = "oom" if _is_oom(err) else "error"
            finally:
                del decoder
                gc.collect()
                _empty_cache(device)
        rows.append(row)
        log.info("max batch %s", row)
    return rows


def run_worker(settings: Settings, kind: str, result_path: Path | None = None) -> dict:
    from ascend_edit.device import resolve_device, seed_everything

    info = resolve_device(settings.device)
    device = info.torch_device
    seed_everything(settings.seed)
    started = time.perf_counter()
    model = build_model(settings, kind, device)
    build_s = time.perf_counter() - started
    bandwidth = copy_bandwidth(device)
    result: dict[str, Any] = {"kind": kind, "device": info.name, "build_s": build_s, "bandwidth_gb_s": bandwidth / 1e9,
              "weight_gib": weight_bytes(model) / 2**30, "dtype": str(next(model.parameters()).dtype),
              "decode": [], "prefill": [], "max_batch": [], "profile": []}
    path = settings.path if device.type == "cuda" or settings.path != "cuda_graph" else "eager"
    result["path"] = path
    result["linears"] = linears_label(settings, kind)
    compile_cells = [(c[0], c[1]) for c in settings.compile_cells
                     if (c[2:] == [kind]) or (not c[2:] and kind in settings.compile_kinds)] if path != "compile" else []
    compiled = CompiledSteps(model, settings)
    compiled.plan([(b, c) for b in settings.batches for c in settings.contexts] if path == "compile" else [])
    compiled.plan(compile_cells)
    if settings.profile_path == "compile":
        compiled.plan([(b, c) for b, c in settings.profile_cells])

    def save() -> None:  # after every measurement: a run cut short still leaves what it measured
        result["wall_s"] = time.perf_counter() - started
        for section in ("decode", "prefill", "max_batch", "profile"):
            for row in result[section]:
                row.setdefault("linears", result["linears"])
        if result_path is not None:
            result_path.write_text(json.dumps(result, indent=1))

    for batch in settings.batches:
        for context in settings.contexts:
            result["decode"].append({"kind": kind, **measure_decode(model, settings, device, batch, context,
                                                                    path, bandwidth, compiled)})
            save()
    for batch, context in compile_cells:
        result["decode"].append({"kind": kind, **measure_decode(model, settings, device, batch, context,
                                                                "compile", bandwidth, compiled)})
        save()
    for batch, context in settings.profile_cells:
        tag = "-compiled" if settings.profile_path == "compile" else ""
        out_file = (result_path.parent / f"profile-{kind}{tag}-b{batch}-c{context}.txt"
                    if result_path is not None else None)
        by_compile = compiled if settings.profile_path == "compile" else None
        result["profile"].append({"kind": kind, **profile_step(model, settings, device, batch, context, out_file,
                                                               by_compile)})
        save()
    compiled.close(device)
    restate_floors(result, copy_bandwidth(device))
    save()
    for context in settings.prefill_contexts:
        result["prefill"].append({"kind": kind, **measure_prefill(model, device, context, settings.seed,
                                                                  settings.prefill_repeats)})
        save()
    if settings.max_batch:
        grid = [c for c in result["decode"] if c["path"] == path]
        result["max_batch"] = [{"kind": kind, **row} for row in max_batch_rows(model, settings, device, grid)]
    result["complete"] = True
    save()
    return result


# ----------------------------------------------------------------------------------------------------
# Orchestration: a fresh process per model, results merged
# ----------------------------------------------------------------------------------------------------
def run_all(settings: Settings, out_dir: Path, timeout_s: int = 3600) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    spec = out_dir / "settings.json"
    spec.write_text(json.dumps(dataclasses.asdict(settings), indent=1))
    results: dict[str, list[dict]] = {kind: [] for kind in settings.kinds}
    for round_idx in range(settings.rounds):
        order = settings.kinds if round_idx % 2 == 0 else list(reversed(settings.kinds))
        for kind in order:
            result_file = out_dir / f"result-{kind}-{round_idx}.json"
            log_file = out_dir / "logs" / f"{kind}-{round_idx}.log"
            cmd = [sys.executable, "-m", "ascend_edit.tasks.bench_decode", "--worker", kind, "--settings", str(spec),
                   "--result", str(result_file)]
            with open(log_file, "w") as handle:
                try:
                    rc: int | str = subprocess.run(cmd, check=False, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if rc != 0:
                tail = log_file.read_text().strip().splitlines()[-3:]
                print(f"bench_decode: {kind} process failed ({rc}); see {log_file}: {' | '.join(tail)}",
                      file=sys.stderr)
            if result_file.exists():  # complete, or what it measured before failing
                results[kind].append(json.loads(result_file.read_text()))
    summary = merge(results)
    write_outputs(summary, out_dir)
    print_table(summary)
    failed = [kind for kind, runs in results.items()
              if len(runs) < settings.rounds or not all(r.get("complete") for r in runs)]
    if failed:
        raise SystemExit(f"bench_decode: the process of {', '.join(failed)} failed; see {out_dir / 'logs'}")
    return summary


def merge(results: dict[str, list[dict]]) -> dict:
    """Pool the rounds of each model: a cell's repeats from every process (median / min / max)."""
    decode, prefill, max_batch, profiles, meta = [], [], [], [], {}
    for kind, runs in results.items():
        if not runs:
            continue
        meta[kind] = {k: runs[0][k] for k in ("device", "bandwidth_gb_s", "weight_gib", "dtype", "build_s")}
        meta[kind]["wall_s"] = [r["wall_s"] for r in runs]
        for i, cell in enumerate(runs[0]["decode"]):
            same = [r["decode"][i] for r in runs if i < len(r["decode"]) and r["decode"][i]["status"] == "ok"]
            pooled = dict(cell)
            if len(same) > 1:
                repeats = [ms for c in same for ms in c["repeats_ms"]]
                pooled.update(ms=statistics.median(repeats), ms_min=min(repeats), ms_max=max(repeats),
                              repeats_ms=repeats)
                pooled["tok_s_seq"] = 1e3 / pooled["ms"]
                pooled["tok_s_total"] = pooled["batch"] * pooled["tok_s_seq"]
                pooled["x_floor"] = pooled["ms"] / pooled["floor_ms"]
            decode.append(pooled)
        # Prefill: every round's timed runs pooled, as the decode repeats.
        for i, row in enumerate(runs[0]["prefill"]):
            same = [r["prefill"][i] for r in runs if i < len(r["prefill"]) and r["prefill"][i]["status"] == "ok"]
            pooled = dict(row)
            if len(same) > 1:
                times = [x for c in same for x in c.get("repeats_s", [c["seconds"]])]
                pooled.update(seconds=statistics.median(times), seconds_min=min(times), seconds_max=max(times),
                              repeats_s=times, tok_s=row["context"] / statistics.median(times))
            prefill.append(pooled)
        max_batch += runs[0]["max_batch"]
        profiles += runs[0].get("profile", [])
    return {"models": meta, "decode": decode, "prefill": prefill, "max_batch": max_batch, "profile": profiles}


DECODE_FIELDS = ["kind", "batch", "context", "path", "status", "ms", "ms_min", "ms_max", "tok_s_seq", "tok_s_total",
                 "floor_ms", "x_floor", "cache_gib", "peak_gib", "cache_len", "compile_mode", "compile_s",
                 "reused_compiled_step", "linears"]


PROFILE_FIELDS = ["kind", "batch", "context", "path", "status", "step_ms", "kernels_per_step", "kernel_ms_per_step",
                  "gemm_ms", "gemm_kernels", "attention_ms", "attention_kernels", "other_ms", "other_kernels", "file", "linears"]


def write_outputs(summary: dict, out_dir: Path) -> None:
    for name, rows, fields in (("decode.csv", summary["decode"], DECODE_FIELDS),
                               ("prefill.csv", summary["prefill"],
                                ["kind", "context", "status", "seconds", "seconds_min", "seconds_max", "tok_s"]),
                               ("profile.csv", summary.get("profile", []), PROFILE_FIELDS),
                               ("max_batch.csv", summary["max_batch"],
                                ["kind", "context", "max_batch", "method", "verified", "per_seq_mib", "free_gib"])):
        with open(out_dir / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_table(summary: dict) -> None:
    """Short table: per cell each model's ms/step (spread), x floor, total tok/s and speed-up over the teacher."""
    cells = {(c["kind"], c["batch"], c["context"], c["path"]): c for c in summary["decode"]}
    keys = sorted({(c["batch"], c["context"], c["path"]) for c in summary["decode"]}, key=lambda k: (k[2], k[0], k[1]))
    kinds = list(summary["models"])
    lines = ["", "decode step: median ms [min-max over repeats] (x floor) total tok/s; speed-up vs teacher"]
    for key in keys:
        parts = []
        base = cells.get(("teacher", *key))
        for kind in kinds:
            c = cells.get((kind, *key))
            if c is None:
                continue
            name = kind if c.get("linears", "cublas") == "cublas" else f"{kind}[{c['linears']}]"
            if c["status"] != "ok":
                parts.append(f"{name} {c['status']}")
                continue
            text = (f"{name} {c['ms']:.2f} [{c['ms_min']:.2f}-{c['ms_max']:.2f}] (x{c['x_floor']:.2f} of "
                    f"{c['floor_ms']:.2f}) {c['tok_s_total']:,.0f}")
            if kind != "teacher" and base is not None and base["status"] == "ok":
                text += f" {base['ms'] / c['ms']:.2f}x"
            parts.append(text)
        lines.append(f"b{key[0]:<3} ctx{key[1]:>6} {key[2]:<10} | " + " | ".join(parts))
    if summary["max_batch"]:
        lines.append("largest batch (exact accounting of free memory; verified = two steps ran at that batch):")
        by_ctx: dict[int, list[str]] = {}
        for row in summary["max_batch"]:
            by_ctx.setdefault(row["context"], []).append(f"{row['kind']} {row['max_batch']}"
                                                        f"{' (' + row['verified'] + ')' if row['verified'] else ''}")
        lines += [f"  ctx{ctx:>6}: " + ", ".join(parts) for ctx, parts in sorted(by_ctx.items())]
    graph_ms = {(c["kind"], c["batch"], c["context"], c["path"]): c["ms"] for c in summary["decode"]
                if c["status"] == "ok" and c["path"] != "eager"}
    for row in summary.get("profile", []):
        path = row.get("path", "eager")
        if row == summary["profile"][0]:
            lines.append(f"{path} step profiled, per step: wall ms | kernels, summed kernel ms = GEMM + attention + "
                         "other (kernel counts) | graph-path step ms of the cell")
        if row["status"] != "ok":
            lines.append(f"  {row['kind']} b{row['batch']} ctx{row['context']}: {row['status']}")
            continue
        cell = (row["kind"], row["batch"], row["context"])
        graph = graph_ms.get((*cell, "compile")) if path == "compile" else graph_ms.get((*cell, "cuda_graph"))
        name = row["kind"] if row.get("linears", "cublas") == "cublas" else f"{row['kind']}[{row['linears']}]"
        lines.append(f"  {name:<8} b{row['batch']} ctx{row['context']:>6}: {row['step_ms']:.2f} | "
                     f"{row['kernels_per_step']:.0f}, {row['kernel_ms_per_step']:.2f} = {row['gemm_ms']:.2f} + "
                     f"{row['attention_ms']:.2f} + {row['other_ms']:.2f} ({row['gemm_kernels']:.0f} / "
                     f"{row['attention_kernels']:.0f} / {row['other_kernels']:.0f}) | {_fmt(graph, '.2f')}")
    if summary["prefill"]:
        lines.append("prefill, batch 1, s: median [min-max] over repeats")
        by_ctx = {}
        for r in summary["prefill"]:
            text = (f"{r['kind']} {_fmt(r.get('seconds'), '.3f')} [{_fmt(r.get('seconds_min'), '.3f')}-"
                    f"{_fmt(r.get('seconds_max'), '.3f')}]" if r["status"] == "ok" else f"{r['kind']} {r['status']}")
            by_ctx.setdefault(r["context"], []).append(text)
        lines += [f"  ctx{ctx:>6}: " + " | ".join(parts) for ctx, parts in sorted(by_ctx.items())]
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------
def _compose(model: str, target: str, extra: list[str] | None = None):
    from hydra import compose, initialize_config_module

    from ascend_edit.config import register_configs, to_typed

    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=[f"model={model}", f"target={target}",
                                                                  "output_dir=.", *(extra or [])]))


def settings_from_root(cfg) -> Settings:
    """The `ascend-edit bench_decode` task: teacher vs `target.kind`, grid and steps from `bench_kv.*`."""
    bench = cfg.bench_kv
    return Settings(model=dataclasses.asdict(cfg.model), targets={cfg.target.kind: dataclasses.asdict(cfg.target)},
                    kinds=["teacher", cfg.target.kind], device=cfg.device.type, contexts=list(bench.contexts),
                    batches=list(bench.batch_sizes), steps=bench.decode_tokens, warmup=max(bench.warmup_tokens, 2),
                    path="cuda_graph" if cfg.device.type in ("cuda", "auto") else "eager",
                    compile_cells=[[min(bench.batch_sizes), min(bench.contexts)]] if cfg.device.type == "cuda" else [],
                    prefill_contexts=[c for c in bench.contexts if c >= 8192][:2], seed=cfg.device.seed)


def run(cfg) -> dict:
    if cfg.target.kind not in KINDS:
        raise ValueError(f"target.kind={cfg.target.kind}: bench_decode compares the teacher with mla or gate_swa")
    if cfg.target.kind == "gate_swa" and cfg.target.gate_swa.full_by_sensitivity:
        raise ValueError("bench_decode needs a fixed plan: give target.gate_swa.full_layers or full_every")
    return run_all(settings_from_root(cfg), Path(cfg.output_dir) / "bench_decode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ascend_edit.models.decode_fusion import SWA_DECODE_ATTENTION  # package imports stay lazy, as above

    p = argparse.ArgumentParser(prog="python -m ascend_edit.tasks.bench_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3_8b_shape", help="conf/model entry (random weights)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "npu"))
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=32, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--path", default="cuda_graph", choices=PATHS)
    p.add_argument("--compile-cells", nargs="*", default=None, help="BATCHxCONTEXT cells also run compiled; "
                   "KIND:BATCHxCONTEXT for that model only (e.g. teacher:1x1024, the anchor). Default: the smallest "
                   "batch at the largest context <= 8192 of --contexts (1x8192 with the default grid); none with "
                   "--path compile")
    p.add_argument("--compile-mode", default="reduce-overhead", choices=("reduce-overhead", "max-autotune", "max-autotune-gemm"),
                   help="torch.compile mode of compiled cells (max-autotune: inductor's GEMM templates too, and "
                   "coordinate-descent tuning of every kernel; max-autotune-gemm: the GEMM autotuning alone)")
    p.add_argument("--compile-cache", default="context", choices=("context", "largest"),
                   help="compiled cells' cache: sized per context (a compile per length), or one per batch for "
                   "the largest context (one compile per batch)")
    p.add_argument("--compile-kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="models the compile cells run for (the teacher alone is the anchor)")
    p.add_argument("--prefill-contexts", nargs="*", type=int, default=None,
                   help="default: the contexts >= 8192 of --contexts (8192 and 32768 with the default grid), else "
                        "the largest")
    p.add_argument("--prefill-repeats", type=int, default=3, help="timed prefill runs after an untimed one")
    p.add_argument("--profile-cells", nargs="*", default=[], help="BATCHxCONTEXT cells whose eager decode step "
                   "is profiled (top kernels written per model)")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"),
                   help="aot_eager: the same graph capture without code generation (quick CPU checks)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-path", default="eager", choices=("eager", "compile"),
                   help="profile the eager step, or the compiled one (reusing the compiled cells' compile)")
    p.add_argument("--decode-linears", default="cublas", choices=("cublas", "gemv"),
                   help="gemv: the GEMV kernel (kernels/triton/gemv.py) for every linear at <= 8 rows on CUDA, "
                        "its config tuned per weight shape at start-up, torch's GEMM kept where that was faster "
                        "(logged); decode only: prefill and other devices keep torch's GEMMs")
    p.add_argument("--fuse-projections", action="store_true",
                   help="concatenate the linears that read one input (MLA query + latent, q/k/v(+gate), MLP gate + up)")
    p.add_argument("--swa-decode-attention", default="sdpa", choices=SWA_DECODE_ATTENTION,
                   help="GateSWA decode attention (models.decode_fusion.set_swa_decode_attention): reductions = "
                        "products and sums that inductor fuses (compiled decode); kernel = the split-K Triton op")
    p.add_argument("--mla-decode-kernel", default="default", choices=("default", "rows"),
                   help="MLA decode attention on CUDA: default = the registry's kernel (the Gluon split pass on sm_90, "
                        "the Triton one elsewhere); rows = the Triton split pass everywhere (an A/B of whole models)")
    p.add_argument("--transform-kinds", nargs="+", default=["mla", "gate_swa"], choices=KINDS,
                   help="models the two options above apply to (add teacher for a transformed teacher)")
    p.add_argument("--no-max-batch", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="do not try the accounted largest batch")
    p.add_argument("--memory-budget-gib", type=float, default=None)
    p.add_argument("--rounds", type=int, default=1, help="process rounds; odd rounds reverse the order")
    p.add_argument("--target-override", nargs="*", default=[], help="Hydra overrides for the targets, "
                   "e.g. target.gate_swa.window=2048; KIND:OVERRIDE for one model only, e.g. mla:target=mla_small "
                   "(the MLA shapes for head_dim-64 teachers) or mla:target.mla.kv_lora_rank=256")
    p.add_argument("--process-timeout", type=int, default=3600, help="seconds per model process")
    p.add_argument("--out", default="bench_decode_out")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _positive_ints(name: str, values: list[int]) -> None:
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"bench_decode: error: --{name} needs positive integers, got {values}")


def settings_from_args(args: argparse.Namespace) -> Settings:
    from ascend_edit.models.loading import teacher_config
    from ascend_edit.validation import check_against_teacher

    for name in ("contexts", "batches"):
        _positive_ints(name, getattr(args, name))
    _positive_ints("steps / --repeats / --prefill-repeats / --profile-steps",
                   [args.steps, args.repeats, args.prefill_repeats, args.profile_steps])
    cells = _cells("compile-cells", default_compile_cells(args.contexts, args.batches, args.path)
                   if args.compile_cells is None else args.compile_cells, with_kind=True)
    profile_cells = _cells("profile-cells", args.profile_cells)
    prefill = default_prefill_contexts(args.contexts) if args.prefill_contexts is None else args.prefill_contexts
    targets, model = {}, None
    for kind in args.kinds:
        if kind == "teacher":
            continue
        cfg = _compose(args.model, *_target_overrides(kind, args.target_override))
        if cfg.target.kind != kind:
            raise ValueError(f"--target-override sets the {kind} model's target.kind to {cfg.target.kind}: prefix a "
                             f"target=NAME entry with the model it is for (e.g. mla:target=mla_small)")
        check_against_teacher(cfg, teacher_config(cfg.model, weights=False))  # one line, before any process starts
        targets[kind], model = dataclasses.asdict(cfg.target), dataclasses.asdict(cfg.model)
    if model is None:
        model = dataclasses.asdict(_compose(args.model, "mla").model)
    return Settings(model=model, targets=targets, kinds=args.kinds, device=args.device, contexts=args.contexts,
                    batches=args.batches, steps=args.steps, repeats=args.repeats, warmup=args.warmup, path=args.path,
                    compile_cells=cells, compile_kinds=args.compile_kinds, prefill_contexts=prefill,
                    prefill_repeats=args.prefill_repeats, profile_cells=profile_cells, profile_steps=args.profile_steps,
                    profile_path=args.profile_path, compile_mode=args.compile_mode, compile_cache=args.compile_cache,
                    compile_backend=args.compile_backend, decode_linears=args.decode_linears,
                    fuse_projections=args.fuse_projections, transform_kinds=args.transform_kinds,
                    swa_decode_attention=args.swa_decode_attention, mla_decode_kernel=args.mla_decode_kernel,
                    max_batch=not args.no_max_batch, verify=not args.no_verify,
                    memory_budget_gib=args.memory_budget_gib, rounds=args.rounds)


def default_compile_cells(contexts: list[int], batches: list[int], path: str) -> list[str]:
    """One compiled cell: the smallest batch at the largest context <= 8192 (else the smallest context); none
    when every cell already runs compiled (--path compile)."""
    if path == "compile":
        return []
    context = max((c for c in contexts if c <= 8192), default=min(contexts))
    return [f"{min(batches)}x{context}"]


def default_prefill_contexts(contexts: list[int]) -> list[int]:
    """The grid's long contexts (>= 8192), or its largest when it has none."""
    return sorted(c for c in set(contexts) if c >= 8192) or [max(contexts)]


def _target_overrides(kind: str, overrides: list[str]) -> tuple[str, list[str]]:
    """(target config name, Hydra overrides) for `kind`: unprefixed overrides apply to every converted model,
    KIND:OVERRIDE to that one; a `target=NAME` entry picks the config group entry instead of the kind's own."""
    target, mine = kind, []
    for entry in overrides:
        prefix, sep, override = entry.partition(":")
        if sep and prefix in KINDS and "=" not in prefix:
            if prefix != kind:
                continue
        else:
            override = entry
        if override.startswith("target="):
            target = override.split("=", 1)[1]
        else:
            mine.append(override)
    return target, mine


def _cells(option: str, entries: list[str], with_kind: bool = False) -> list[list]:
    """BATCHxCONTEXT entries as [batch, context]; with `with_kind`, KIND:BATCHxCONTEXT as [batch, context, kind]."""
    cells: list[list] = []
    for cell in entries:
        kind, _, shape = cell.rpartition(":")
        if kind and not with_kind:
            raise SystemExit(f"bench_decode: error: --{option} entry {cell!r}: no KIND: prefix here (BATCHxCONTEXT)")
        if kind and kind not in KINDS:
            raise SystemExit(f"bench_decode: error: --{option} entry {cell!r}: {kind!r} is not one of {KINDS}")
        try:
            batch, context = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bench_decode: error: --{option} entry {cell!r} is not "
                             f"{'[KIND:]' if with_kind else ''}BATCHxCONTEXT") from None
        if batch <= 0 or context <= 0:
            raise SystemExit(f"bench_decode: error: --{option} entry {cell!r} needs positive integers")
        cells.append([batch, context, kind] if kind else [batch, context])
    return cells


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.worker:
        settings = Settings(**json.loads(Path(args.settings).read_text()))
        run_worker(settings, args.worker, Path(args.result))
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ascend_edit.config import ConfigError

    try:
        settings = settings_from_args(args)
    except (ConfigError, HydraException, OmegaConfBaseException, ValueError) as err:  # one line naming the key
        raise SystemExit(f"bench_decode: error: {str(err).splitlines()[0]}") from None
    run_all(settings, Path(args.out), timeout_s=args.process_timeout)


if __name__ == "__main__":
    main()
