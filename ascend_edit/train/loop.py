"""The train loop: one readable function for both distillation stages, on any engine and world size.

Batch geometry: for optimizer step `s` the sampler hands every rank its contiguous slice of global
batch `s`; the loop cuts that slice into `accumulation` equal micro-batches. So the micro-batches of
all ranks together are exactly the global batch, in the same order whatever the world size: 2 ranks
x 1 micro-batch and 1 rank x 2 micro-batches of the same size see identical data. The step's loss is
the mean of its micro-batch losses over all ranks (DeepSpeed averages gradients over ranks, the
engines divide by `accumulation`), and the logged metrics are that same global mean.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ascend_edit.data.sampler import ResumableDistributedSampler
from ascend_edit.device import rng_state, set_rng_state
from ascend_edit.train.engine import CheckpointDir, rank_and_world

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """Everything one stage needs besides the engine (which holds the model and the objective)."""

    name: str  # "layerwise" | "model_level"
    steps: int  # optimizer steps of the whole stage (a resumed run does the rest)
    accumulation: int  # micro-batches per optimizer step on each rank
    sampler: ResumableDistributedSampler  # global batch = one optimizer step
    dataset: torch.utils.data.Dataset
    device: torch.device
    log_every: int = 10
    checkpoint_every: int = 0  # optimizer steps; 0 = none inside the stage
    checkpoints: CheckpointDir | None = None
    is_main: bool = True
    metrics_log: Path | None = None  # JSON lines, one per step, written by the main rank
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.accumulation < 1 or self.sampler.local_batch_size % self.accumulation:
            raise ValueError(f"{self.name}: the per-rank batch of {self.sampler.local_batch_size} sequences cannot "
                             f"be cut into {self.accumulation} equal micro-batches")
        if self.checkpoint_every and self.checkpoints is None:
            raise ValueError(f"{self.name}: checkpoint_every={self.checkpoint_every} needs a checkpoint directory")


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """Stack dataset items into one batch of tensors on `device`."""
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def _step_batches(run: StageRun) -> Iterator[list[dict]]:
    """For each optimizer step, this rank's micro-batches (the sampler rolls over epochs by itself)."""
    micro = run.sampler.local_batch_size // run.accumulation
    while True:
        for indices in run.sampler:
            yield [collate(run.dataset, indices[i:i + micro], run.device) for i in range(0, len(indices), micro)]


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average every metric over the ranks (one all-reduce); the identity in one process."""
    _, world = rank_and_world()
    if world == 1:
        return metrics
    keys = sorted(metrics)  # every rank runs the same objective, so the keys agree
    values = torch.tensor([metrics[key] for key in keys], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / world).tolist()))


def train_stage(engine, run: StageRun, start_step: int = 0) -> list[dict]:
    """Run optimizer steps `start_step .. run.steps - 1`; returns the stage's per-step metric history."""
    if not 0 <= start_step <= run.steps:
        raise ValueError(f"{run.name}: start_step={start_step} outside [0, {run.steps}]")
    engine.model.train()
    batches = _step_batches(run)
    if run.is_main and run.metrics_log is not None:
        Path(run.metrics_log).parent.mkdir(parents=True, exist_ok=True)
        _trim_metrics_log(run.metrics_log, run.name, keep_until=start_step)
    bar = tqdm(total=run.steps, initial=start_step, desc=run.name, disable=not run.is_main, dynamic_ncols=True)
    tokens_seen, started = 0, time.perf_counter()
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
        totals = _mean_over_ranks(totals, run.device)
        if not math.isfinite(totals["loss"]):  # the same verdict on every rank: all stop together
            raise FloatingPointError(f"{run.name} step {step + 1}: loss is {totals['loss']}")
        totals.update(grad_norm=engine.step(), lr=lr, step=step + 1)
        run.history.append(totals)
        if run.is_main and run.metrics_log is not None:
            with open(run.metrics_log, "a") as f:
                f.write(json.dumps({"stage": run.name, **totals}) + "\n")
        tok_s = tokens_seen / max(time.perf_counter() - started, 1e-9)  # this rank's throughput
        bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if run.log_every and (step + 1) % run.log_every == 0:
            log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s/rank", run.name, step + 1, run.steps,
                     totals["loss"], lr, tok_s)
        if run.checkpoint_every and (step + 1) % run.checkpoint_every == 0 and step + 1 < run.steps:
            save_checkpoint(engine, run, step + 1)
    bar.close()
    engine.model.eval()
    return run.history


def save_checkpoint(engine, run: StageRun, step: int) -> Path:
    """Checkpoint after `step` optimizer steps (every rank calls this)."""
    if run.checkpoints is None:
        raise ValueError(f"{run.name}: no checkpoint directory to save into")
    state = {"sampler": run.sampler.state_at_step(step), "history": run.history[:step]}
    return run.checkpoints.save(engine, run.name, step, state, rank_state={"rng": rng_state()})


def resume(engine, run: StageRun) -> int:
    """Restore the newest checkpoint of this stage, if any; returns the step to continue from.

    Restores the trainable weights, optimizer and LR schedule (through the engine), the sampler
    position, every rank's RNG state and the metric history.
    """
    latest = run.checkpoints.latest(run.name) if run.checkpoints is not None else None
    if latest is None:
        return 0
    state, rank_state = run.checkpoints.load(engine, latest)
    step = int(state["step"])
    if step > run.steps:
        raise ValueError(f"{latest} is at step {step}, past this stage's {run.steps} steps: "
                         "resume with the same schedule, or set engine.resume=false")
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(rank_state["rng"])
    run.history[:] = state["history"]
    log.info("resumed %s from %s (step %d of %d)", run.name, latest, step, run.steps)
    return step


def _trim_metrics_log(path: Path, stage: str, keep_until: int) -> None:
    """Drop this stage's lines after step `keep_until` (a resumed run writes them again)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and not ((row := json.loads(line))["stage"] == stage and row["step"] > keep_until)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
