"""A run's report to look at: `report.md` with PNG plots, rebuilt from what the run left on disk.

Reads `report.json` (stage results, KV, tokens), `eval.json` (the held-out suite), `metrics.jsonl`
(per-step training metrics), `run_info.json` (wall time, device) and `.hydra/config.yaml`; any of them
may be missing (an `ascend-edit eval` output has only eval.json). Plots use matplotlib's Agg backend.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PLOTS = "plots"
log = logging.getLogger(__name__)


class DamagedRunFile(ValueError):
    """A run's JSON file that cannot be read (cut short by a killed process, edited by hand)."""


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRunFile(f"{path} is damaged ({err}); restore it or move it aside") from err
    if not isinstance(value, dict):
        raise DamagedRunFile(f"{path} is damaged (a JSON {type(value).__name__}, not an object)")
    return value


def _metrics_lines(path: Path) -> list[dict]:
    """Per-step metrics; the last line may be cut short by a killed run (the training loop drops it on resume),
    so it is skipped, as a damaged line anywhere else is not."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    metrics = []
    for number, line in enumerate(lines, 1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s: its last line is cut short (a killed run); left out of the report", path)
                break
            raise DamagedRunFile(f"{path} is damaged at line {number} ({err})") from err
    return metrics


# The config a task really used where it differs from Hydra's composed one (`ascend-edit eval` of a run directory)
EFFECTIVE_CONFIG = "effective_config.yaml"


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    metrics = _metrics_lines(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    # an eval of a run directory used the run's teacher, data and seed, not its own composed ones: it says so
    config = run_dir / EFFECTIVE_CONFIG if (run_dir / EFFECTIVE_CONFIG).is_file() else run_dir / ".hydra" / "config.yaml"
    overrides = run_dir / ".hydra" / "overrides.yaml"
    return {"dir": run_dir, "report": _load_json(run_dir / "report.json"), "eval": _load_json(run_dir / "eval.json"),
            "info": _load_json(run_dir / "run_info.json"), "metrics": metrics,
            "config": config.read_text() if config.is_file() else "",
            "config_name": ("config used (the evaluated run's teacher, data and seed)" if config.name == EFFECTIVE_CONFIG
                            else "composed config"),
            "overrides": overrides.read_text() if overrides.is_file() else ""}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _figure(path: Path, *, dpi: int = 110, tight: bool = True, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of ``plt.subplots(**subplots)``; the figure is saved to ``path`` at the end of the
    block (after ``tight_layout`` unless ``tight=False``) and closed either way."""
    plt = _pyplot()
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        if tight:
            fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_layerwise(metrics: list[dict], path: Path) -> bool:
    rows = [m for m in metrics if m.get("stage") == "layerwise"]
    layers = sorted({k for m in rows for k in m if k.startswith("layer/")}, key=lambda k: int(k.split("/")[1]))
    if not rows or not layers:
        return False
    with _figure(path, figsize=(7, 4)) as (_, ax):
        cmap = _pyplot().get_cmap("viridis")
        for i, key in enumerate(layers):
            ax.plot([m["step"] for m in rows], [m[key] for m in rows], color=cmap(i / max(1, len(layers) - 1)),
                    lw=0.9, label=key if len(layers) <= 8 else None)
        ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], color="black", lw=2, label="mean")
        ax.set(xlabel="step", ylabel="activation loss", title="Stage 1: per-layer loss (dark = early layers)",
               yscale="log")
        ax.legend(fontsize=7)
    return True


def plot_model_level(metrics: list[dict], path: Path) -> bool:
    rows = [m for m in metrics if m.get("stage") == "model_level"]
    if not rows:
        return False
    with _figure(path, figsize=(7, 4)) as (_, ax):
        # the objective distill.model_level.kl names (forward / reverse KL, JSD; x T^2 at temperature T; top-k
        # renormalised): the plain KL to the teacher is the held-out suite's teacher-KL, not this curve
        ax.plot([m["step"] for m in rows], [m.get("kd", m["loss"]) for m in rows],
                label="KD objective (distill.model_level.kl)")
        if any("loss" in m and "kd" in m and m["loss"] != m["kd"] for m in rows):
            ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], label="total loss", alpha=0.7)
        ax.set(xlabel="step", ylabel="nats/token", title="Stage 2: distillation objective (training batches)")
        ax.legend()
    return True


