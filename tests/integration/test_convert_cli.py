"""The `ascend-edit` conversion, end to end through the command line, on a small trained teacher (issue 4).

Each run is `ascend-edit` in its own process (forked from a preloaded interpreter: tests/helpers/cli_runner.py)
with its own `hydra.run.dir`; the tests read what it leaves behind (report.json, converted/,
stage-layerwise/) and reload it in-process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

from ascend_edit.attention.edited import EditedAttention
from ascend_edit.config import DataConfig, GateSWAConfig, MLAConfig, ModelConfig, TargetConfig
from ascend_edit.data import build_train_eval, load_documents
from ascend_edit.models.checkpoint import load_converted, run_directory_of, save_converted
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, edit_model, set_mode
from tests.helpers import cli_runner

pytestmark = pytest.mark.usefixtures("few_cpu_threads")  # see conftest.py

SEED = 0
SEQ_LEN = 64
EVAL_SEQUENCES = 8
EVAL_BATCH_SIZE = 4  # eval.batch_size's default, which the CLI runs use
METRIC_RTOL = 1e-4  # reloaded vs reported held-out metrics (fp32; only summation order differs)


def tiny_convert_overrides(teacher: Path, data_path: Path | None = None) -> list[str]:
    """A small MLA conversion of the tiny teacher on its own corpus (seconds on a CPU)."""
    return [
        "model=hf", f"model.path={teacher}", "model.dtype=fp32",
        "target=mla_small", "target.mla.kv_lora_rank=32", "target.mla.qk_rope_head_dim=8",
        "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16", "target.calibration_batches=2",
        "data=files", f"data.path={data_path or teacher / 'corpus.txt'}", "data.split_on_blank_lines=true",
        f"data.seq_len={SEQ_LEN}", f"data.eval_sequences={EVAL_SEQUENCES}",
        # As many CPU threads as this session uses (conftest.py: one, and why).
        "device=cpu", f"device.seed={SEED}", f"device.threads={torch.get_num_threads()}",
    ]


def run_cli(run_dir: Path, overrides: list[str], hydra_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`hydra_dir`: Hydra's own run directory apart from the run's (`output_dir=run_dir`)."""
    env = {k: v for k, v in os.environ.items() if k != "ASCEND_EDIT_DEBUG"}  # errors as users see them
    env["TQDM_DISABLE"] = "1"
    where = [f"hydra.run.dir={run_dir}"] if hydra_dir is None else [f"hydra.run.dir={hydra_dir}", f"output_dir={run_dir}"]
    return cli_runner.run_cli([*overrides, *where], cwd=run_dir.parent, env=env, timeout=600)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def results_of(run_dir: Path) -> dict[str, dict]:
    return json.loads((run_dir / "report.json").read_text())["results"]


def eval_batches(teacher: Path) -> list[dict]:
    """The held-out batches the CLI evaluates on: the first `data.eval_sequences` packed sequences of the
    held-out documents (`data.eval_fraction`'s default, split with `device.seed`), `eval.batch_size` a batch.

    Rebuilt with the public data API; `test_reloaded_model_reproduces_reported_metrics` first checks
    that the teacher's reported numbers come out, so a change in how the task picks them shows as such.
    """
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    documents = load_documents(teacher / "corpus.txt", split_on_blank_lines=True)
    _, held_out = build_train_eval(documents, tokenizer, SEQ_LEN, eval_fraction=DataConfig.eval_fraction, seed=SEED)
    keys = ("input_ids", "position_ids", "loss_mask")
    count = min(EVAL_SEQUENCES, len(held_out))
    return [{k: torch.stack([held_out[i][k] for i in range(start, min(start + EVAL_BATCH_SIZE, count))])
             for k in keys} for start in range(0, count, EVAL_BATCH_SIZE)]


def prompt_ids(tokenizer_dir: Path) -> torch.Tensor:
    """A corpus-like prompt of 53 characters (= tokens), longer than any sliding window used here."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer("the old king remembers the garden again again. and so", return_tensors="pt")["input_ids"]


@torch.no_grad()
def metrics_against(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Token-weighted held-out perplexity, KL(teacher || student) and top-1 agreement, two separate models."""
    nll = kl = agree = tokens = 0.0
    for batch in batches:
        mask = batch["loss_mask"]
        # No cache: with one, transformers would not build the packed-documents mask from position_ids.
        kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        log_q = torch.log_softmax(student(**kwargs).logits[mask].float(), dim=-1)
        log_p = torch.log_softmax(teacher(**kwargs).logits[mask].float(), dim=-1)
        targets = torch.roll(batch["input_ids"], -1, dims=1)[mask]
        nll += float(-log_q.gather(-1, targets[:, None]).sum())
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        agree += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        tokens += int(mask.sum())
    return {"ppl": math.exp(nll / tokens), "teacher_kl": kl / tokens, "top1_agreement": agree / tokens}


