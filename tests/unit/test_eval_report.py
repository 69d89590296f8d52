"""report.md and its plots render from what a run leaves on disk; runs compare in one table; TensorBoard events."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ascend_edit.cli import main
from ascend_edit.eval.report import render
from ascend_edit.eval.tensorboard import TrainingBoard


def fake_run(run_dir: Path, ratio: float = 1.05) -> Path:
    run_dir.mkdir(parents=True)
    metrics = [{"stage": "layerwise", "step": s, "loss": 1.0 / s, "layer/0": 1.2 / s, "layer/1": 0.8 / s}
               for s in range(1, 6)]
    metrics += [{"stage": "model_level", "step": s, "loss": 0.5 / s, "kd": 0.5 / s} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    point = {"ppl": 10.0, "teacher_kl": 0.1, "top1_agreement": 0.8, "tokens": 100}
    (run_dir / "report.json").write_text(json.dumps({
        "results": {"teacher": point, "after_model_level": point}, "train_seconds": {"layerwise": 3.0},
        "throughput": {"layerwise": {"tokens": 1000}},
        "kv": {"context": 8192, "teacher_bytes_per_token": 100.0, "converted_bytes_per_token": 40.0,
               "teacher_total_bytes": 819200, "converted_total_bytes": 327680, "reduction_pct": 60.0}}))
    quality = {c: {"teacher": {"ppl": 10.0, "tokens": 99}, "sequences": 2, "ppl_ratio": ratio,
                   "student": {"ppl": 10.0 * ratio, "teacher_kl": 0.05, "top1_agreement": 0.9, "tokens": 99}}
               for c in ("256", "1024")}
    (run_dir / "eval.json").write_text(json.dumps({
        "domains": {"in_domain": "d", "python_docs": "p"}, "quality": {"in_domain": quality, "python_docs": quality},
        "skipped_contexts": [], "max_positions": 2048, "seconds": 1.0,
        "passkey": {"contexts": [256, 1024], "depths": [0.0, 0.5, 1.0], "trials": 2, "filler": "python_docs",
                    "seed": 0, "teacher": [[1, 1, 0.5], [1, 0.5, 0]], "student": [[1, 0.5, 0.5], [0.5, 0, 0]]}}))
    (run_dir / "run_info.json").write_text(json.dumps({"wall_seconds": 75.0, "device": "cpu", "device_name": "x"}))
    (run_dir / ".ascend-edit-run").touch()  # every task marks its directory when it starts
    return run_dir


def test_report_renders_every_section_with_plots(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    text = render(run_dir).read_text()
    for plot in ("layerwise", "model_level", "quality", "passkey", "kv"):
        png = run_dir / "plots" / f"{plot}.png"
        assert png.stat().st_size > 5000, plot  # a real picture, not an empty canvas
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot}.png" in text
    assert "| python_docs | 1,024 | 2 | 10.00 | 10.50 | 1.050× | 0.0500 | 90.0 % |" in text
    assert "| student | 1,024 | 50 % | 0 % | 0 % |" in text
    assert "1 min 15 s" in text and "60.0 % less" in text


def test_report_of_an_eval_only_directory(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    for name in ("metrics.jsonl", "report.json", "run_info.json"):
        (run_dir / name).unlink()
    text = render(run_dir).read_text()
    assert "Passkey" in text and "Training curves" not in text
    assert not (run_dir / "plots" / "layerwise.png").exists()


def test_report_command_compares_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 1.05), fake_run(tmp_path / "b", 1.5)
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert (a / "report.md").is_file() and (b / "report.md").is_file()
    table = (tmp_path / "compare.md").read_text().split("\n", 1)[1]  # after the mark that lets a re-run overwrite
    assert table in out
    assert "in_domain@1024 ppl× (KL) [windows]" in table and "1.500 (0.050) [2]" in table and "| 60.0 % [8,192] |" in table
    assert "42 % [256/1024 × 3 depths × 2]" in table  # the passkey grid behind the percentage
    assert main(["report", str(a), str(b)]) == 0  # its own comparison file is rewritten
    (tmp_path / "compare.md").write_text("my own notes")  # a user's compare.md, where the default would go
    assert main(["report", str(a), str(b)]) == 2
    assert "a file this command did not write" in capsys.readouterr().err
    assert (tmp_path / "compare.md").read_text() == "my own notes"


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 1.05)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    assert main(["report", str(run), "--output", str(notes)]) == 2
    assert "--output" in capsys.readouterr().err and notes.read_text() == "my notes"
    assert not (run / "report.md").exists()  # refused before anything was written


def test_report_to_a_missing_directory_is_one_line_before_any_report_is_rewritten(tmp_path, capsys):
    run = fake_run(tmp_path / "a", 1.05)
    assert main(["report", str(run), "--output", str(tmp_path / "nope" / "x.md")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (run / "report.md").exists()


def test_report_command_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_report_refuses_a_converted_model_and_a_directory_no_run_left(tmp_path, capsys):
    """report.md and plots/ written into converted/ broke the model's manifest (export refused it as damaged), and
    any directory's report.md was replaced, in both command forms."""
    run = fake_run(tmp_path / "run")
    converted = run / "converted"
    converted.mkdir()
    (converted / "ascend_edit.json").write_text("{}")
    (converted / "eval.json").write_text("{}")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "eval.json").write_text('{"my": 1}')
    (theirs / "report.md").write_text("my notes")
    for where, expect in ((converted, "is a converted model"), (theirs, "holds a report.json or eval.json but no")):
        assert main(["report", str(where)]) == 2
        assert expect in capsys.readouterr().err
        with pytest.raises(SystemExit) as hydra_form:
            main(["report", f"eval.checkpoint={where}", f"hydra.run.dir={tmp_path / 'h'}"])
        assert hydra_form.value.code == 2 and expect in capsys.readouterr().err
    assert sorted(p.name for p in converted.iterdir()) == ["ascend_edit.json", "eval.json"]
    assert (theirs / "report.md").read_text() == "my notes" and not (theirs / "plots").exists()


