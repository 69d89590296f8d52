"""benchmarks/smollm2_results.py: the per-layer-window GateSWA conditions keep gateswa's bytes and differ in how
the layers are chosen alone; their candidate windows stay below the context; the table names each layer's
window and the GateSWA targets are judged for them — no model, no data."""
from __future__ import annotations

import dataclasses

import pytest

from tests.helpers.scripts import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("smollm2_results", "smollm2_results_windows") as module:
        yield module


def test_window_conditions_change_the_choice_only(script):
    conditions = script.conditions()
    base = conditions["gateswa"]
    for name, selection in (("gateswa_windows", "both"), ("gateswa_windows_retrieval", "retrieval")):
        other = conditions[name]
        assert other.per_layer_windows and not base.per_layer_windows and other.selection == selection
        assert dataclasses.replace(other, name=base.name, what=base.what, selection=base.selection,
                                   per_layer_windows=False) == base
        assert name in script.GATE_SWA and name in script.CONDITIONS


@pytest.mark.parametrize("argv, expected", [([], [32, 64, 128, 256]), (["--tiny"], [4, 8, 16, 32]),
                                            (["--window", "1024"], [256, 512, 1024])])
def test_candidate_windows_are_multiples_of_the_window_below_the_context(script, argv, expected):
    args, _ = script.parse_args(["--out", "x", *argv])
    runner = object.__new__(script.Runner)  # candidate_windows reads the arguments only
    runner.args = args
    assert runner.candidate_windows() == expected  # 2048 (2 x 1024) is the context: full attention, left out


def test_the_table_names_each_layers_window(script):
    cell = {"2048": {"ppl_ratio": 1.01, "teacher": {"ppl": 10.0}, "student": {"ppl": 10.1, "teacher_kl": 0.01}}}
    final = {"quality": {"in_domain": cell, "python_docs": cell},
             "passkey": {"teacher": [[1, 1, 0, 0]], "student": [[1, 0, 0, 0]]}}
    result = {"final_suite": final, "init_suite": final, "kv_fraction": 0.24, "kv": {"converted_bytes_per_token": 1.0},
              "train_tokens": 1000, "train_seconds": {"layerwise": 1.0}, "train_tokens_per_s": 1000.0,
              "full_layers": [1], "selection": "both", "windows": [32, 0, 256], "candidate_windows": [32, 64, 128, 256],
              "tokens_held": 2338, "budget_tokens": 1536 * 3}
    args = script.parse_args(["--out", "x"])[0]
    markdown = script.table({"gateswa_windows": result}, args, {"total": 1, "stage1": 1, "stage2": 0,
                                                                "tokens_per_step": 1})
    assert "per-layer windows [32, 0, 256] (0 = full) from [32, 64, 128, 256] + 4 sinks" in markdown
    verdicts = {target: verdict for target, _, verdict in script.targets({"gateswa_windows": result})}
    assert verdicts["GateSWA (gateswa_windows): passkey within 5 points of the teacher"] == "**missed**"
    assert verdicts["GateSWA (gateswa_windows): KV saving >= 75 % at the eval context"] == "**met**"
