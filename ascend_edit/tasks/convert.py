"""`ascend-edit` (convert): teacher -> edited model -> stage 1 -> stage 2 -> converted checkpoint + report.

Under `engine.zero_stage=3` the model stays partitioned from the teacher's load to the written checkpoint:
each stage's engine leaves it partitioned (`run_stage(keep_partitioned=True)`), evaluations gather one
module at a time for its forward (every rank runs them), and `save_converted` gathers one tensor at a time
to rank 0, which writes. `report.json` records what each rank held whole at the start of each stage and the
largest number of values ever gathered at once (`zero3`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ascend_edit import distributed, jsonio
from ascend_edit.config import RootConfig, StageConfig
from ascend_edit.device import memory_stats
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import model_level_objective
from ascend_edit.eval.kv import kv_table
from ascend_edit.eval.metrics import TeacherReference, evaluate
from ascend_edit.models.checkpoint import load_converted_weights, save_converted
from ascend_edit.models.surgery import plan_entries
from ascend_edit.models.zero3 import GATHER_METER, full_numel, has_zero_params
from ascend_edit.tasks.eval import command_overrides
from ascend_edit.train.loop import NonFiniteSteps
from ascend_edit.train.prepare import prepare
from ascend_edit.train.stage import run_stage, stage_settings
from ascend_edit.validation import init_from_directory


def run(cfg: RootConfig, *, partitioned_handoff: bool | None = None) -> dict:
    """The conversion. `partitioned_handoff` (default: under ZeRO-3) keeps the model partitioned between and
    after the stages; False gathers it whole on every rank after each stage (the reference path in tests)."""
    started = time.perf_counter()
    GATHER_METER.reset()
    phases: dict[str, float] = {}  # where the wall time goes besides training (report.json `phase_seconds`)
    with clock(phases, "prepare"):  # teacher, targets and their warm start, data
        prepared = prepare(cfg)
    if prepared is None:
        return {}
    device, env, model, tokenizer = prepared.device, prepared.env, prepared.model, prepared.tokenizer
    train_set, eval_batches, plan, out_dir = prepared.train_set, prepared.eval_batches, prepared.plan, prepared.out_dir
    console = Console()
    if partitioned_handoff is None:
        partitioned_handoff = cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 3
    held: dict[str, dict[str, int]] = {}  # per stage: what this rank holds whole when it starts
    original_teacher = None  # a frozen copy, when stage 2 trains shared weights (the model's teacher path moves)

    def collective() -> bool:  # every rank takes part in writing the model (it is partitioned)
        return has_zero_params(model)

    reference = TeacherReference(eval_batches)  # the teacher's forwards run once for every evaluation below
    with clock(phases, "evaluate"):
        results = {"teacher": evaluate(model, eval_batches, "teacher", reference),
                   "after_init": evaluate(model, eval_batches, reference=reference)}
    console.print(f"teacher ppl {results['teacher']['ppl']:.2f} | after init ppl {results['after_init']['ppl']:.2f}"
                  f" KL {results['after_init']['teacher_kl']:.3f}")
    timings, histories = {}, {}
    ckpt_dir = out_dir / "checkpoints"
    resumed_at: dict[str, int] = {}  # per stage, the step a resume started from: the report says so
    settings = stage_settings(cfg)
    stages = {"layerwise": ("layerwise", "both"), "model_level": ("model_level", "both")}
    if cfg.distill.stage in stages["layerwise"] and cfg.distill.layerwise.steps:
        objective = LayerwiseObjective(cfg.distill.layerwise.loss, cfg.distill.layerwise.match)
        held["layerwise"] = whole_on_this_rank(model)
        histories["layerwise"], timings["layerwise"] = run_stage(
            "layerwise", model, objective, cfg.distill.layerwise, settings, train_set, device, env, ckpt_dir,
            keep_partitioned=partitioned_handoff, resumed_at=resumed_at)
        with clock(phases, "evaluate"):
            results["after_layerwise"] = evaluate(model, eval_batches, reference=reference)
        refuse_diverged("layerwise", results["after_layerwise"], ckpt_dir)
        if env.is_main or collective():  # the hand-off point for a stage 2 run as a separate job
            with clock(phases, "save"):
                save_converted(model, cfg.target, out_dir / "stage-layerwise", tokenizer)
    elif cfg.distill.stage == "model_level":
        start = init_from_directory(cfg.distill.init_from) if cfg.distill.init_from else out_dir / "stage-layerwise"
        if start.exists():
            load_converted_weights(model, start, cfg.target)
            with clock(phases, "evaluate"):
                results["after_layerwise"] = evaluate(model, eval_batches, reference=reference)
            console.print(f"stage 2 starts from {start}")
        elif cfg.distill.init_from:
            raise FileNotFoundError(f"distill.init_from={start} does not exist")
        else:
            console.print("stage 2 starts from the initialised targets (no stage-layerwise/ in the run dir)")
    if cfg.distill.stage in stages["model_level"] and cfg.distill.model_level.steps:
        ml = cfg.distill.model_level
        held["model_level"] = whole_on_this_rank(model)
        kd_objective = model_level_objective(model, ml, compile_kd=cfg.engine.compile != "off")
        histories["model_level"], timings["model_level"] = run_stage(
            "model_level", model, kd_objective, ml, settings, train_set, device, env, ckpt_dir,
            keep_partitioned=partitioned_handoff, resumed_at=resumed_at)
        # trainable=target+norms|all moved the model's own teacher path: the frozen copy is the teacher now
        original_teacher = kd_objective.teacher
        reference.use_teacher(original_teacher)
        with clock(phases, "evaluate"):
            results["after_model_level"] = evaluate(model, eval_batches, reference=reference)
        refuse_diverged("model_level", results["after_model_level"], ckpt_dir)

    kv = kv_table(model, cfg.eval.context, bytes_per_value=2)
    throughput = {name: stage_throughput(getattr(cfg.distill, name), cfg.data.seq_len, seconds, env.world_size)
                  for name, seconds in timings.items()}
    report = {"results": results, "train_seconds": timings, "throughput": throughput,
              "peak_memory_gib": memory_stats(device)["peak_gib"],
              # the plan as built (edit_model sets it): with an MLA budget it carries the ranks chosen there
              "plan": plan_entries(getattr(model, "edit_plan", plan)),
              "kv": {k: v for k, v in kv.items() if k != "layers"},
              "train_sequences": len(train_set), "eval_tokens": results["teacher"]["tokens"],
              "histories": histories,
              "skipped_steps": {name: [row["step"] for row in rows if row.get("skipped")]
                                for name, rows in histories.items()}}
    if cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 3:
        report["zero3"] = {"stage_start": held, "end": whole_on_this_rank(model),
                           "largest_gathered_values": GATHER_METER.largest}
    partitioned = collective()
    if env.is_main or partitioned:
        with clock(phases, "save"):
            save_converted(model, cfg.target, out_dir / "converted", tokenizer)
    report["phase_seconds"] = phases
    # the command's own overrides: a sweep's summary tells this report from one an earlier attempt of the job left
    report["overrides"] = command_overrides()
    if resumed_at:
        report["resumed_at"] = resumed_at
    suite_written = partitioned and cfg.eval.suite and tokenizer is not None  # (without one it is skipped)
    if suite_written:  # the suite's forwards gather module by module: every rank runs them
        suite_on_every_rank(model, tokenizer, cfg, out_dir, device, env.is_main, original_teacher)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, suite=False))
    if env.is_main:
        (out_dir / "report.json").write_text(jsonio.dumps(report, indent=2))
        print_results(console, results, kv)
        console.print(f"converted model: {out_dir / 'converted'}  report: {out_dir / 'report.json'}")
        from ascend_edit.tasks.report import finish_run  # held-out suite (eval.*) + report.md with plots

        finish_run(model, tokenizer, cfg, out_dir, device, wall_seconds=time.perf_counter() - started,
                   teacher=original_teacher, suite_written=suite_written)
    distributed.barrier()
    return report


def refuse_diverged(stage: str, metrics: dict, ckpt_dir: Path) -> None:
    """Stop before a diverged stage's weights are written anywhere. Skipping non-finite steps does not catch
    every divergence: one huge update can leave finite weights (~1e30) whose every later step is skipped, too
    few in a row to stop the stage, and those weights pass the writers' NaN/inf guard. The held-out evaluation
    after the stage shows it: a perplexity past exp(709) or a NaN KL is no model."""
    if math.isfinite(metrics["ppl"]) and math.isfinite(metrics["teacher_kl"]):
        return
    raise NonFiniteSteps(
        f"{stage}: the held-out evaluation after the stage is not finite (perplexity {metrics['ppl']}, teacher-KL "
        f"{metrics['teacher_kl']}): training diverged, so nothing of this stage was written (no "
        f"{'stage-layerwise/' if stage == 'layerwise' else 'converted/'}); its checkpoints in {ckpt_dir} hold the "
        f"diverged weights: start over with a lower distill.{stage}.lr and engine.resume=false (earlier outputs are "
        "moved aside, not deleted)")


@contextlib.contextmanager
def clock(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall seconds to `phases[name]`."""
    begun = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - begun


