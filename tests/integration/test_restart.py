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
    # the same command resumes: stage 1 is done (resumed at its last step), stage 2 starts fresh, and the report
    # says this command's wall time covers only that
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    monkeypatch.setattr("ascend_edit.train.stage.save_checkpoint", real_save)
    assert main([*TINY, *steps(3), "engine.checkpoint_every=100", f"hydra.run.dir={run_dir}"]) == 0
    assert json.loads((run_dir / "report.json").read_text())["resumed_at"] == {"layerwise": 3}
    assert "| wall time (this command, resumed: layerwise at step 3) |" in (run_dir / "report.md").read_text()


def test_a_corpus_edited_between_a_stop_and_its_resume_is_refused(tmp_path):
    """The checkpoint records a digest of data.path's files; an in-place edit (same size) before the resume is
    refused in one line naming data.identity (was: resumed silently on the new text, 5 % off in loss)."""
    from tests.unit.test_data_indexed import documents, write_indexed

    corpus = tmp_path / "corpus"
    prefix = write_indexed(corpus, documents(count=120, vocab=250))
    # the path as users also give it, with the .bin suffix (the check once hashed "corpus.bin.bin": nothing)
    args = [*TINY, "data=indexed", f"data.path={prefix}.bin", "data.seq_len=32", "data.eval_fraction=0.2",
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


def test_a_resume_in_stage_one_keeps_the_plan_it_measured(tmp_path):
    """A measured plan (here the rotary choice) was saved only with stage-layerwise/ and converted/: a run stopped
    in stage 1 measured it again on resume, and a change resume allows (eval.batch_size sizes the calibration
    set) chose other frequencies for the weights already trained. measured_plan.json is written before stage 1."""
    import shutil

    run_dir = tmp_path / "run"
    args = [*TINY, "engine.keep_last=10", "target.mla.rope_selection=measured", "target.calibration_batches=2",
            "distill.layerwise.steps=6", "distill.model_level.steps=0", f"hydra.run.dir={run_dir}"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    planned = json.loads((run_dir / "converted" / "ascend_edit.json").read_text())["plan"]
    assert json.loads((run_dir / "measured_plan.json").read_text())["plan"] == planned
    for name in ("step-layerwise-4", "step-layerwise-6"):  # as if killed after step 2's checkpoint
        shutil.rmtree(run_dir / "checkpoints" / name)
    for name in ("stage-layerwise", "converted"):
        shutil.rmtree(run_dir / name)
    (run_dir / "report.json").unlink()
    again = run_cli([*args, "eval.batch_size=1"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed layerwise" in again.stderr + again.stdout
    assert json.loads((run_dir / "converted" / "ascend_edit.json").read_text())["plan"] == planned


def test_a_teacher_changed_in_place_between_a_stop_and_its_resume_is_refused(tmp_path):
    """The same check as the data's: model.identity digests the teacher's config, weights and tokenizer (was:
    a resume distilled from other weights for the rest of the run, exit 0). A copy elsewhere, or a README added
    beside the weights, is the same teacher."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ascend_edit.config import ModelConfig, RootConfig
    from ascend_edit.train.stage import model_identity, stage_settings
    from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

    teacher = make_tiny_checkpoint(tmp_path / "teacher")
    shutil.copytree(teacher, tmp_path / "copy")

    def identity(path) -> str | None:
        return model_identity(RootConfig(model=ModelConfig(source="hf", path=str(path))))

    before = identity(teacher)
    assert before is not None and identity(tmp_path / "copy") == before
    assert stage_settings(RootConfig(model=ModelConfig(source="hf", path=str(teacher)))).run_config[
        "model.identity"] == before
    (teacher / "README.md").write_text("notes")
    assert identity(teacher) == before
    weights = teacher / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 1.5 if "mlp" in k else v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    assert identity(teacher) != before
    assert identity(tmp_path / "nowhere") is not None  # a missing path is the loader's to report


def test_identity_is_the_contents_not_the_place_or_the_time(tmp_path):
    """Node-local copies of one corpus (another directory, another mtime) give one identity, so ranks on other
    nodes agree; an edit of the same size does not."""
    import os

    from ascend_edit.config import DataConfig, RootConfig
    from ascend_edit.train.stage import data_identity

    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "corpus.txt").write_text("the cat sees the dog\n\nanother document\n")
    os.utime(tmp_path / "b" / "corpus.txt", ns=(0, 0))

    def identity(where: str) -> str | None:
        return data_identity(RootConfig(data=DataConfig(source="files", path=str(tmp_path / where / "corpus.txt"))))

    assert identity("a") == identity("b") is not None
    (tmp_path / "b" / "corpus.txt").write_text("the dog sees the cat\n\nanother document\n")
    assert identity("a") != identity("b")


def test_identity_and_cache_key_cover_the_files_read_only(tmp_path):
    """A README added beside the corpus, or data.cache_dir kept inside data.path, changed the identity (resume
    refused an unchanged corpus) and the cache key (each run tokenized a new copy into the cache it grew)."""
    from ascend_edit.config import DataConfig, RootConfig
    from ascend_edit.data.cache import source_identity
    from ascend_edit.data.sources import DocumentSource
    from ascend_edit.train.stage import data_identity

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sees the dog\n\nanother document\n")
    (corpus / "b.txt").write_text("a third document\n")
    cfg = RootConfig(data=DataConfig(source="files", path=str(corpus)))
    source = DocumentSource(corpus, format="auto")
    before, key_before = data_identity(cfg), source_identity(corpus, source.files_read())
    (corpus / "README.md").write_text("where this corpus came from")
    (corpus / ".cache" / "0123").mkdir(parents=True)
    (corpus / ".cache" / "0123" / "train.bin").write_bytes(b"\x00" * 64)
    (corpus / ".cache" / "0123" / "meta.json").write_text("{}")
    assert data_identity(cfg) == before
    assert source_identity(corpus, source.files_read()) == key_before
    (corpus / "b.txt").write_text("a third document, edited\n")  # the data itself: still seen
    assert data_identity(cfg) != before


def test_set_aside_takes_every_training_output_and_nothing_else(tmp_path):
    """convert's and ablation's outputs move together (ablation-*/ runs hold their own checkpoints); Hydra's files
    and anything of the user's stay."""
    from ascend_edit.run_dir import set_aside_previous_run

    for name in ("checkpoints", "ablation-stage2-only/checkpoints", "ablation-stage1+2", ".hydra", "notes"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "ablation.json", "cli.log"):
        (tmp_path / name).write_text("x")
    aside = set_aside_previous_run(tmp_path)
    assert aside is not None
    assert sorted(p.name for p in aside.iterdir()) == ["ablation-stage1+2", "ablation-stage2-only", "ablation.json",
                                                        "checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir() if p != aside) == [".hydra", "cli.log", "notes"]
    assert set_aside_previous_run(tmp_path) is None  # nothing left to move


def test_starting_over_keeps_the_earlier_runs_config_with_its_outputs(tmp_path, trained_teacher):
    """engine.resume=false in an earlier run's directory: its outputs go to replaced-<time>/, and so does the config
    they were made with (Hydra used to overwrite .hydra/ first, leaving the set-aside model without its config)."""
    from tests.integration.test_convert_cli import checked, run_cli, tiny_convert_overrides

    run_dir = tmp_path / "run"
    short = [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=1", "distill.model_level.steps=1",
             "distill.layerwise.warmup_steps=0", "distill.model_level.warmup_steps=0", "eval.suite=false"]
    checked(run_cli(run_dir, [*short, "target.mla.kv_lora_rank=32"]))
    checked(run_cli(run_dir, [*short, "target.mla.kv_lora_rank=16", "engine.resume=false"]))
    (aside,) = run_dir.glob("replaced-*")
    assert "kv_lora_rank: 32" in (aside / ".hydra" / "config.yaml").read_text()
    assert (aside / "converted").is_dir() and not (run_dir / ".hydra-earlier").exists()
    assert "kv_lora_rank: 16" in (run_dir / ".hydra" / "config.yaml").read_text()
