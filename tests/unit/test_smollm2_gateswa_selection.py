"""benchmarks/smollm2_results.py: the retrieval-selected GateSWA conditions differ from `gateswa` in the selection
alone, and the GateSWA targets (passkey included) are judged for each of them — no model, no data."""
from __future__ import annotations

import dataclasses

import pytest

from tests.helpers.scripts import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("smollm2_results", "smollm2_results_selection") as module:
        yield module


def result(ratio_in: float, passkey_student: list) -> dict:
    def cell(r):
        return {"2048": {"ppl_ratio": r, "teacher": {"ppl": 10.0}, "student": {"ppl": 10.0 * r, "teacher_kl": r - 1}}}

    final = {"quality": {"in_domain": cell(ratio_in), "python_docs": cell(1.04)},
             "passkey": {"teacher": [[1, 1, 0, 0]], "student": [passkey_student]}}
    return {"final_suite": final, "init_suite": final, "kv_fraction": 0.22, "kv": {"converted_bytes_per_token": 1.0},
            "train_tokens": 1000, "train_seconds": {"layerwise": 1.0}, "train_tokens_per_s": 1000.0,
            "full_layers": [1, 2], "selection": "retrieval", "probe_teacher_retrieved": 0.75}


def test_the_retrieval_conditions_change_the_selection_only(script):
    conditions = script.conditions()
    base = conditions["gateswa"]
    for name in ("gateswa_retrieval", "gateswa_both"):
        other = conditions[name]
        assert other.selection != base.selection == "text"
        assert dataclasses.replace(other, name=base.name, what=base.what, selection=base.selection) == base
    assert script.parse_args(["--out", "x", "--only", "gateswa,gateswa_retrieval"])[0].only
    assert set(script.GATE_SWA) <= set(script.CONDITIONS)


def test_gate_swa_targets_are_judged_for_every_selection(script):
    results = {"gateswa": result(1.01, [0, 0, 0, 0]), "gateswa_retrieval": result(1.02, [1, 1, 0, 0])}
    verdicts = {target: (measured, verdict) for target, measured, verdict in script.targets(results)}
    assert verdicts["GateSWA: passkey within 5 points of the teacher"] == ("0 vs 50", "**missed**")
    assert verdicts["GateSWA (gateswa_retrieval): passkey within 5 points of the teacher"] == ("50 vs 50", "**met**")
    assert verdicts["GateSWA (gateswa_retrieval): in_domain ppl within 5 %"] == ("1.020×", "**met**")
    assert not any("gateswa_both" in target for target in verdicts)  # not run: no rows
    markdown = script.table(results, script.parse_args(["--out", "x"])[0],
                            {"total": 1, "stage1": 1, "stage2": 0, "tokens_per_step": 1})
    assert "selection retrieval; teacher answers 75 % of the retrieval probes" in markdown
