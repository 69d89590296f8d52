"""End of a conversion: the held-out suite, report.md with plots and TensorBoard events; then
`ascend-edit eval` on the run directory gives the same numbers, and `ascend-edit report` compares runs."""
from __future__ import annotations

import json

import pytest

from tests.integration.test_convert_cli import checked, run_cli, tiny_convert_overrides

pytestmark = pytest.mark.usefixtures("few_cpu_threads")

SMALL_EVAL = ["eval.contexts=[64,128,100000]", "eval.sequences=2", "eval.passkey_contexts=[160]",
              "eval.passkey_depths=[0,1]", "eval.passkey_trials=1", "distill.layerwise.steps=3",
              "distill.model_level.steps=3", "distill.layerwise.warmup_steps=1", "distill.model_level.warmup_steps=1"]


def test_conversion_ends_with_suite_report_and_events(trained_teacher, tmp_path):
    run_dir = tmp_path / "run"
    checked(run_cli(run_dir, tiny_convert_overrides(trained_teacher) + SMALL_EVAL))
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results["quality"]) == {"in_domain", "python_docs"}
    assert set(results["quality"]["in_domain"]) == {"64", "128"} and results["skipped_contexts"] == [100000]
    assert results["passkey"]["contexts"] == [160] and len(results["passkey"]["student"][0]) == 2
    report = (run_dir / "report.md").read_text()
    for plot in ("layerwise", "model_level", "quality", "passkey", "kv"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 5000
    assert "| in_domain | 128 |" in report
    if pytest.importorskip("tensorboard"):
        assert list((run_dir / "tensorboard" / "layerwise").glob("events.out.tfevents.*"))

    eval_dir = tmp_path / "eval"
    checked(run_cli(eval_dir, ["eval", f"eval.checkpoint={run_dir}", *SMALL_EVAL[:5]]))
    again = json.loads((eval_dir / "eval.json").read_text())
    for domain, per_context in results["quality"].items():
        for context, metrics in per_context.items():
            assert again["quality"][domain][context]["student"]["ppl"] == pytest.approx(metrics["student"]["ppl"],
                                                                                        rel=1e-4)
    assert again["passkey"]["student"] == results["passkey"]["student"]
    assert f"* evaluated: `{run_dir}`, in_domain from the run's data" in (eval_dir / "report.md").read_text()

    table = checked(run_cli(tmp_path / "unused", ["report", str(run_dir), str(eval_dir)])).stdout
    assert "in_domain@128 ppl× (KL)" in table and str(run_dir) in table

    # Outside its run directory the model is still scored on the run's own held-out text: its converted/ dir
    # through the run it lies in, an export through the data and seed the export recorded (not this command's
    # data=, which here names no data at all: the default Shakespeare).
    checked(run_cli(tmp_path / "x", ["export", f"export.checkpoint={run_dir}"]))  # into the export job's x/hf
    recorded = json.loads((run_dir / "run_inputs.json").read_text())  # the teacher and data the run started with
    provenance = json.loads((tmp_path / "x" / "hf" / "ascend_edit_provenance.json").read_text())
    assert provenance["inputs"] == recorded and recorded["model.identity"] and recorded["data.identity"]
    teacher_only = [o for o in tiny_convert_overrides(trained_teacher) if o.split("=")[0].split(".")[0]
                    in ("model", "device")]
    for name, checkpoint, extra in (("converted", run_dir / "converted", []),
                                    ("export", tmp_path / "x" / "hf", ["eval.trust_remote_code=true"])):  # auto_map
        out = tmp_path / f"eval-{name}"
        proc = checked(run_cli(out, ["eval", f"eval.checkpoint={checkpoint}", *teacher_only, *SMALL_EVAL[:2],
                                     *extra]))
        outside = json.loads((out / "eval.json").read_text())
        assert "run's data (files" in outside["in_domain_source"] and "in_domain: held-out part of" in proc.stdout
        for context, metrics in results["quality"]["in_domain"].items():
            assert outside["quality"]["in_domain"][context]["student"]["ppl"] == pytest.approx(
                metrics["student"]["ppl"], rel=1e-4), (name, context)


def test_eval_of_a_run_directory_runs_where_this_command_says(tmp_path, trained_teacher):
    """The run's saved config gives eval its teacher, data and seed, not its device: device= of this command holds
    (on a machine without CUDA, device=cuda is refused in one line rather than silently run on the CPU)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    run_dir = tmp_path / "run"
    checked(run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=1",
                              "distill.model_level.steps=1", "distill.layerwise.warmup_steps=0",
                              "distill.model_level.warmup_steps=0", "eval.suite=false"]))
    result = run_cli(tmp_path / "eval", ["eval", f"eval.checkpoint={run_dir}", "device=cuda"])
    assert result.returncode == 2 and "device=cuda" in result.stderr and "Traceback" not in result.stderr


def test_eval_names_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_cli(tmp_path / "eval", ["eval", f"eval.checkpoint={tmp_path / 'nope'}"])
    assert result.returncode == 2
    assert "eval.checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_eval_holds_student_and_teacher_in_the_runs_dtype(tmp_path, trained_teacher):
    """A bf16 run: `ascend-edit eval` gives the end-of-run suite's numbers (it once held the student in
    fp32 against the bf16 teacher, scoring bf16 rounding as conversion loss) and records the dtype."""
    run_dir = tmp_path / "run"
    bf16 = [o for o in tiny_convert_overrides(trained_teacher) if not o.startswith("model.dtype=")]
    bf16 += ["model.dtype=bf16", "device.dtype=bf16"]
    checked(run_cli(run_dir, [*bf16, *SMALL_EVAL[:2], "eval.passkey_trials=0", "distill.layerwise.steps=1",
                              "distill.model_level.steps=1", "distill.layerwise.warmup_steps=0",
                              "distill.model_level.warmup_steps=0"]))
    in_run = json.loads((run_dir / "eval.json").read_text())["quality"]
    checked(run_cli(tmp_path / "eval", ["eval", f"eval.checkpoint={run_dir}", *SMALL_EVAL[:2], "eval.passkey_trials=0"]))
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for domain, per_context in in_run.items():
        for context, metrics in per_context.items():
            for key in ("ppl", "teacher_kl", "top1_agreement"):
                assert again["quality"][domain][context]["student"][key] == pytest.approx(
                    metrics["student"][key], rel=1e-5, abs=1e-7), (domain, context, key)
    assert again["dtype"] == "bf16"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, trained_teacher):
    """A one-step conversion without the end-of-run suite: a run directory to point evaluations at."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    checked(run_cli(run_dir, [*tiny_convert_overrides(trained_teacher), "distill.layerwise.steps=1",
                              "distill.model_level.steps=1", "distill.layerwise.warmup_steps=0",
                              "distill.model_level.warmup_steps=0", "eval.suite=false"]))
    return run_dir


