"""Starting over in a run directory (`engine.resume=false`) and a signal at the end of a stage."""
from __future__ import annotations

import json
import signal

import pytest

from tests.helpers.cli_runner import run_cli

TINY = ["experiment=tiny", "eval.suite=false", "export.enabled=false", "engine.checkpoint_every=2",
        "engine.keep_last=2"]


def steps(n: int) -> list[str]:
    return [f"distill.layerwise.steps={n}", f"distill.model_level.steps={n}"]


def test_starting_over_sets_the_earlier_run_aside_and_keeps_only_this_runs_checkpoints(tmp_path):
    """`engine.resume=false` in a directory holding a finished 6 + 6-step run: its outputs move to replaced-*/
    (nothing deleted), so this run's checkpoints are the only ones a later resume can find (was: pruning ranked the
    earlier run's step 6 above this run's step 2 and deleted the new checkpoint; the next resume delivered the
    earlier run's model)."""
    run_dir = tmp_path / "run"
    first = run_cli([*TINY, *steps(6), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    again = run_cli([*TINY, *steps(2), "engine.resume=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (aside,) = run_dir.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == earlier
    assert (aside / "converted").is_dir() and (aside / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-layerwise-2", "step-model_level-2"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("layerwise", 1), ("layerwise", 2), ("model_level", 1),
                                                        ("model_level", 2)]


def test_a_signal_during_a_stages_end_checkpoint_stops_before_the_next_stage(tmp_path, monkeypatch):
    """SIGTERM while the last step's checkpoint is written: the checkpoint completes and the run exits 75 before
    stage 2 (was: logged, then ignored — all of stage 2 trained and the job ended 0, or was killed mid-stage)."""
    from ascend_edit.train import loop
    from ascend_edit.train.preemption import EXIT_PREEMPTED, Preempted

    pytest.importorskip("hydra")
    from ascend_edit.cli import main

    real_save = loop.save_checkpoint

    def save_then_signal(engine, run, step):
        path = real_save(engine, run, step)
        if run.name == "layerwise" and step == run.steps:
            signal.raise_signal(signal.SIGTERM)  # arrives while the end checkpoint is being finished
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_signal)
    monkeypatch.setattr("ascend_edit.train.stage.save_checkpoint", save_then_signal)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Preempted) as stop:
        main([*TINY, *steps(3), "engine.checkpoint_every=100", f"hydra.run.dir={run_dir}"])
    assert stop.value.code == EXIT_PREEMPTED and "at the end of the stage" in str(stop.value)
    assert (run_dir / "checkpoints" / "step-layerwise-3").is_dir()
    assert not list((run_dir / "checkpoints").glob("step-model_level-*"))


def test_a_corpus_edited_between_a_stop_and_its_resume_is_refused(tmp_path):
    """The checkpoint records a digest of data.path's files; an in-place edit (same size) before the resume is
    refused in one line naming data.identity (was: resumed silently on the new text, 5 % off in loss)."""
    from tests.unit.test_data_indexed import documents, write_indexed

    corpus = tmp_path / "corpus"
    prefix = write_indexed(corpus, documents(count=120, vocab=250))
    args = [*TINY, "data=indexed", f"data.path={prefix}", "data.seq_len=32", "data.eval_fraction=0.2",
            f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli([*args, *steps(2)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    data = bytearray((tmp_path / "corpus.bin").read_bytes())
    data[:2] = bytes([(data[0] + 1) % 200 + 3, 0])  # same size, another (valid) first token
    (tmp_path / "corpus.bin").write_bytes(bytes(data))
    again = run_cli([*args, *steps(2)], cwd=tmp_path)
    assert again.returncode == 2
    line = again.stderr.strip().splitlines()[-1]
    assert "data.identity" in line and "cannot change on resume" in line
