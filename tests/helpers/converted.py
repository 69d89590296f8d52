"""A tiny teacher converted to a target in place: the starting point of the decode and attention tests."""
from __future__ import annotations

from torch import nn

from ascend_edit.config import TargetConfig
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model


def converted_tiny(cfg: TargetConfig, family: str = "qwen3") -> nn.Module:
    """`tiny_model(family)` with every layer's attention replaced per `cfg`, in eval mode."""
    model = tiny_model(family)
    edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg)
    return model.eval()
