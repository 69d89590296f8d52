"""GateSWA per-layer windows under a KV budget (target.gate_swa.windows): the allocation meets its token budget
exactly-or-under, never gives a window at or above the context, is the true optimum of the measured costs (brute
force on small cases), beats every uniform window where the costs say so, and the choice is measured on the
model, saved with the plan, and refused in one line when the config cannot be met."""
from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from ascend_edit.config import ConfigError, GateSWAConfig, TargetConfig
from ascend_edit.models.budget import (
    FULL,
    combine_swa_scores,
    combine_window_costs,
    full_layers_for_budget,
    gate_swa_windows_for_budget,
    swa_tokens_held,
    windows_for_budget,
)
from ascend_edit.models.sensitivity import swa_sensitivity, swa_window_sensitivity
from ascend_edit.models.surgery import (
    LayerPlan,
    build_plan,
    edit_model,
    plan_entries,
    plan_from_entries,
    plan_with_windows,
)
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def held(windows: dict[int, int], sinks: int, context: int) -> int:
    return sum(context if w == FULL else swa_tokens_held(w, sinks, context) for w in windows.values())


def random_costs(layers: int, windows: list[int], seed: int) -> dict[int, dict[int, float]]:
    """Costs that fall with the window (as KL does), with a layer-specific scale."""
    rng = random.Random(seed)
    out = {}
    for i in range(layers):
        scale = rng.uniform(0.01, 1.0)
        out[i] = {w: scale * rng.uniform(0.5, 1.5) / w for w in windows}
    return out


def brute_force(costs, kv_fraction, context, sinks):
    layers = sorted(costs)
    options = [FULL, *sorted(next(iter(costs.values())), reverse=True)]
    budget = int(kv_fraction * context * len(layers) + 1e-9)
    best = None
    for choice in itertools.product(options, repeat=len(layers)):
        windows = dict(zip(layers, choice))
        if held(windows, sinks, context) > budget:
            continue
        cost = sum(0.0 if w == FULL else costs[i][w] for i, w in windows.items())
        if best is None or cost < best - 1e-12:
            best = cost
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kv_fraction, context, sinks", [(0.25, 512, 4), (0.4, 300, 0), (0.15, 1024, 2)])
def test_allocation_is_the_optimum_within_the_budget_and_below_the_context(seed, kv_fraction, context, sinks):
    windows = [16, 32, 64, 128]
    costs = random_costs(5, windows, seed)
    chosen = windows_for_budget(costs, kv_fraction, context, sinks)
    assert chosen.tokens == held(chosen.windows, sinks, context) <= chosen.budget_tokens
    assert chosen.budget_tokens == int(kv_fraction * context * 5 + 1e-9)
    assert set(chosen.windows.values()) <= {FULL, *windows} and all(w < context for w in chosen.windows.values())
    assert chosen.cost == pytest.approx(brute_force(costs, kv_fraction, context, sinks), rel=1e-12, abs=1e-15)


def test_the_optimum_mixes_windows_where_a_uniform_window_costs_more():
    # Layer 0 fetches from far back (costly unless full or wide), layers 1-3 barely care below 64 tokens.
    windows = [16, 64, 256]
    costs = {0: {16: 5.0, 64: 4.0, 256: 0.5}, 1: {16: 0.02, 64: 0.01, 256: 0.005},
             2: {16: 0.03, 64: 0.01, 256: 0.005}, 3: {16: 0.9, 64: 0.1, 256: 0.05}}
    # 0.33 x 1024 x 4 = 1351 tokens: a full layer plus 16, 16 and 256 (1024 + 19 + 19 + 259 = 1321) fit, a full
    # layer plus three of one window fit only up to 64 (1024 + 3 x 67 = 1225), four at 256 hold 1036
    context, sinks, fraction = 1024, 4, 0.33
    chosen = windows_for_budget(costs, fraction, context, sinks)
    # every uniform-window plan of today: one window for all sliding layers, full layers by that window's cost
    uniform = {}
    for w in windows:
        full = full_layers_for_budget([costs[i][w] for i in range(4)], fraction, context, w, sinks)
        uniform[w] = sum(0.0 if i in full else costs[i][w] for i in range(4))
    assert chosen.cost < min(uniform.values())
    assert len({w for w in chosen.windows.values() if w != FULL}) > 1  # not one window for every sliding layer
    assert chosen.windows == {0: FULL, 1: 16, 2: 16, 3: 256}  # the insensitive layers pay for the others
    assert chosen.cost == pytest.approx(0.02 + 0.03 + 0.05) and min(uniform.values()) == pytest.approx(0.12)
    assert chosen.tokens <= chosen.budget_tokens


def test_one_candidate_window_chooses_the_full_layers_of_today():
    scores = [0.1, 0.9, 0.3, 0.8, 0.05, 0.2]
    for fraction in (0.25, 0.4, 0.7):
        chosen = windows_for_budget({i: {64: s} for i, s in enumerate(scores)}, fraction, 1024, 4)
        assert chosen.full_layers == full_layers_for_budget(scores, fraction, 1024, 64, 4)
        assert all(w in (FULL, 64) for w in chosen.windows.values())


