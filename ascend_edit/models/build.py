"""From a model config to the teacher (optionally on the meta device) and the edited model."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ascend_edit.config import ModelConfig, TargetConfig
from ascend_edit.models.budget import full_layers_for_budget, windows_for_budget
from ascend_edit.models.loading import TORCH_DTYPES, build_from_config, check_supported, load_teacher
from ascend_edit.models.surgery import build_plan, edit_model, plan_with_windows

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
    windows: dict[int, int] | None = None
    if target_cfg.kind == "gate_swa":
        target_cfg, windows = _shape_view_gate_swa(target_cfg, n)
    mla = target_cfg.mla
    weightless = any(p.is_meta for p in model.parameters())
    if target_cfg.kind == "mla" and mla.kv_budget is not None and mla.allocation != "uniform" and weightless:
        # Per-layer ranks follow the teacher's weights (and data), which a shape-only teacher does not have: the
        # uniform allocation of the same budget gives the same bytes.
        log.warning("shape view: target.mla.allocation=%s needs the teacher's weights; shown with one rank in every "
                    "layer at the same KV budget (the same bytes, not the run's per-layer ranks)", mla.allocation)
        target_cfg = dataclasses.replace(target_cfg, mla=dataclasses.replace(mla, allocation="uniform"))
    plan = build_plan(n, target_cfg)
    if windows is not None:
        plan = plan_with_windows(plan, windows)
    return edit_model(model, plan, target_cfg)


def _spread(layers: list[int], count: int) -> list[int]:
    """`count` of `layers`, evenly spaced: stand-ins for layers a run would choose by measurement."""
    return sorted({layers[(2 * i + 1) * len(layers) // (2 * count)] for i in range(count)}) if count else []


def _shape_view_gate_swa(target_cfg: TargetConfig, num_layers: int) -> tuple[TargetConfig, dict[int, int] | None]:
    """GateSWA choices that a run measures on data (which layers stay full, each layer's window), replaced by
    stand-ins with the run's count and budget, so a shape view shows the bytes a conversion would hold."""
    swa = target_cfg.gate_swa
    converted = list(range(num_layers)) if target_cfg.layers is None else sorted(target_cfg.layers)
    windows = None
    if swa.full_by_sensitivity:
        full = _spread(converted, min(swa.full_by_sensitivity, len(converted)))
        log.warning("shape view: full_by_sensitivity=%d measures its layers on data; layers %s stand in for them "
                    "(same count, so the same bytes)", len(full), full)
    elif swa.kv_budget is not None and not swa.windows:
        # Every full layer costs the same, so the count the budget pays for does not depend on which layers.
        count = len(full_layers_for_budget([0.0] * num_layers, swa.kv_budget, swa.kv_budget_context, swa.window,
                                           swa.sink_tokens, converted))
        full = _spread(converted, count)
        log.warning("shape view: kv_budget=%s keeps the %d layers a run measures as most sensitive full; layers %s "
                    "stand in for them (same count, so the same bytes)", swa.kv_budget, count, full)
    elif swa.kv_budget is not None:
        # Each layer's window follows its measured cost; with one cost for every layer the knapsack spends the
        # same budget, so the bytes are at most the budget's, as a run's are.
        costs = {i: {w: 1.0 / w for w in swa.windows} for i in converted}
        allocation = windows_for_budget(costs, swa.kv_budget, swa.kv_budget_context, swa.sink_tokens)
        windows, full = allocation.windows, allocation.full_layers
        log.warning("shape view: kv_budget=%s with windows=%s chooses each layer's window on data; shown with an "
                    "allocation of the same budget as if every layer were equally sensitive (%.1f %% of the "
                    "teacher's KV at %d tokens, as a run holds at most %.1f %%)", swa.kv_budget, list(swa.windows),
                    100 * allocation.kv_fraction, swa.kv_budget_context, 100 * swa.kv_budget)
    else:
        return target_cfg, None
    swa = dataclasses.replace(swa, full_by_sensitivity=0, full_every=0, kv_budget=None, windows=[],
                              full_layers=full)
    return dataclasses.replace(target_cfg, gate_swa=swa), windows
