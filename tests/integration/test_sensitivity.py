"""GateSWA hybrid plans chosen by measured per-layer sensitivity, on the small trained teacher."""
from __future__ import annotations

import torch

from ascend_edit.config import GateSWAConfig, ModelConfig, TargetConfig
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.sensitivity import swa_sensitivity
from ascend_edit.models.surgery import build_plan, decoder_layers


def test_sensitivity_ranks_layers_and_leaves_the_teacher_untouched(trained_teacher):
    model, _ = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention_types = [type(layer.self_attn) for layer in decoder_layers(model)]
    ids = torch.randint(3, 40, (2, 96), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(96)[None].expand(2, -1)}
    cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=4, sink_tokens=0, full_by_sensitivity=1))

    scores = swa_sensitivity(model, cfg, [batch])

    assert len(scores) == model.config.num_hidden_layers
    assert all(s > 0 for s in scores)  # a window of 4 over 96 tokens changes every layer's output
    assert max(scores) > 1.5 * min(scores)  # and the layers really differ
    plan = build_plan(len(scores), cfg, scores)
    assert [e.layer_idx for e in plan if e.kind == "full"] == [max(range(len(scores)), key=scores.__getitem__)]
    assert [type(layer.self_attn) for layer in decoder_layers(model)] == attention_types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