def test_allocation_refuses_what_cannot_be_met():
    costs = {0: {8: 1.0, 64: 0.5}, 1: {8: 1.0, 64: 0.5}}
    with pytest.raises(ValueError, match="full attention"):  # a window as long as the context
        windows_for_budget({0: {8: 1.0, 64: 0.5}}, 0.5, 64, 0)
    with pytest.raises(ValueError, match="even all-sliding layers at the smallest window"):
        windows_for_budget(costs, 0.01, 128, 4)
    with pytest.raises(ValueError, match="every candidate window"):
        windows_for_budget({0: {8: 1.0, 64: 0.5}, 1: {8: 1.0}}, 0.5, 128, 0)
    with pytest.raises(ValueError, match="not finite"):
        windows_for_budget({0: {8: float("nan")}}, 0.5, 128, 0)


@pytest.mark.parametrize("fields, message", [
    (dict(windows=[64]), r"^target\.gate_swa\.windows=\[64\] needs target\.gate_swa\.kv_budget"),
    (dict(kv_budget=0.25, kv_budget_context=256, windows=[64, 256]),
     r"^target\.gate_swa\.windows=\[64, 256\]: \[256\] >= target\.gate_swa\.kv_budget_context=256"),
    (dict(kv_budget=0.25, windows=[64, 64]), r"^target\.gate_swa\.windows=\[64, 64\] lists a window twice"),
    (dict(kv_budget=0.25, windows=[0, 64]), r"^target\.gate_swa\.windows=\[0, 64\]: windows must be >= 1"),
])
def test_bad_windows_are_one_line_naming_the_key(fields, message):
    with pytest.raises(ConfigError, match=message) as err:
        GateSWAConfig(**fields)
    assert "\n" not in str(err.value)


def test_window_costs_combine_as_shares_comparable_across_windows():
    text = {0: {8: 2.0, 32: 1.0}, 1: {8: 6.0, 32: 1.0}}
    retrieval = {0: {8: 0.3, 32: 0.3}, 1: {8: 0.1, 32: 0.0}}
    both = combine_window_costs(text, retrieval, "both", 0.5)
    # shares of each kind's sum over the layers at the smallest window (8): text 8.0, retrieval 0.4
    assert both[0][8] == pytest.approx(0.5 * 2 / 8 + 0.5 * 0.3 / 0.4)
    assert both[1][32] == pytest.approx(0.5 * 1 / 8 + 0.5 * 0.0)
    one = combine_window_costs({i: {8: c[8]} for i, c in text.items()}, {i: {8: c[8]} for i, c in retrieval.items()},
                               "both", 0.3)
    assert [one[i][8] for i in (0, 1)] == pytest.approx(combine_swa_scores([2.0, 6.0], [0.3, 0.1], "both", 0.3))
    assert combine_window_costs(text, None, "text") == text
    with pytest.raises(ValueError, match="retrieval scores were not measured"):
        combine_window_costs(text, None, "retrieval")


def test_plan_entries_carry_each_layers_window_and_read_old_plans():
    plan = plan_with_windows([LayerPlan(i, "swa") for i in range(4)] + [LayerPlan(4, "keep")],
                             {0: 32, 1: FULL, 2: 128, 3: 32})
    assert [(e.kind, e.window) for e in plan] == [("swa", 32), ("full", None), ("swa", 128), ("swa", 32),
                                                  ("keep", None)]
    entries = plan_entries(plan)
    assert entries[0] == [0, "swa", None, 32] and entries[1] == [1, "full"]
    assert plan_from_entries(entries) == plan
    assert plan_from_entries([[0, "mla", 64], [1, "swa"]]) == [LayerPlan(0, "mla", 64), LayerPlan(1, "swa")]


def calibration(seq: int = 48) -> list[dict]:
    return [{"input_ids": torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))}]


def test_window_sensitivity_is_the_single_window_pass_at_each_window_and_restores_the_teacher():
    model = tiny_model("llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=4, sink_tokens=1))
    batches = calibration()
    curves = swa_window_sensitivity(model, target, batches, [4, 16])
    assert sorted(curves) == [0, 1, 2, 3] and all(sorted(c) == [4, 16] for c in curves.values())
    for w in (4, 16):  # one edit serves every window: the same numbers as editing at that window
        single = swa_sensitivity(model, dataclasses.replace(target, gate_swa=dataclasses.replace(
            target.gate_swa, window=w)), batches)
        assert [curves[i][w] for i in range(4)] == pytest.approx(single, rel=1e-5, abs=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "edit_plan")


@pytest.mark.parametrize("selection", ["text", "both"])
def test_measured_windows_meet_the_budget_and_build_the_planned_model(selection):
    from ascend_edit.eval.kv import kv_table

    model = tiny_model("llama", seed=0)
    target = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(
        window=8, sink_tokens=2, kv_budget=0.5, kv_budget_context=48, windows=[4, 8, 16], selection=selection,
        retrieval_probes=2))
    measured: dict = {}
    swa, chosen = gate_swa_windows_for_budget(model, target, calibration(), 0.5, 48, measured=measured)
    assert sorted(measured) == (["text"] if selection == "text" else ["retrieval", "text"])
    assert chosen.tokens <= chosen.budget_tokens == 96 and swa.kv_budget is None and swa.windows == []
    assert swa.full_layers == chosen.full_layers
    plan = plan_with_windows(build_plan(4, dataclasses.replace(target, gate_swa=swa)), chosen.windows)
    edit_model(model, plan, dataclasses.replace(target, gate_swa=swa))
    attns = [layer.self_attn.target for layer in model.model.layers]
    assert [a.window for a in attns] == [chosen.windows[i] for i in range(4)]
    kv = kv_table(model, context=48, bytes_per_value=2)
    per_token_layer = 2 * 2 * 16 * 2  # keys and values of 2 KV heads of 16, 2 bytes each
    assert kv["converted_bytes_per_token"] * 48 == pytest.approx(chosen.tokens * per_token_layer)


