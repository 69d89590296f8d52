"""Command-line entry point: `ascend-edit [SUBCOMMAND] [hydra overrides...]`.

Subcommands pick the task; everything after them is plain Hydra (overrides, `--cfg job`, `-m`
multirun, `--help`). With no subcommand the full conversion runs:

    ascend-edit                                   # convert the embedded default (SmolLM2 -> MLA)
    ascend-edit inspect model=qwen3_tiny target=gate_swa
    ascend-edit export export.checkpoint=runs/...  # HF checkpoint of a converted model
    ascend-edit bench_kv model=qwen3_8b_shape
    ascend-edit ablation

Bad input (a config value, a path, a damaged file) ends with one line on stderr and exit code 2;
`--debug`, `ASCEND_EDIT_DEBUG=1` or `HYDRA_FULL_ERROR=1` show the traceback instead.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ascend_edit.config import ConfigError, register_configs, to_typed

log = logging.getLogger("ascend_edit")

# subcommand -> module in ascend_edit.tasks with a `run(cfg: RootConfig) -> dict` function
TASKS = {
    "convert": "convert",
    "inspect": "inspect",
    "export": "export",
    "bench_kv": "bench_kv",
    "bench_decode": "bench_decode",
    "ablation": "ablation",
    "eval": "eval",
    "report": "report",
    "plan": "plan",
    "teacher_text": "teacher_text",
}
SUBCOMMAND_ALIASES = {"train": "convert", "bench-kv": "bench_kv", "bench-decode": "bench_decode",
                      "teacher-text": "teacher_text"}


class UserError(Exception):
    """An error caused by the user's input; reported as one line, no traceback."""


DEBUG_FLAG = "--debug"
EXIT_BAD_INPUT = 2