def plot_quality(results: dict, path: Path) -> bool:
    quality = results.get("quality") or {}
    if not any(quality.values()):
        return False
    with _figure(path, ncols=2, figsize=(10, 4)) as (_, axes):
        for domain, per_context in quality.items():
            contexts = sorted(per_context, key=int)
            x = [int(c) for c in contexts]
            axes[0].plot(x, [per_context[c]["ppl_ratio"] for c in contexts], marker="o", label=domain)
            axes[1].plot(x, [per_context[c]["student"]["teacher_kl"] for c in contexts], marker="o", label=domain)
        ticks = sorted({int(c) for per_context in quality.values() for c in per_context})
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
            ax.minorticks_off()
        axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[0].set(xlabel="context (tokens)", ylabel="student ppl / teacher ppl",
                    title="Perplexity ratio per context")
        axes[1].set(xlabel="context (tokens)", ylabel="nats/token", title="Teacher-KL per context")
        for ax in axes:
            ax.legend()
    return True


def plot_passkey(results: dict, path: Path) -> bool:
    passkey = results.get("passkey")
    if not passkey:
        return False
    size = (10, 0.5 * len(passkey["contexts"]) + 2.8)
    with _figure(path, tight=False, ncols=2, figsize=size, squeeze=False, layout="constrained") as (fig, axes):
        for ax, name in zip(axes[0], ("teacher", "student")):
            image = ax.imshow(passkey[name], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(passkey["depths"])), [f"{d:g}" for d in passkey["depths"]])
            ax.set_yticks(range(len(passkey["contexts"])), [str(c) for c in passkey["contexts"]])
            for i, row in enumerate(passkey[name]):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
            ax.set(xlabel="needle depth", ylabel="context (tokens)", title=f"Passkey accuracy (%): {name}")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return True


def plot_kv(report: dict, path: Path) -> bool:
    kv = report.get("kv")
    if not kv:
        return False
    with _figure(path, figsize=(5, 3.2)) as (_, ax):
        values = [kv["teacher_bytes_per_token"], kv["converted_bytes_per_token"]]
        bars = ax.bar(["teacher", "converted"], values, color=["#888888", "#2a7ab0"])
        ax.bar_label(bars, [f"{v:,.0f}" for v in values])
        ax.set(ylabel="bytes per token (16-bit)",
               title=f"KV cache at {kv['context']:,} tokens: {kv['reduction_pct']:.1f} % less")
    return True


def plot_overview(plots: Path, path: Path, made: dict[str, bool]) -> bool:
    """The plots this report made, on one page (the picture the README links); an earlier report's plot still
    on disk (a suite that did not run this time) is not this run's."""
    names = [n for n in ("quality", "passkey", "layerwise", "model_level", "kv") if made.get(n)]
    if not names:
        return False
    import matplotlib.image as mpimg

    rows = (len(names) + 1) // 2
    with _figure(path, dpi=100, nrows=rows, ncols=2, figsize=(16, 4.6 * rows), squeeze=False) as (_, axes):
        for ax in axes.flat:
            ax.axis("off")
        for ax, name in zip(axes.flat, names):
            ax.imshow(mpimg.imread(plots / f"{name}.png"))
    return True


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)  # rounded once: 119.6 s is 2 min 0 s, not 1 min 60 s
    return f"{whole // 60} min {whole % 60} s"


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    """A metric as text; `null` in the JSON (a non-finite value, ascend_edit/jsonio.py) shows as nan."""
    return "nan" if value is None else format(scale * value, spec)


