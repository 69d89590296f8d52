"""One summary for a Hydra multirun: a table (markdown + CSV) and a plot of quality vs KV-cache bytes.

Every job of a sweep writes its own `report.json` into its own directory (`hydra.sweep.dir`/<num>);
this module reads them back and lays them side by side. It runs as a Hydra callback at the end of a
multirun (configured under `hydra.callbacks` in the sweep experiments, so it also runs after a Slurm
sweep through the submitit launcher), or by hand on any sweep directory, complete or not:

    python -m ascend_edit.sweep multirun/2026-12-01/12-00-00
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STAGES = ("after_model_level", "after_layerwise", "after_init")  # the latest stage a job reached comes first
COLUMNS = ("stage", "ppl", "teacher_kl", "top1_agreement", "teacher_ppl", "kv_bytes_per_token",
           "teacher_kv_bytes_per_token", "kv_reduction_pct", "kv_context", "train_seconds")


@dataclass
class Job:
    """One job of a sweep: its directory (relative to the sweep), its overrides and its numbers."""

    name: str
    overrides: dict[str, str]
    metrics: dict[str, object] = field(default_factory=dict)
    status: str = "ok"


def _job_sort_key(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def read_job(sweep_dir: Path, job_dir: Path) -> Job:
    """One job's row; a job whose files are cut short or incomplete (killed while writing) is listed with a status
    that says so, never a traceback that loses the other jobs' rows."""
    name = job_dir.relative_to(sweep_dir).as_posix()
    try:
        overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        pairs = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
    except Exception:  # a YAML error, or not a list: Hydra was killed while writing it
        return Job(name, {}, status=".hydra/overrides.yaml unreadable (cut short)")
    report_file = job_dir / "report.json"
    if not report_file.is_file():
        return Job(name, pairs, status="no report.json (failed or still running)")
    try:
        report = json.loads(report_file.read_text())
    except json.JSONDecodeError:
        return Job(name, pairs, status="report.json unreadable (still being written, or cut short)")
    written_with = report.get("overrides") if isinstance(report, dict) else None
    if isinstance(written_with, list) and sorted(map(str, written_with)) != sorted(map(str, overrides)):
        # a job restarted with other settings (a resumed sweep) keeps the earlier attempt's report until it finishes
        return Job(name, pairs, status="report.json is from an earlier attempt with other settings (the job "
                                       "restarted since: running, stopped or failed)")
    try:
        return Job(name, pairs, _metrics(report))
    except (AttributeError, KeyError, TypeError):  # a report.json without the fields every finished job writes
        return Job(name, pairs, status="report.json incomplete")


def _metrics(report: dict) -> dict[str, object]:
    results = report.get("results") or {}
    stage = next((s for s in STAGES if s in results), None)
    if stage is None:
        raise KeyError("results")
    final, kv = results[stage], report.get("kv") or {}
    return {
        "stage": stage.removeprefix("after_"),
        "ppl": final["ppl"], "teacher_kl": final["teacher_kl"], "top1_agreement": final["top1_agreement"],
        "teacher_ppl": (results.get("teacher") or {}).get("ppl"),
        "kv_bytes_per_token": kv.get("converted_bytes_per_token"),
        "teacher_kv_bytes_per_token": kv.get("teacher_bytes_per_token"),
        "kv_reduction_pct": kv.get("reduction_pct"), "kv_context": kv.get("context"),
        "train_seconds": sum((report.get("train_seconds") or {}).values()),
    }


def collect(sweep_dir: Path) -> list[Job]:
    """All jobs under `sweep_dir`: every directory Hydra wrote a `.hydra/overrides.yaml` into, except those inside
    another job's (an earlier run a restarted job set aside into `replaced-<time>/` is no job of the sweep)."""
    found = {f.parent.parent for f in sweep_dir.glob("**/.hydra/overrides.yaml")}
    outermost = [d for d in found if not any(parent in found for parent in d.parents)]
    job_dirs = sorted(outermost, key=lambda d: _job_sort_key(d.relative_to(sweep_dir)))
    return [read_job(sweep_dir, d) for d in job_dirs]


