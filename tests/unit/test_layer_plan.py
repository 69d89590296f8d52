"""The per-layer plan has one JSON form, and one builder turns a plan entry into a target module."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.hf.modeling import install_converted_attention
from ascend_edit.models.surgery import LayerPlan, build_plan, edit_model, plan_entries, plan_from_entries
from tests.conftest import tiny_model

MLA = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def test_plan_entries_round_trip_with_and_without_ranks():
    plan = [LayerPlan(0, "mla", kv_lora_rank=16), LayerPlan(1, "keep"), LayerPlan(2, "mla"), LayerPlan(3, "swa")]
    entries = plan_entries(plan)
    assert entries == [[0, "mla", 16], [1, "keep"], [2, "mla"], [3, "swa"]]
    assert plan_from_entries(entries) == plan


@pytest.mark.parametrize("target", [
    TargetConfig(kind="mla", mla=MLA, init="random"),
    TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=8, sink_tokens=2, full_every=2), init="random"),
])
def test_surgery_and_exported_modeling_build_the_same_targets(target):
    """Per layer, the target model surgery builds from the run's config and the one an exported
    checkpoint builds from `config.ascend_edit` have the same type and parameter shapes."""
    ranks = {0: 16} if target.kind == "mla" else {}  # MLA: a budget-aware plan, layer 0 with its own rank
    plan = [dataclasses.replace(e, kv_lora_rank=ranks.get(e.layer_idx)) for e in build_plan(4, target)]
    edited = edit_model(tiny_model(), plan, target)
    spec = {"plan": [e.kind for e in edited.edit_plan], "mla": dataclasses.asdict(target.mla),
            "gate_swa": {"window": 8, "sink_tokens": 2, "gate": target.gate_swa.gate}}
    if ranks:
        spec["kv_lora_ranks"] = [ranks.get(i, MLA.kv_lora_rank) for i in range(4)]
    exported = tiny_model()
    install_converted_attention(exported, SimpleNamespace(**vars(exported.config), ascend_edit=spec))
    for ours, theirs in zip(edited.model.layers, exported.model.layers):
        target_module = ours.self_attn.target
        assert type(target_module) is type(theirs.self_attn)
        assert {n: p.shape for n, p in target_module.named_parameters()} == \
            {n: p.shape for n, p in theirs.self_attn.named_parameters()}
    if ranks:
        assert exported.model.layers[0].self_attn.kv_lora_rank == 16
        assert exported.model.layers[1].self_attn.kv_lora_rank == MLA.kv_lora_rank


def test_identity_entries_copy_the_teacher_attention():
    model = tiny_model()
    teacher_attn = model.model.layers[0].self_attn
    edit_model(model, [LayerPlan(i, "identity" if i == 0 else "keep") for i in range(4)], TargetConfig(kind="mla"))
    copy = model.model.layers[0].self_attn.target
    assert copy is not teacher_attn and type(copy) is type(teacher_attn)
    assert torch.equal(copy.q_proj.weight, teacher_attn.q_proj.weight)
