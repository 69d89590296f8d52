"""benchmarks/smollm2_results.py: equal training tokens per condition, and every issue-12 target judged from
the measured numbers as they are (met, missed or not run) — no model, no data."""
from __future__ import annotations

import json

import pytest

from ascend_edit.cli import exit_on_bad_input
from tests.helpers.scripts import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("smollm2_results", "smollm2_results") as module:
        yield module


def suite(ratio_in: float, ratio_ood: float, passkey: tuple[list, list] | None = None) -> dict:
    def cell(r):
        return {"2048": {"ppl_ratio": r, "teacher": {"ppl": 10.0}, "student": {"ppl": 10.0 * r, "teacher_kl": r - 1}}}

    out = {"quality": {"in_domain": cell(ratio_in), "python_docs": cell(ratio_ood)}}
    if passkey:
        out["passkey"] = {"teacher": passkey[0], "student": passkey[1]}
    return out


def result(ratio_in, ratio_ood, kv_fraction=0.25, bytes_per_token=100.0, init=None, passkey=None) -> dict:
    return {"final_suite": suite(ratio_in, ratio_ood, passkey), "init_suite": init or suite(2.0, 4.0),
            "kv_fraction": kv_fraction, "kv": {"converted_bytes_per_token": bytes_per_token},
            "train_tokens": 1000, "train_seconds": {"layerwise": 1.0}, "train_tokens_per_s": 1000.0}


def test_every_trained_condition_gets_the_same_tokens(script):
    args, _ = script.parse_args(["--out", "x", "--tokens", "2e6"])
    steps = script.plan_steps(args)
    assert steps["stage1"] + steps["stage2"] == steps["total"]  # stage 2 only runs `total` steps
    assert steps["tokens_per_step"] == 8 * 2048
    assert abs(steps["total"] * steps["tokens_per_step"] - 2e6) <= steps["tokens_per_step"] / 2
    tiny, _ = script.parse_args(["--out", "x", "--tiny", "--device", "cpu"])
    assert tiny.context == 256 and script.plan_steps(tiny)["total"] == 2


def test_targets_are_judged_from_the_numbers(script):
    results = {
        "mla25_uniform": result(1.05, 1.20),
        "mla25_budget": result(1.02, 1.05),
        "gateswa": result(1.01, 1.04, kv_fraction=0.22, passkey=([[1, 1, 0]], [[1, 0, 0]])),
        "mla12_uniform": result(1.12, 1.5),
        "mla25_rand_s12": result(1.5, 3.0),
        "mla25_rand_s2only": result(4.0, 9.0),
    }
    verdicts = {target: verdict for target, _, verdict in script.targets(results)}
    assert verdicts["MLA 25 % (mla25_uniform): in-domain ppl within 3 %"] == "**missed**"
    assert verdicts["MLA 25 % (mla25_budget): in-domain ppl within 3 %"] == "**met**"
    assert verdicts["MLA 25 % (mla25_budget): OOD ppl within 6 %"] == "**met**"
    assert verdicts["MLA 12.5 % (mla12_uniform): in-domain ppl within 10 %"] == "**missed**"
    assert verdicts["MLA 12.5 % (mla12_budget): in-domain ppl within 10 %"] == "not run"
    assert verdicts["GateSWA: KV saving >= 75 % at the eval context"] == "**met**"
    assert verdicts["GateSWA: passkey within 5 points of the teacher"] == "**missed**"  # 33 vs 67 points
    assert verdicts["budget-aware better than uniform at 25 % (in-domain ppl, same bytes)"] == "**met**"
    assert verdicts["random init: stage 1+2 ppl ratio <= half of stage 2 only (in-domain, equal tokens)"] == "**met**"
    markdown = script.table(results, script.parse_args(["--out", "x"])[0], {"total": 1, "stage1": 1, "stage2": 0,
                                                                            "tokens_per_step": 1})
    assert "| mla25_budget | 25.0 % | 2.000× (1.000) | 4.000× (3.000) | 1.020× (0.020) |" in markdown


def test_budget_aware_is_not_better_when_the_bytes_differ(script):
    results = {"mla25_uniform": result(1.05, 1.2), "mla25_budget": result(1.01, 1.1, bytes_per_token=120.0)}
    verdicts = {target: (measured, verdict) for target, measured, verdict in script.targets(results)}
    measured, verdict = verdicts["budget-aware better than uniform at 25 % (in-domain ppl, same bytes)"]
    assert verdict == "**missed**" and "bytes differ" in measured


def test_a_condition_cut_short_keeps_what_it_measured(script, tmp_path, capsys):
    # a device call stopped at its time limit (SIGKILL included) must leave the init and after-stage-1 numbers
    partial = {"condition": "mla25_budget", "init_suite": suite(3.0, 9.0)}
    script.save_progress(tmp_path, partial, "init")
    partial["after_stage1_suite"] = suite(1.2, 2.5)
    script.save_progress(tmp_path, partial, "after_stage1")
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["reached"] == "after_stage1"
    assert written["after_stage1_suite"]["quality"]["python_docs"]["2048"]["ppl_ratio"] == 2.5
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # the temporary file was renamed, not left
    printed = capsys.readouterr().out
    assert "mla25_budget init: in-domain 3.000× (2.000), OOD 9.000× (8.000)" in printed
    assert "mla25_budget after_stage1: in-domain 1.200× (0.200), OOD 2.500× (1.500)" in printed
    script.save_progress(tmp_path, {**partial, "final_suite": suite(1.0, float("nan"))}, "done")

    def refuse(literal):
        raise AssertionError(f"{literal} is not JSON")

    done = json.loads((tmp_path / "result.json").read_text(), parse_constant=refuse)  # strict JSON: NaN -> null
    assert done["reached"] == "done"
    assert done["final_suite"]["quality"]["python_docs"]["2048"]["ppl_ratio"] is None


@pytest.mark.parametrize("override, named", [("distill.model_level.lr=abc", "distill.model_level.lr"),
                                             ("distill.model_level.nosuch=1", "distill.model_level.nosuch"),
                                             ("target.mla.rope_selection=bogus", "target.mla.rope_selection")])
def test_bad_override_is_one_line_naming_its_key(script, tmp_path, monkeypatch, capsys, override, named):
    monkeypatch.setattr(script, "check_assets", lambda: None)  # the override is refused before any asset is read
    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_input("smollm2_results", script.main, ["--device", "cpu", "--tiny", "--out", str(tmp_path), override])
    message = str(exit_info.value.code)
    assert message.startswith("smollm2_results: error: ") and named in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tmp_path):
    def broken(argv=None):
        raise KeyError("not bad input")

    with pytest.raises(KeyError):
        exit_on_bad_input("smollm2_results", broken, ["--out", str(tmp_path)])
