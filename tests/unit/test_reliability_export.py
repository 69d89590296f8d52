"""Reliability of converted directories and exports (issue 9): manifests, no non-finite weights, no
destroyed data, no code from a checkpoint run without being asked. Tiny random models on the CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ascend_edit.config import ExportConfig, MLAConfig, RootConfig, TargetConfig
from ascend_edit.models.checkpoint import load_converted, load_converted_weights, save_converted
from ascend_edit.models.export import ExportError, export_converted, load_exported
from ascend_edit.models.surgery import build_plan, edit_model
from ascend_edit.tasks import export as export_task
from ascend_edit.train.checkpoint_io import MANIFEST, CheckpointIntegrityError, NonFiniteTensorError
from tests.conftest import tiny_model

MLA = TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                             v_head_dim=16, latent_norm=True))
MLA_NO_NORM = TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                     v_head_dim=16, latent_norm=False))  # exports as auto_map


def converted(target: TargetConfig = MLA) -> torch.nn.Module:
    model = tiny_model("qwen3")
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    return model.eval()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name or ".old" in p.name)


# ---------------------------------------------------------------------------------------------- converted/


def test_converted_dir_carries_a_manifest_verified_on_load(tmp_path):
    save_converted(converted(), MLA, tmp_path / "converted")
    files = json.loads((tmp_path / "converted" / MANIFEST).read_text())["files"]
    assert {"config.json", "ascend_edit.json", "model.safetensors"} <= set(files)
    load_converted(tmp_path / "converted")  # intact: loads

    data = bytearray((tmp_path / "converted" / "model.safetensors").read_bytes())
    data[-4] ^= 0x01  # a finite bit flip
    (tmp_path / "converted" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors does not match its sha256"):
        load_converted(tmp_path / "converted")
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors"):
        load_converted_weights(converted(), tmp_path / "converted")


def test_a_stage_two_job_on_another_targets_weights_names_the_changed_key(tmp_path):
    """A stage-2 job whose target differs from stage 1's got a list of tensor shapes; it names the key now."""
    import dataclasses

    save_converted(converted(), MLA, tmp_path / "stage-layerwise")
    smaller = dataclasses.replace(MLA, mla=dataclasses.replace(MLA.mla, kv_lora_rank=16))
    with pytest.raises(ValueError, match=r"saved with another target config \(target.mla.kv_lora_rank: 32 -> 16\)"):
        load_converted_weights(converted(smaller), tmp_path / "stage-layerwise", smaller)
    with pytest.raises(ValueError, match="shape mismatches"):  # without the run's target: the shapes, as before
        load_converted_weights(converted(smaller), tmp_path / "stage-layerwise")