def debugging() -> bool:
    """Whether errors keep their traceback (for bug reports)."""
    return bool(os.environ.get("ASCEND_EDIT_DEBUG")) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: config values and cross-checks (ConfigError and the
    loaders' ValueErrors), missing / unreadable / damaged files (OSError, ModelInputError), a missing
    device, an unsupported model, an asset pip could not fetch. Anything else is a bug and keeps its
    traceback."""
    from ascend_edit.assets import AssetFetchError
    from ascend_edit.device import DeviceUnavailableError

    return (UserError, ValueError, OSError, DeviceUnavailableError, NotImplementedError, AssetFetchError)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def user_error_line(err: BaseException) -> str:
    """What follows `ascend-edit: error:` for a bad-input exception (its type named unless it is ours)."""
    prefix = "" if isinstance(err, (ConfigError, UserError)) else f"{type(err).__name__}: "
    return f"{prefix}{one_line(err)}"


def experiment_problem(name: str | None, available: list[str] | None = None) -> str | None:
    """`experiment` is an optional defaults entry (the plain run has none), so Hydra silently skips a name with no
    file: a typo would run the default job instead. Say so in one line, with the experiments there are
    (`available`: Hydra's own list, which includes --config-dir / hydra.searchpath; default: the packaged ones)."""
    from importlib.resources import files

    if name in (None, "null"):
        return None
    if available is None:
        available = sorted(_experiment_names(files("ascend_edit.conf")))
    if name in available:
        return None
    return f"experiment={name} not found; choose one of {', '.join(available)}"


def run_task(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from ascend_edit.distributed import discover
    from ascend_edit.validation import check_before_load

    if HydraConfig.initialized():  # multirun jobs skip the precheck: each checks its own choice here
        from hydra.core.global_hydra import GlobalHydra

        options = GlobalHydra.instance().config_loader().get_group_options("experiment")
        options += _experiments_in(HydraConfig.get().runtime.config_sources)  # + hydra.searchpath's, not above
        problem = experiment_problem(HydraConfig.get().runtime.choices.get("experiment"), sorted(set(options)))
        if problem:
            raise UserError(problem)
    typed = to_typed(cfg)
    if HydraConfig.initialized() and Path(typed.output_dir).resolve() != Path(HydraConfig.get().runtime.output_dir).resolve():
        # output_dir apart from Hydra's directory, resolved now (an interpolation such as ${oc.env:DIR} escapes the
        # check made on the command line): nothing is written there yet, so a foreign directory is still intact
        problem = _foreign_directory_problem("output_dir", typed.output_dir)
        if problem:
            raise UserError(problem)
    mark_run_directory(typed.output_dir)
    env = discover()
    # held from here: nothing below writes into a directory another command is using
    with run_directory_lock(typed.output_dir, held_here=env.rank == 0 and not env.msrun_scheduler):
        check_before_load(typed, world_size=env.world_size)
        if typed.task == "convert" and env.rank == 0 and HydraConfig.initialized():
            keep_composed_config(Path(HydraConfig.get().runtime.output_dir), Path(typed.output_dir))
        if env.msrun_scheduler:  # msrun's extra scheduler process: no task runs there (eval/export would write twice)
            log.info("msrun scheduler process: task=%s runs in the worker processes only", typed.task)
            return {}
        module = importlib.import_module(f"ascend_edit.tasks.{TASKS[typed.task]}")
        return module.run(typed)


def _experiment_names(config_root) -> list[str]:
    """The `experiment/*.yaml` names under a config directory (a Path or a package's Traversable)."""
    folder = config_root.joinpath("experiment")
    return [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")] if folder.is_dir() else []


def _experiments_in(config_sources) -> list[str]:
    """The experiment names in the job's config sources (file:// and pkg:// directories, as Hydra records them)."""
    from importlib.resources import files

    names: list[str] = []
    for source in config_sources:
        try:
            if source.schema in ("file", "pkg"):
                names += _experiment_names(Path(source.path) if source.schema == "file" else files(source.path))
        except (ModuleNotFoundError, OSError, TypeError):  # a source that is not a readable directory
            continue
    return names


@hydra.main(version_base="1.3", config_path="pkg://ascend_edit.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict | None:
    try:
        return run_task(cfg)
    except user_error_types() as err:
        # Hydra's runner would print a traceback for an Exception, but SystemExit passes.
        if debugging():
            raise
        print(f"ascend-edit: error: {user_error_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# Hydra flags that take a value: the token after them is not a subcommand.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _split_subcommand(argv: list[str]) -> list[str]:
    """Turn `ascend-edit [-m] inspect a=b` into Hydra's `task=inspect a=b [-m]`, Hydra's flags last: its parser
    takes no override after a flag (`inspect --config-dir D a=b` would stop at `a=b`), and a bare `--info` reads
    the next token as its value."""
    flags, rest = _hydra_flags_apart(argv)
    for i, token in enumerate(rest):
        if token.startswith(("-", "~")) or "=" in token:  # a flag, an override, or a delete override (~key)
            continue
        name = SUBCOMMAND_ALIASES.get(token, token)
        if name not in TASKS:
            raise UserError(f"unknown subcommand '{token}'; choose one of {sorted(TASKS)}")
        return [*rest[:i], f"task={name}", *rest[i + 1:], *flags]
    return [*rest, *flags]


def _hydra_flags_apart(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, everything else), each in the order given."""
    flags: list[str] = []
    rest: list[str] = []
    takes_value = False
    for i, token in enumerate(argv):
        if takes_value or token.startswith("-"):
            flags.append(token)
            following = argv[i + 1] if i + 1 < len(argv) else None
            # --info's value is optional: only one of its choices is its value, anything else an override
            takes_value = (not takes_value and token in _FLAGS_WITH_VALUE
                           and (token not in ("--info", "-i") or following in _INFO_CHOICES))
        else:
            rest.append(token)
    return flags, rest


def _config_dirs(argv: list[str]) -> list[str]:
    """The directories `--config-dir` / `-cd` add to Hydra's search path (`--config-dir D` or `--config-dir=D`)."""
    dirs = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token in ("--config-dir", "-cd")]
    return dirs + [token.split("=", 1)[1] for token in argv if token.startswith(("--config-dir=", "-cd="))]


_HYDRA_MODES = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
                "--cfg", "-c", "--resolve", "--version", "--experimental-rerun"}


def _precheck(argv: list[str], world_size: int | None = None) -> str | None:
    """Compose the config once before Hydra runs the job, to report a bad override in one line.

    Hydra would print a multi-line block; multirun sweeps and Hydra's own flags are left to Hydra.
    With `world_size` (the launch wrappers' one-process check) also every check that needs no weights or device,
    at that world size, so bad input is reported once rather than by every rank.
    Returns the error line, or None when the composition is fine (or not checked).
    """
    config_dirs = _config_dirs(argv)
    searchpaths = [t for t in argv if t.lstrip("+").startswith("hydra.searchpath=")]
    other_primary = any(t.split("=", 1)[0] in ("--config-path", "-cp", "--config-name", "-cn") for t in argv)
    multirun = any(token in ("-m", "--multirun") for token in argv)
    if (other_primary or len(config_dirs) > 1 or (config_dirs and searchpaths)
            or (multirun and (config_dirs or searchpaths))
            or any(set(d) & set(",[]'\"\\${}") for d in config_dirs)):
        # another primary config, a search path the sweep check does not take, or one this check cannot write as
        # an override: the job checks itself (run_task)
        return None
    if config_dirs:  # what --config-dir does: one more directory on the search path, composed here as Hydra will
        searchpaths = [f"hydra.searchpath=['file://{Path(config_dirs[0]).expanduser().resolve()}']"]
    flags, argv = _hydra_flags_apart(argv)
    argv += [t for t in flags if t.split("=", 1)[0] in _HYDRA_MODES]  # --config-dir and its value: no overrides
    if multirun and not any(
            token in _HYDRA_MODES - {"-m", "--multirun"} for token in argv):
        return _sweep_problem([t for t in argv if t not in ("-m", "--multirun")])
    if any(token.split("=", 1)[0] in _HYDRA_MODES for token in argv):  # (`--cfg=job` too)
        return None
    from hydra import compose, initialize_config_module

    # a resumed run's directory (hydra.run.dir): output_dir as the job will see it, for the resume check below
    run_dirs = [t.split("=", 1)[1] for t in argv if t.startswith("hydra.run.dir=") and "${" not in t]
    resumed = run_dirs[-1] if run_dirs and _holds_checkpoints(Path(run_dirs[-1]).expanduser()) else None
    # (Hydra's settings are not the job's config: left out, but for the search path the composition needs)
    overrides = ([t for t in argv if not t.lstrip("+~").startswith("hydra.")] + searchpaths
                 + [f"output_dir={resumed or '.'}"] * (not any(t.startswith("output_dir=") for t in argv)))
    # the packaged experiments only: with a search path the job checks against Hydra's own list (run_task)
    packaged_only = not searchpaths
    for token in overrides:
        option, _, value = token.lstrip("+").partition("=")
        if option == "experiment" and packaged_only and (problem := experiment_problem(value)):
            return problem
    try:
        with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
            typed = to_typed(compose(config_name="config", overrides=overrides))
        if run_dirs and "${" not in run_dirs[-1]:  # before Hydra rewrites the run's .hydra/config.yaml
            check_reused_run_directory(typed, Path(run_dirs[-1]).expanduser(), f"hydra.run.dir={run_dirs[-1]}")
        outputs = [t.split("=", 1)[1] for t in argv if t.startswith("output_dir=") and "${" not in t]
        if outputs and outputs[-1] not in run_dirs[-1:]:  # another task's run as output_dir: its files replaced
            check_reused_run_directory(typed, Path(outputs[-1]).expanduser(), f"output_dir={outputs[-1]}")
    except Exception as err:
        return composition_error_line(err)
    if world_size is not None:
        from ascend_edit.validation import check_before_load

        try:
            check_before_load(typed, world_size=world_size)
        except user_error_types() as err:
            if debugging():
                raise
            return user_error_line(err)
    return _run_dir_problem(argv)


def check_reused_run_directory(cfg, run_dir: Path, where: str) -> None:
    """A job in a directory that already holds a run: Hydra rewrites its `.hydra/` (the config that export, eval
    and resume read back) before the task starts, so only the same task may run there — a resume checked against
    its checkpoints now, before hours of loading — never another task over it."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.select(OmegaConf.load(saved), "task", default=None)
    except Exception:  # an unreadable saved config: nothing to protect that a later read could use
        return
    if task is not None and task != cfg.task:
        raise ConfigError(f"{where} holds a task={task} run: this task={cfg.task} job would overwrite that run's "
                          f"saved config (.hydra/); give this job its own directory")
    if not cfg.engine.resume and int(os.environ.get("RANK", "0") or 0) == 0:
        # starting over: the earlier run's outputs are set aside by the task, but its config is replaced by Hydra
        # before the task starts; kept now so that it goes aside with them
        from ascend_edit.run_dir import keep_earlier_config

        keep_earlier_config(run_dir)
    elif _holds_checkpoints(run_dir):
        from ascend_edit.validation import check_resume_config

        check_resume_config(cfg, run_dir, launcher_world_size(dict(os.environ)))


def _holds_checkpoints(run_dir: Path) -> bool:
    """A conversion's checkpoints/ or an ablation's variant folders: a job there resumes."""
    from ascend_edit.run_dir import CHECKPOINT_DIRS

    return any((run_dir / name).is_dir() for name in CHECKPOINT_DIRS)


def composition_error_line(err: BaseException) -> str:
    """One line for a config that does not compose or validate: Hydra's composition errors wrap OmegaConf's,
    which name the key; an unknown group option lists the valid ones."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, user_error_types()) and not isinstance(err, (HydraException, OmegaConfBaseException)):
        return user_error_line(err)
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    message = str(cause).splitlines()[0] if str(cause) else str(err).splitlines()[0]
    lines = [line.strip() for line in str(err).splitlines()]
    if "Could not find" in message and "Available options" in str(err):  # list the valid options
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        end = next((i for i, line in enumerate(lines) if i > start and line.startswith("Config search")), None)
        message += "; " + " ".join(lines[start:end])
    key = getattr(cause, "full_key", None) if isinstance(cause, OmegaConfBaseException) else None
    return f"{message} ({key})" if key and key not in message else message


def bad_input_types() -> tuple[type[BaseException], ...]:
    """`user_error_types` plus Hydra's and OmegaConf's composition errors: what composing and checking a config
    from the command line can raise for bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException, *user_error_types())


def hydra_overrides(parser, argv: list[str] | None = None) -> tuple[Any, list[str]]:
    """A script's (its own arguments, Hydra overrides): anything left that is not `key=value` is refused by name
    (it would otherwise reach Hydra's override lexer and fail there in a block of text)."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o or o.startswith("-")]
    if unknown:
        parser.error(f"unknown arguments {unknown} (Hydra overrides are key=value)")
    return args, overrides


def exit_on_bad_input(program: str, main: Callable[..., None], *args: Any) -> None:
    """Run a script's `main(*args)`; bad input (an override that does not compose or validate, a missing file,
    too little data) ends it in one line that names the problem, as `ascend-edit` says it. A bug keeps its
    traceback. For the benchmark scripts, whose users pass Hydra overrides too."""
    try:
        main(*args)
    except bad_input_types() as err:
        sys.exit(f"{program}: error: {composition_error_line(err)}")


MAX_CHECKED_SWEEP_POINTS = 512  # beyond this a grid is checked job by job, as each starts


def sweep_points(argv: list[str]) -> list[list[str]] | None:
    """The overrides of every job Hydra's basic sweeper would run for `argv` (without -m): the grid of the
    experiment's `hydra.sweeper.params`, replaced key by key by the command line's sweeps, in the sweeper's order.
    None when another sweeper runs the sweep or the grid cannot be read here (the jobs then check themselves)."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        given = parser.parse_overrides([t for t in argv if not t.lstrip("+~").startswith("hydra.")])
        fixed = [str(o.input_line) for o in given if not o.is_sweep_override()]
        with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
            hydra_cfg = compose(config_name="config", overrides=[*fixed, "output_dir=."], return_hydra_config=True).hydra
        if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = hydra_cfg.sweeper.get("params") or {}
        grid: dict[str, list[str]] = {}
        for override in [*parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), *given]:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
            grid.pop(override.get_key_element(), None)  # the command line replaces the grid's key, in its place
            grid[override.get_key_element()] = values
    except Exception:  # a malformed sweep: Hydra's own error, from the multirun itself
        return None
    points: list[list[str]] = [[]]
    for key, values in grid.items():
        points = [[*point, f"{key}={value}"] for point in points for value in values]
    return points


def _sweep_problem(argv: list[str]) -> str | None:
    """A multirun's every job, composed and checked (without weights) before the first starts: a bad point of
    the grid is one line now, not a traceback hours into the sweep. Names the point."""

    points = sweep_points(argv)
    if points is None:
        return None
    if not points:
        return "the sweep has no jobs (an empty range or choice): give every swept key at least one value"
    if launcher_world_size(dict(os.environ)) > 1:  # each rank would pick its own sweep directory from its clock
        return ("a sweep (-m) runs its jobs one after another, each in one process: start it without torchrun, the "
                "DeepSpeed launcher or msrun, or launch each point as its own multi-process job")
    outputs = [t.split("=", 1)[1] for t in argv if t.startswith("output_dir=") and "${" not in t]
    if outputs and len(points) > 1:  # every job would write into it, and each later one resume the one before
        return (f"output_dir={outputs[-1]} is fixed for a sweep of {len(points)} jobs: each would write into it and "
                "resume the one before; leave output_dir to the sweep (one directory per job)")
    if len(points) > MAX_CHECKED_SWEEP_POINTS:
        log.info("sweep of %d jobs: the first %d are checked now, the rest as each starts", len(points),
                 MAX_CHECKED_SWEEP_POINTS)
    bad_input = bad_input_types()
    try:
        world_size = env_world_size()
    except UserError as err:
        return str(err)
    # an explicit sweep directory with Hydra's job subdirectories: jobs of an earlier sweep may already be there
    sweep_dirs = [t.split("=", 1)[1] for t in argv if t.startswith("hydra.sweep.dir=") and "${" not in t]
    subdirs = [t.split("=", 1)[1] for t in argv if t.startswith("hydra.sweep.subdir=")]
    default_subdirs = not subdirs or subdirs[-1].strip("'\"") == "${hydra.job.num}"  # Hydra's own: job number
    if sweep_dirs and (problem := _foreign_sweep_directory_problem(Path(sweep_dirs[-1]).expanduser(),
                                                                   numbered=default_subdirs)):
        return problem  # whatever the job subdirectories are called: a user's folder is not a sweep's
    reused = Path(sweep_dirs[-1]).expanduser() if sweep_dirs and default_subdirs else None
    logging.disable(logging.WARNING)  # each job warns again when it runs; a grid's worth of them here is noise
    try:
        return _first_bad_point(points, bad_input, world_size, reused)
    finally:
        logging.disable(logging.NOTSET)


def _first_bad_point(points: list[list[str]], bad_input: tuple[type[BaseException], ...],
                     world_size: int, sweep_dir: Path | None) -> str | None:
    from hydra import compose, initialize_config_module

    from ascend_edit.validation import check_before_load

    teacher_configs: dict = {}
    shared = set(points[0]).intersection(*points[1:])  # overrides every job has: not what names a point
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        for number, point in enumerate(points[:MAX_CHECKED_SWEEP_POINTS]):
            experiments = [o.partition("=")[2] for o in point if o.lstrip("+").startswith("experiment=")]
            problem = experiment_problem(experiments[-1]) if experiments else None
            try:
                if problem is None:
                    job_dir = sweep_dir / str(number) if sweep_dir is not None else None
                    typed = to_typed(compose(config_name="config", overrides=[*point, f"output_dir={job_dir or '.'}"]))
                    check_before_load(typed, world_size=world_size, teacher_configs=teacher_configs)
                    varied = {o.lstrip("+").partition("=")[0] for o in point if o not in shared}
                    if "target.mla.kv_lora_rank" in varied and typed.target.mla.kv_budget:
                        problem = (f"target.mla.kv_lora_rank is swept, but target.mla.kv_budget="
                                   f"{typed.target.mla.kv_budget} chooses every layer's rank: the points would train "
                                   "the same model; sweep target.mla.kv_budget instead, or set it to null")
                    if job_dir is not None:  # Hydra rewrites the job's .hydra/ before the job checks anything
                        check_reused_run_directory(typed, job_dir, f"its directory {job_dir}")
            except bad_input as err:
                if debugging():
                    raise
                problem = composition_error_line(err)
            if problem:
                swept = " ".join(o for o in point if o not in shared)
                return f"sweep job {number} of {len(points)} ({swept or 'every job'}): {problem}"
    return None


# Written into every task's output directory when the task starts: the directory holds a run, and a later run may
# write into it again (to resume, or to redo a benchmark).
RUN_MARK = ".ascend-edit-run"


def holds_run(path: Path) -> bool:
    """Whether directory `path` holds an ascend-edit run: its mark, or what only this project's runs leave
    (runs from before the mark existed): a Hydra config that starts with `task:`, or stage checkpoints
    named `step-<stage>-<n>`; or msrun's worker-log folder, which the launcher creates before any rank starts.
    Generic names (checkpoints/, tensorboard/, report.md) do not count: other tools' directories hold them."""
    if (path / RUN_MARK).exists() or (path / "msrun_log").is_dir():
        return True
    hydra = path / ".hydra"
    if hydra.is_dir():
        # This project's configs start with `task:`. Another rank's Hydra may be creating the folder or writing
        # the file at this moment (every rank of a launch checks the shared directory), so a folder without a
        # config yet, or an empty one, counts too; another tool's Hydra config has content and another first key.
        try:
            first = next(iter((hydra / "config.yaml").read_text(errors="replace").splitlines()), "")
        except OSError:  # not written yet, or unreadable (the run's own reads will say why): not to refuse here
            return True
        if not first or first.startswith("task:"):
            return True
    return any(path.glob("checkpoints/step-layerwise-*")) or any(path.glob("checkpoints/step-model_level-*"))


def keep_composed_config(hydra_dir: Path, output_dir: Path) -> None:
    """A conversion with `output_dir=` apart from Hydra's run directory: its `.hydra/` (composed config,
    overrides) goes beside the model too, since eval, export and report read the run's data, seed and
    teacher from `<run>/.hydra/config.yaml` (without it an eval would take its own default data as the
    held-out text, which may be the run's training text). Written once, for a new run, after the checks."""
    source, target = hydra_dir / ".hydra", output_dir / ".hydra"
    if not source.is_dir() or source.resolve() == target.resolve():
        return
    if (target / "config.yaml").exists():
        # an earlier run's (a resume, or a command about to be refused by the resume checks): eval, export and
        # report read that run's settings from it, so it is never replaced
        return
    target.mkdir(parents=True, exist_ok=True)
    for item in source.glob("*.yaml"):
        shutil.copyfile(item, target / item.name)


def mark_run_directory(output_dir: str) -> None:
    """Mark `output_dir` as a run's (see RUN_MARK); every rank may do it, it is idempotent."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARK).touch()


RUN_LOCK = ".ascend-edit.lock"
LOCK_PATIENCE_S = 2.0  # how long a lock must stay held to count as another command's (a probe holds it for a moment)


def launcher_world_size(env: dict[str, str]) -> int:
    """The job's process count as the launcher's variables state it (WORLD_SIZE, or msrun's), read leniently:
    `discover()` is the one that names a bad value."""
    sizes = [env.get(name, "") for name in ("WORLD_SIZE", "RANK_SIZE", "MS_WORKER_NUM")]
    return max([int(size) for size in sizes if size.isdigit()], default=1)


def launch_id(env: dict[str, str] | None = None) -> str | None:
    """What every process of one multi-process job shares and another job does not: torchrun's rendezvous run id,
    msrun's scheduler address, else the master address and port; None for a single process (a MASTER_ADDR left in
    a shell would otherwise make every single-process command there one job, and none would be refused)."""
    env = dict(os.environ if env is None else env)
    if launcher_world_size(env) <= 1:
        return None
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    if env.get("MS_SCHED_HOST"):
        return f"msrun-{env['MS_SCHED_HOST']}-{env.get('MS_SCHED_PORT', '')}"
    if env.get("MASTER_ADDR") or env.get("MASTER_PORT"):
        return f"{env.get('MASTER_ADDR', 'localhost')}-{env.get('MASTER_PORT', '')}"
    return None


def _holder(lock) -> tuple[str, str | None]:
    """(who holds the lock, as written; the launch id written with it)."""
    lock.seek(0)
    text = lock.read().strip()
    job = text.rsplit("(job ", 1)[1].rstrip(")") if "(job " in text else None
    return text or "another process", job


def _in_use(key: str, directory: str, holder: str) -> str:
    return f"{key}={directory} is in use by another ascend-edit command ({holder}); wait for it to end, or give another {key}"


def _held_by_another_command(lock, own_job: str | None) -> str | None:
    """Whom `lock` is held by when that is another command (None: free, or held by this process's own job). A
    process of this job may hold it for a moment (its probe), so only a hold that lasts LOCK_PATIENCE_S counts."""
    import fcntl
    import time

    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            holder, job = _holder(lock)
            if own_job is not None and job == own_job:
                return None
            if time.monotonic() >= deadline:
                return holder
            time.sleep(0.1)


@contextlib.contextmanager
def run_directory_lock(output_dir: str, held_here: bool) -> Iterator[None]:
    """One command at a time in a run directory: two (a re-run while the first still trains, a scheduler's
    requeue while the old job lives) would resume from, write and prune the same checkpoints and interleave
    one metrics log. Rank 0 holds an exclusive `flock` for the task, with its pid, host and launch id written in
    the file (the other processes of its job recognise it by that id); the kernel drops it when the process ends,
    however it ends, so a killed run leaves no stale lock. A file system without `flock` runs unguarded."""
    if not held_here:
        yield
        return
    import fcntl

    path = Path(output_dir) / RUN_LOCK
    with open(path, "a+") as lock:
        try:
            holder = _held_by_another_command(lock, own_job=None)
        except OSError as err:  # e.g. a Lustre mount without the flock option
            log.warning("output_dir=%s cannot be locked (%s): nothing stops a second command from writing there "
                        "at the same time", output_dir, err)
            yield
            return
        if holder is not None:
            raise UserError(_in_use("output_dir", output_dir, holder))
        job = launch_id()
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}" + (f" (job {job})" if job else ""))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _busy_problem(key: str, directory: str) -> str | None:
    """Before Hydra writes `.hydra/` and its log into a directory (which it does before any task starts): is
    another command running there? Every process asks (a refused job's other ranks would otherwise rewrite the
    running job's saved config); a lock held under this process's own launch id is its own job's."""
    path = Path(directory).expanduser() / RUN_LOCK
    if not path.is_file():
        return None
    with open(path) as lock:
        try:
            holder = _held_by_another_command(lock, own_job=launch_id())
        except OSError:  # no flock on this file system: run_directory_lock says so
            return None
        return _in_use(key, directory, holder) if holder is not None else None  # closing the file unlocks it


def _foreign_directory_problem(key: str, directory: str) -> str | None:
    """A run writes converted/, checkpoints/, reports and logs into its directory: refuse one that is a file, or
    that holds files but nothing a run leaves (a model directory, a dataset), rather than write among them."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        return f"{key}={directory} is a file, not a directory"
    if path.is_dir() and any(path.iterdir()) and not holds_run(path):
        via = " (RUN_DIR of the launch wrappers)" if key == "hydra.run.dir" else ""
        return (f"{key}={directory}{via} is a non-empty directory that holds no ascend-edit run; give a new or "
                "empty directory (or an earlier run's directory to resume it)")
    return None


def _foreign_sweep_directory_problem(sweep_dir: Path, numbered: bool = True) -> str | None:
    """A sweep writes job directories (numbered unless hydra.sweep.subdir says otherwise), multirun.yaml and
    summary.* into its directory: one that holds files but no earlier sweep's job (a run in a job directory) is
    someone else's, and is refused."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        return f"hydra.sweep.dir={sweep_dir} is a file, not a directory"
    if not sweep_dir.is_dir() or not any(sweep_dir.iterdir()):
        return None
    if numbered:
        jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    else:  # subdirectories named by the user's pattern, up to three levels down (e.g. `${a}/${b}`)
        jobs = [d for pattern in ("*", "*/*", "*/*/*") for d in sweep_dir.glob(pattern) if d.is_dir()]
    if not any(holds_run(d) for d in jobs):
        return (f"hydra.sweep.dir={sweep_dir} is a non-empty directory that holds no ascend-edit sweep; give a new or "
                "empty directory (or an earlier sweep's directory to resume it)")
    for job in jobs if numbered else []:  # an earlier sweep's directory: each job folder in it is a run or empty
        if any(job.iterdir()) and not holds_run(job):
            return f"hydra.sweep.dir={sweep_dir}: its job directory {job} holds files but no ascend-edit run"
    return None


def _inside_saved_model_problem(name: str, directory: str) -> str | None:
    from ascend_edit.train.checkpoint_io import manifested_ancestor

    model = manifested_ancestor(directory)
    if model is None:
        return None
    return (f"{name}={directory} lies inside {model}, whose manifest lists its files: the files written there would "
            "make every later load refuse it as damaged; choose a directory outside it")


def _run_dir_problem(argv: list[str]) -> str | None:
    """Hydra creates the run directory before the task starts and prints a traceback when it cannot; the
    directories a run writes into must not be someone else's."""
    given = [t.split("=", 1)[1] for t in argv if t.startswith("hydra.run.dir=")]
    outputs = [t.split("=", 1)[1] for t in argv if t.startswith("output_dir=")]
    for name, chosen in (("hydra.run.dir", given[-1:]), ("output_dir", outputs[-1:])):
        if chosen and "${" not in chosen[0]:
            problem = (_inside_saved_model_problem(name, chosen[0]) or _foreign_directory_problem(name, chosen[0])
                       or _busy_problem(name, chosen[0]))
            if problem:
                return problem
    key, directory = ("hydra.run.dir", given[-1]) if given else ("the run directory root", "runs")
    if "${" in directory:  # an interpolation: Hydra resolves it
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        return f"{key}={directory} cannot be created: {err.strerror or err}"
    return None


def env_world_size() -> int:
    """WORLD_SIZE as the launcher (or a launch wrapper's check) set it; 1 when unset."""
    value = os.environ.get("WORLD_SIZE", "") or "1"
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"WORLD_SIZE={value!r} is not a positive integer")
    return int(value)


def shared_run_dir_override(argv: list[str], env: dict[str, str]) -> list[str]:
    """Under a multi-process launcher every rank must write to one run directory.

    Hydra's default run dir carries a timestamp that ranks started a second apart would disagree on,
    so when the job has several processes and no `hydra.run.dir` is given, it is named from torchrun's
    rendezvous run id, unique per job. Without one (the DeepSpeed launcher, msrun, a hand-made environment) the
    command is refused: a name from the master address and port is the same for every job on that port, so a
    later job resumed, or was refused by, an earlier one; the launch wrappers always pass a directory.
    """
    if any(t.startswith("hydra.run.dir=") for t in argv):
        return []
    world = launcher_world_size(env)  # WORLD_SIZE, or msrun's RANK_SIZE / MS_WORKER_NUM
    if world <= 1:
        return []
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return [f"hydra.run.dir=runs/dist-{run_id}"]
    raise UserError(f"a {world}-process job without torchrun's run id (TORCHELASTIC_RUN_ID) needs hydra.run.dir=<a "
                    "directory, the same for every process>: a name made from the master address and port would be "
                    "the same for every job on that port (launch/deepspeed.sh and launch/msrun.sh pass one)")


# Where a job writes: checked before Hydra writes there (foreign, busy, another task's run, a fixed sweep output)
DIRECTORY_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "output_dir")


def plain_directory_overrides(argv: list[str]) -> list[str]:
    """`++hydra.run.dir=D` (or `+`) as `hydra.run.dir=D`: these keys always exist, so the prefix changes nothing
    for Hydra, but every directory check reads the plain key — with the prefix a run wrote into a user's folder."""
    plain = []
    for token in argv:
        key = token.lstrip("+").split("=", 1)[0]
        plain.append(token.lstrip("+") if token.startswith("+") and "=" in token and key in DIRECTORY_KEYS else token)
    return plain


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv:
        argv = [t for t in argv if t != DEBUG_FLAG]
        os.environ["ASCEND_EDIT_DEBUG"] = "1"
    check_only = os.environ.get(CHECK_ONLY_ENV) == "1"
    if check_only and argv[:1] == ["report"]:  # a launcher's one-process check: report reads runs, no config
        return 0
    # `report RUN_DIR...` (no Hydra): a token without `=`, or an existing directory (a sweep's `lr=1e-3/`)
    if argv[:1] == ["report"] and any("=" not in token or Path(token).is_dir() for token in argv[1:]):
        from ascend_edit.tasks.report import main as report_main

        return report_main([token for token in argv[1:] if not token.startswith("hydra.")])
    argv = plain_directory_overrides(argv)
    try:
        if not check_only:  # the wrapper's check passes the run directory it will give the ranks
            argv = [*argv, *shared_run_dir_override(argv, dict(os.environ))]
        sys.argv = [sys.argv[0], *_split_subcommand(argv)]
    except UserError as err:
        print(f"ascend-edit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    register_configs()
    try:
        world_size = env_world_size() if check_only else None
    except UserError as err:
        print(f"ascend-edit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = _precheck(sys.argv[1:], world_size)
    if problem:
        print(f"ascend-edit: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if check_only:
        return 0
    _hydra_main()
    return 0


# Set by the launch/ wrappers: check the configuration once before the ranks start, then exit (0 = fine).
CHECK_ONLY_ENV = "ASCEND_EDIT_CHECK_ONLY"


if __name__ == "__main__":
    sys.exit(main())
