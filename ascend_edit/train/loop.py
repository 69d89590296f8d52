"""The train loop: one readable function for both distillation stages, on any engine and world size.

Batch geometry: for optimizer step `s` the sampler hands every rank its contiguous slice of global
batch `s`; the loop cuts that slice into `accumulation` equal micro-batches. So the micro-batches of
all ranks together are exactly the global batch, in the same order whatever the world size: 2 ranks
x 1 micro-batch and 1 rank x 2 micro-batches of the same size see identical data. The step's loss is
the mean of its micro-batch losses over all ranks (DeepSpeed averages gradients over ranks, the
engines divide by `accumulation`), and the logged metrics are that same global mean.

Reliability: a step whose loss or gradient norm is NaN/inf is skipped (no update, no optimizer-state or
schedule change), marked `skipped` in the metrics and counted; `max_consecutive_skips` skips in a row
stop the stage (`NonFiniteSteps`) with the last good checkpoint left in place. A SIGTERM/SIGINT
(`preemption`) checkpoints at the next step boundary and exits with 75. A resumed stage refuses a
changed config unless every changed key may change on resume (`RESUMABLE_CHANGES`), and carries on
the stage's elapsed time and token count, so throughput covers the whole run.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ascend_edit import jsonio
from ascend_edit.data.batches import PackedSequences, collate
from ascend_edit.data.sampler import ResumableDistributedSampler
from ascend_edit.device import rng_state, set_rng_state
from ascend_edit.eval.tensorboard import training_board
from ascend_edit.train.checkpoint_io import CheckpointDir, rank_and_world
from ascend_edit.train.preemption import Preempted, PreemptionFlag, resume_instruction

log = logging.getLogger(__name__)

# Config keys (fnmatch patterns, dotted) that may differ between a checkpoint and the run resuming it:
# cadence, logging, evaluation and export settings, and how many steps this or a later stage runs
# (`{stage}` / `{later}` are filled in per stage). Any other change refuses the resume.
RESUMABLE_CHANGES = ("distill.log_every", "distill.stage", "engine.checkpoint_every", "engine.keep_last",
                     "engine.resume", "engine.max_consecutive_skips", "engine.compile", "device.threads",
                     "eval.*", "export.*", "data.eval_sequences", "output_dir", "task")
STAGE_ORDER = ("layerwise", "model_level")
# Saved keys that are not config keys, named for a user in a refusal (train/stage.py adds them to the run config)
KEY_MEANINGS = {"data.identity": " (the contents of the files under data.path)",
                "model.identity": " (the teacher's config, weights and tokenizer under model.path)"}


class NonFiniteSteps(FloatingPointError, ValueError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm; the stage stopped.
    (Also a ValueError: the command line reports it as one line, like other unusable input.)"""


class ConfigChangedOnResume(ValueError):
    """The run is resumed with config values that cannot change mid-run (the message lists them)."""


@dataclass
class StageRun:
    """Everything one stage needs besides the engine (which holds the model and the objective)."""

    name: str  # "layerwise" | "model_level"
    steps: int  # optimizer steps of the whole stage (a resumed run does the rest)
    accumulation: int  # micro-batches per optimizer step on each rank
    sampler: ResumableDistributedSampler  # global batch = one optimizer step
    dataset: PackedSequences
    device: torch.device
    log_every: int = 10
    checkpoint_every: int = 0  # optimizer steps; 0 = none inside the stage
    checkpoints: CheckpointDir | None = None
    is_main: bool = True
    metrics_log: Path | None = None  # JSON lines, one per step, written by the main rank
    history: list[dict] = field(default_factory=list)
    max_consecutive_skips: int = 5  # non-finite steps in a row that stop the stage
    config: dict[str, Any] | None = None  # the run's resolved config, flat (`flatten_config`): saved, compared
    preemption: PreemptionFlag | None = None  # set by SIGTERM / SIGINT: checkpoint and exit at a step boundary
    elapsed_s: float = 0.0  # seconds spent training this stage, over every process of the run (restored)
    tokens: int = 0  # tokens trained on in this stage, all ranks (restored)

    def __post_init__(self):
        if self.accumulation < 1 or self.sampler.local_batch_size % self.accumulation:
            raise ValueError(f"{self.name}: the per-rank batch of {self.sampler.local_batch_size} sequences cannot "
                             f"be cut into {self.accumulation} equal micro-batches")
        if self.checkpoint_every and self.checkpoints is None:
            raise ValueError(f"{self.name}: checkpoint_every={self.checkpoint_every} needs a checkpoint directory")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"engine.max_consecutive_skips={self.max_consecutive_skips} must be >= 1")

    @property
    def skipped_steps(self) -> list[int]:
        return [row["step"] for row in self.history if row.get("skipped")]