def test_converted_model_with_a_nan_weight_is_never_written(tmp_path):
    model = converted()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".target." in n).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="holds NaN or inf"):
        save_converted(model, MLA, tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []


def test_save_converted_swaps_an_old_converted_dir_and_refuses_anything_else(tmp_path):
    save_converted(converted(), MLA, tmp_path / "converted")
    (tmp_path / "converted" / "stale.txt").write_text("from the old one")
    save_converted(converted(), MLA, tmp_path / "converted")
    assert not (tmp_path / "converted" / "stale.txt").exists()
    assert leftovers(tmp_path) == []

    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("irreplaceable")
    with pytest.raises(FileExistsError, match="not a converted model"):
        save_converted(converted(), MLA, other)
    assert snapshot(other) == {"thesis.txt": b"irreplaceable"}
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- export


def test_export_onto_a_non_empty_dir_leaves_every_file_in_place(tmp_path):
    out = tmp_path / "hf"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    with pytest.raises(ExportError, match="export.output=.*is not empty.*export.overwrite=true"):
        export_converted(converted(), out)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []

    with pytest.raises(ExportError, match="holds no earlier ascend-edit export .* replaces an earlier export only"):
        export_converted(converted(), out, overwrite=True)  # a directory of other files: never deleted
    assert snapshot(out) == before and leftovers(tmp_path) == []

    earlier = tmp_path / "earlier"
    export_converted(converted(), earlier)
    result = export_converted(converted(), earlier, overwrite=True)  # an earlier export: replaced as a whole
    assert result.format == "deepseek_v3" and (earlier / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_an_export_exactly_as_it_was_written(tmp_path):
    """A config.json was the only proof of "an earlier export": overwrite removed a teacher's model directory
    (weights, the run's corpus, a README), a user's folder and another run's converted/. Only a directory whose
    export manifest lists every file in it is replaced now."""
    teacher_like = tmp_path / "teacher"
    teacher_like.mkdir()
    (teacher_like / "config.json").write_text("{}")
    (teacher_like / "corpus.txt").write_text("the run's data")
    other_run = tmp_path / "run" / "converted"
    save_converted(converted(), MLA, other_run)  # has config.json and a (checkpoint) manifest
    for victim in (teacher_like, other_run):
        before = snapshot(victim)
        with pytest.raises(ExportError, match="holds no earlier ascend-edit export"):
            export_converted(converted(), victim, overwrite=True)
        assert snapshot(victim) == before

    earlier = tmp_path / "earlier"
    export_converted(converted(), earlier)
    (earlier / "notes.md").write_text("my notes on this export")
    before = snapshot(earlier)
    with pytest.raises(ExportError, match="holds notes.md, which its export did not write"):
        export_converted(converted(), earlier, overwrite=True)
    assert snapshot(earlier) == before and leftovers(tmp_path) == []


def test_a_damaged_export_is_named_before_it_loads(tmp_path):
    """An export carries a manifest: one flipped byte or a cut file is named in one line (a flipped byte was
    evaluated silently, a cut file ended in a safetensors traceback); an export without one is still checked
    for cut safetensors files."""
    from ascend_edit.models.export import load_exported
    from ascend_edit.models.loading import ModelInputError
    from ascend_edit.train.checkpoint_io import CheckpointIntegrityError

    out = tmp_path / "hf"
    export_converted(converted(), out)
    load_exported(out)  # intact: loads
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors does not match its sha256"):
        load_exported(out)
    weights.write_bytes(bytes(data[:len(data) // 2]))
    (out / "manifest.json").unlink()  # as an export written before manifests
    with pytest.raises(ModelInputError, match="model.safetensors is truncated"):
        load_exported(out)


def test_a_run_whose_converted_model_is_damaged_is_not_exported_from_stage_one(tmp_path):
    """converted/ without its marker made export fall back to stage-layerwise/ and ship the stage-1 model as
    the run's result (exit 0); eval said the run had no converted/. Both now name the damage."""
    from ascend_edit.tasks.eval import load_student
    from ascend_edit.train.checkpoint_io import CheckpointIntegrityError

    run_dir = tmp_path / "run"
    save_converted(converted(), MLA, run_dir / "stage-layerwise")
    save_converted(converted(), MLA, run_dir / "converted")
    (run_dir / "converted" / "ascend_edit.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"converted is damaged \(ascend_edit.json is missing\); not falling back"):
        export_task.run(_export_cfg(run_dir, tmp_path / "out" / "hf", overwrite=False))
    assert not (tmp_path / "out" / "hf").exists()
    with pytest.raises(CheckpointIntegrityError, match="ascend_edit.json is missing"):
        load_student(run_dir)


def test_export_never_replaces_its_own_job_directory(tmp_path, monkeypatch):
    """export.output=. from inside the job's own run tree (or its run directory) would delete the job's log."""
    run_dir = tmp_path / "run"
    save_converted(converted(), MLA, run_dir / "converted")
    job = tmp_path / "scratch" / "runs" / "job"
    job.mkdir(parents=True)
    (job / "cli.log").write_text("log")
    monkeypatch.chdir(tmp_path / "scratch")
    for output in (".", str(job)):
        cfg = RootConfig(task="export", output_dir=str(job),
                         export=ExportConfig(checkpoint=str(run_dir), output=output, overwrite=True))
        with pytest.raises(ValueError, match="own directory"):
            export_task.run(cfg)
    assert (job / "cli.log").read_text() == "log"


def test_export_of_a_nan_weight_is_refused_before_writing(tmp_path):
    model = converted()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match="embed_tokens.weight holds NaN or inf"):
        export_converted(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def _export_cfg(checkpoint: Path, output: Path, overwrite: bool) -> RootConfig:
    return RootConfig(task="export", output_dir=str(output.parent),
                      export=ExportConfig(checkpoint=str(checkpoint), output=str(output), overwrite=overwrite))


@pytest.mark.parametrize("where", ["source", "run_dir", "parent_of_run", "inside_source"])
def test_export_never_overwrites_its_source_or_a_directory_holding_it(tmp_path, where):
    run_dir = tmp_path / "runs" / "run"
    save_converted(converted(), MLA, run_dir / "converted")
    before = snapshot(tmp_path / "runs")
    output = {"source": run_dir / "converted", "run_dir": run_dir, "parent_of_run": tmp_path / "runs",
              "inside_source": run_dir / "converted" / "hf"}[where]
    with pytest.raises(ValueError, match="export.output="):
        export_task.run(_export_cfg(run_dir, output, overwrite=True))
    assert snapshot(tmp_path / "runs") == before


def test_export_task_writes_next_to_the_output_and_reports_no_leftovers(tmp_path):
    run_dir = tmp_path / "run"
    save_converted(converted(), MLA, run_dir / "converted")
    report = export_task.run(_export_cfg(run_dir, tmp_path / "out" / "hf", overwrite=False))
    assert report["format"] == "deepseek_v3" and (tmp_path / "out" / "hf" / "model.safetensors").exists()
    assert leftovers(tmp_path / "out") == []


def test_export_task_refuses_a_damaged_source_naming_the_file(tmp_path):
    run_dir = tmp_path / "run"
    save_converted(converted(), MLA, run_dir / "converted")
    (run_dir / "converted" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors is 9 bytes"):
        export_task.run(_export_cfg(run_dir, tmp_path / "out" / "hf", overwrite=False))
    assert not (tmp_path / "out" / "hf").exists()


# ---------------------------------------------------------------------------------------------- remote code


def test_auto_map_self_check_runs_no_code_from_the_checkpoint(tmp_path):
    """The verification reloads the export with the package's classes: no module from the directory is
    imported (transformers would import it as `transformers_modules.*`)."""
    before = {name for name in sys.modules if "modeling_ascend_edit" in name}
    result = export_converted(converted(MLA_NO_NORM), tmp_path / "hf")
    assert result.format == "auto_map" and result.max_rel_logit_diff is not None
    assert {name for name in sys.modules if "modeling_ascend_edit" in name} == before


def test_loading_an_auto_map_export_needs_explicit_trust(tmp_path):
    export_converted(converted(MLA_NO_NORM), tmp_path / "hf")
    with pytest.raises(ExportError, match="trust_remote_code=True"):
        load_exported(tmp_path / "hf")


def test_the_export_summary_gives_the_cache_in_the_exports_own_dtype():
    """The self-check's probe runs in fp32; a bf16 export's summary said twice the cache the model holds."""
    from rich.console import Console

    from ascend_edit.models.export import ExportResult

    result = ExportResult(Path("/out"), "auto_map", {}, 1e-7, 304.0, [], 16)
    console = Console(record=True, width=400)
    export_task.print_result(console, export_task.ExportSource("converted", Path("/src")), result, torch.bfloat16)
    text = console.export_text()
    assert "304 bytes/token held after a 16-token fp32 probe; 152 bytes/token in the export's bfloat16" in text
    console = Console(record=True, width=400)
    export_task.print_result(console, export_task.ExportSource("converted", Path("/src")), result, torch.float32)
    assert "in the export's" not in console.export_text()
