"""Per-layer sensitivity to sliding-window attention, for choosing which layers stay full.

Each layer in turn runs its sliding-window target (warm-started, so the only change is the
window) while every other layer runs the teacher; the KL to the teacher on calibration batches is
that layer's sensitivity. Layers are restored to the teacher afterwards.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ascend_edit.config import TargetConfig
from ascend_edit.models.surgery import build_plan, decoder_layers, edit_model, edited_attentions, set_mode


@torch.no_grad()
def swa_sensitivity(model: nn.Module, cfg: TargetConfig, batches: list[dict]) -> list[float]:
    num_layers = model.config.num_hidden_layers
    all_sliding = dataclasses.replace(cfg, init="warm", gate_swa=dataclasses.replace(
        cfg.gate_swa, full_by_sensitivity=0, full_every=0, full_layers=[]))
    edit_model(model, build_plan(num_layers, all_sliding), all_sliding)
    modules = {m.layer_idx: m for m in edited_attentions(model)}
    scores = [0.0] * num_layers
    try:
        for batch in batches:
            kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            set_mode(model, "teacher")
            reference = F.log_softmax(model(**kwargs).logits.float(), -1)
            for idx, module in modules.items():
                module.mode = "student"
                logp = F.log_softmax(model(**kwargs).logits.float(), -1)
                scores[idx] += float(F.kl_div(logp, reference, log_target=True, reduction="batchmean"))
                module.mode = "teacher"
    finally:
        for layer in decoder_layers(model):  # back to the untouched teacher
            layer.self_attn = layer.self_attn.teacher if hasattr(layer.self_attn, "teacher") else layer.self_attn
    return scores
