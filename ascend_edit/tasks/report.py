"""`ascend-edit report RUN_DIR [RUN_DIR ...]`: rebuild each run's report.md and compare the runs in one table.

The table (markdown) goes to stdout and to `--output` (default `compare.md` in the run when one is given, in the
first run's parent directory when several are). Also the end of every conversion (`finish_run`): the held-out suite,
`run_info.json` and the report.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

import torch

from ascend_edit import jsonio
from ascend_edit.config import RootConfig
from ascend_edit.eval.report import compare_runs, render
from ascend_edit.run_dir import set_aside_previous_run

log = logging.getLogger(__name__)


def write_report(run_dir: Path) -> Path:
    path = render(run_dir)
    log.info("report: %s", path)
    return path


def finish_run(model: torch.nn.Module, tokenizer, cfg: RootConfig, out_dir: Path, device, wall_seconds: float,
               teacher: torch.nn.Module | None = None, suite_written: bool = False) -> None:
    """End of a conversion (main rank): held-out suite -> eval.json, run_info.json, report.md + plots.
    `teacher`: the frozen teacher copy of a stage 2 that trained shared weights (None: the model's own path).
    `suite_written`: this run's eval.json was already written (every rank ran the suite on a partitioned model)."""
    from ascend_edit.tasks.eval import suite_after_conversion

    suite_seconds, failure, fresh = 0.0, None, suite_written
    if cfg.eval.suite:
        try:
            results = suite_after_conversion(model, tokenizer, cfg, out_dir, device.torch_device, teacher)
            suite_seconds, fresh = results.get("seconds", 0.0), bool(results)  # {}: skipped (no tokenizer)
        except (ValueError, OSError) as err:  # the model is saved: the run's record is written, then the error
            failure = err
    name = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device.torch_device)
    elif device.type == "cpu":
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    info = {"wall_seconds": wall_seconds + suite_seconds, "suite_seconds": suite_seconds, "device": device.type,
            "device_name": name, "torch": torch.__version__}
    if failure is not None:
        info["suite_error"] = f"{type(failure).__name__}: {failure}"
    if not fresh:
        # an eval.json here is an earlier model's (a resumed run that trained on): the report must not show it
        # as this one's
        aside = set_aside_previous_run(Path(out_dir), names=("eval.json",))
        if aside is not None:
            log.warning("the held-out suite did not run on this model: the earlier model's eval.json moved to %s",
                        aside)
    (Path(out_dir) / "run_info.json").write_text(jsonio.dumps(info, indent=2))
    print(f"report: {write_report(out_dir)}")
    if failure is not None:
        raise ValueError(f"the held-out suite failed after the conversion was saved ({out_dir / 'converted'}; "
                         f"report.md written without it): {failure}") from failure


def run_dir_problem(run_dir: Path) -> str | None:
    """Why `run_dir` is not a run whose report.md may be rebuilt, or None. A converted model's directory is
    refused (a file added to it breaks its manifest), and so is any directory no run of this project left
    (its report.md would be someone else's); the run's JSON files are read once, so a damaged one is named
    before any report is rewritten."""
    from ascend_edit.cli import holds_run
    from ascend_edit.eval.report import DamagedRunFile, load_run

    if (run_dir / "ascend_edit.json").is_file() or (run_dir.name == "converted" and holds_run(run_dir.parent)):
        return f"{run_dir} is a converted model, not a run directory; give the run directory ({run_dir.parent})"
    if not ((run_dir / "report.json").is_file() or (run_dir / "eval.json").is_file()):
        return f"{run_dir} is not a run directory (no report.json or eval.json)"
    if not holds_run(run_dir):
        return f"{run_dir} holds a report.json or eval.json but no ascend-edit run; its files are left as they are"
    try:
        load_run(run_dir)
    except DamagedRunFile as err:
        return str(err)
    return None


def run(cfg: RootConfig) -> dict:
    """`ascend-edit report eval.checkpoint=RUN_DIR` (the Hydra form): rebuild one run's report."""
    if not cfg.eval.checkpoint:
        raise ValueError("usage: ascend-edit report RUN_DIR [RUN_DIR ...]")
    run_dir = Path(cfg.eval.checkpoint).expanduser()
    problem = run_dir_problem(run_dir)
    if problem:
        raise ValueError(f"eval.checkpoint: {problem} (nothing was written)")
    return {"report": str(write_report(run_dir))}


# First line of every comparison file written here: a later run may overwrite such a file, never any other.
COMPARISON_MARK = "<!-- ascend-edit report: comparison of runs -->"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-edit report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with report.json or eval.json)")
    parser.add_argument("--output", type=Path, help="where to write the comparison table (markdown)")
    args = parser.parse_args(argv)
    output = args.output or (args.runs[0] / "compare.md" if len(args.runs) == 1 else args.runs[0].parent / "compare.md")
    # compare.md (default or --output) is replaced only when this command wrote it (its first line is the mark);
    # a directory never. Everything is checked before any run's report.md is rewritten.
    foreign = output.is_file() and not output.read_text(errors="replace").startswith(COMPARISON_MARK)
    problem = None
    for run_dir in args.runs:  # the runs first: a missing run is the problem, not the default --output beside it
        problem = problem or run_dir_problem(run_dir)
    if problem is None and (output.is_dir() or foreign):
        what = "a directory" if output.is_dir() else "a file this command did not write"
        problem = f"{output} is {what}; give a new path with --output"
    elif problem is None and not output.parent.is_dir():
        problem = f"--output {output}: the directory {output.parent} does not exist"
    if problem:
        print(f"ascend-edit: error: {problem} (nothing was written)", file=sys.stderr)
        return 2
    try:
        for run_dir in args.runs:
            print(f"report: {write_report(run_dir)}")
        table = compare_runs(args.runs)
        print(table)
        output.write_text(f"{COMPARISON_MARK}\n{table}")
    except OSError as err:  # a read-only run directory (a colleague's runs), a full disk
        print(f"ascend-edit: error: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
        return 2
    print(f"comparison: {output}")
    return 0
