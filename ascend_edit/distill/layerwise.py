"""Stage 1: layer-wise, teacher-forced activation matching.

One forward per batch runs the teacher path through the whole network (every layer sees teacher
hidden states); each converted layer's target computes its output from the same input, and its
loss against the teacher's attention output is summed over layers. Layers never feed each other
errors, so all of them train together from a cold start. The LM head is never evaluated.
"""
from __future__ import annotations

import torch
from torch import nn

from ascend_edit.distill.losses import activation_loss
from ascend_edit.models.surgery import edited_attentions, set_mode


class LayerwiseObjective:
    """(model, batch) -> (loss, metrics) with per-layer losses under `layer/<idx>`."""

    def __init__(self, loss: str = "nmse"):
        self.loss = loss

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        set_mode(model, "both")
        model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        losses, metrics = [], {}
        for module in edited_attentions(model):
            student, teacher = module.pair
            layer_loss = activation_loss(student, teacher, self.loss)
            losses.append(layer_loss)
            metrics[f"layer/{module.layer_idx}"] = float(layer_loss.detach())
            module.pair = None  # drop the references: the graph lives on through `losses`
        if not losses:
            raise RuntimeError("stage 1 needs at least one converted layer")
        loss = torch.stack(losses).mean()
        metrics["loss"] = float(loss.detach())
        return loss, metrics
