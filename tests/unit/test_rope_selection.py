"""MLA's shared RoPE key: which teacher rotary frequencies it carries (target.mla.rope_selection)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ascend_edit.attention.geometry import read_geometry
from ascend_edit.attention.init import choose_rope_frequencies
from ascend_edit.config import ConfigError, MLAConfig, TargetConfig
from ascend_edit.models.checkpoint import load_converted, save_converted
from ascend_edit.models.surgery import (
    LayerPlan,
    build_plan,
    collect_layer_stats,
    edit_model,
    plan_entries,
    plan_from_entries,
    rope_frequency_choice,
    teacher_inv_freq,
)
from tests.conftest import tiny_model

# tiny model: 4 query heads over 2 KV heads of 16 dims -> 8 rotary frequencies per head
MLA = MLAConfig(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16, latent_norm=False)


def _stats(model):
    torch.manual_seed(1)
    return collect_layer_stats(model, [{"input_ids": torch.randint(0, 256, (2, 24))}])


def _boost_frequency(model, layer: int, freq: int, factor: float) -> None:
    """Scale one rotary frequency's key and query dims (both dims of the pair, every head) of one layer."""
    attn = model.model.layers[layer].self_attn
    d = attn.head_dim
    with torch.no_grad():
        for proj in (attn.k_proj, attn.q_proj):
            rows = proj.weight.view(-1, d, proj.in_features)
            rows[:, [freq, freq + d // 2]] *= factor


def _choice(model, layer: int, context):
    attn = model.model.layers[layer].self_attn
    return choose_rope_frequencies(attn, read_geometry(attn, model.config), _stats(model)[layer], MLA,
                                   teacher_inv_freq(model), context)


def test_a_frequency_that_carries_the_scores_is_chosen_and_the_default_keeps_the_highest():
    model = tiny_model("llama")
    _boost_frequency(model, 0, 5, 30.0)
    chosen = _choice(model, 0, context=None)
    assert len(chosen) == MLA.qk_rope_head_dim // 2 and chosen == sorted(chosen)
    assert 5 in chosen  # by energy alone
    # with the whole energy of the layer in frequency 5, its two directions (2 KV heads) are both taken
    _boost_frequency(model, 0, 5, 30.0)
    assert _choice(model, 0, context=None) == [5, 5]


def test_a_frequency_that_barely_turns_over_the_context_is_left_to_the_position_free_part():
    model = tiny_model("llama")
    slowest = model.model.layers[0].self_attn.head_dim // 2 - 1  # theta^(-14/16): ~3e-4 rad per token
    _boost_frequency(model, 0, slowest, 30.0)
    assert slowest in _choice(model, 0, context=None)
    assert float(teacher_inv_freq(model)[slowest]) * 16 < 0.01
    assert slowest not in _choice(model, 0, context=16)


def test_every_direction_of_every_frequency_makes_the_rotary_keys_exact():
    """2 KV heads x 8 frequencies, each frequency taken twice: the shared RoPE key holds every teacher key
    exactly, the latent every value, so the converted model is the teacher."""
    teacher = tiny_model("llama")
    stats = _stats(teacher)
    every = [f for f in range(8) for _ in range(2)]
    mla = dataclasses.replace(MLA, kv_lora_rank=32, qk_rope_head_dim=32, allow_larger_cache=True)
    cfg = TargetConfig(kind="mla", mla=mla)
    plan = [dataclasses.replace(e, rope_frequencies=tuple(every)) for e in build_plan(4, cfg)]
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        student = edit_model(tiny_model("llama"), plan, cfg, stats)
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the default (highest frequencies, one direction each) at the same width cannot be exact
    mla_high = dataclasses.replace(mla, qk_rope_head_dim=16)
    cfg_high = TargetConfig(kind="mla", mla=mla_high)
    with torch.no_grad():
        high = edit_model(tiny_model("llama"), build_plan(4, cfg_high), cfg_high, stats)(input_ids=ids).logits
    assert (high - want).abs().max() > 10 * (got - want).abs().max()


def test_measured_choice_survives_plan_json_save_reload_and_export(tmp_path):
    from ascend_edit.models.export import conversion_spec, export_converted, native_blockers

    teacher = tiny_model("llama")
    _boost_frequency(teacher, 1, 6, 30.0)
    cfg = TargetConfig(kind="mla", mla=dataclasses.replace(MLA, rope_selection="measured", rope_selection_context=None))
    model = edit_model(teacher, build_plan(4, cfg), cfg, _stats(tiny_model("llama")))
    chosen = [e.rope_frequencies for e in model.edit_plan]
    assert all(f is not None and len(f) == 2 for f in chosen) and 6 in chosen[1]
    assert plan_from_entries(plan_entries(model.edit_plan)) == model.edit_plan
    save_converted(model, cfg, tmp_path / "ckpt")
    reloaded = load_converted(tmp_path / "ckpt")
    assert [e.rope_frequencies for e in reloaded.edit_plan] == chosen
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    spec = conversion_spec(reloaded)
    assert spec["rope_frequencies"] == [list(f) for f in chosen]
    assert any("rotary frequencies" in r for r in native_blockers(reloaded, spec)["deepseek_v3"])
    exported = export_converted(reloaded, tmp_path / "hf", native="auto")  # reloads and compares logits
    assert exported.format == "auto_map"


def test_old_plan_entries_read_as_before():
    assert plan_from_entries([[0, "mla"], [1, "mla", 8], [2, "swa", None, 32]]) == [
        LayerPlan(0, "mla"), LayerPlan(1, "mla", 8), LayerPlan(2, "swa", None, 32)]
    assert plan_entries([LayerPlan(0, "mla", None, None, (1, 2))]) == [[0, "mla", None, None, [1, 2]]]


def test_rope_selection_config_is_validated():
    with pytest.raises(ConfigError, match="target.mla.rope_selection"):
        MLAConfig(rope_selection="lowest")
    with pytest.raises(ConfigError, match="target.mla.rope_frequencies"):
        MLAConfig(qk_rope_head_dim=4, rope_frequencies=[0, 1, 2])
    with pytest.raises(ConfigError, match=r"target.mla.rope_frequencies=\[-1, 2\] must be teacher rotary-pair"):
        MLAConfig(qk_rope_head_dim=4, rope_frequencies=[-1, 2])
    assert MLAConfig(qk_rope_head_dim=4, rope_frequencies=[3, 3]).rope_frequencies == [3, 3]  # two directions of one
    with pytest.raises(ConfigError, match="target.mla.rope_selection_context"):
        MLAConfig(rope_selection_context=0)


def test_measured_frequencies_decode_with_the_cache_as_without():
    """The absorbed decode path (latent cache, rotated shared key) under chosen frequencies: a step against
    the cache gives the logits of the full forward."""
    teacher = tiny_model("llama")
    _boost_frequency(teacher, 2, 7, 30.0)
    cfg = TargetConfig(kind="mla", mla=dataclasses.replace(MLA, rope_selection="measured", rope_selection_context=None))
    model = edit_model(teacher, build_plan(4, cfg), cfg, _stats(tiny_model("llama")))
    assert any(e.rope_frequencies != (0, 1) for e in model.edit_plan)  # not the default choice somewhere
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_a_later_direction_never_outranks_an_earlier_one_of_its_frequency():
    """The warm start gives a frequency's n-th rotary pair its n-th direction across KV heads; a choice must not
    take direction 1 while leaving direction 0. Here direction 1 of frequency 3 (KV head 1, read by queries
    scaled 40x) carries far more score than direction 0 (KV head 0, barely read)."""
    from ascend_edit.attention.init import rope_component_scores

    model = tiny_model("llama")
    attn, d = model.model.layers[0].self_attn, 16
    with torch.no_grad():
        keys = attn.k_proj.weight.view(2, d, -1)
        keys[0, [3, 3 + d // 2]] *= 5
        keys[1, [3, 3 + d // 2]] *= 2
        attn.q_proj.weight.view(4, d, -1)[2:, [3, 3 + d // 2]] *= 40  # heads 2, 3 read KV head 1
    scores = rope_component_scores(attn, read_geometry(attn, model.config), _stats(model)[0], MLA,
                                   teacher_inv_freq(model), None)
    by_freq: dict[int, list[float]] = {}
    for score, freq, k in scores:
        assert k == len(by_freq.setdefault(freq, []))
        by_freq[freq].append(score)
    assert all(a >= b for values in by_freq.values() for a, b in zip(values, values[1:]))
    assert by_freq[3][1] == by_freq[3][0]  # capped: uncapped, direction 1 scored ~15x direction 0


def test_a_shape_only_teacher_keeps_the_default_frequencies():
    """`plan` / `inspect` build the teacher on the meta device: nothing to measure, same shapes."""
    teacher = tiny_model("llama").to("meta")
    cfg = TargetConfig(kind="mla", mla=dataclasses.replace(MLA, rope_selection="measured"))
    assert rope_frequency_choice(teacher, range(4), None, cfg.mla) == {}


def test_a_rebuild_takes_a_measured_choice_from_the_saved_plan(tmp_path):
    """A stage checkpoint is rebuilt without calibration statistics; a choice made again there would differ
    with the same shapes. The rebuild reads the run's saved plan, or refuses without one."""
    import json

    from ascend_edit.config import RootConfig
    from ascend_edit.models.checkpoint import CONVERTED_MARKER
    from ascend_edit.train.rebuild import _run_plan

    cfg = RootConfig(target=TargetConfig(kind="mla", mla=dataclasses.replace(MLA, rope_selection="measured")))
    with pytest.raises(NotImplementedError, match="rotary frequencies"):
        _run_plan(cfg, tmp_path, 4)
    saved = [LayerPlan(i, "mla", None, None, (i, 5)) for i in range(4)]
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / CONVERTED_MARKER).write_text(json.dumps({"plan": plan_entries(saved)}))
    assert _run_plan(cfg, tmp_path, 4) == saved


def test_budgeted_ranks_and_a_measured_choice_build_together_within_the_bytes():
    """kv_budget spreads the latent over layers from spectra of the nope part the chosen frequencies leave."""
    from ascend_edit.eval.kv import kv_table

    teacher = tiny_model("llama")
    _boost_frequency(teacher, 0, 6, 30.0)
    mla = dataclasses.replace(MLA, rope_selection="measured", rope_selection_context=None, kv_budget=0.25,
                              allocation="spectrum", rank_multiple=4)
    cfg = TargetConfig(kind="mla", mla=mla)
    model = edit_model(teacher, build_plan(4, cfg), cfg, _stats(tiny_model("llama")))
    assert all(e.kv_lora_rank is not None for e in model.edit_plan) and 6 in model.edit_plan[0].rope_frequencies
    kv = kv_table(model, context=64, bytes_per_value=2)
    assert kv["converted_bytes_per_token"] <= 0.25 * 4 * (2 * 2 * 16) * 2  # 25 % of the teacher's 16-bit KV


def test_a_measured_rope_key_wider_than_a_head_is_planned_and_bounded():
    """With rope_selection=measured the RoPE key may take more than one KV-head direction of a frequency: the shape
    view (inspect / plan) builds it as a conversion does, and a width beyond every direction is one line up front."""
    from ascend_edit.config import ConfigError
    from ascend_edit.models.build import edited_shape_model
    from ascend_edit.validation import check_against_teacher
    from tests.unit.test_validation import compose_typed, tiny_qwen3

    wide = ["model=qwen3_tiny", "target=mla_small", "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16",
            "target.mla.kv_lora_rank=16", "target.mla.rope_selection=measured"]
    cfg = compose_typed([*wide, "target.mla.qk_rope_head_dim=24"])
    check_against_teacher(cfg, tiny_qwen3())
    model = edited_shape_model(cfg.model, cfg.target)
    assert all(len(e.rope_frequencies or ()) == 12 for e in model.edit_plan)
    with pytest.raises(ConfigError, match="qk_rope_head_dim=40 exceeds the 32 rotary dims"):
        check_against_teacher(compose_typed([*wide, "target.mla.qk_rope_head_dim=40"]), tiny_qwen3())