def _step_batches(run: StageRun) -> Iterator[list[dict]]:
    """For each optimizer step, this rank's micro-batches (the sampler rolls over epochs by itself)."""
    micro = run.sampler.local_batch_size // run.accumulation
    while True:
        for indices in run.sampler:
            yield [collate(run.dataset, indices[i:i + micro], run.device) for i in range(0, len(indices), micro)]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (the identity in one process)."""
    return _mean_over_ranks({"flag": float(flag)}, device)["flag"] > 0


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average every metric over the ranks (one all-reduce); the identity in one process.
    A non-finite value on any rank makes the mean non-finite: every rank reaches the same verdict."""
    _, world = rank_and_world()
    if world == 1:
        return metrics
    keys = sorted(metrics)  # every rank runs the same objective, so the keys agree
    values = torch.tensor([metrics[key] for key in keys], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / world).tolist()))


def train_stage(engine, run: StageRun, start_step: int = 0) -> list[dict]:
    """Run optimizer steps `start_step .. run.steps - 1`; returns the stage's per-step metric history.

    Raises `NonFiniteSteps` after `run.max_consecutive_skips` skipped steps in a row and `Preempted`
    (after saving a checkpoint) when `run.preemption` was set.
    """
    if not 0 <= start_step <= run.steps:
        raise ValueError(f"{run.name}: start_step={start_step} outside [0, {run.steps}]")
    engine.model.train()
    batches = _step_batches(run)
    if run.is_main and run.metrics_log is not None:
        Path(run.metrics_log).parent.mkdir(parents=True, exist_ok=True)
        _trim_metrics_log(run.metrics_log, run.name, keep_until=start_step)
    _, world = rank_and_world()
    bar = tqdm(total=run.steps, initial=start_step, desc=run.name, disable=not run.is_main, dynamic_ncols=True)
    board = training_board(run.metrics_log if run.is_main else None, run.name, start_step)  # if installed
    tokens_seen, started, elapsed_before = 0, time.perf_counter(), run.elapsed_s
    try:
        for step in range(start_step, run.steps):
            lr = engine.lr  # the rate this step's update uses (the schedule advances in the update)
            totals: dict[str, float] = {}
            for batch in next(batches):
                loss, metrics = engine.forward(batch)
                engine.backward(loss)
                engine.micro_step()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / run.accumulation
                tokens_seen += batch["input_ids"].numel()
                run.tokens += batch["input_ids"].numel() * world
            # The preemption flag rides on the metrics' all-reduce: any rank's signal stops every rank here.
            totals["_preempt"] = float(run.preemption is not None and run.preemption.requested)
            totals = _mean_over_ranks(totals, run.device)
            preempt = totals.pop("_preempt") > 0
            grad_norm = _update(engine, run, step + 1, totals["loss"])
            skipped = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))
            totals.update(grad_norm=grad_norm, lr=lr, step=step + 1, skipped=skipped)
            if skipped and math.isfinite(totals["loss"]) and getattr(engine, "loss_scale_backoff", False):
                totals["loss_scale_backoff"] = True
            run.history.append(totals)
            run.elapsed_s = elapsed_before + time.perf_counter() - started
            if run.is_main and run.metrics_log is not None:
                with open(run.metrics_log, "a") as f:
                    f.write(jsonio.dumps({"stage": run.name, **totals}) + "\n")
                board.log(run.name, step + 1, totals)
            tok_s = tokens_seen / max(time.perf_counter() - started, 1e-9)  # this rank's throughput
            bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if skipped:
                _check_skips(run, step + 1, totals)
            if run.log_every and (step + 1) % run.log_every == 0:
                log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s/rank%s", run.name, step + 1, run.steps,
                         totals["loss"], lr, tok_s, f" ({len(run.skipped_steps)} skipped)" if run.skipped_steps else "")
            if preempt:
                path = save_checkpoint(engine, run, step + 1)
                signal_name = run.preemption.signal_name if run.preemption is not None else None
                run_dir = Path(path).parent.parent  # <run>/checkpoints/step-<stage>-<n>
                raise Preempted(f"{run.name}: stopped on {signal_name or 'a signal'} after step "
                                f"{step + 1}; checkpoint {path}; to resume, {resume_instruction(run_dir)}; a new "
                                "run directory would start over")
            if run.checkpoint_every and (step + 1) % run.checkpoint_every == 0 and step + 1 < run.steps:
                save_checkpoint(engine, run, step + 1)
    finally:  # also on an error: the bar ends its line before the error line is printed
        bar.close()
        board.close()
    engine.model.eval()
    return run.history


def _update(engine, run: StageRun, step: int, loss: float) -> float:
    """The optimizer step after the step's backward passes; returns the gradient norm, non-finite when
    the update was skipped (a non-finite loss or gradient: no parameter, optimizer or schedule change)."""
    if math.isfinite(loss):
        return engine.step()  # a non-finite norm: the engine skipped the update itself
    if not engine.skip_step():
        raise NonFiniteSteps(f"{run.name} step {step}: loss is {loss} with finite gradients, which DeepSpeed has "
                             f"already applied: stopping; the last good checkpoint is {_last_checkpoint(run)}")
    return float("nan")


