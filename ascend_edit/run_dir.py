"""A run directory no other run shares: `<root>/<date>/<time to the millisecond>[-<n>]`, created exclusively.

Hydra's stock `runs/${now:%Y-%m-%d}/${now:%H-%M-%S}` gives two runs started in the same second one
directory (interleaved metrics, one config lost). `conf/config.yaml` instead asks the resolver
registered here, which creates the directory with `os.mkdir` (which fails if it exists, atomically, also
across machines on a shared file system) and on a collision tries `-1`, `-2`, ... Hydra then finds the
directory in place and writes `.hydra/` into it as usual.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

RESOLVER = "unique_run_dir"
MAX_SUFFIX = 10_000


def make_unique_run_dir(root: str, now: datetime | None = None) -> str:
    """Create and return a new directory under `root` named by the date and the time of `now`."""
    now = now or datetime.now()
    parent = Path(root) / now.strftime("%Y-%m-%d")
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{now.strftime('%H-%M-%S')}.{now.microsecond // 1000:03d}"
    for n in range(MAX_SUFFIX):
        candidate = parent / (stem if n == 0 else f"{stem}-{n}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return str(candidate)
    raise OSError(f"no free run directory name under {parent} after {MAX_SUFFIX} tries")


def register_run_dir_resolver() -> None:
    # use_cache: Hydra resolves `hydra.run.dir` of one config once; a cached value guarantees that a
    # second read of the same config returns the directory already made instead of a new one.
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, make_unique_run_dir, use_cache=True)


# What a training run writes into its directory besides Hydra's files: set aside together when a run starts over.
# `ascend-edit ablation`'s trained variants, each with its own checkpoints, metrics.jsonl and TensorBoard events
# (both train a `model_level` stage: in one log the second would trim the first's lines).
ABLATION_VARIANT_DIRS = ("ablation-stage2-only", "ablation-stage1+2")
# Where a training task's checkpoints live in its run directory: a job there resumes.
CHECKPOINT_DIRS = ("checkpoints", *ABLATION_VARIANT_DIRS)
# The layer plan a run measured on calibration data, written before stage 1 trains: a resume takes it (measuring
# again can choose differently for the weights already trained), whichever stage the run stopped in.
MEASURED_PLAN = "measured_plan.json"
# What made the run's teacher and data theirs when it started (train/stage.py `input_identities`): eval, and an
# export's eval, compare the teacher and data they load against it.
RUN_INPUTS = "run_inputs.json"
TRAINING_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "stage-layerwise", "converted", "report.json",
                    "report.md", "plots", "eval.json", "ablation.json", "ablation-*", MEASURED_PLAN, RUN_INPUTS)
# A saved config's paths to files the run read, as the user gave them (relative to where the run was started)
RUN_PATH_KEYS = ("model.path", "data.path")


def saved_run_config(run_dir: Path) -> Any:
    """A run's `.hydra/config.yaml` with its relative teacher and data paths made absolute against the directory
    the run was started from (`.hydra/hydra.yaml`, hydra.runtime.cwd): read by eval, export or a rebuild started
    elsewhere, `model.path=teacher` would name another teacher, or none. Raises what `OmegaConf.load` raises."""
    raw = OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml")
    started_in = _started_in(Path(run_dir))
    if started_in is None or not isinstance(raw, DictConfig):
        return raw
    mix = OmegaConf.select(raw, "data.mix", default=None, throw_on_resolution_failure=False)
    for key in (*RUN_PATH_KEYS, *(f"data.mix.{i}.path" for i in range(len(mix or [])))):
        value = OmegaConf.select(raw, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            OmegaConf.update(raw, key, str(started_in / value), merge=False)
    return raw


def _started_in(run_dir: Path) -> Path | None:
    """The working directory a run was started from, as Hydra recorded it; None without a readable record."""
    try:
        value = OmegaConf.select(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"), "hydra.runtime.cwd", default=None,
                                 throw_on_resolution_failure=False)
    except Exception:  # no record, or a damaged one: the paths stay as saved
        return None
    return Path(value) if isinstance(value, str) and os.path.isabs(value) else None


# The earlier run's `.hydra/` (the config eval, export and resume read back), copied here before Hydra rewrites it
# for a run that starts over (`engine.resume=false`); set aside with that run's outputs as `<aside>/.hydra`.
EARLIER_CONFIG = ".hydra-earlier"


def outputs_in(run_dir: Path, names: tuple[str, ...]) -> list[str]:
    """The entries of `run_dir` that match `names` (glob patterns), sorted."""
    return sorted({path.name for pattern in names for path in run_dir.glob(pattern)})


def keep_earlier_config(run_dir: Path) -> None:
    """Copy `run_dir/.hydra/` to `run_dir/.hydra-earlier/` (once; written under a temporary name, then renamed)
    when it holds an earlier run's outputs: Hydra is about to replace it with the new run's config."""
    import shutil

    source, kept = run_dir / ".hydra", run_dir / EARLIER_CONFIG
    if not outputs_in(run_dir, TRAINING_OUTPUTS) or not (source / "config.yaml").is_file() or kept.exists():
        return
    partial = run_dir / f"{EARLIER_CONFIG}.partial-{os.getpid()}"
    shutil.copytree(source, partial)
    try:
        os.rename(partial, kept)
    except OSError:  # another process kept it first
        shutil.rmtree(partial, ignore_errors=True)  # created above by this process


def set_aside_previous_run(run_dir: Path, now: datetime | None = None,
                           names: tuple[str, ...] = TRAINING_OUTPUTS) -> Path | None:
    """Move an earlier run's training outputs in `run_dir` into `run_dir/replaced-<UTC time>/` (nothing is
    deleted); returns that directory, or None when there was nothing to move.

    `engine.resume=false` starts over in the same directory: the earlier run's checkpoints must not stay beside the
    new ones, or a later resume (or checkpoint pruning, which ranks by step) would take the earlier run's."""
    present = outputs_in(run_dir, names)
    if not present:
        return None
    stamp = (now or datetime.utcnow()).strftime("%Y%m%dT%H%M%S.%f")
    aside = run_dir / f"replaced-{stamp}"
    aside.mkdir()
    for name in present:
        os.replace(run_dir / name, aside / name)
    if (run_dir / EARLIER_CONFIG).is_dir():  # the config those outputs were made with: eval / export read it there
        os.replace(run_dir / EARLIER_CONFIG, aside / ".hydra")
    return aside
