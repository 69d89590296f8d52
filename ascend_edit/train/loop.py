"""The train loop: one readable function for both distillation stages."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ascend_edit.data.sampler import ResumableDistributedSampler
from ascend_edit.device import rng_state, set_rng_state
from ascend_edit.train.engine import CheckpointDir

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


@dataclass
class StageRun:
    """Everything one stage needs besides the model and objective."""

    name: str  # "layerwise" | "model_level"
    steps: int
    accumulation: int
    sampler: ResumableDistributedSampler
    dataset: torch.utils.data.Dataset
    device: torch.device
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoints: CheckpointDir | None = None
    is_main: bool = True
    history: list[dict] = field(default_factory=list)


def _batches(run: StageRun) -> Iterator[dict]:
    while True:  # the sampler rolls over epochs by itself
        for indices in run.sampler:
            items = [run.dataset[i] for i in indices]
            yield {key: torch.stack([item[key] for item in items]).to(run.device) for key in items[0]}


def train_stage(model: nn.Module, objective: Objective, engine, run: StageRun, start_step: int = 0) -> list[dict]:
    """Run `run.steps` optimizer steps of `objective`; returns the per-step metric history."""
    model.train()
    batches = _batches(run)
    bar = tqdm(total=run.steps, initial=start_step, desc=run.name, disable=not run.is_main, dynamic_ncols=True)
    tokens_seen, started = 0, time.perf_counter()
    for step in range(start_step, run.steps):
        totals: dict[str, float] = {}
        for _ in range(run.accumulation):
            batch = next(batches)
            loss, metrics = objective(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{run.name} step {step}: loss is {loss.item()}")
            engine.backward(loss)
            engine.micro_step()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / run.accumulation
            tokens_seen += batch["input_ids"].numel()
        totals["grad_norm"] = engine.step()
        totals["lr"] = engine.lr
        totals["step"] = step + 1
        run.history.append(totals)
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{totals['lr']:.1e}",
                        tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}")
        bar.update(1)
        if run.log_every and (step + 1) % run.log_every == 0:
            log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s", run.name, step + 1, run.steps, totals["loss"],
                     totals["lr"], tokens_seen / max(elapsed, 1e-9))
        if run.checkpoints and run.checkpoint_every and (step + 1) % run.checkpoint_every == 0 \
                and step + 1 < run.steps:
            save_checkpoint(engine, run, step + 1)
    bar.close()
    model.eval()
    return run.history


def save_checkpoint(engine, run: StageRun, step: int) -> Path:
    extra = {"step": step, "stage": run.name, "sampler": run.sampler.state_at_step(step),
             "rng": rng_state(), "history": run.history}
    return run.checkpoints.save(engine, run.name, step, extra, run.is_main)


def resume(engine, run: StageRun) -> int:
    """Restore the newest checkpoint of this stage, if any; returns the step to continue from."""
    if run.checkpoints is None:
        return 0
    latest = run.checkpoints.latest(run.name)
    if latest is None:
        return 0
    state = engine.load(latest)
    run.sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    run.history[:] = state.get("history", [])
    log.info("resumed %s from %s (step %d)", run.name, latest, state["step"])
    return int(state["step"])