def test_a_damaged_run_file_is_one_line_before_any_report_is_rewritten(tmp_path, capsys):
    """A report.json cut short gave a JSONDecodeError traceback after earlier runs' report.md were rewritten; a
    metrics.jsonl whose last line a killed run cut short is reported without that line."""
    good, torn = fake_run(tmp_path / "good"), fake_run(tmp_path / "torn")
    (torn / "report.json").write_text((torn / "report.json").read_text()[:50])
    assert main(["report", str(good), str(torn)]) == 2
    err = capsys.readouterr().err
    assert f"{torn / 'report.json'} is damaged" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (good / "report.md").exists()
    cut = fake_run(tmp_path / "cut")
    lines = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(lines[:-20])  # the last line cut mid-record
    assert main(["report", str(cut)]) == 0 and (cut / "report.md").is_file()
    (cut / "metrics.jsonl").write_text("{broken\n" + lines)  # damage elsewhere is not a killed run's
    assert main(["report", str(cut)]) == 2 and "damaged at line 1" in capsys.readouterr().err


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    board = TrainingBoard(tmp_path / "tb")
    for step in range(1, 4):
        board.log("layerwise", step, {"loss": 1.0 / step, "layer/0": 0.5, "skipped": False, "grad_norm": float("nan")})
    board.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["layerwise/layer/0", "layerwise/loss"]
    assert [e.step for e in acc.Scalars("layerwise/loss")] == [1, 2, 3]


def test_no_board_is_a_no_op(tmp_path):
    board = TrainingBoard(None)
    board.log("layerwise", 1, {"loss": 1.0})
    board.close()


