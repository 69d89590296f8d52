"""Budget-aware conversion: per-layer MLA ranks meet the byte budget exactly, never exceed the teacher's
KV width, beat uniform ranks on retained energy, and survive save / reload / export."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from ascend_edit.config import ConfigError, MLAConfig, TargetConfig
from ascend_edit.eval.kv import kv_table
from ascend_edit.models.budget import (
    allocate_ranks,
    budget_latent_dims,
    candidate_ranks,
    full_layers_for_budget,
    mla_rank_allocation,
    retained_energy,
    sensitivity_allocation,
    sensitivity_weights,
)
from ascend_edit.models.checkpoint import load_converted, save_converted
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model
from tests.conftest import tiny_model

MLA = {"kv_lora_rank": 32, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 16, "latent_norm": False}


def spectra_of(*decays: float, width: int = 48) -> dict[int, torch.Tensor]:
    return {i: torch.tensor([decay**k for k in range(width)]) for i, decay in enumerate(decays)}


@pytest.mark.parametrize("allocation", ["spectrum", "uniform", "sensitivity"])
@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_allocation_spends_the_budget_exactly_within_each_layers_width(allocation, multiple):
    generator = torch.Generator().manual_seed(0)
    spectra = {i: torch.rand(40, generator=generator).sort(descending=True).values for i in range(7)}
    max_rank = {i: 24 + 3 * i for i in range(7)}  # a teacher KV width per layer (minus the RoPE key)
    weights = {i: float(w) for i, w in enumerate(torch.rand(7, generator=generator) * 10)}
    for total in range(7 * multiple, sum(m - m % multiple for m in max_rank.values()) + 1, multiple):
        ranks = allocate_ranks(spectra, total, max_rank, multiple, allocation, weights)
        assert sum(ranks.values()) == total
        assert all(multiple <= ranks[i] <= max_rank[i] and ranks[i] % multiple == 0 for i in ranks)


def test_allocation_refuses_a_budget_it_cannot_meet():
    spectra = spectra_of(0.9, 0.5)
    with pytest.raises(ValueError, match="target.mla.kv_budget: .* cannot be met .* choose a smaller"):
        allocate_ranks(spectra, 200, {0: 48, 1: 48})
    with pytest.raises(ValueError, match="multiple"):
        allocate_ranks(spectra, 30, {0: 48, 1: 48}, rank_multiple=8)


def test_water_filling_is_optimal_on_a_small_case():
    """Greedy equals exhaustive search for the kept normalised energy (3 layers, every rank split)."""
    spectra = {0: torch.tensor([5.0, 1.0, 0.5, 0.1]), 1: torch.tensor([2.0, 1.9, 1.8, 0.2]),
               2: torch.tensor([1.0, 0.9, 0.2, 0.1])}
    energy = {i: s.pow(2) / s.pow(2).sum() for i, s in spectra.items()}
    for total in range(3, 13):
        ranks = allocate_ranks(spectra, total, {i: 4 for i in spectra})
        kept = sum(float(energy[i][: ranks[i]].sum()) for i in spectra)
        best = max(sum(float(energy[i][: r].sum()) for i, r in enumerate(split))
                   for split in itertools.product(range(1, 5), repeat=3) if sum(split) == total)
        assert kept == pytest.approx(best, abs=1e-9)


def test_a_layer_with_a_flat_spectrum_gets_more_rank():
    ranks = allocate_ranks(spectra_of(0.5, 0.98), total=48, max_rank={0: 48, 1: 48})
    assert ranks[1] > ranks[0]


def test_budget_in_bytes_is_a_fraction_of_the_teachers():
    widths = [64] * 4  # e.g. 2 KV heads x 16 dims x (K and V)
    latent = budget_latent_dims(0.25, widths, rope_dim=4)
    assert latent + 4 * len(widths) == 64  # exactly 25 % of 256 values per token
    assert budget_latent_dims(0.3, widths, rope_dim=4, rank_multiple=8) == 56  # floor(76.8)=76 -> 60 -> 56
    with pytest.raises(ValueError, match="kv_budget"):
        budget_latent_dims(0.01, widths, rope_dim=4)
    with pytest.raises(ValueError, match="kv_budget"):
        budget_latent_dims(1.5, widths, rope_dim=4)


def converted(kv_budget: float, allocation: str = "spectrum", seed: int = 0):
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():  # layer 0's keys and values read only 4 directions of the input: it needs less rank
        attn = model.model.layers[0].self_attn
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[:, 4:] = 0
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))}]
    stats = collect_layer_stats(model, batches)
    target = TargetConfig(kind="mla", init="warm", mla=MLAConfig(**MLA, kv_budget=kv_budget, allocation=allocation,
                                                                 rank_multiple=4))
    plan = build_plan(model.config.num_hidden_layers, target)
    allocation_info = mla_rank_allocation(model, [e.layer_idx for e in plan], stats, target.mla)
    edit_model(model, plan, target, stats)
    return model, target, allocation_info


@pytest.mark.parametrize("fraction", [0.25, 0.125, 0.4])
def test_budget_aware_model_caches_exactly_the_budgeted_bytes(fraction):
    model, _, allocation = converted(fraction)
    ranks = [e.kv_lora_rank for e in model.edit_plan]
    teacher_width = 2 * 2 * 16  # tiny model: 2 KV heads of 16 dims
    assert all(r is not None and r + MLA["qk_rope_head_dim"] <= teacher_width for r in ranks)
    kv = kv_table(model, context=64, bytes_per_value=2)
    assert kv["converted_bytes_per_token"] == 2 * allocation.values_per_token
    assert allocation.values_per_token <= fraction * 4 * teacher_width
    # within one rank step of the fraction asked for (the budget is rounded down to a multiple of 4)
    assert allocation.values_per_token > fraction * 4 * teacher_width - 4


def test_spectrum_keeps_at_least_the_energy_of_uniform_at_the_same_bytes():
    _, _, spectrum = converted(0.25, "spectrum")
    _, _, uniform = converted(0.25, "uniform")
    assert spectrum.values_per_token == uniform.values_per_token
    assert len(set(uniform.ranks.values())) == 1
    assert sum(spectrum.retained.values()) >= sum(uniform.retained.values()) - 1e-12


def test_per_layer_ranks_survive_save_reload_and_export(tmp_path):
    from ascend_edit.models.export import conversion_spec, export_converted, native_blockers

    model, target, allocation = converted(0.25)
    assert len(set(allocation.ranks.values())) > 1 and allocation.ranks[0] == min(allocation.ranks.values())
    save_converted(model, target, tmp_path / "ok")
    reloaded = load_converted(tmp_path / "ok")
    assert [e.kv_lora_rank for e in reloaded.edit_plan] == list(allocation.ranks.values())
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    spec = conversion_spec(reloaded)
    assert spec["kv_lora_ranks"] == list(allocation.ranks.values())
    assert any("differ per layer" in r for r in native_blockers(reloaded, spec)["deepseek_v3"])
    exported = export_converted(reloaded, tmp_path / "hf", native="auto")  # auto_map, reloaded and checked
    assert exported.format == "auto_map"


def test_budget_config_is_validated():
    with pytest.raises(ConfigError, match="kv_budget"):
        MLAConfig(kv_budget=0.0)
    with pytest.raises(ConfigError, match="allocation"):
        MLAConfig(kv_budget=0.25, allocation="random")


def test_gate_swa_full_layers_follow_sensitivity_within_the_budget():
    sensitivity = [0.1, 0.9, 0.3, 0.8, 0.05, 0.2]
    # context 1024, window 64 + 4 sinks (67 tokens): 25 % of 6 x 1024 pays for one full layer
    assert full_layers_for_budget(sensitivity, 0.25, 1024, 64, 4) == [1]
    assert full_layers_for_budget(sensitivity, 0.4, 1024, 64, 4) == [1, 3]
    with pytest.raises(ValueError, match="all-sliding"):
        full_layers_for_budget(sensitivity, 0.01, 1024, 64, 4)


def test_sensitive_layers_get_more_rank_than_the_spectrum_alone_gives_them():
    spectra = spectra_of(0.9, 0.9, 0.9)  # identical spectra: energy alone splits evenly
    even = allocate_ranks(spectra, 48, {i: 48 for i in spectra}, 4, "spectrum")
    weighted = allocate_ranks(spectra, 48, {i: 48 for i in spectra}, 4, "sensitivity", {0: 10.0, 1: 1.0, 2: 1.0})
    assert max(even.values()) - min(even.values()) <= 4
    assert weighted[0] > even[0] and weighted[0] > weighted[1] and sum(weighted.values()) == 48
    with pytest.raises(ValueError, match="sensitivity"):
        allocate_ranks(spectra, 48, {i: 48 for i in spectra}, 4, "sensitivity")


def test_sensitivity_weight_is_the_slope_of_kl_in_dropped_energy():
    spectra = spectra_of(0.8, 0.95)
    measured = {i: {r: 0.3 + (2.0 if i == 0 else 0.5) * (1 - retained_energy(spectra[i], r)) for r in (4, 8, 16)}
                for i in spectra}
    weights = sensitivity_weights(spectra, measured)
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(0.5)
    flat = sensitivity_weights(spectra, {0: {4: 0.5, 8: 0.5}, 1: {4: 0.9, 8: 0.1}})
    assert 0 < flat[0] < flat[1]  # an insensitive layer keeps a small positive weight


def test_candidate_ranks_bracket_the_uniform_rank_within_the_width():
    assert candidate_ranks(30 * 64, 30, 352, 8) == [32, 64, 128]
    assert candidate_ranks(30 * 16, 30, 352, 8) == [8, 16, 32]
    assert candidate_ranks(4 * 32, 4, 40, 8) == [16, 32, 40]


@pytest.mark.parametrize("fraction", [0.25, 0.125])
def test_measured_sensitivity_allocation_meets_the_budget_and_leaves_the_teacher_untouched(fraction):
    model = tiny_model("llama", seed=0)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))}]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    stats = collect_layer_stats(model, batches)
    target = TargetConfig(kind="mla", init="warm", mla=MLAConfig(**MLA, kv_budget=fraction,
                                                                 allocation="sensitivity", rank_multiple=4))
    layers = list(range(model.config.num_hidden_layers))
    chosen = sensitivity_allocation(model, layers, stats, target, batches)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # measured, then restored
    teacher_width = 2 * 2 * 16
    assert all(r + MLA["qk_rope_head_dim"] <= teacher_width and r % 4 == 0 for r in chosen.ranks.values())
    uniform = mla_rank_allocation(model, layers, stats, MLAConfig(**MLA, kv_budget=fraction, allocation="uniform",
                                                                  rank_multiple=4))
    assert chosen.values_per_token == uniform.values_per_token  # the same bytes, spent exactly
    assert set(chosen.measured) == set(layers) and all(len(c) >= 2 for c in chosen.measured.values())
    assert all(w > 0 for w in chosen.weights.values())
    with pytest.raises(ValueError, match="sensitivity"):  # never silently from the spectrum alone
        mla_rank_allocation(model, layers, stats, target.mla)
    plan = [dataclasses.replace(e, kv_lora_rank=chosen.ranks[e.layer_idx])
            for e in build_plan(len(layers), target)]
    edit_model(model, plan, target, stats)
    kv = kv_table(model, context=64, bytes_per_value=2)
    assert kv["converted_bytes_per_token"] == 2 * chosen.values_per_token


def test_gate_swa_full_layers_are_measured_and_written_as_an_explicit_list():
    from ascend_edit.config import GateSWAConfig
    from ascend_edit.models.budget import gate_swa_for_budget

    model = tiny_model("llama", seed=0)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))}]
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    target = TargetConfig(kind="gate_swa", init="warm", gate_swa=GateSWAConfig(window=4, sink_tokens=1, full_every=2))
    swa, scores = gate_swa_for_budget(model, target, batches, kv_fraction=0.5, context=32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # measured, then restored
    layers = model.config.num_hidden_layers
    assert swa.full_layers == full_layers_for_budget(scores, 0.5, 32, 4, 1)
    assert swa.full_every == 0 and swa.full_by_sensitivity == 0
    # what the budget pays for: every full layer costs 32 - 4 tokens more than a sliding one (4 = 3 + 1 sink)
    assert len(swa.full_layers) == int((0.5 * 32 * layers - 4 * layers) // 28)
    ranked = sorted(range(layers), key=lambda i: (-scores[i], i))
    assert swa.full_layers == sorted(ranked[: len(swa.full_layers)])
    plan = build_plan(layers, dataclasses.replace(target, gate_swa=swa))
    assert [e.layer_idx for e in plan if e.kind == "full"] == swa.full_layers
    # a window as long as the calibration sequences slides nothing: every score 0, the choice arbitrary
    wide = TargetConfig(kind="gate_swa", init="warm", gate_swa=GateSWAConfig(window=32, sink_tokens=1, full_every=2))
    with pytest.raises(ValueError, match="target.gate_swa.window=32 is not shorter than the 32-token calibration"):
        gate_swa_for_budget(model, wide, batches, kv_fraction=0.5, context=64)


def test_gate_swa_kv_budget_is_validated_and_chosen_once_on_data():
    from ascend_edit.config import ConfigError, GateSWAConfig
    from ascend_edit.train.prepare import gate_swa_target_for_budget

    for budget in (1.5, 1.0):  # 1.0 converted nothing (every layer fits full), exit 0
        with pytest.raises(ConfigError, match=rf"target\.gate_swa\.kv_budget={budget} must be in \(0, 1\) .*nothing "
                                              "slides"):
            GateSWAConfig(kv_budget=budget)
    with pytest.raises(ConfigError, match="give only one of full_layers, full_every, full_by_sensitivity, kv_budget"):
        GateSWAConfig(kv_budget=0.5, full_every=2)
    with pytest.raises(ConfigError, match=r"calibration_batches=0: target\.gate_swa\.kv_budget"):
        TargetConfig(kind="gate_swa", init="random", calibration_batches=0, gate_swa=GateSWAConfig(kv_budget=0.5))
    budgeted = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=4, sink_tokens=1, kv_budget=0.5,
                                                                    kv_budget_context=32))
    with pytest.raises(ValueError, match="measured on calibration data"):  # never silently all-sliding
        build_plan(4, budgeted)

    model = tiny_model("llama", seed=0)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))}]
    chosen = gate_swa_target_for_budget(model, budgeted, batches)
    layers = model.config.num_hidden_layers
    assert chosen.gate_swa.kv_budget is None and chosen.gate_swa.window == 4
    assert len(chosen.gate_swa.full_layers) == int((0.5 * 32 * layers - 4 * layers) // 28)
    # A budget below every layer sliding is refused with the config, before any teacher loads or layer is measured
    with pytest.raises(ConfigError, match=r"^target\.gate_swa\.kv_budget=0\.05 cannot be met: .* each holds 4 of the "
                       r"kv_budget_context=32 tokens .* at least 0\.125 or give a smaller target\.gate_swa\.window"):
        dataclasses.replace(budgeted.gate_swa, kv_budget=0.05)
    with pytest.raises(ConfigError, match=r"kv_budget=0\.1 cannot be met: .*windows=8 .*target\.gate_swa\.windows$"):
        GateSWAConfig(window=4, sink_tokens=1, kv_budget=0.1, kv_budget_context=32, windows=[8, 16])
    at_floor = dataclasses.replace(budgeted.gate_swa, kv_budget=4 / 32)  # exactly all-sliding: allowed, no full layer
    chosen = gate_swa_target_for_budget(model, dataclasses.replace(budgeted, gate_swa=at_floor), batches)
    assert chosen.gate_swa.full_layers == []


def test_shape_views_of_budgeted_targets_keep_the_runs_bytes(caplog):
    """inspect / plan build the teacher on the meta device, without weights: a spectrum or sensitivity allocation
    is shown as the uniform one of the same budget (it crashed on meta tensors), and full_by_sensitivity as that
    many evenly spread full layers (it showed another count), each said in a warning."""
    from ascend_edit.config import GateSWAConfig, ModelConfig
    from ascend_edit.models.build import edited_shape_model

    shape = ModelConfig(source="config", arch="qwen3", dtype="bf16",
                        overrides={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                   "vocab_size": 256})
    mla = MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=32, kv_budget=0.25,
                    allocation="spectrum", rank_multiple=4, latent_norm=False)
    with caplog.at_level("WARNING"):
        model = edited_shape_model(shape, TargetConfig(kind="mla", mla=mla))
    ranks = {e.kv_lora_rank for e in model.edit_plan}
    assert len(ranks) == 1 and "shown with one rank in every layer" in caplog.text
    kv = kv_table(model, context=64, bytes_per_value=2)
    assert kv["converted_bytes_per_token"] <= 0.25 * kv["teacher_bytes_per_token"]
    swa = GateSWAConfig(window=16, sink_tokens=2, full_every=0, full_by_sensitivity=3)
    model = edited_shape_model(shape, TargetConfig(kind="gate_swa", gate_swa=swa, layers=[0, 1, 2, 3, 4, 5]))
    assert sum(e.kind == "full" for e in model.edit_plan) == 3 and "stand in for them" in caplog.text

    # A GateSWA kv_budget chooses its full layers on data: shown as the count the budget pays for (it was refused
    # with advice that was itself refused), which is the count a run chooses
    swa = GateSWAConfig(window=16, sink_tokens=2, full_every=0, kv_budget=0.5, kv_budget_context=64)
    budgeted = TargetConfig(kind="gate_swa", gate_swa=swa, layers=[0, 1, 2, 3, 4, 5])
    model = edited_shape_model(shape, budgeted)
    run_full = full_layers_for_budget([float(i % 3) for i in range(8)], 0.5, 64, 16, 2, [0, 1, 2, 3, 4, 5])
    assert sum(e.kind == "full" for e in model.edit_plan) == len(run_full) == 1  # (0.5 * 64 - 17) * 6 // 47
    assert [e.kind for e in model.edit_plan][6:] == ["keep", "keep"]
    # ... and per-layer windows as an allocation of the same budget, within it at its context
    windowed = dataclasses.replace(budgeted, gate_swa=dataclasses.replace(swa, kv_budget=0.3, windows=[8, 16, 32]))
    with caplog.at_level("WARNING"):
        model = edited_shape_model(shape, windowed)
    converted = [e for e in model.edit_plan if e.kind != "keep"]
    held = sum(64 if e.kind == "full" else min(64, e.window - 1 + 2) for e in converted)
    assert held <= 0.3 * 64 * 6 and {e.window for e in converted if e.kind == "swa"} <= {8, 16, 32}
    assert "as if every layer were equally sensitive" in caplog.text


def test_a_run_that_goes_on_takes_its_saved_measured_plan(tmp_path):
    """A measured plan (budget ranks, windows, full layers) is not measured again on a resume or a stage-2 job:
    other calibration batches chose other windows (a GateSWA resume trained on with them) or other ranks (an MLA
    resume died on a shape mismatch)."""
    import json

    from ascend_edit.train.prepare import earlier_plan
    from tests.unit.test_validation import compose_typed

    saved = [[0, "mla", 25], [1, "mla", 24], [2, "mla", 24], [3, "mla", 23]]
    run = tmp_path / "run"
    (run / "stage-layerwise").mkdir(parents=True)
    (run / "stage-layerwise" / "ascend_edit.json").write_text(json.dumps({"plan": saved}))
    budget = ["experiment=tiny", "target.mla.kv_budget=0.5", "target.mla.rank_multiple=1"]
    plan, source = earlier_plan(compose_typed(budget), run)
    assert [e.kv_lora_rank for e in plan] == [25, 24, 24, 23] and source.parent.name == "stage-layerwise"
    assert earlier_plan(compose_typed([*budget, "engine.resume=false"]), run) is None  # a new run measures
    assert earlier_plan(compose_typed(["experiment=tiny"]), run) is None  # a plan from the config alone
    stage2 = compose_typed([*budget, f"distill.init_from={run}", "distill.stage=model_level"])
    (run / "stage-layerwise" / "manifest.json").write_text("{}")
    assert [e.kv_lora_rank for e in earlier_plan(stage2, tmp_path / "elsewhere")[0]] == [25, 24, 24, 23]


def test_a_budget_that_cannot_hold_the_rope_keys_is_refused_before_loading():
    """A natural halving sweep reaches a budget whose values are all RoPE key: refused at the grid check
    (check_before_load composes it without weights), not when that job starts after the others trained."""
    from ascend_edit.validation import check_before_load
    from tests.unit.test_validation import compose_typed

    check_before_load(compose_typed(["experiment=tiny", "target.mla.kv_budget=0.5"]))
    with pytest.raises(ValueError, match="target.mla.kv_budget=0.001: 0 values per token cannot hold a RoPE key"):
        check_before_load(compose_typed(["experiment=tiny", "target.mla.kv_budget=0.001"]))
