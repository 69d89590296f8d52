"""Eval scores the teacher and data the conversion had: relative paths of a run resolve against where it was
started, and a teacher or corpus changed since (or another teacher for an export) is refused by name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ascend_edit.config import DataConfig, ModelConfig, RootConfig
from ascend_edit.models.export import PROVENANCE_FILE
from ascend_edit.run_dir import RUN_INPUTS, saved_run_config
from ascend_edit.tasks.eval import check_inputs_unchanged
from ascend_edit.train.stage import input_identities, record_inputs


def _run_dir(root: Path, config: str, started_in: Path | None) -> Path:
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(config)
    if started_in is not None:
        (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {started_in}\n")
    return run


def test_relative_paths_of_a_run_resolve_against_where_it_was_started(tmp_path):
    """Read from another directory, `model.path=teacher` named that directory's teacher (or none), silently."""
    config = ("model: {source: hf, path: teacher}\ndata: {source: mix, path: corpus.jsonl, mix: "
              "[{name: files, path: mine/texts.jsonl, weight: 1.0}, {name: wiki, weight: 1.0}]}\n")
    raw = saved_run_config(_run_dir(tmp_path, config, Path("/work/started")))
    assert raw.model.path == "/work/started/teacher" and raw.data.path == "/work/started/corpus.jsonl"
    assert raw.data.mix[0].path == "/work/started/mine/texts.jsonl" and raw.data.mix[1].get("path") is None
    absolute = saved_run_config(_run_dir(tmp_path / "b", "model: {source: hf, path: /models/t}\n", Path("/x")))
    assert absolute.model.path == "/models/t"  # an absolute path stays
    unrecorded = saved_run_config(_run_dir(tmp_path / "c", config, None))
    assert unrecorded.model.path == "teacher"  # no record of the start directory: as saved


def _teacher(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "config.json").write_text('{"model_type": "llama"}')
    (where / "model.safetensors").write_bytes(b"weights-1")
    return where


def test_eval_refuses_a_teacher_or_corpus_changed_since_the_run(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n')
    cfg = RootConfig(model=ModelConfig(source="hf", path=str(_teacher(tmp_path / "teacher"))),
                     data=DataConfig(source="files", path=str(corpus)))
    run = _run_dir(tmp_path, "model: {source: hf}\n", tmp_path)
    record_inputs(run, cfg)
    assert json.loads((run / RUN_INPUTS).read_text()) == input_identities(cfg)
    check_inputs_unchanged(run, cfg, cfg.data)  # unchanged: scored
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=re.escape(f"data.path={corpus}: the data changed since the run {run} "
                                                   "started")):
        check_inputs_unchanged(run, cfg, cfg.data)
    (run / "converted").mkdir()
    record_inputs(run, cfg)  # a run that has trained keeps its first record: a resume cannot rewrite it
    with pytest.raises(ValueError, match="the data changed"):
        check_inputs_unchanged(run, cfg, cfg.data)
    (run / "converted").rmdir()
    record_inputs(run, cfg)  # nothing trained from the old record: a fresh start records again
    check_inputs_unchanged(run, cfg, cfg.data)
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"weights-2")
    with pytest.raises(ValueError, match=re.escape(f"model.path={cfg.model.path}: this teacher is not the one the "
                                                   f"run {run} was converted from")):
        check_inputs_unchanged(run, cfg, cfg.data)


def test_an_export_is_scored_only_against_the_teacher_it_was_converted_from(tmp_path):
    """The export's provenance carries its run's record: a teacher of the same vocabulary was accepted."""
    own = RootConfig(model=ModelConfig(source="hf", path=str(_teacher(tmp_path / "own"))))
    other = _teacher(tmp_path / "other")
    (other / "model.safetensors").write_bytes(b"other weights")
    export = tmp_path / "export"
    export.mkdir()
    (export / PROVENANCE_FILE).write_text(json.dumps({"run_directory": "/runs/r", "data": {"source": "shakespeare"},
                                                      "seed": 0, "inputs": input_identities(own)}))
    check_inputs_unchanged(export, own, own.data)
    elsewhere = RootConfig(model=ModelConfig(source="hf", path=str(other)))
    with pytest.raises(ValueError, match=re.escape(f"model.path={other}: this teacher is not the one the run "
                                                   "/runs/r (the export's source) was converted from")):
        check_inputs_unchanged(export, elsewhere, elsewhere.data)
    (export / PROVENANCE_FILE).write_text(json.dumps({"run_directory": "/r", "data": {}, "seed": 0}))
    check_inputs_unchanged(export, elsewhere, elsewhere.data)  # an export of an older version: not checked