def _check_skips(run: StageRun, step: int, totals: dict) -> None:
    """Log a skipped step; stop after `max_consecutive_skips` of them in a row. An fp16 loss-scale back-off
    (the grad scaler halving its scale after an overflow) is logged but neither counts nor breaks the row."""
    in_a_row, first = 0, None
    for row in reversed(run.history):
        if not row.get("skipped"):
            break
        if not row.get("loss_scale_backoff"):
            in_a_row, first = in_a_row + 1, row
    if totals.get("loss_scale_backoff"):
        log.info("%s step %d skipped: fp16 gradients overflowed at this loss scale; the scale is lowered",
                 run.name, step)
        return
    log.warning("%s step %d skipped: loss %s, gradient norm %s (%d skipped so far)", run.name, step,
                totals["loss"], totals["grad_norm"], len(run.skipped_steps))
    if in_a_row >= run.max_consecutive_skips and first is not None:
        raise NonFiniteSteps(f"{run.name} step {first['step']}: loss is {first['loss']}, gradient norm "
                             f"{first['grad_norm']}; {in_a_row} steps in a row were non-finite and skipped "
                             f"(engine.max_consecutive_skips={run.max_consecutive_skips}): stopping; the last good "
                             f"checkpoint is {_last_checkpoint(run)}")


def _last_checkpoint(run: StageRun) -> str:
    latest = run.checkpoints.latest(run.name) if run.checkpoints is not None else None
    return str(latest) if latest is not None else "none (this stage has not saved one)"


def save_checkpoint(engine, run: StageRun, step: int) -> Path:
    """Checkpoint after `step` optimizer steps (every rank calls this)."""
    if run.checkpoints is None:
        raise ValueError(f"{run.name}: no checkpoint directory to save into")
    state = {"sampler": run.sampler.state_at_step(step), "history": run.history[:step],
             "elapsed_s": run.elapsed_s, "tokens": run.tokens, "config": run.config}
    return run.checkpoints.save(engine, run.name, step, state, rank_state={"rng": rng_state()})


def resume(engine, run: StageRun) -> int:
    """Restore the newest intact checkpoint of this stage, if any; returns the step to continue from.

    Restores the trainable weights, optimizer and LR schedule (through the engine), the sampler
    position, every rank's RNG state, the metric history and the stage's elapsed time and tokens.
    A damaged newer checkpoint is logged by name and passed over; a changed config is refused
    (`check_config_change`) before anything is loaded.
    """
    if run.checkpoints is None:
        return 0
    latest = run.checkpoints.newest_intact(run.name)
    if latest is None:
        return 0
    saved = json.loads((latest / run.checkpoints.STATE_FILE).read_text())
    if run.config is not None and saved.get("config") is not None:
        check_config_change(saved["config"], run.config, run.name, latest)
    state, rank_state = run.checkpoints.load(engine, latest)
    step = int(state["step"])
    if step > run.steps:
        raise ValueError(f"{latest} is at step {step}, past this stage's {run.steps} steps: "
                         "resume with the same schedule, or set engine.resume=false")
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(rank_state["rng"])
    run.history[:] = state["history"]
    run.elapsed_s, run.tokens = float(state.get("elapsed_s", 0.0)), int(state.get("tokens", 0))
    log.info("resumed %s from %s (step %d of %d)", run.name, latest, step, run.steps)
    return step


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (dicts of dicts) as {dotted key: value}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_config_change(saved: dict[str, Any], current: dict[str, Any], stage: str, checkpoint: Path) -> None:
    """Refuse, in one message, keys that changed since `checkpoint` was written and may not change on
    resume; log the ones that may (they apply from here on)."""
    later = STAGE_ORDER[STAGE_ORDER.index(stage):] if stage in STAGE_ORDER else (stage,)
    allowed = (*RESUMABLE_CHANGES, *(f"distill.{name}.steps" for name in later))
    changed = sorted(key for key in set(saved) | set(current)
                     if json.dumps(saved.get(key), sort_keys=True) != json.dumps(current.get(key), sort_keys=True))
    # A key only one side has comes from another version of the package (a setting added or removed): the
    # checkpoint cannot say what it was, so it is logged with the rest rather than refused.
    refused = [key for key in changed if key in saved and key in current
               and not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed)]
    if refused:
        listed = ", ".join(f"{key}{KEY_MEANINGS.get(key, '')}: {saved.get(key)!r} -> {current.get(key)!r}"
                           for key in refused[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        raise ConfigChangedOnResume(f"{checkpoint} was written with a different config ({listed}{more}); these "
                                    "keys cannot change on resume: restore them, or start a new run "
                                    "(another hydra.run.dir, or engine.resume=false)")
    if changed:
        log.info("resuming %s with changed settings: %s", stage,
                 ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed))


def _trim_metrics_log(path: Path, stage: str, keep_until: int) -> None:
    """Drop this stage's lines after step `keep_until` (a resumed run writes them again)."""
    path = Path(path)
    if not path.exists():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash or a full disk: it is only a log, drop it
            torn += 1
            continue
        if not (isinstance(row, dict) and row.get("stage") == stage and isinstance(row.get("step"), int)
                and row["step"] > keep_until):
            kept.append(line)
    if torn:
        log.warning("%s: dropped %d damaged line(s) (a write cut short); the resumed run logs its steps again",
                    path, torn)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
