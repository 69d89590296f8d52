"""The frozen teacher a stage 2 that trains shared weights keeps: a copy of what trains, every frozen weight shared."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import MLAConfig, ModelLevelConfig, TargetConfig
from ascend_edit.distill.model_level import frozen_teacher
from ascend_edit.models.surgery import build_plan, edit_model, set_trainable
from tests.conftest import tiny_model


def edited(arch: str):
    model = tiny_model(arch)
    target = TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                    v_head_dim=16))
    return edit_model(model, build_plan(model.config.num_hidden_layers, target), target).eval()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_target_and_norms_copies_the_norms_and_shares_every_frozen_weight(arch):
    """Was: a deep copy of the whole model (for Qwen3-30B-A3B every expert again: 57 GiB)."""
    model = edited(arch)
    teacher = frozen_teacher(model, ModelLevelConfig(trainable="target+norms"))
    assert not any(p.requires_grad for p in teacher.parameters())  # as it comes out, before the stage starts
    mine = dict(model.named_parameters())
    copied = {name for name, param in teacher.named_parameters() if param is not mine.get(name)}
    assert copied and all("norm" in name and ".teacher." not in name for name in copied)
    assert any(".mlp." in name for name in mine if name not in copied)  # MLPs / experts shared, not copied
    # the model's norms train; the teacher's stay as they were
    set_trainable(model, "target+norms")
    before = {name: teacher.get_parameter(name).detach().clone() for name in copied}
    with torch.no_grad():
        for name in copied:
            mine[name].add_(1.0)
    assert all(torch.equal(teacher.get_parameter(name), before[name]) for name in copied)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_all_copies_every_shared_weight_and_shares_the_teacher_attentions():
    model = edited("qwen3")
    teacher = frozen_teacher(model, ModelLevelConfig(trainable="all"))
    mine = dict(model.named_parameters())
    shared = {name for name, param in teacher.named_parameters() if param is mine.get(name)}
    assert shared and all(".teacher." in name for name in shared)
    assert "model.embed_tokens.weight" not in shared