def test_prepare_chooses_windows_once_and_refuses_a_budget_too_small():
    from ascend_edit.train.prepare import gate_swa_windows_target_for_budget

    model = tiny_model("llama", seed=0)
    budgeted = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=8, sink_tokens=2, kv_budget=0.5,
                                                                    kv_budget_context=48, windows=[4, 8, 16]))
    chosen, windows = gate_swa_windows_target_for_budget(model, budgeted, calibration())
    again, windows_again = gate_swa_windows_target_for_budget(model, budgeted, calibration())
    assert windows == windows_again and chosen == again
    assert chosen.gate_swa.full_layers == sorted(i for i, w in windows.items() if w == FULL)
    # below every layer sliding at the smallest window (3 + 2 sinks of 48 tokens): refused with the config now,
    # before any teacher loads or layer is measured
    with pytest.raises(ConfigError, match=r"^target\.gate_swa\.kv_budget=0\.05 cannot be met: .*windows=4"):
        dataclasses.replace(budgeted.gate_swa, kv_budget=0.05)


# ---------------------------------------------------------------------------------------------
# decoding with per-layer windows: bounded rings of each layer's own size, static == dynamic


PER_LAYER = {0: 6, 1: FULL, 2: 3, 3: 10}
SINKS = 2


def per_layer_model() -> torch.nn.Module:
    target = TargetConfig(kind="gate_swa", init="random", gate_swa=GateSWAConfig(window=6, sink_tokens=SINKS))
    model = tiny_model("qwen3")
    edit_model(model, plan_with_windows(build_plan(4, target), PER_LAYER), target)
    return model.eval()


def test_static_and_compiled_decode_equal_dynamic_generate_with_per_layer_windows():
    from transformers import DynamicCache

    from ascend_edit.attention.cache_layers import SinkWindowLayer, StaticSinkWindowLayer
    from ascend_edit.models.static_decode import StaticDecoder

    model = per_layer_model()
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0
    new = 3 * max(PER_LAYER.values())  # decode runs well past the widest window
    options = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **options)
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **options)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(static.sequences, dynamic.sequences) and torch.equal(uncached.sequences, dynamic.sequences)
    sinks_kept = set()  # a dynamic layer keeps its last window - 1 tokens plus what is a sink in any row
    for idx, window in PER_LAYER.items():
        ring, bounded = static.past_key_values.layers[idx], dynamic.past_key_values.layers[idx]
        if window == FULL:
            assert not isinstance(ring, StaticSinkWindowLayer) and not isinstance(bounded, SinkWindowLayer)
            continue
        assert isinstance(ring, StaticSinkWindowLayer) and ring.keys.shape[-2] == SINKS + window + 1
        assert isinstance(bounded, SinkWindowLayer) and bounded.keys.shape[-2] < ids.shape[1] + new - 1
        sinks_kept.add(bounded.keys.shape[-2] - (window - 1))
        assert ring.leader is ring  # every window its own group: the rings' bookkeeping is not shared across sizes
    assert len(sinks_kept) == 1  # each layer trimmed to its own window, the same sinks in all
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + new, mode="compile", backend="aot_eager")
    assert torch.equal(decoder.generate(ids, mask, new), dynamic.sequences)


def test_windows_as_long_as_the_calibration_sequences_are_refused():
    """A window of at least the sequence length slides nothing there: every cost reads 0 and the choice is arbitrary."""
    from ascend_edit.models.budget import gate_swa_windows_for_budget
    from tests.conftest import tiny_model

    cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=64, sink_tokens=1, full_every=0, kv_budget=0.5,
                                                               kv_budget_context=256, windows=[16, 64]))
    batches = [{"input_ids": torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))}]
    with pytest.raises(ValueError, match=r"windows=\[16, 64\]: windows of 64 tokens or more cost nothing .* "
                                         r"raise data.seq_len above 64"):
        gate_swa_windows_for_budget(tiny_model("llama"), cfg, batches, 0.5, 256)
