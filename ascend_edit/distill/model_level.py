"""Stage 2: model-level distillation of the free-running converted model on the teacher's outputs.

The teacher pass (all attentions in teacher mode, no gradient) gives final hidden states; the
student pass (targets) gives its own. The KL between next-token distributions is computed from
hidden states and the LM head in token chunks, so [tokens x vocab] tensors never exist whole.
Optional terms: cosine feature matching on chosen layers (weak), cross-entropy on the data.
"""
from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ascend_edit.config import ModelLevelConfig
from ascend_edit.distill.chunked_kd import KDKind, ce_loss, kd_logits_loss
from ascend_edit.distill.losses import feature_cosine_loss
from ascend_edit.models.surgery import edited_attentions, set_mode, shared_trained


class ModelLevelObjective:
    def __init__(self, kl: str = "forward", temperature: float = 1.0, top_k: int | None = None,
                 chunk_size: int = 1024, feature_weight: float = 0.0, feature_layers: list[int] | None = None,
                 ce_weight: float = 0.0, teacher: nn.Module | None = None, compile_kd: bool = True):
        """`teacher`: a separate frozen copy for runs that also train shared (non-attention) weights;
        without it the teacher pass runs the same model with every attention in teacher mode.
        `compile_kd`: the KD chunk math compiled where `chunked_kd.use_fused_kd` allows (False: eager
        everywhere, as `engine.compile=off` asks)."""
        self.teacher, self.compile_kd = teacher, compile_kd
        self.kl, self.temperature, self.top_k, self.chunk_size = kl, temperature, top_k, chunk_size
        self.feature_weight, self.feature_layers, self.ce_weight = feature_weight, feature_layers or [], ce_weight

    def _hidden(self, model: nn.Module, batch: dict, want_states: bool):
        out = model.get_submodule("model")(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                           use_cache=False, output_hidden_states=want_states)
        states = None
        if want_states:  # hidden_states[i + 1] is the output of layer i
            layers = self.feature_layers or sorted(m.layer_idx for m in edited_attentions(model))
            states = [out.hidden_states[i + 1] for i in layers]
        return out.last_hidden_state, states

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        want_states = self.feature_weight > 0
        with torch.no_grad():
            teacher = self.teacher if self.teacher is not None else model
            set_mode(teacher, "teacher")
            teacher_hidden, teacher_states = self._hidden(teacher, batch, want_states)
        set_mode(model, "student")
        student_hidden, student_states = self._hidden(model, batch, want_states)
        weight = _lm_head_weight(model)
        # fp32 master norms (trainable=target+norms) give an fp32 hidden state under autocast: match the head.
        student_hidden = student_hidden.to(weight.dtype)
        teacher_weight = None if self.teacher is None else _lm_head_weight(self.teacher)
        mask = batch["loss_mask"]
        kind = cast(KDKind, self.kl)  # one of KD_KINDS: checked by ModelLevelConfig
        kd = kd_logits_loss(student_hidden, teacher_hidden, weight, kind=kind, temperature=self.temperature,
                            top_k=self.top_k, chunk_size=self.chunk_size, mask=mask,
                            teacher_lm_head_weight=teacher_weight, fused=None if self.compile_kd else False)
        loss, metrics = kd, {"kd": float(kd.detach())}
        if want_states:
            feat = feature_cosine_loss(student_states, teacher_states, mask=mask)
            loss = loss + self.feature_weight * feat
            metrics["feature"] = float(feat.detach())
        if self.ce_weight > 0:
            # logits[t] predicts input_ids[t + 1]; loss_mask drops document ends and the wrap-around.
            targets = torch.roll(batch["input_ids"], -1, dims=1).masked_fill(~mask, -100)
            ce = ce_loss(student_hidden, weight, targets, chunk_size=self.chunk_size)
            loss = loss + self.ce_weight * ce
            metrics["ce"] = float(ce.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics


def _lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The output embedding of a transformers CausalLM (nn.Module's typing cannot know it is one)."""
    return cast(PreTrainedModel, model).get_output_embeddings().weight


class _NoTarget(nn.Module):
    """Stands in for the targets in a frozen teacher copy: the copy only ever runs its teacher path."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this is the frozen teacher copy of a stage 2 that trains shared weights: "
                           "it holds no target attention (run it with set_mode(copy, 'teacher'))")


def frozen_teacher(model: nn.Module, stage: ModelLevelConfig) -> nn.Module | None:
    """A separate frozen teacher when stage 2 trains shared weights (norms or all): otherwise the
    teacher pass would run on weights that move. Only the weights the stage trains are copied; every
    frozen weight (teacher attentions, and with `target+norms` the MLPs, a MoE teacher's experts, the
    embeddings) is the same tensor in both, and the target attentions are left out (never run in teacher
    mode). With `target+norms` the copy is the norms alone, not a second model."""
    if stage.trainable == "target":
        return None
    attentions = edited_attentions(model)
    targets = [module.target for module in attentions]
    stand_in = _NoTarget()
    trained = {id(param) for param in shared_trained(model, stage.trainable)}
    # deepcopy's memo: a tensor found there is taken as its own copy, i.e. shared with the copy
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in trained}
    try:
        for module in attentions:  # left out of the copy; put back below
            module.target = stand_in
        # frozen throughout: the copies, and the shared weights, which this stage never trains
        teacher = copy.deepcopy(model, memo=shared).requires_grad_(False).eval()
    finally:
        for module, target in zip(attentions, targets):
            module.target = target
    set_mode(teacher, "teacher")
    return teacher


def model_level_objective(model: nn.Module, stage: ModelLevelConfig, compile_kd: bool = True) -> ModelLevelObjective:
    """Stage 2's objective for `model` as `stage` configures it (with a frozen teacher copy where needed);
    `compile_kd=False` (`engine.compile=off`) keeps the KD loss eager."""
    return ModelLevelObjective(stage.kl, stage.temperature, stage.top_k, stage.chunk_size, stage.feature_weight,
                               list(stage.feature_layers), stage.ce_weight, teacher=frozen_teacher(model, stage),
                               compile_kd=compile_kd)
