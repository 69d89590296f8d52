"""EditedAttention: one layer's frozen teacher attention and its learnable target, side by side.

Modes (set for the whole model by `models.surgery.set_mode`):
* teacher — run the teacher attention only (the original model, exactly);
* student — run the target only (the converted model);
* both    — run the teacher (its output continues down the network, so every later layer sees
            teacher hidden states: teacher forcing for free) and also run the target on the same
            input, keeping both outputs for the layer-wise loss of stage 1.

Only attention is duplicated; every other weight of the model is shared by both paths.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("teacher", "student", "both")


class EditedAttention(nn.Module):
    def __init__(self, teacher: nn.Module, target: nn.Module, layer_idx: int):
        super().__init__()
        self.teacher = teacher
        self.target = target
        self.layer_idx = layer_idx
        self.mode = "student"
        # (target output, teacher output) of the last `both` forward; read by the stage-1 objective.
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        if self.mode == "teacher":
            return self.teacher(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        if self.mode == "student":
            return self.target(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        with torch.no_grad():
            teacher_out, weights = self.teacher(hidden_states, position_embeddings, attention_mask, **kwargs)
        # The input is the teacher's hidden state: the target's loss must not reach earlier layers.
        target_out, _ = self.target(hidden_states.detach(), position_embeddings, attention_mask, **kwargs)
        self.pair = (target_out, teacher_out)
        return teacher_out, weights
