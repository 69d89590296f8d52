"""One distillation stage end to end: batch geometry, engine, sampler, resume, training, final checkpoint.

`run_stage` takes the stage's own `StageConfig` and the run-wide `StageSettings` (engine, precision,
seed, logging, the config snapshot checkpoints are compared against), never the root config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ascend_edit.config import EngineConfig, RootConfig, StageConfig
from ascend_edit.data.batches import PackedSequences
from ascend_edit.data.sampler import ResumableDistributedSampler
from ascend_edit.device import DeviceInfo
from ascend_edit.distributed import DistEnv
from ascend_edit.models.surgery import set_trainable
from ascend_edit.train.activation_checkpointing import checkpointing_config, set_activation_checkpointing
from ascend_edit.train.checkpoint_io import CheckpointDir
from ascend_edit.train.engine import Objective, make_engine
from ascend_edit.train.loop import StageRun, any_rank, flatten_config, resume, save_checkpoint, train_stage
from ascend_edit.train.precision import frozen_dtype, resolve_precision
from ascend_edit.train.preemption import Preempted, PreemptionFlag, resume_instruction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """What running a stage needs besides its own `StageConfig`; the same for every stage of a run."""

    engine: EngineConfig
    dtype: str  # device.dtype: the training precision policy (train/precision.py)
    seed: int  # device.seed: the sampler's shuffling
    log_every: int  # distill.log_every
    metrics_log: Path  # JSON lines, one per optimizer step
    run_config: dict[str, Any]  # the run's resolved config, flat: saved with checkpoints, compared on resume


def stage_settings(cfg: RootConfig) -> StageSettings:
    """The run-wide stage settings of a run's config."""
    run_config = flatten_config(dataclasses.asdict(cfg))
    for key, identity in input_identities(cfg).items():
        if identity is not None:  # compared on resume like any key that cannot change (train/loop.py)
            run_config[key] = identity
    return StageSettings(engine=cfg.engine, dtype=cfg.device.dtype, seed=cfg.device.seed,
                         log_every=cfg.distill.log_every, metrics_log=Path(cfg.output_dir) / "metrics.jsonl",
                         run_config=run_config)


def input_identities(cfg: RootConfig) -> dict[str, str | None]:
    """What makes a run's teacher and data theirs (`model_identity`, `data_identity`; None where a package or a
    config provides them): compared on resume, recorded when a run starts (`record_inputs`) for eval to compare."""
    return {"model.identity": model_identity(cfg), "data.identity": data_identity(cfg)}


def record_inputs(out_dir: Path, cfg: RootConfig) -> None:
    """Write RUN_INPUTS when a run starts (rank 0). A run that has trained keeps its first record: a resume is
    refused if its inputs changed, and a record rewritten before that refusal would vouch for the new ones."""
    from ascend_edit import jsonio
    from ascend_edit.run_dir import RUN_INPUTS, outputs_in

    path = out_dir / RUN_INPUTS
    if path.exists() and outputs_in(out_dir, ("checkpoints", "stage-layerwise", "converted")):
        return
    tmp = out_dir / f"{RUN_INPUTS}.tmp"
    tmp.write_text(jsonio.dumps(input_identities(cfg), indent=1))
    os.replace(tmp, path)


def recorded_inputs(run_dir: Path) -> dict[str, str | None] | None:
    """The identities a run recorded when it started; None for a run without the record (older versions) or
    with a damaged one."""
    from ascend_edit.run_dir import RUN_INPUTS

    try:
        recorded = json.loads((Path(run_dir) / RUN_INPUTS).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def changed_inputs(recorded: dict | None, current: dict[str, str | None]) -> list[str]:
    """The recorded identities (`input_identities` keys) that `current` does not match."""
    return [key for key, value in (recorded or {}).items() if value is not None and current.get(key) != value]


def files_digest(roots: list[tuple[Path, list[Path] | None]]) -> str:
    """A short digest of files by name (relative to their root), size and end digests (data/cache.py
    `source_identity`) — not modification time or location, so node-local copies agree. Each root with the files
    read under it (None: every file); a root that does not exist counts as missing."""
    import hashlib

    from ascend_edit.data.cache import source_identity

    contents: list = []
    for path, files in roots:
        if not path.exists():
            contents.append([path.name, "missing"])
            continue
        root = path.resolve()
        for name, size, _mtime, digest in source_identity(root, files)["files"]:
            where = Path(name).name if root.is_file() else str(Path(name).relative_to(root))
            contents.append([where, size, digest])
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:16]


def data_identity(cfg: RootConfig) -> str | None:
    """A digest of the data under `data.path` (`files_digest`): a corpus edited between a stop and its resume is
    refused rather than trained on from the middle of another. Only the files the reader reads count (a README or
    a cache kept beside them is not the data). None for built-in sources (package data) and synthetic ids."""
    if cfg.data.source not in ("files", "indexed") or cfg.data.path is None:
        return None
    if cfg.data.source == "indexed":
        from ascend_edit.data.indexed import files_of

        return files_digest([(path, None) for path in files_of(cfg.data.path)])  # the .bin and .idx
    from ascend_edit.data.loading import text_source

    source = text_source(cfg.data)
    return files_digest([(source.path, source.files_read() if source.path.exists() else None)])