def quality_table(results: dict) -> list[str]:
    lines = ["| domain | context | sequences | teacher ppl | student ppl | ratio | teacher-KL | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for domain, per_context in (results.get("quality") or {}).items():
        for context in sorted(per_context, key=int):
            m = per_context[context]
            lines.append(f"| {domain} | {int(context):,} | {m.get('sequences', '-')} | {_num(m['teacher']['ppl'], '.2f')} | "
                         f"{_num(m['student']['ppl'], '.2f')} | {_num(m['ppl_ratio'], '.3f')}× | "
                         f"{_num(m['student']['teacher_kl'], '.4f')} | "
                         f"{_num(m['student']['top1_agreement'], '.1f', 100)} % |")
    return lines


def passkey_table(passkey: dict) -> list[str]:
    depths = passkey["depths"]
    lines = ["| model | context | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---|---:|" + "---:|" * len(depths)]
    for name in ("teacher", "student"):
        for context, row in zip(passkey["contexts"], passkey[name]):
            lines.append(f"| {name} | {context:,} | " + " | ".join(f"{100 * v:.0f} %" for v in row) + " |")
    return lines


def render(run_dir: Path) -> Path:
    """Write `report.md` and `plots/*.png` into `run_dir`; returns the report's path."""
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    plots = run_dir / PLOTS
    plots.mkdir(exist_ok=True)
    report, results, info = run["report"], run["eval"], run["info"]
    made = {name: fn(arg, plots / f"{name}.png") for name, fn, arg in (
        ("layerwise", plot_layerwise, run["metrics"]), ("model_level", plot_model_level, run["metrics"]),
        ("quality", plot_quality, results), ("passkey", plot_passkey, results), ("kv", plot_kv, report))}
    plot_overview(plots, plots / "overview.png", made)
    lines = [f"# Run report: {run_dir.name}", ""]
    if info or report:
        lines += ["| | |", "|---|---|"]
        lines.append(f"| device | {info.get('device', '-')} {info.get('device_name', '')} |")
        resumed = ", ".join(f"{stage} at step {step}" for stage, step in (report.get("resumed_at") or {}).items())
        lines.append(f"| wall time{f' (this command, resumed: {resumed})' if resumed else ''} | "
                     f"{_fmt_seconds(info.get('wall_seconds'))} |")
        for stage, seconds in (report.get("train_seconds") or {}).items():
            tokens = (report.get("throughput") or {}).get(stage, {}).get("tokens", 0)
            lines.append(f"| {stage} | {tokens:,} tokens in {_fmt_seconds(seconds)} |")
        phase_names = {"prepare": "setup: teacher, targets + warm start, data", "evaluate": "evaluations along the way",
                       "save": "writing checkpoints"}
        for phase, seconds in (report.get("phase_seconds") or {}).items():
            lines.append(f"| {phase_names.get(phase, phase)} | {_fmt_seconds(seconds)} |")
        if "peak_memory_gib" in report:
            lines.append(f"| peak device memory | {report['peak_memory_gib']:.2f} GiB |")
        if results.get("seconds") is not None:
            lines.append(f"| held-out suite | {_fmt_seconds(results['seconds'])} |")
        lines.append("")
    if report.get("results"):
        lines += ["## Quality along the conversion (training-domain eval batches)", "",
                  "| model | perplexity | teacher-KL | top-1 agreement |", "|---|---:|---:|---:|"]
        for name, m in report["results"].items():
            lines.append(f"| {name} | {_num(m['ppl'], '.2f')} | {_num(m['teacher_kl'], '.4f')} | "
                         f"{_num(m['top1_agreement'], '.1f', 100)} % |")
        lines.append("")
    if info.get("suite_error"):  # finish_run: the model was saved, then the suite failed
        lines += ["## Held-out suite", "", f"**The held-out suite failed on this model**: {info['suite_error']}", ""]
    if results.get("quality"):
        lines += ["## Held-out suite per domain and context", ""]
        lines += [f"* **{name}**: {text}" for name, text in results.get("domains", {}).items()]
        if results.get("checkpoint"):  # an `ascend-edit eval` job: what it scored, and on whose text
            lines.append(f"* evaluated: `{results['checkpoint']}`, in_domain from {results.get('in_domain_source')}")
        if results.get("skipped_contexts"):
            lines.append(f"* skipped (beyond the model's {results['max_positions']} positions): "
                         f"{results['skipped_contexts']}")
        lines += [""] + quality_table(results) + [""]
        if made["quality"]:
            lines += [f"![quality per context]({PLOTS}/quality.png)", ""]
    if results.get("passkey"):
        pk = results["passkey"]
        note = (f"{pk['trials']} samples per cell, filler: {pk['filler']}, seed {pk['seed']}; a sample counts when "
                "every answer token is the model's top-1.")
        lines += ["## Passkey retrieval", "", note, "", *passkey_table(pk), ""]
        if made["passkey"]:
            lines += [f"![passkey heat-map]({PLOTS}/passkey.png)", ""]
    if report.get("kv"):
        kv = report["kv"]
        text = (f"{kv['teacher_bytes_per_token']:,.0f} → {kv['converted_bytes_per_token']:,.0f} "
                f"bytes per token at {kv['context']:,} tokens (16-bit), {kv['reduction_pct']:.1f} % less; "
                f"{kv['teacher_total_bytes'] / 2**20:,.1f} → {kv['converted_total_bytes'] / 2**20:,.1f} MiB "
                "per sequence.")
        lines += ["## KV cache", "", text, ""]
        if made["kv"]:
            lines += [f"![KV bytes]({PLOTS}/kv.png)", ""]
    if made["layerwise"] or made["model_level"]:
        lines += ["## Training curves", ""]
        lines += [f"![stage 1]({PLOTS}/layerwise.png)", ""] if made["layerwise"] else []
        lines += [f"![stage 2]({PLOTS}/model_level.png)", ""] if made["model_level"] else []
    if (run_dir / "tensorboard").is_dir():
        lines += [f"TensorBoard: `tensorboard --logdir {run_dir / 'tensorboard'}`", ""]
    if run["config"]:
        lines += ["## Config", "", "Overrides:", "", "```yaml", run["overrides"].strip(), "```", "",
                  f"<details><summary>{run['config_name']}</summary>", "", "```yaml", run["config"].strip(), "```", "",
                  "</details>", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def summary_row(run_dir: Path) -> dict:
    """One run's headline numbers for the comparison table."""
    run = load_run(run_dir)
    report, results = run["report"], run["eval"]
    kv = report.get("kv") or {}
    row = {"run": str(run_dir), "kv_reduction_pct": kv.get("reduction_pct"), "kv_context": kv.get("context"),
           "tokens": sum(t.get("tokens", 0) for t in (report.get("throughput") or {}).values()) or None,
           "wall_seconds": run["info"].get("wall_seconds"), "resumed": bool(report.get("resumed_at"))}
    for domain, per_context in (results.get("quality") or {}).items():
        for context, m in per_context.items():
            row[f"{domain}@{context}"] = (m["ppl_ratio"], m["student"]["teacher_kl"], m.get("sequences"))
    row["texts"] = dict(results.get("text_sha256") or {})  # which text each domain's cells were scored on
    if results.get("passkey"):
        pk = results["passkey"]
        grid = pk["student"]
        row["passkey"] = sum(map(sum, grid)) / sum(len(r) for r in grid)
        row["passkey_grid"] = f"{'/'.join(map(str, pk['contexts']))} × {len(pk['depths'])} depths × {pk['trials']}"
    return row


def compare_runs(run_dirs: list[Path]) -> str:
    """A markdown table: one row per run; ppl ratio (KL) per domain@context with the windows it averages,
    passkey with its grid (runs evaluated on different grids are not comparable cell by cell), KV saving,
    tokens, time."""
    rows = [summary_row(d) for d in run_dirs]
    cells = sorted({k for r in rows for k in r if "@" in k}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    header = ["run", *[f"{c} ppl× (KL) [windows]" for c in cells], "passkey [contexts × depths × trials]",
              "KV saved [at context]", "train tokens", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        values = [r["run"]]
        values += [f"{_num(r[c][0], '.3f')} ({_num(r[c][1], '.3f')}) [{r[c][2] if r[c][2] is not None else '?'}]"
                   if c in r else "-"
                   for c in cells]
        values.append(f"{100 * r['passkey']:.0f} % [{r['passkey_grid']}]" if r.get("passkey") is not None else "-")
        # a sliding window saves more the longer the context: the figure is only comparable at one context
        values.append(f"{r['kv_reduction_pct']:.1f} % [{r['kv_context']:,}]" if r["kv_reduction_pct"] is not None
                      and r["kv_context"] else "-")
        values.append(f"{r['tokens']:,}" if r["tokens"] else "-")
        # a resumed run's wall time is its last command's: not comparable with a run made in one go
        values.append(_fmt_seconds(r["wall_seconds"]) + (" (resumed)" if r.get("resumed") else ""))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in different_texts(rows))


def different_texts(rows: list[dict]) -> list[str]:
    """One line per domain whose runs scored different texts (another corpus or split, or python_docs of another
    Python version): their cells in that domain do not compare."""
    notes = []
    for domain in sorted({d for r in rows for d in r["texts"]}):
        digests = {r["run"]: r["texts"][domain] for r in rows if r["texts"].get(domain)}
        if len(set(digests.values())) > 1:
            groups: dict[str, list[str]] = {}
            for run, digest in digests.items():
                groups.setdefault(digest, []).append(run)
            listed = "; ".join(f"{digest}: {', '.join(runs)}" for digest, runs in groups.items())
            notes.append(f"**{domain} was scored on different texts** (text_sha256 {listed}): its cells compare only "
                         "within a group.")
    return notes