def swept_keys(jobs: list[Job]) -> list[str]:
    """The overrides whose values differ between jobs (all of them for a single job), in first-seen order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def rows(jobs: list[Job]) -> tuple[list[str], list[list[object]]]:
    keys = swept_keys(jobs)
    header = ["job", *keys, *COLUMNS, "status"]
    body = [[job.name, *(job.overrides.get(k, "") for k in keys),
             *(job.metrics.get(c, "") for c in COLUMNS), job.status] for job in jobs]
    return header, body


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(header: list[str], body: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot(jobs: list[Job], keys: list[str], path: Path) -> None:
    """Held-out perplexity and teacher-KL against KV-cache bytes per token, one labelled point per finished job."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters and CI
    import matplotlib.pyplot as plt

    # a non-finite metric is null in report.json (jsonio): such a job stays in the table, not in the plot
    done = [j for j in jobs if all(j.metrics.get(k) is not None for k in ("kv_bytes_per_token", "ppl", "teacher_kl"))]
    # every teacher of the sweep (one per model / data / seed a sweep varies), each where its own jobs measured it
    teachers = sorted({(j.metrics["teacher_kv_bytes_per_token"], j.metrics["teacher_ppl"]) for j in done
                       if j.metrics.get("teacher_ppl") is not None
                       and j.metrics.get("teacher_kv_bytes_per_token") is not None})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, metric, label in ((axes[0], "ppl", "held-out perplexity"), (axes[1], "teacher_kl", "teacher-KL (nats/token)")):
        ax.scatter([j.metrics["kv_bytes_per_token"] for j in done], [j.metrics[metric] for j in done],
                   color="tab:blue", zorder=3, label="converted")
        for job in done:
            text = ", ".join(f"{k.rsplit('.', 1)[-1]}={job.overrides.get(k, '')}" for k in keys) or job.name
            ax.annotate(text, (job.metrics["kv_bytes_per_token"], job.metrics[metric]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        if teachers:
            ax.scatter([kv for kv, _ in teachers], [ppl if metric == "ppl" else 0.0 for _, ppl in teachers],
                       marker="*", s=120, color="tab:red", zorder=3,
                       label="teacher" if len(teachers) == 1 else f"teachers ({len(teachers)})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    context = done[0].metrics.get("kv_context") if done else None
    fig.supxlabel(f"KV-cache bytes per token (16-bit, averaged over a {context or '?'}-token context)")
    fig.suptitle("Sweep: quality vs KV-cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(sweep_dir: str | Path, name: str = "summary") -> dict[str, Path]:
    """Write `<name>.md`, `<name>.csv` and `<name>.png` into the sweep directory; returns their paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    jobs = collect(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no Hydra jobs (*/.hydra/overrides.yaml) under {sweep_dir}")
    header, body = rows(jobs)
    paths = {ext: sweep_dir / f"{name}.{ext}" for ext in ("md", "csv", "png")}
    if paths["md"].is_file() and not paths["md"].read_text(errors="replace").startswith("# Sweep "):
        # a file this module did not write (its summaries start with that title): never replaced
        raise FileExistsError(f"{paths['md']} exists and is not a sweep summary: give another name or directory")
    if not paths["md"].is_file() and (theirs := [p for p in (paths["csv"], paths["png"]) if p.exists()]):
        # written only with the .md: without it, a file of that name is someone else's
        raise FileExistsError(f"{theirs[0]} exists and is not part of a sweep summary: give another name or directory")
    title = f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs; quality is the latest stage each job reached.\n\n"
    paths["md"].write_text(title + markdown_table(header, body))
    with paths["csv"].open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    plot(jobs, swept_keys(jobs), paths["png"])
    return paths


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory once every job of a multirun has finished."""

    def __init__(self, name: str = "summary") -> None:
        self.name = name

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        # The same config object the launcher resolved the directory from: `${now:...}` is cached in it.
        paths = write_summary(str(config.hydra.sweep.dir), self.name)
        log.info("sweep summary: %s", ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m ascend_edit.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    try:
        paths = write_summary(argv[0])
    except (FileNotFoundError, FileExistsError) as err:
        print(f"ascend_edit.sweep: error: {err}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