def test_a_resumed_stage_shows_each_step_once(tmp_path):
    """A stage resumed from its step-4 checkpoint logs steps 5.. again: the events after step 4 that the stopped
    run had written are purged, and the other stage's curve is untouched (was: steps 1-6 then 5, 6 again)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ascend_edit.eval.tensorboard import training_board

    metrics_log = tmp_path / "metrics.jsonl"
    for stage in ("layerwise", "model_level"):
        board = training_board(metrics_log, stage)
        for step in range(1, 7):
            board.log(stage, step, {"loss": float(step)})
        board.close()
    # event files are named by the second they open in (then a process-wide counter, compared as text): a resume
    # opens its file seconds later at least; here, one second later, so the files sort as in a real resume
    time.sleep(1.1)
    resumed = training_board(metrics_log, "layerwise", start_step=4)
    for step in (5, 6):
        resumed.log("layerwise", step, {"loss": 10.0 * step})
    resumed.close()
    values = {}
    for stage in ("layerwise", "model_level"):
        acc = EventAccumulator(str(tmp_path / "tensorboard" / stage))
        acc.Reload()
        values[stage] = {e.step: e.value for e in acc.Scalars(f"{stage}/loss")}
        assert [e.step for e in acc.Scalars(f"{stage}/loss")] == [1, 2, 3, 4, 5, 6]
    assert values["layerwise"][6] == 60.0 and values["model_level"][6] == 6.0  # the resumed run's; the other untouched


def test_a_suite_failure_after_the_conversion_still_writes_the_runs_record(tmp_path, monkeypatch):
    """The conversion is saved before the suite runs: a suite error still leaves run_info.json (naming the
    error) and report.md, rather than a directory without its record, then stops the job with the error."""
    from types import SimpleNamespace

    from ascend_edit.config import RootConfig
    from ascend_edit.tasks import eval as eval_task
    from ascend_edit.tasks.report import finish_run

    run_dir = fake_run(tmp_path / "run")
    (run_dir / "run_info.json").unlink()

    def failing_suite(*args, **kwargs):
        raise ValueError("evaluation batches hold no scored tokens")

    monkeypatch.setattr(eval_task, "suite_after_conversion", failing_suite)
    with pytest.raises(ValueError, match="held-out suite failed after the conversion was saved"):
        finish_run(None, None, RootConfig(), run_dir, SimpleNamespace(type="meta", torch_device="meta"), 1.0)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert "no scored tokens" in info["suite_error"]
    assert (run_dir / "report.md").is_file()
    # the eval.json there was an earlier model's: moved aside, not shown in the report as this model's
    assert not (run_dir / "eval.json").exists() and len(list(run_dir.glob("replaced-*/eval.json"))) == 1
    text = (run_dir / "report.md").read_text()
    assert "Passkey" not in text and "python_docs" not in text
    assert "The held-out suite failed on this model**: ValueError: evaluation batches hold no scored" in text


def test_a_resumed_run_without_the_suite_does_not_report_the_earlier_models_suite(tmp_path):
    """A finished run resumed to train on with eval.suite=false kept the earlier model's eval.json: report.md and
    `ascend-edit report` showed its ratios (and its quality plot in the overview) as the new model's."""
    from types import SimpleNamespace

    from ascend_edit.config import EvalConfig, RootConfig
    from ascend_edit.tasks.report import finish_run

    run_dir = fake_run(tmp_path / "run")
    render(run_dir)  # the earlier model's report, with its quality and passkey plots
    before = (run_dir / "eval.json").read_text()
    cfg = RootConfig(eval=EvalConfig(suite=False))
    finish_run(None, None, cfg, run_dir, SimpleNamespace(type="meta", torch_device="meta"), 119.6)
    assert [p.read_text() for p in run_dir.glob("replaced-*/eval.json")] == [before]
    text = (run_dir / "report.md").read_text()
    assert "python_docs" not in text and "quality.png" not in text and "2 min 0 s" in text  # not "1 min 60 s"
    # a suite that is on but skipped (a teacher without a tokenizer) did not score this model either
    again = fake_run(tmp_path / "again")
    finish_run(None, None, RootConfig(), again, SimpleNamespace(type="meta", torch_device="meta"), 1.0)
    assert not (again / "eval.json").exists() and len(list(again.glob("replaced-*/eval.json"))) == 1
    # ... while a suite this run already wrote (every rank of a partitioned model ran it) stays
    kept = fake_run(tmp_path / "kept")
    finish_run(None, None, cfg, kept, SimpleNamespace(type="meta", torch_device="meta"), 1.0, suite_written=True)
    assert (kept / "eval.json").is_file() and not list(kept.glob("replaced-*"))