# What the teacher's directory holds that makes it this teacher (and its tokenizer, which made the training rows).
TEACHER_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def model_identity(cfg: RootConfig) -> str | None:
    """A digest of the teacher's files under `model.path` (`files_digest` of its config, weights — or the GGUF file
    named —, tokenizer), or of the bundled SmolLM2 file, so that weights changed in place between a stop and its
    resume are refused rather than distilled from for the rest of the run, and eval scores against the teacher the
    run had. None for a config-built teacher (its seed and config make it)."""
    if cfg.model.source == "smollm2":  # the GGUF file the asset package installed (one SmolLM2 is not another)
        from ascend_edit.assets import smollm2_gguf

        return files_digest([(smollm2_gguf(), None)])
    if cfg.model.source != "hf" or not cfg.model.path:
        return None
    root = Path(cfg.model.path).expanduser().resolve()
    patterns = (*TEACHER_FILES[:1], cfg.model.gguf_file, *TEACHER_FILES[3:]) if cfg.model.gguf_file else TEACHER_FILES
    return files_digest([(root, sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}))])


def stage_geometry(stage: StageConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for a stage's global batch of `stage.batch_size`.

    Each process takes a contiguous `batch_size / world` slice of every global batch and cuts it into
    micro-batches of `micro_batch_size` (default: the whole slice, no accumulation).
    """
    if world < 1:
        raise ValueError(f"world size {world} must be >= 1")
    if stage.batch_size % world:
        raise ValueError(f"batch_size={stage.batch_size} is not divisible by the world size {world}")
    local = stage.batch_size // world
    micro = stage.micro_batch_size or local
    if micro < 1 or local % micro:
        raise ValueError(f"micro_batch_size={micro} does not divide the per-process batch {local} "
                         f"(batch_size={stage.batch_size} over {world} processes)")
    return micro, local // micro


def run_stage(name: str, model: nn.Module, objective: Objective, stage: StageConfig, settings: StageSettings,
              train_set: PackedSequences, device: DeviceInfo, env: DistEnv, ckpt_dir: Path,
              keep_partitioned: bool = False, resumed_at: dict[str, int] | None = None) -> tuple[list[dict], float]:
    """Train one stage (resuming from its newest intact checkpoint if asked); returns (history, seconds).

    `seconds` is the stage's training time over the whole run, the part before a resume included
    (`resumed_at[name]` gets the step a resume started from, for the report). The
    model comes back a plain module with full weights on every rank, whatever the engine — unless
    `keep_partitioned` and the engine is ZeRO-3: then it stays partitioned, gathered module by module for
    no-grad forwards, ready for the next stage's engine (train/engine.py `DeepSpeedEngine.close`). SIGTERM /
    SIGINT during the stage checkpoint it and exit with 75 (train/preemption.py).
    """
    set_trainable(model, stage.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    micro, accumulation = stage_geometry(stage, env.world_size)
    engine_cfg = settings.engine
    # Stage 2 recomputes the configured decoder layers; stage 1 keeps none (train/activation_checkpointing.py).
    set_activation_checkpointing(model, checkpointing_config(engine_cfg), active=name == "model_level")
    engine = make_engine(model, objective, params, stage, engine_cfg, accumulation=accumulation, micro_batch=micro,
                         world_size=env.world_size, device=device,
                         precision=resolve_precision(settings.dtype, device.type, frozen_dtype(model)))
    sampler = ResumableDistributedSampler(len(train_set), stage.batch_size, env.rank, env.world_size,
                                          seed=settings.seed)
    run = StageRun(name, stage.steps, accumulation, sampler, train_set, device.torch_device,
                   log_every=settings.log_every, checkpoint_every=engine_cfg.checkpoint_every,
                   checkpoints=CheckpointDir(ckpt_dir, engine_cfg.keep_last), is_main=env.is_main,
                   metrics_log=settings.metrics_log, max_consecutive_skips=engine_cfg.max_consecutive_skips,
                   config=settings.run_config)
    start = resume(engine, run) if engine_cfg.resume else 0
    if start and resumed_at is not None:  # the caller's record: this command's time starts at this step
        resumed_at[name] = start
    with PreemptionFlag() as run.preemption:
        try:
            history = train_stage(engine, run, start_step=start)
        except Preempted as stop:
            if env.is_main:
                print(f"ascend-edit: {stop}", file=sys.stderr)
            raise
        except BaseException:
            # a process that outlives the error (a notebook, a caller catching NonFiniteSteps) gets the torch
            # engine's model back as it was, and its offloaded optimizer's hooks, accumulators and pinned host
            # memory go (DeepSpeed's close gathers across ranks: not from an error path)
            if engine_cfg.kind == "torch":
                engine.close()
            raise
        if start < stage.steps:
            path = save_checkpoint(engine, run, stage.steps)
            # a signal during the stage's last step or its checkpoint (every rank decides alike: one all-reduce)
            if any_rank(run.preemption.requested, run.device):
                at_end = Preempted(f"{name}: stopped on {run.preemption.signal_name} at the end of the stage; "
                                   f"checkpoint {path}; to resume, {resume_instruction(Path(path).parent.parent)}")
                if env.is_main:
                    print(f"ascend-edit: {at_end}", file=sys.stderr)
                raise at_end
    if run.skipped_steps:
        log.warning("%s: %d optimizer steps skipped for a non-finite loss or gradient: %s", name,
                    len(run.skipped_steps), run.skipped_steps[:20])
    engine.close(keep_partitioned=keep_partitioned)
    return history, run.elapsed_s
