"""Activation checkpointing of decoder layers (stage 2), through transformers' own layer mechanism.

Every transformers decoder layer is a `GradientCheckpointingLayer`: once enabled, its forward runs
inside `torch.utils.checkpoint` (non-reentrant), so only the layer's input is kept for backward and
the layer is recomputed there. `activation_checkpointing_enable(every_n_layers=k)` picks every k-th
layer (layers 0, k, 2k, ...). The wrapper sits on `forward`, below `__call__`, so the regional
`torch.compile` of a whole layer (train/compile.py) traces the checkpoint as one region and a
compiled MLP/norm block is simply recomputed compiled.

Stage 1 needs none of this: the teacher path runs without gradients and only the target attentions
keep activations. In stage 2 the teacher pass runs under `no_grad` (the layers then run as they are);
the student pass is checkpointed.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

POLICIES = ("none", "every", "every_k")


@dataclass(frozen=True)
class CheckpointingConfig:
    policy: str = "none"  # none | every | every_k
    k: int = 2  # every_k: checkpoint layers 0, k, 2k, ...

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"engine.activation_checkpointing={self.policy!r} is not one of {list(POLICIES)}")
        if self.k < 1:
            raise ValueError(f"engine.activation_checkpointing_k={self.k} must be >= 1")

    @property
    def every_n_layers(self) -> int:
        """0 = off; 1 = every layer; k = every k-th layer."""
        return {"none": 0, "every": 1}.get(self.policy, self.k)


def checkpointed_layer_ids(num_layers: int, cfg: CheckpointingConfig) -> list[int]:
    """The decoder layers whose activations are recomputed (for the memory planner and logs)."""
    n = cfg.every_n_layers
    return [] if n == 0 else list(range(0, num_layers, n))


def enable(model: nn.Module, cfg: CheckpointingConfig) -> bool:
    """Turn checkpointing on for the chosen layers; returns whether anything was enabled."""
    n = cfg.every_n_layers
    if n == 0:
        return False
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"engine.activation_checkpointing={cfg.policy}: {type(model).__name__} does not support "
                         "activation checkpointing")
    hf_model = cast("PreTrainedModel", model)  # it says it supports checkpointing: a transformers model
    hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                             every_n_layers=n)
    # The helper also makes the embedding output require grad (needed by reentrant checkpoints only);
    # non-reentrant checkpoints do not need it, and it would make backward run down to the embeddings.
    hf_model.disable_input_require_grads()
    log.info("activation checkpointing: every %d layer(s)", n)
    return True


def disable(model: nn.Module) -> None:
    if getattr(model, "supports_gradient_checkpointing", False):
        cast("PreTrainedModel", model).activation_checkpointing_disable()


@contextlib.contextmanager
def checkpointing(model: nn.Module, cfg: CheckpointingConfig, active: bool = True):
    """Checkpointing on for the duration of one stage (`active=False`: a no-op, e.g. stage 1)."""
    enabled = enable(model, cfg) if active else False
    try:
        yield enabled
    finally:
        if enabled:
            disable(model)


def checkpointing_config(engine_cfg) -> CheckpointingConfig:
    """From the engine's config (`engine.activation_checkpointing`, `engine.activation_checkpointing_k`)."""
    return CheckpointingConfig(engine_cfg.activation_checkpointing, engine_cfg.activation_checkpointing_k)


def set_activation_checkpointing(model: nn.Module, cfg: CheckpointingConfig, active: bool) -> bool:
    """Switch checkpointing to what a stage wants (on per `cfg` when `active`, else off); idempotent.
    Left on after the last stage it is harmless: without gradients the layers run as they are."""
    disable(model)
    return enable(model, cfg) if active else False