def whole_on_this_rank(model) -> dict[str, int]:
    """Parameter values this rank holds whole (each shared parameter once), the largest single one, and the
    model's full size: equal under plain PyTorch, the persistent small parameters only under ZeRO-3."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"values": sum(p.numel() for p in params), "largest": max(p.numel() for p in params),
            "full_values": sum(full_numel(p) for p in params)}


def suite_on_every_rank(model, tokenizer, cfg: RootConfig, out_dir: Path, device, is_main: bool,
                        teacher: torch.nn.Module | None = None) -> None:
    """The held-out suite of `tasks/eval.suite_after_conversion` on a partitioned model: every rank runs the
    same seeded forwards (each module gathered for its own), rank 0 writes eval.json. `teacher`: as there."""
    if tokenizer is None:
        return
    from ascend_edit.data.heldout import run_documents
    from ascend_edit.eval.metrics import paired_logits
    from ascend_edit.eval.suite import held_out_sets, run_suite
    from ascend_edit.tasks.eval import write_results

    sets = held_out_sets(cfg.eval, run_documents(cfg.data, cfg.device.seed))
    teacher_logits, student_logits = paired_logits(model, teacher)
    with torch.no_grad():
        results = run_suite(teacher_logits, student_logits, tokenizer, cfg.eval, sets,
                            getattr(model.config, "max_position_embeddings", None), device.torch_device)
    if is_main:
        write_results(results, out_dir)


def stage_throughput(stage: StageConfig, seq_len: int, seconds: float, world_size: int) -> dict:
    tokens = stage.steps * stage.batch_size * seq_len
    per_s = tokens / seconds
    return {"tokens": tokens, "tokens_per_s": per_s, "tokens_per_s_per_device": per_s / world_size}


def print_results(console: Console, results: dict, kv: dict) -> None:
    table = Table(title="Held-out quality (teacher-KL in nats/token)")
    for col in ("model", "perplexity", "teacher-KL", "top-1 agreement"):
        table.add_column(col, justify="right")
    for name, metrics in results.items():
        table.add_row(name, f"{metrics['ppl']:.2f}", f"{metrics['teacher_kl']:.4f}",
                      f"{100 * metrics['top1_agreement']:.1f} %")
    console.print(table)
    console.print(f"KV cache at {kv['context']:,} tokens (16-bit): teacher {kv['teacher_total_bytes'] / 2**20:,.1f} MiB"
                  f" -> converted {kv['converted_total_bytes'] / 2**20:,.1f} MiB ({_change(kv['reduction_pct'])})")


def _change(reduction_pct: float) -> str:
    return f"{reduction_pct:.1f} % less" if reduction_pct >= 0 else f"{-reduction_pct:.1f} % MORE"
