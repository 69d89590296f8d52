"""What every task that trains starts from: device and processes, teacher, data, plan and edited model."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ascend_edit import distributed
from ascend_edit.config import ConfigError, RootConfig, TargetConfig
from ascend_edit.data.batches import PackedSequences, batches_of
from ascend_edit.data.loading import load_data
from ascend_edit.device import DeviceInfo, resolve_device, seed_everything
from ascend_edit.distributed import DistEnv
from ascend_edit.models.fused_layers import install_fused_ops
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.sensitivity import swa_sensitivity
from ascend_edit.models.surgery import LayerPlan, build_plan, collect_layer_stats, edit_model
from ascend_edit.train.compile import apply_compile, apply_experts_implementation, compile_mode

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every task that trains needs: device, processes, the edited model and its data."""

    device: DeviceInfo
    env: DistEnv
    model: nn.Module
    tokenizer: Any  # the teacher's tokenizer; None for a teacher built from a config alone
    train_set: PackedSequences
    eval_batches: list[dict]
    plan: list[LayerPlan]
    out_dir: Path


def prepare(cfg: RootConfig) -> Prepared | None:
    """Device and process group, teacher, data, calibration statistics, plan and edited model."""
    env = distributed.discover()
    device = resolve_device(cfg.device.type, local_rank=env.local_rank, dtype=cfg.device.dtype)
    if env.msrun_scheduler:  # msrun's scheduler process runs no training
        return None
    distributed.init_process_group(device.dist_backend, env)
    seed_everything(cfg.device.seed)
    if cfg.device.threads:
        torch.set_num_threads(cfg.device.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, model.config.vocab_size)
    eval_batches = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), cfg.eval.batch_size,
                              device.torch_device)
    calibration = batches_of(train_set, range(min(cfg.target.calibration_batches * cfg.eval.batch_size,
                                                  len(train_set))), cfg.eval.batch_size, device.torch_device)
    sensitivity = None
    target = cfg.target
    if target.kind == "gate_swa" and target.gate_swa.full_by_sensitivity:
        sensitivity = swa_sensitivity(model, target, calibration[:1])
    if target.kind == "gate_swa" and target.gate_swa.kv_budget is not None:
        target = gate_swa_target_for_budget(model, target, calibration[:1])
    plan = build_plan(model.config.num_hidden_layers, target, sensitivity)
    stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
    if cfg.target.kind == "mla" and cfg.target.mla.kv_budget and cfg.target.mla.allocation == "sensitivity":
        from ascend_edit.models.budget import plan_with_ranks, sensitivity_allocation  # measured per-layer ranks

        layers = [e.layer_idx for e in plan if e.kind == "mla"]
        stats = stats or collect_layer_stats(model, calibration)
        plan = plan_with_ranks(plan, sensitivity_allocation(model, layers, stats, cfg.target, calibration[:1]).ranks)
    edit_model(model, plan, target, stats)
    # Teacher and student share every non-attention module, so one swap serves both (NPU only by default).
    install_fused_ops(model, cfg.model.fused_ops, device_type=device.type)
    apply_experts_implementation(cfg.engine.experts_implementation, model)
    apply_compile(compile_mode(cfg.engine.compile, device.type, model), model)
    return Prepared(device, env, model, tokenizer, train_set, eval_batches, plan, out_dir)


def gate_swa_target_for_budget(model: torch.nn.Module, target: TargetConfig, batches: list[dict]) -> TargetConfig:
    """`target` with `gate_swa.full_layers` chosen by measured sensitivity under `gate_swa.kv_budget`."""
    from ascend_edit.models.budget import gate_swa_for_budget

    swa = target.gate_swa
    assert swa.kv_budget is not None
    try:
        chosen, _ = gate_swa_for_budget(cast(PreTrainedModel, model), target, batches, swa.kv_budget,
                                        swa.kv_budget_context)
    except ValueError as err:  # a budget below what all-sliding layers hold
        raise ConfigError(f"target.gate_swa.kv_budget={swa.kv_budget}: {err}") from err
    log.info("gate_swa: full layers %s under %.1f %% of the teacher's KV at %d tokens", chosen.full_layers,
             100 * swa.kv_budget, swa.kv_budget_context)
    return replace(target, gate_swa=chosen)
