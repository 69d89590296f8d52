"""Stage 1: layer-wise, teacher-forced activation matching.

One forward per batch runs the teacher path through the whole network (every layer sees teacher
hidden states); each converted layer's target computes its output from the same input, and its
loss against the teacher's is summed over layers. Layers never feed each other errors, so all of
them train together from a cold start. The LM head is never evaluated.

What is matched (`match`):
* "attention" — the attention output (cheapest; the default);
* "block"     — the decoder block output, `h + a + mlp(norm(h + a))`, with the layer's own frozen
                MLP applied to both the teacher's and the target's attention output: errors that the
                MLP amplifies weigh more, errors it ignores weigh less.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from ascend_edit.distill.losses import ActivationLossKind, activation_loss
from ascend_edit.models.surgery import decoder_layers, edited_attentions, set_mode

MATCHES = ("attention", "block")


@contextmanager
def _layer_inputs(model: nn.Module, layer_ids: set[int]):
    """Record each chosen decoder layer's input residual stream (detached) during a forward."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(decoder_layers(model)):
        if idx in layer_ids:
            def hook(module, args, kwargs, idx=idx):
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs[idx] = hidden.detach()
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _block_output(layer: nn.Module, residual: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
    hidden = residual + attention_out
    mlp_out = layer.get_submodule("mlp")(layer.get_submodule("post_attention_layernorm")(hidden))
    if isinstance(mlp_out, tuple):  # some MoE blocks also return router logits
        mlp_out = mlp_out[0]
    return hidden + mlp_out


class LayerwiseObjective:
    """(model, batch) -> (loss, metrics) with per-layer losses under `layer/<idx>`."""

    def __init__(self, loss: str = "nmse", match: str = "attention"):
        if match not in MATCHES:
            raise ValueError(f"match={match!r} is not one of {MATCHES}")
        self.match = match
        self.loss = cast(ActivationLossKind, loss)  # one of ACTIVATION_LOSS_KINDS: checked by LayerwiseConfig

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        set_mode(model, "both")
        modules = edited_attentions(model)
        if not modules:
            raise RuntimeError("stage 1 needs at least one converted layer")
        wanted = {m.layer_idx for m in modules} if self.match == "block" else set()
        with _layer_inputs(model, wanted) as residuals:
            model.get_submodule("model")(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False)
        layers = decoder_layers(model)
        losses, metrics = [], {}
        for module in modules:
            assert module.pair is not None  # set by the forward above ("both" mode)
            student, teacher = module.pair
            module.pair = None  # drop the references: the graph lives on through `losses`
            if self.match == "block":
                layer, residual = layers[module.layer_idx], residuals[module.layer_idx]
                with torch.no_grad():
                    teacher = _block_output(layer, residual, teacher)
                student = _block_output(layer, residual, student)
            layer_loss = activation_loss(student, teacher, self.loss)
            losses.append(layer_loss)
            metrics[f"layer/{module.layer_idx}"] = float(layer_loss.detach())
        loss = torch.stack(losses).mean()
        metrics["loss"] = float(loss.detach())
        return loss, metrics