def test_a_resumed_runs_wall_time_says_it_is_this_commands(tmp_path):
    """The wall time is the finishing command's, the stage seconds the whole stage's: a resumed run's report and
    the comparison table say so, with the steps the stages resumed from (report.json `resumed_at`)."""
    from ascend_edit.eval.report import compare_runs

    run_dir = fake_run(tmp_path / "run")
    assert "| wall time |" in render(run_dir).read_text()
    assert "(resumed)" not in compare_runs([run_dir])
    report = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.json").write_text(json.dumps({**report, "resumed_at": {"layerwise": 60, "model_level": 20}}))
    assert "| wall time (this command, resumed: layerwise at step 60, model_level at step 20) |" in (
        render(run_dir).read_text())
    assert "(resumed) |" in compare_runs([run_dir])


def test_report_of_a_run_with_non_finite_metrics(tmp_path):
    """jsonio writes a NaN metric as null: the report shows it as nan rather than failing to format it."""
    from ascend_edit import jsonio

    run_dir = fake_run(tmp_path / "run")
    report = json.loads((run_dir / "report.json").read_text())
    report["results"]["after_model_level"] = {"ppl": float("nan"), "teacher_kl": float("nan"), "top1_agreement": 0.0}
    (run_dir / "report.json").write_text(jsonio.dumps(report))
    assert "| after_model_level | nan | nan | 0.0 % |" in render(run_dir).read_text()


def test_report_names_a_missing_run_and_takes_directories_with_equals_signs(tmp_path, capsys, monkeypatch):
    """`report nonexist` blamed the default --output; a sweep's `lr=1e-3/` directories went to Hydra as
    overrides ("Key 'sweep/lr' not in 'RootConfig'")."""
    monkeypatch.chdir(tmp_path)
    assert main(["report", "nonexist"]) == 2
    assert "nonexist is not a run directory" in capsys.readouterr().err
    fake_run(tmp_path / "sweep" / "lr=1e-3", 1.05)
    fake_run(tmp_path / "sweep" / "lr=1e-4", 1.5)
    assert main(["report", "sweep/lr=1e-3", "sweep/lr=1e-4"]) == 0
    assert "1.500 (0.050)" in (tmp_path / "sweep" / "compare.md").read_text()


def test_comparison_says_when_runs_scored_different_texts(tmp_path):
    """`ascend-edit report A B` put cells measured on different texts (another corpus, another Python's
    python_docs) side by side without a word."""
    from ascend_edit.eval.report import compare_runs

    runs = [fake_run(tmp_path / name) for name in ("a", "b", "c")]
    for run, digest in zip(runs, ("1111", "1111", "2222")):
        results = json.loads((run / "eval.json").read_text())
        (run / "eval.json").write_text(json.dumps({**results, "text_sha256": {"in_domain": "aaaa",
                                                                             "python_docs": digest}}))
    table = compare_runs(runs)
    assert f"**python_docs was scored on different texts** (text_sha256 1111: {runs[0]}, {runs[1]}; 2222: " \
        f"{runs[2]})" in table
    assert "in_domain was scored" not in table and "different texts" not in compare_runs(runs[:2])