def one_line_error(result, *named: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for text in named:
        assert text in line, line
    return line


def test_eval_of_a_run_refuses_overrides_it_would_not_use(tmp_path, short_run):
    """The run decides the teacher, data and seed; the same keys on the command were once dropped without a word
    (and the report showed them as the config)."""
    for override in ("data=shakespeare", "model.dtype=bf16", "device.seed=5"):
        one_line_error(run_cli(tmp_path / override.split("=")[0], ["eval", f"eval.checkpoint={short_run}", override]),
                       override, "would not be used")


def test_eval_of_a_run_whose_saved_config_is_stale_or_damaged_says_so(tmp_path, short_run):
    import shutil

    saved = short_run / ".hydra" / "config.yaml"
    for name, edit in (("stale", lambda text: text.replace("model:\n", "model:\n  retired_key: 3\n", 1)),
                       ("cut", lambda text: text + "model: [unclosed\n"),
                       ("empty", lambda text: "")):
        copy = tmp_path / name
        shutil.copytree(short_run, copy)
        (copy / ".hydra" / "config.yaml").write_text(edit(saved.read_text()))
        line = one_line_error(run_cli(tmp_path / f"eval-{name}", ["eval", f"eval.checkpoint={copy}"]),
                              "eval.checkpoint=", "saved config")
        if name == "stale":
            assert "model.retired_key" in line


def test_eval_records_what_it_compared_and_keeps_an_earlier_evaluation(tmp_path, short_run):
    """eval.json names the teacher and the checkpoint's absolute path; report.md shows the config really used (the
    run's teacher, not this command's default); a second evaluation into the same directory moves the first aside."""
    eval_dir = tmp_path / "eval"
    small = [*SMALL_EVAL[:2], "eval.passkey_trials=0"]
    checked(run_cli(eval_dir, ["eval", f"eval.checkpoint={short_run}", *small]))
    first = json.loads((eval_dir / "eval.json").read_text())
    teacher_path = next(o.split("=", 1)[1] for o in tiny_convert_overrides(short_run) if o.startswith("model.path="))
    assert first["checkpoint"] == str(short_run.resolve())
    assert first["teacher"]["source"] == "hf" and first["teacher"]["path"] != teacher_path  # the run's, not a guess
    assert first["skipped_contexts"] == [100000]  # passkey off: its contexts are not listed
    used = (eval_dir / "effective_config.yaml").read_text()
    assert f"path: {first['teacher']['path']}" in used and "source: hf" in used
    assert "config used (the evaluated run's teacher" in (eval_dir / "report.md").read_text()

    checked(run_cli(eval_dir, ["eval", f"eval.checkpoint={short_run / 'stage-layerwise'}", *small]))
    asides = list(eval_dir.glob("replaced-*"))
    assert len(asides) == 1 and json.loads((asides[0] / "eval.json").read_text()) == first
    assert json.loads((eval_dir / "eval.json").read_text())["checkpoint"].endswith("stage-layerwise")


def test_a_suite_that_would_measure_nothing_is_refused(tmp_path, short_run, trained_teacher):
    one_line_error(run_cli(tmp_path / "eval", ["eval", f"eval.checkpoint={short_run}", "eval.contexts=[100000]",
                                               "eval.passkey_trials=0"]), "eval.contexts", "positions")
    # before training, at conversion: nothing under the run directory but what Hydra and the refusal leave
    result = run_cli(tmp_path / "conv", [*tiny_convert_overrides(trained_teacher), "eval.contexts=[100000]",
                                         "eval.passkey_trials=0"])
    one_line_error(result, "eval.contexts")
    assert not (tmp_path / "conv" / "checkpoints").exists()


def test_a_training_corpus_holding_the_out_of_domain_text_is_refused_before_training(tmp_path, trained_teacher):
    from ascend_edit.data.heldout import python_docs_documents

    corpus = tmp_path / "corpus.txt"
    # the first long passage of 20 topics: enough that the split leaves some in the training part
    long_passages = ([p for p in doc.split("\n\n") if len(p.split()) > 20] for doc in python_docs_documents())
    passages = [found[0] for found in long_passages if found][:20]
    corpus.write_text((trained_teacher / "corpus.txt").read_text() + "\n\n" + "\n\n".join(passages) + "\n")
    result = run_cli(tmp_path / "conv", [*tiny_convert_overrides(trained_teacher, corpus), "eval.passkey_trials=0"])
    one_line_error(result, "python_docs", "not held out")
    assert not (tmp_path / "conv" / "checkpoints").exists()


def test_an_interpolated_output_dir_is_checked_once_resolved(tmp_path, trained_teacher, monkeypatch):
    """`output_dir=${oc.env:DIR}` escaped the command-line check and overwrote a user's report.md."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "report.md").write_text("my notes")
    monkeypatch.setenv("ASCEND_EDIT_TEST_DIR", str(foreign))
    result = run_cli(tmp_path / "run", [*tiny_convert_overrides(trained_teacher), "output_dir=${oc.env:ASCEND_EDIT_TEST_DIR}"])
    one_line_error(result, "output_dir=", "holds no ascend-edit run")
    assert sorted(p.name for p in foreign.iterdir()) == ["report.md"] and (foreign / "report.md").read_text() == "my notes"
