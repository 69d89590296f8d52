"""From a model config to the teacher (optionally on the meta device) and the edited model."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ascend_edit.config import ModelConfig, TargetConfig
from ascend_edit.models.loading import TORCH_DTYPES, build_from_config, check_supported, load_teacher
from ascend_edit.models.surgery import build_plan, edit_model

log = logging.getLogger(__name__)


def shape_only_teacher(cfg: ModelConfig):
    """The teacher's modules on the meta device: shapes and counts without memory or weights."""
    if cfg.source == "smollm2":  # small, and its shapes come with the GGUF weights
        model, _ = load_teacher(cfg)
        return model
    dtype = TORCH_DTYPES[cfg.dtype]
    if cfg.source == "config":
        assert cfg.arch is not None  # ModelConfig requires it with source=config
        model = build_from_config(cfg.arch, cfg.overrides, dtype, device="meta")
    else:
        assert cfg.path is not None  # ModelConfig requires it with source=hf
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.path {path} does not exist")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        with torch.device("meta"):
            config = AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)  # never the hub
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_supported(model)
    model.set_attn_implementation(cfg.attn_implementation)
    return model


def edited_shape_model(model_cfg: ModelConfig, target_cfg: TargetConfig):
    """Edited model on the meta device (random init is shape-only there): for inspect and accounting."""
    model = shape_only_teacher(model_cfg)
    target_cfg = dataclasses.replace(target_cfg, init="random")
    n = model.config.num_hidden_layers
    if target_cfg.kind == "gate_swa" and target_cfg.gate_swa.full_by_sensitivity:
        # Sensitivities need real weights and data: the shape view keeps the count (N evenly spread layers stand
        # for the N a run measures), so KV bytes and parameters are the run's; which layers is not.
        converted = list(range(n)) if target_cfg.layers is None else sorted(target_cfg.layers)
        count = min(target_cfg.gate_swa.full_by_sensitivity, len(converted))
        placeholders = sorted({converted[(2 * i + 1) * len(converted) // (2 * count)] for i in range(count)})
        log.warning("shape view: full_by_sensitivity=%d measures its layers on data; layers %s stand in for them "
                    "(same count, so the same bytes)", count, placeholders)
        swa = dataclasses.replace(target_cfg.gate_swa, full_by_sensitivity=0, full_every=0, full_layers=placeholders)
        target_cfg = dataclasses.replace(target_cfg, gate_swa=swa)
    mla = target_cfg.mla
    weightless = any(p.is_meta for p in model.parameters())
    if target_cfg.kind == "mla" and mla.kv_budget is not None and mla.allocation != "uniform" and weightless:
        # Per-layer ranks follow the teacher's weights (and data), which a shape-only teacher does not have: the
        # uniform allocation of the same budget gives the same bytes.
        log.warning("shape view: target.mla.allocation=%s needs the teacher's weights; shown with one rank in every "
                    "layer at the same KV budget (the same bytes, not the run's per-layer ranks)", mla.allocation)
        target_cfg = dataclasses.replace(target_cfg, mla=dataclasses.replace(mla, allocation="uniform"))
    plan = build_plan(n, target_cfg)
    return edit_model(model, plan, target_cfg)
