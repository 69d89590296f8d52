"""Reliability through the command line (issue 9): preemption, config changes on resume, divergence and
export safety, each as a real `python -m ascend_edit.cli` subprocess on the tiny trained teacher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_edit.train.preemption import EXIT_PREEMPTED
from tests.integration.test_convert_cli import checked, results_of, run_cli, tiny_convert_overrides

pytestmark = pytest.mark.usefixtures("few_cpu_threads")  # see conftest.py

RUN_TIMEOUT_S = 600


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ascend-edit:")]


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- preemption

PREEMPT_STEPS = {"layerwise": 80, "model_level": 20}


def test_sigterm_mid_stage_then_restart_equals_the_uninterrupted_run(trained_teacher: Path, tmp_path: Path):
    """SIGTERM once stage 1 has logged a few steps: the job checkpoints at the next step boundary and exits
    with 75; the same command resumes there. Same process layout and ops: metrics and held-out results
    must be identical floats (compared exactly)."""
    overrides = [*tiny_convert_overrides(trained_teacher),
                 *(f"distill.{stage}.steps={steps}" for stage, steps in PREEMPT_STEPS.items())]
    reference = tmp_path / "straight"
    checked(run_cli(reference, overrides))

    run_dir = tmp_path / "preempted"
    env = {**{k: v for k, v in os.environ.items() if k != "ASCEND_EDIT_DEBUG"}, "TQDM_DISABLE": "1"}
    job = subprocess.Popen([sys.executable, "-m", "ascend_edit.cli", *overrides, f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len([r for r in metrics_rows(run_dir) if r["stage"] == "layerwise"]) < 5:
        assert job.poll() is None, "the job ended before training"
        assert time.monotonic() < deadline, "no training step in time"
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=RUN_TIMEOUT_S)
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("ascend-edit: layerwise: stopped on SIGTERM")]
    assert len(stopped) == 1, stderr[-3000:]
    saved = sorted((run_dir / "checkpoints").glob("step-layerwise-*"))
    assert len(saved) == 1 and int(saved[0].name.rsplit("-", 1)[1]) < PREEMPT_STEPS["layerwise"]
    assert not (run_dir / "report.json").exists()

    checked(run_cli(run_dir, overrides))
    assert metrics_rows(run_dir) == metrics_rows(reference)
    assert results_of(run_dir) == results_of(reference)
    report = json.loads((run_dir / "report.json").read_text())
    # The stage's time covers both processes: the throughput is over the whole stage's tokens.
    assert report["throughput"]["layerwise"]["tokens"] == json.loads(
        (reference / "report.json").read_text())["throughput"]["layerwise"]["tokens"]
    assert report["skipped_steps"] == {"layerwise": [], "model_level": []}


# ---------------------------------------------------------------------------------------------- resume config


def test_resume_with_a_changed_learning_rate_is_refused_in_one_line(trained_teacher: Path, tmp_path: Path):
    base = [*tiny_convert_overrides(trained_teacher), "distill.stage=layerwise", "distill.layerwise.steps=4",
            "distill.layerwise.warmup_steps=1"]
    run_dir = tmp_path / "run"
    checked(run_cli(run_dir, [*base, "distill.layerwise.lr=1e-3"]))
    result = run_cli(run_dir, [*base, "distill.layerwise.lr=2e-3"])
    assert_one_line_error(result, "distill.layerwise.lr: 0.001 -> 0.002", "cannot change on resume")
    # More steps may change on resume: applied, the stage goes on from its checkpoint.
    checked(run_cli(run_dir, [*base, "distill.layerwise.lr=1e-3", "distill.layerwise.steps=6"]))
    assert len(json.loads((run_dir / "report.json").read_text())["histories"]["layerwise"]) == 6


# ---------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_in_one_line_and_writes_no_converted_model(trained_teacher: Path, tmp_path: Path):
    """An absurd learning rate drives the weights to inf: the following steps are non-finite and skipped,
    the stage stops after engine.max_consecutive_skips, and no non-finite tensor reaches the disk."""
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=30",
                               "distill.layerwise.lr=1e30", "distill.layerwise.warmup_steps=0",
                               "engine.grad_clip=0", "engine.max_consecutive_skips=2", "engine.checkpoint_every=1"])
    assert_one_line_error(result, "2 steps in a row were non-finite")
    assert not (run_dir / "converted").exists() and not (run_dir / "report.json").exists()
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        for file in checkpoint.glob("*.safetensors"):
            assert all(bool(torch.isfinite(t).all()) for t in load_file(str(file)).values() if t.is_floating_point())


def test_a_stage_that_ends_on_finite_garbage_writes_nothing_of_it(trained_teacher: Path, tmp_path: Path):
    """One huge stage-2 step leaves finite weights (~1e30) and the next steps are skipped, fewer in a row than
    engine.max_consecutive_skips: the stage finishes, but its held-out perplexity is inf. That run exited 0
    and wrote converted/; now it stops in one line and stage 1's hand-off stays the last thing written."""
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=2",
                               "distill.layerwise.warmup_steps=1", "distill.model_level.steps=3",
                               "distill.model_level.warmup_steps=0", "distill.model_level.lr=1e30",
                               "engine.grad_clip=0", "engine.max_consecutive_skips=5"])
    assert_one_line_error(result, "model_level: the held-out evaluation after the stage is not finite",
                          "distill.model_level.lr", "engine.resume=false")
    stage2 = [row for row in metrics_rows(run_dir) if row.get("stage") == "model_level"]
    assert len(stage2) == 3 and stage2[-1]["skipped"]  # the stage ran to its end, on skipped steps
    assert (run_dir / "stage-layerwise").is_dir()
    assert not (run_dir / "converted").exists() and not (run_dir / "report.json").exists()


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def small_run(trained_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    checked(run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=2", "distill.layerwise.warmup_steps=1", "distill.model_level.warmup_steps=1",
                              "distill.model_level.steps=2"]))
    return run_dir


def test_cli_export_onto_a_non_empty_dir_leaves_every_file_in_place(small_run: Path, tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli(tmp_path / "export_run", ["export", f"export.checkpoint={small_run}", f"export.output={out}"])
    assert_one_line_error(result, f"export.output={out}", "export.overwrite=true")
    assert snapshot(out) == {"notes.txt": b"keep me"}


def test_cli_export_onto_its_source_is_refused_even_with_overwrite(small_run: Path, tmp_path: Path):
    before = snapshot(small_run)
    for output in (small_run, small_run / "converted", small_run.parent):
        result = run_cli(tmp_path / "export_run", ["export", f"export.checkpoint={small_run}",
                                                   f"export.output={output}", "export.overwrite=true"])
        assert_one_line_error(result, "export.output=")
    assert snapshot(small_run) == before
