"""Activation checkpointing of decoder layers gives the same stage-2 loss and gradients as none.

Tolerance: recomputation repeats the same fp32 CPU kernels on the same inputs, so results agree to
float round-off; we allow rtol 1e-5 / atol 1e-6 (a reordering of a reduction, not a different result).
"""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import MLAConfig, TargetConfig
from ascend_edit.distill.model_level import ModelLevelObjective
from ascend_edit.models.surgery import build_plan, edit_model, set_trainable
from ascend_edit.train.activation_checkpointing import (
    CheckpointingConfig,
    checkpointed_layer_ids,
    checkpointing,
)
from tests.conftest import tiny_model

RTOL, ATOL = 1e-5, 1e-6


def edited(arch: str):
    model = tiny_model(arch, seed=0)
    target = TargetConfig(kind="mla", init="random",
                          mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    torch.manual_seed(1)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    set_trainable(model, "target")
    return model.train()


def batch():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 24), generator=generator)
    return {"input_ids": ids, "position_ids": torch.arange(24).expand(2, 24),
            "loss_mask": torch.ones(2, 24, dtype=torch.bool)}


def loss_and_grads(model, cfg: CheckpointingConfig):
    model.zero_grad(set_to_none=True)
    with checkpointing(model, cfg) as enabled:
        assert enabled == (cfg.policy != "none")
        loss, _ = ModelLevelObjective(chunk_size=16)(model, batch())
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("policy", ["every", "every_k"])
def test_checkpointing_matches_no_checkpointing(arch, policy):
    model = edited(arch)
    ref_loss, ref_grads = loss_and_grads(model, CheckpointingConfig("none"))
    loss, grads = loss_and_grads(model, CheckpointingConfig(policy, k=2))
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)
    assert not model.is_activation_checkpointing  # switched off after the stage


def test_checkpointing_really_recomputes_layers():
    """Counts forwards of each layer's first module: checkpointed layers run once more, in the backward
    (the recompute stops early once it has what backward needs, so a layer's last module may not rerun)."""
    model = edited("qwen3")
    calls: list[int] = []
    for idx, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(lambda m, a, o, idx=idx: calls.append(idx))
    loss_and_grads(model, CheckpointingConfig("every_k", k=2))
    # teacher pass (no grad) + student pass = 2 forwards per layer; checkpointed layers 0 and 2 run a third time
    assert sorted(calls) == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_layer_choice_and_bad_values():
    assert checkpointed_layer_ids(6, CheckpointingConfig("every")) == [0, 1, 2, 3, 4, 5]
    assert checkpointed_layer_ids(6, CheckpointingConfig("every_k", k=3)) == [0, 3]
    assert checkpointed_layer_ids(6, CheckpointingConfig("none")) == []
    with pytest.raises(ValueError, match="engine.activation_checkpointing="):
        CheckpointingConfig("some")
    with pytest.raises(ValueError, match="engine.activation_checkpointing_k="):
        CheckpointingConfig("every_k", k=0)


@pytest.mark.slow  # inductor compiles on the CPU: about a minute
def test_checkpointing_composes_with_whole_layer_compile():
    from ascend_edit.train.compile import compile_whole_layers

    model = edited("qwen3")
    ref_loss, ref_grads = loss_and_grads(model, CheckpointingConfig("none"))
    compile_whole_layers(model)
    loss, grads = loss_and_grads(model, CheckpointingConfig("every"))
    # compiled kernels fuse and reorder fp32 arithmetic: a looser tolerance than eager recomputation
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