# ---------------------------------------------------------------------------------------------
# the full conversion: stage 1 then stage 2 in one run


@pytest.fixture(scope="module")
def full_run(trained_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("convert") / "run"
    # output_dir= apart from Hydra's directory, as the README's job runs
    checked(run_cli(run_dir, [*tiny_convert_overrides(trained_teacher),
                              "distill.layerwise.steps=20", "distill.layerwise.lr=3e-3",
                              "distill.model_level.steps=20"], hydra_dir=run_dir.parent / "hydra-run"))
    return run_dir


def test_convert_writes_report_and_converted_model(full_run: Path):
    results = results_of(full_run)
    assert list(results) == ["teacher", "after_init", "after_layerwise", "after_model_level"]
    init, stage1, stage2 = results["after_init"], results["after_layerwise"], results["after_model_level"]
    # Measured on this teacher: ppl 3.31 -> 1.67 -> 1.39 (teacher 1.34), KL 0.92 -> 0.22 -> 0.056.
    assert stage2["ppl"] < init["ppl"]
    assert stage1["teacher_kl"] < 0.5 * init["teacher_kl"]
    assert stage2["teacher_kl"] < stage1["teacher_kl"]
    assert results["teacher"]["teacher_kl"] == pytest.approx(0.0, abs=1e-6)

    report = json.loads((full_run / "report.json").read_text())
    assert [tuple(e) for e in report["plan"]] == [(i, "mla") for i in range(4)]
    assert len(report["histories"]["layerwise"]) == 20 and len(report["histories"]["model_level"]) == 20
    # where the wall time went besides training: every phase ran and took time
    assert set(report["phase_seconds"]) == {"prepare", "evaluate", "save"}
    assert all(seconds > 0 for seconds in report["phase_seconds"].values())
    assert "| setup: teacher, targets + warm start, data |" in (full_run / "report.md").read_text()
    for name in ("config.json", "ascend_edit.json", "model.safetensors", "tokenizer.json"):
        assert (full_run / "converted" / name).is_file(), name
    # the composed config lies beside the model (eval/export/report read the run's data and seed there)
    saved = OmegaConf.load(full_run / ".hydra" / "config.yaml")
    assert saved.device.seed == SEED and saved.output_dir == str(full_run)
    assert run_directory_of(full_run / "converted") == full_run


def test_reloaded_model_reproduces_reported_metrics(full_run: Path, trained_teacher: Path):
    model = load_converted(full_run / "converted")
    assert not any(isinstance(m, EditedAttention) for m in model.modules()), "teacher attention was exported"
    teacher, _ = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    batches = eval_batches(trained_teacher)
    results = results_of(full_run)
    assert metrics_against(teacher, teacher, batches)["ppl"] == pytest.approx(results["teacher"]["ppl"], rel=1e-6), \
        "these are not the batches the CLI evaluated on"
    measured = metrics_against(model, teacher, batches)
    for key, value in measured.items():
        assert value == pytest.approx(results["after_model_level"][key], rel=METRIC_RTOL), key


def test_stage2_training_shared_weights_is_measured_against_the_original_teacher(
        full_run: Path, trained_teacher: Path, tmp_path: Path):
    """`distill.model_level.trainable=all` moves the edited model's own teacher path (its MLPs, norms and head
    train): every number after stage 2 must still be against the original teacher, and the saved model must
    carry the trained shared weights."""
    run_dir = tmp_path / "run"
    checked(run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=10",
                              "distill.layerwise.lr=3e-3", "distill.model_level.steps=10",
                              "distill.model_level.lr=3e-3", "distill.model_level.trainable=all"]))
    model = load_converted(run_dir / "converted")
    teacher, _ = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    moved = [n for n, p in model.named_parameters() if ".mlp." in n
             and not torch.equal(p, teacher.get_parameter(n))]
    assert moved, "stage 2 trained no shared weight (or the converted model did not save it)"
    measured = metrics_against(model, teacher, eval_batches(trained_teacher))
    for key, value in measured.items():
        assert value == pytest.approx(results_of(run_dir)["after_model_level"][key], rel=METRIC_RTOL), key
    # The end-of-run suite's teacher is the teacher: the same numbers as the trainable=target run's.
    suite = json.loads((run_dir / "eval.json").read_text())["quality"]
    reference = json.loads((full_run / "eval.json").read_text())["quality"]
    for domain, contexts in reference.items():
        for context, cell in contexts.items():
            assert suite[domain][context]["teacher"]["ppl"] == pytest.approx(cell["teacher"]["ppl"], rel=1e-6), \
                (domain, context)
    # Its converted/ as a stage-2 starting point would move the teacher (its MLPs trained): refused in one line.
    refused = run_cli(tmp_path / "again", [*tiny_convert_overrides(trained_teacher), "distill.stage=model_level",
                                           f"distill.init_from={run_dir / 'converted'}"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "shared weights" in refused.stderr and "trainable=target+norms or all" in refused.stderr


def test_reloaded_model_generates_with_its_cache(full_run: Path):
    model = load_converted(full_run / "converted")
    prompt = prompt_ids(full_run / "converted")
    cached = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    recomputed = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.shape == (1, prompt.shape[1] + 16)
    assert torch.equal(cached, recomputed)


# ---------------------------------------------------------------------------------------------
# save -> reload in-process: the reloaded model computes exactly what the framework's model does


def _target(kind: str) -> TargetConfig:
    if kind == "mla":
        return TargetConfig(kind="mla", init="random", mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8,
                                                                      qk_nope_head_dim=8, v_head_dim=16))
    return TargetConfig(kind="gate_swa", init="warm",
                        gate_swa=GateSWAConfig(window=8, sink_tokens=1, full_every=2, gate="headwise"))


@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_save_and_reload_keep_logits_and_generation(kind: str, trained_teacher: Path, tmp_path: Path):
    model, tokenizer = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    target = _target(kind)
    torch.manual_seed(SEED)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    with torch.no_grad():  # move every target off its initial values, so a reload cannot pass by re-initialising
        for name, p in model.named_parameters():
            if ".target." in name:
                p.add_(0.01 * torch.randn_like(p))
    set_mode(model, "student")
    reloaded = load_converted(save_converted(model, target, tmp_path / "converted", tokenizer))

    batch = eval_batches(trained_teacher)[0]  # packed documents: position_ids restart inside rows
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():
        expected, got = model(**kwargs).logits, reloaded(**kwargs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # A prompt longer than the sliding window: the GateSWA cache must drop and keep the right tokens.
    prompt = prompt_ids(tmp_path / "converted")
    assert prompt.shape[1] > 8
    options = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    framework = model.generate(prompt, **options)
    assert torch.equal(reloaded.generate(prompt, **options), framework)
    assert torch.equal(reloaded.generate(prompt, use_cache=False, **options), framework)


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr naming the problem, exit code 2, no traceback


@pytest.mark.parametrize("case, expected", [
    ("empty", "no non-empty documents found in"),
    ("missing", "data path does not exist"),
    ("too_short", "fewer than one sequence of seq_len=64"),
])
def test_bad_data_is_a_one_line_error(case: str, expected: str, trained_teacher: Path, tmp_path: Path):
    data = tmp_path / f"{case}.txt"
    if case == "empty":
        data.write_text("")
    elif case == "too_short":  # two documents (one held out), far fewer tokens than one sequence
        data.write_text("the cat sees the moon.\n\na dog.\n")
    result = run_cli(tmp_path / "run", tiny_convert_overrides(trained_teacher, data))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ascend-edit:")]
    assert len(errors) == 1 and errors[0].startswith("ascend-edit: error: "), result.stderr[-3000:]
    assert expected in errors[0]
    if case != "too_short":
        assert str(data) in errors[0]
    assert not (tmp_path / "run" / "report.json").exists()


# ---------------------------------------------------------------------------------------------
# stage 1 and stage 2 as separate jobs sharing one run directory


def test_stage2_job_starts_from_stage1_job(trained_teacher: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    base = tiny_convert_overrides(trained_teacher)
    checked(run_cli(run_dir, [*base, "distill.stage=layerwise", "distill.layerwise.steps=20",
                              "distill.layerwise.lr=3e-3"]))
    first = results_of(run_dir)
    assert "after_model_level" not in first
    assert (run_dir / "stage-layerwise" / "model.safetensors").is_file()

    checked(run_cli(run_dir, [*base, "distill.stage=model_level", "distill.model_level.steps=10"]))
    second = results_of(run_dir)
    # The second job evaluates the stage-1 result it loaded: the same numbers the first job reported.
    for key in ("ppl", "teacher_kl", "top1_agreement"):
        assert second["after_layerwise"][key] == pytest.approx(first["after_layerwise"][key], rel=1e-6), key
    # ... and stage 2 went on from there: KL 0.22 -> 0.10 measured. The same 10 steps from a fresh init
    # (no stage-layerwise/ to start from) end at 0.38, above the stage-1 result.
    assert second["after_model_level"]["teacher_kl"] < first["after_layerwise"]["teacher_kl"]
    history = json.loads((run_dir / "report.json").read_text())["histories"]
    assert list(history) == ["model_level"] and len(history["model_level"]) == 10
