"""Bad model inputs are one line naming the key, before any weight is read; no traceback reaches the user."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ascend_edit.config import ModelConfig
from ascend_edit.models.loading import ModelInputError, check_model_files, load_teacher, teacher_config
from tests.helpers.cli_runner import run_cli

TINY_CONFIG = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64}


def hf_dir(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    if weights:
        save_file({"w": torch.ones(64, 64), "b": torch.zeros(64)}, str(path / "model.safetensors"))
    return path


def gguf_file(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("a", np.ones((64, 64), dtype=np.float32))
    writer.add_tensor("b", np.ones((32,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf(path: Path, gguf: str | None = None) -> ModelConfig:
    return ModelConfig(source="hf", path=str(path), gguf_file=gguf)


def refused(cfg: ModelConfig, *fragments: str) -> str:
    with pytest.raises(ModelInputError) as err:
        check_model_files(cfg)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_whole_checkpoint_passes(tmp_path):
    check_model_files(hf(hf_dir(tmp_path / "m")))
    check_model_files(hf(tmp_path, gguf=gguf_file(tmp_path / "ok.gguf").name))


def test_missing_path_and_file_as_path(tmp_path):
    refused(hf(tmp_path / "nope"), f"model.path={tmp_path / 'nope'} does not exist", "nothing is downloaded")
    weights = hf_dir(tmp_path / "m") / "model.safetensors"
    refused(hf(weights), "is a file, not a checkpoint directory")
    gguf = gguf_file(tmp_path / "x.gguf")
    refused(hf(gguf), f"model.path={tmp_path} model.gguf_file=x.gguf")  # says how to give a GGUF


def test_config_only_and_no_config(tmp_path):
    refused(hf(hf_dir(tmp_path / "c", weights=False)), "has a config.json but no weights")
    (tmp_path / "g").mkdir()
    gguf_file(tmp_path / "g" / "m.gguf")
    refused(hf(tmp_path / "g"), "has no config.json", "model.gguf_file=m.gguf")


def test_truncated_safetensors_and_shard_index(tmp_path):
    weights = hf_dir(tmp_path / "m") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    refused(hf(tmp_path / "m"), "model.safetensors is truncated")
    weights.write_bytes(b"\xff" * 4)
    refused(hf(tmp_path / "m"), "is not a safetensors file")
    sharded = hf_dir(tmp_path / "s", weights=False)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part-1.safetensors"}}))
    refused(hf(sharded), "lists shards that are missing: ['part-1.safetensors']")


def test_gguf_missing_truncated_or_foreign(tmp_path):
    good = gguf_file(tmp_path / "good.gguf")
    refused(hf(tmp_path, gguf="missing.gguf"), "model.gguf_file=missing.gguf is not a file in", "nothing is downloaded",
            "good.gguf")
    data = good.read_bytes()
    for cut in (10, 200, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:-cut])
        refused(hf(tmp_path, gguf="cut.gguf"), "model.gguf_file=cut.gguf is truncated")
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    refused(hf(tmp_path, gguf="zip.gguf"), "is not a GGUF file")


def test_teacher_config_names_a_broken_config(tmp_path):
    directory = hf_dir(tmp_path / "m")
    assert teacher_config(hf(directory)).num_hidden_layers == 2  # read without weights
    (directory / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelInputError, match="model.path=.*: the model config in .*config.json could not be read"):
        teacher_config(hf(directory))
    with pytest.raises(ModelInputError, match="model.overrides"):
        teacher_config(ModelConfig(source="config", arch="qwen3", overrides={"num_attention_heads": "many"}))


def test_unreadable_tokenizer_is_named_before_weights_load(tmp_path):
    directory = hf_dir(tmp_path / "m")
    (directory / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ModelInputError, match="its tokenizer could not be loaded"):
        load_teacher(hf(directory))


def test_a_teacher_without_a_usable_tokenizer_is_refused(tmp_path):
    """For a Qwen checkpoint without tokenizer files transformers builds an empty tokenizer (every text encodes to
    nothing) instead of failing, and an export would ship it: refused, as is one larger than the vocabulary."""
    from tests.conftest import tiny_model
    from tests.helpers.tiny_checkpoint import char_tokenizer

    tiny_model("qwen3").save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelInputError, match=r"model.path=.*bare: its tokenizer is empty .*no usable tokenizer"):
        load_teacher(hf(tmp_path / "bare"))
    tiny_model("qwen3", vocab_size=8).save_pretrained(tmp_path / "small")
    char_tokenizer(["abcdefghijklmnop"]).save_pretrained(tmp_path / "small")
    with pytest.raises(ModelInputError, match=r"tokenizer has \d+ tokens, more than the model's vocabulary of 8"):
        load_teacher(hf(tmp_path / "small"))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    """transformers fills a missing tensor with random values (and drops unexpected ones) with only a log line:
    a teacher missing one projection, or a converted run's directory given as the teacher, must be refused."""
    from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

    whole = make_tiny_checkpoint(tmp_path / "whole", num_hidden_layers=2)
    load_teacher(hf(whole))  # the saved checkpoint itself loads
    state = load_file(str(whole / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    state["model.layers.0.self_attn.kv_a_proj.weight"] = torch.zeros(4, 4)  # a converted layer's name
    save_file(state, str(whole / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelInputError) as err:
        load_teacher(hf(whole))
    message = str(err.value)
    assert "do not match the checkpoint's config.json" in message and f"model.path={whole}" in message
    assert "model.layers.1.self_attn.k_proj.weight" in message and "kv_a_proj" in message


# ----------------------------------------------------------------------------------------------------------
# through the command line: one line, exit code 2, no traceback (a few fast cases; the full table is
# benchmarks/reliability_faults.py -> docs/reliability.md)


def cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None,
        fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_EDIT_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(env_extra or {})
    return run_cli(args, cwd=cwd, env=env, timeout=300, fresh_interpreter=fresh_interpreter)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ascend-edit: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


TINY = ["experiment=tiny"]


def test_cli_bad_values_are_one_line(tmp_path):
    # `python -m ascend_edit.cli` itself (the other CLI tests fork a preloaded interpreter)
    one_line_error(cli(*TINY, "engine.grad_clip=-1", cwd=tmp_path, fresh_interpreter=True),
                   "engine.grad_clip=-1.0 must be")
    one_line_error(cli(*TINY, "distill.model_level.warmup_steps=-2", cwd=tmp_path), "distill.model_level.warmup_steps")
    one_line_error(cli(*TINY, "engine=zero2", "+engine.zero_options.overlap_com=true", cwd=tmp_path),
                   "engine.zero_options.overlap_com is not a DeepSpeed zero_optimization key")


def test_cli_never_writes_a_run_into_someone_elses_directory(tmp_path):
    """A run writes converted/, checkpoints/ and reports into its directory: a file, or a non-empty directory that
    holds no earlier run (here a model's), is refused by name and left as it was; an earlier run's directory is
    accepted (resuming writes there again)."""
    model_dir = hf_dir(tmp_path / "model")
    before = sorted(p.name for p in model_dir.iterdir())
    for key in ("hydra.run.dir", "output_dir"):
        one_line_error(cli(*TINY, f"{key}={model_dir}", cwd=tmp_path), f"{key}={model_dir}", "is a non-empty directory")
    assert sorted(p.name for p in model_dir.iterdir()) == before
    (tmp_path / "afile").write_text("keep me")
    one_line_error(cli(*TINY, f"output_dir={tmp_path / 'afile'}", cwd=tmp_path), "is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "keep me"
    from ascend_edit.cli import _run_dir_problem

    earlier_run = tmp_path / "run"  # a run from before the mark: its Hydra config names a task and a target
    (earlier_run / ".hydra").mkdir(parents=True)
    (earlier_run / ".hydra" / "config.yaml").write_text("task: convert\nmodel:\n  source: config\ntarget:\n  kind: mla\n")
    assert _run_dir_problem([f"hydra.run.dir={earlier_run}"]) is None
    old_checkpoints = tmp_path / "checkpointed"  # or its stage checkpoints
    (old_checkpoints / "checkpoints" / "step-layerwise-3").mkdir(parents=True)
    assert _run_dir_problem([f"output_dir={old_checkpoints}"]) is None
    # another tool's training directory holds generic names (checkpoints/, tensorboard/, a Hydra config of its
    # own, metrics.jsonl, report.md): not a run of this project, so its report.md is never overwritten
    other_tool = tmp_path / "other"
    for sub in ("checkpoints/epoch-1", "tensorboard", ".hydra"):
        (other_tool / sub).mkdir(parents=True)
    (other_tool / ".hydra" / "config.yaml").write_text("trainer:\n  epochs: 3\n")
    (other_tool / "metrics.jsonl").write_text("{}\n")
    (other_tool / "report.md").write_text("my analysis")
    for key in ("hydra.run.dir", "output_dir"):
        assert "holds no ascend-edit run" in (_run_dir_problem([f"{key}={other_tool}"]) or "")
    # every rank of a launch checks the shared directory while another rank's Hydra creates .hydra/ and writes
    # its config: a folder without the file yet, or an empty file, is a run starting, not someone else's
    starting = tmp_path / "starting"
    (starting / ".hydra").mkdir(parents=True)
    (starting / "cli.log").write_text("")
    assert _run_dir_problem([f"hydra.run.dir={starting}"]) is None
    (starting / ".hydra" / "config.yaml").write_text("")
    assert _run_dir_problem([f"hydra.run.dir={starting}"]) is None
    assert _run_dir_problem([f"hydra.run.dir={tmp_path / 'new'}"]) is None
    launched = tmp_path / "launched"  # msrun makes its worker-log folder in RUN_DIR before any rank starts
    (launched / "msrun_log").mkdir(parents=True)
    (launched / "msrun_log" / "worker_0.log").write_text("starting")
    assert _run_dir_problem([f"hydra.run.dir={launched}"]) is None
    benchmark_out = tmp_path / "bench"  # a task that leaves no run files is marked when it starts
    from ascend_edit.cli import RUN_MARK, mark_run_directory

    mark_run_directory(str(benchmark_out))
    (benchmark_out / "bench_table.csv").write_text("ms\n")
    assert (benchmark_out / RUN_MARK).is_file() and _run_dir_problem([f"output_dir={benchmark_out}"]) is None


def test_cli_model_inputs_are_one_line_and_debug_shows_the_traceback(tmp_path):
    config_only = hf_dir(tmp_path / "config-only", weights=False)
    args = ["model=hf", f"model.path={config_only}", "target=mla_small", "target.mla.kv_lora_rank=32",
            "target.mla.qk_rope_head_dim=8", "data=synthetic", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    one_line_error(cli(*args, cwd=tmp_path), "model.path=", "has a config.json but no weights")
    debug = cli(*args, "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ModelInputError" in debug.stderr


def test_cli_larger_mla_cache_is_refused_before_loading(tmp_path):
    line = one_line_error(cli(*TINY, "target.mla.kv_lora_rank=512", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path),
                          "target.mla.kv_lora_rank=512", "1,040 B", "128 B", "allow_larger_cache")
    assert "teacher" in line


def test_eval_names_the_trust_key_and_a_teacher_of_another_vocabulary(tmp_path):
    """`ascend-edit eval` of an auto_map export needs eval.trust_remote_code=true (it runs shipped code), and a
    checkpoint compared with a teacher of another vocabulary is refused before any forward indexes past it."""
    from types import SimpleNamespace

    from ascend_edit.tasks.eval import check_same_vocabulary, load_student

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({**TINY_CONFIG, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(ValueError, match="add eval.trust_remote_code=true"):
        load_student(export)

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    check_same_vocabulary(model(64), model(64), "hf")
    with pytest.raises(ValueError, match=r"vocabulary \(64 tokens\) is not the teacher's \(49152, model.source=smollm2"):
        check_same_vocabulary(model(64), model(49152), "smollm2")


def test_eval_of_an_export_names_where_its_in_domain_text_comes_from(tmp_path, caplog):
    """An export without a recorded source run is scored on this command's data= split, said in one warning line;
    a damaged record is refused naming its file."""
    from ascend_edit.config import RootConfig
    from ascend_edit.models.export import PROVENANCE_FILE
    from ascend_edit.tasks.eval import in_domain_data

    export = tmp_path / "export"
    export.mkdir()
    with caplog.at_level("WARNING"):
        data, seed, source = in_domain_data(export, RootConfig())
    assert (data.source, seed) == ("shakespeare", RootConfig().device.seed)
    assert source.startswith("this command's data (shakespeare") and "data=shakespeare" in caplog.text
    (export / PROVENANCE_FILE).write_text(json.dumps({"run_directory": "/r", "data": {"source": "mix", "mix": [
        {"name": "wiki", "weight": 1.0}]}, "seed": 7}))
    data, seed, source = in_domain_data(export, RootConfig())
    assert (data.source, data.mix[0].name, seed) == ("mix", "wiki", 7) and "recorded by export from /r" in source
    (export / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{PROVENANCE_FILE} is not valid JSON"):
        in_domain_data(export, RootConfig())


def test_a_refused_resume_is_refused_before_loading_and_leaves_the_run_as_it_was(tmp_path):
    """Resuming in a run directory with a key that cannot change mid-run is refused before Hydra rewrites the
    run's .hydra/config.yaml (an export of that run rebuilds from it) and before the teacher loads."""
    run = tmp_path / "run"
    base = [*TINY, "engine.checkpoint_every=1", "eval.suite=false", f"hydra.run.dir={run}"]
    done = cli(*base, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = (run / ".hydra" / "config.yaml").read_text()
    refused = cli(*base, "target.mla.kv_lora_rank=16", cwd=tmp_path)
    one_line_error(refused, "target.mla.kv_lora_rank: 32 -> 16", "cannot change on resume")
    assert "teacher ppl" not in refused.stdout + refused.stderr  # nothing was loaded
    assert (run / ".hydra" / "config.yaml").read_text() == saved


def test_a_resume_by_another_number_of_processes_is_refused_before_loading(tmp_path):
    """It was refused only when the engine read the checkpoint: after the teacher's load (minutes at 8B), the warm
    start and the first evaluation."""
    import dataclasses

    from ascend_edit.config import ConfigError, RootConfig
    from ascend_edit.train.loop import flatten_config
    from ascend_edit.validation import check_resume_config

    cfg = RootConfig()
    checkpoint = tmp_path / "checkpoints" / "step-layerwise-4"
    checkpoint.mkdir(parents=True)
    state = {"stage": "layerwise", "step": 4, "engine": "deepspeed", "world_size": 2,
             "config": flatten_config(dataclasses.asdict(cfg))}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    check_resume_config(cfg, tmp_path, world_size=2)  # the same job size resumes
    with pytest.raises(ConfigError, match=re.escape(f"{checkpoint} was written by 2 processes and this job has 1: "
                                                    "resume with the same number of processes")):
        check_resume_config(cfg, tmp_path, world_size=1)
    check_resume_config(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, resume=False)), tmp_path,
                        world_size=1)  # starting over reads nothing


def test_lm_eval_adapter_runs_shipped_code_only_when_asked(tmp_path):
    """An auto_map export runs the modeling code it ships: the lm-eval adapter refuses it without the flag."""
    from ascend_edit.eval.lm_eval_adapter import evaluate_export, main

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({**TINY_CONFIG, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        evaluate_export(export)
    (export / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="--trust-remote-code"):
        evaluate_export(export)
    with pytest.raises(SystemExit, match=r"lm_eval_adapter: error: .* is an auto_map export"):
        main(["run", str(export)])


def test_lm_eval_adapter_refuses_what_is_not_an_export_and_never_overwrites_data(tmp_path):
    """A converted/ directory holds the teacher's config.json beside the target weights: transformers would load the
    teacher's architecture with random attention and score it; a run directory holds no config.json. `build` writes
    only where it is told, and not over a file unless asked."""
    from ascend_edit.eval.lm_eval_adapter import CLOZE_DATA, main

    converted = tmp_path / "run" / "converted"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text(json.dumps(TINY_CONFIG))
    (converted / "ascend_edit.json").write_text("{}")
    for where in (converted, converted.parent):
        with pytest.raises(SystemExit, match="is a converted model .* not an export: .*ascend-edit export"):
            main(["run", str(where)])
    with pytest.raises(SystemExit, match="holds no config.json"):
        main(["run", str(tmp_path)])
    with pytest.raises(SystemExit):  # --output is required: the bundled file is never the silent default
        main(["build"])
    mine = tmp_path / "mine.jsonl"
    mine.write_text("keep\n")
    with pytest.raises(SystemExit, match="exists: give another --output"):
        main(["build", "--output", str(mine), "--items", "3"])
    assert mine.read_text() == "keep\n" and CLOZE_DATA.is_file()


@pytest.mark.parametrize(("overrides", "named"), [
    ({"hidden_size": -1}, "model.overrides.hidden_size=-1 must be a positive integer"),
    ({"vocab_size": 0}, "model.overrides.vocab_size=0 must be a positive integer"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "num_attention_heads=3 is not a multiple of"),
    # MoE sizes: top-k past the expert count ("selected index k out of range" in torch.topk), a zero expert width
    ({"num_experts": 4, "num_experts_per_tok": 8}, "num_experts_per_tok=8 is more than num_experts=4"),
    ({"moe_intermediate_size": 0}, "model.overrides.moe_intermediate_size=0 must be a positive integer"),
    ({"num_experts_per_tok": 0}, "model.overrides.num_experts_per_tok=0 must be a positive integer"),
])
def test_random_teacher_sizes_that_cannot_build_a_model_are_named(overrides, named):
    """They failed inside torch with a traceback ("negative dimension", "random_ expects 'from' < 'to'")."""
    arch = "qwen3_moe" if {"num_experts", "num_experts_per_tok", "moe_intermediate_size"} & set(overrides) else "qwen3"
    with pytest.raises(ModelInputError, match=re.escape(named)):
        teacher_config(ModelConfig(source="config", arch=arch, overrides=overrides))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_expert_overrides_on_a_dense_architecture_are_refused(arch):
    """model.arch=qwen3 with model.overrides.num_experts=8 built a dense teacher with no word (the config stored
    the key, the model never read it)."""
    with pytest.raises(ModelInputError, match=re.escape(f"model.overrides.num_experts: model.arch={arch} is a dense "
                                                        "architecture and ignores it (experts need one of ['qwen3_moe'])")):
        teacher_config(ModelConfig(source="config", arch=arch, overrides={"num_experts": 8, "hidden_size": 64}))
    assert teacher_config(ModelConfig(source="config", arch="qwen3_moe", overrides={"num_experts": 8})).num_experts == 8


def test_model_arch_with_a_teacher_read_from_disk_is_refused():
    """model.arch was ignored with model.source=hf (the checkpoint's config decides): a user meaning another
    architecture got no word."""
    from ascend_edit.config import ConfigError

    with pytest.raises(ConfigError, match="model.arch='qwen3_moe' is only read with model.source=config"):
        ModelConfig(source="hf", path="/some/checkpoint", arch="qwen3_moe")


def test_no_job_or_export_writes_inside_a_directory_its_manifest_describes(tmp_path):
    """An eval run directory inside an export (or an export inside another run's converted/) was accepted: its files
    were missing from that manifest, and every later load refused the model as damaged."""
    from ascend_edit.models.export import output_problem
    from ascend_edit.train.checkpoint_io import write_manifest

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    write_manifest(export)
    listed = sorted(p.name for p in export.iterdir())
    one_line_error(cli("inspect", "model=qwen3_tiny", f"hydra.run.dir={export / 'eval'}", cwd=tmp_path),
                   f"hydra.run.dir={export / 'eval'} lies inside {export}, whose manifest lists its files")
    assert sorted(p.name for p in export.iterdir()) == listed
    assert f"lies inside {export}" in output_problem(export / "hf" / "x", overwrite=False)
    assert output_problem(tmp_path / "elsewhere", overwrite=False) is None


def test_an_evaluation_that_would_measure_nothing_is_refused(tmp_path):
    """`ascend-edit eval` with eval.suite=false skipped the empty-grid checks (an empty table, exit 0), and an empty
    eval.contexts was refused for being 'all longer than the model's positions'; a repeated passkey depth doubled
    that cell's samples under the same trial count."""
    from ascend_edit.config import ConfigError, EvalConfig
    from ascend_edit.eval.suite import check_measurable

    one_line_error(cli("eval", f"eval.checkpoint={tmp_path}", "eval.suite=false", "eval.domains=[]",
                       "eval.passkey_trials=0", cwd=tmp_path),
                   "eval.domains is empty and eval.passkey_trials=0: this evaluation would measure nothing")
    check_measurable(EvalConfig(suite=False, contexts=[], passkey_trials=0), max_positions=512)  # not 'too long'
    with pytest.raises(ConfigError, match=r"eval.passkey_depths lists 0.5 more than once"):
        EvalConfig(passkey_depths=[0.5, 0.5])


def test_eval_of_a_teacher_without_a_tokenizer_is_refused_before_loading(tmp_path):
    """A conversion of a config-built teacher (experiment=tiny) was refused for lacking a tokenizer only after the
    student and the teacher had loaded."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task: convert\nmodel: {source: config, arch: qwen3}\n")
    one_line_error(cli("eval", f"eval.checkpoint={run}", cwd=tmp_path),
                   "eval needs the teacher's tokenizer, and model.source=config")
