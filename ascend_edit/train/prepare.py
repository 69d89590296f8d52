"""What every task that trains starts from: device and processes, teacher, data, plan and edited model."""
from __future__ import annotations

import json
import logging
import os
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
from ascend_edit.data.teacher_text import sample_calibration_set
from ascend_edit.device import DeviceInfo, resolve_device, seed_everything, set_cpu_threads
from ascend_edit.distributed import DistEnv
from ascend_edit.eval.passkey import check_passkey_contexts
from ascend_edit.eval.suite import check_suite_before_training
from ascend_edit.models.budget import swa_layer_scores
from ascend_edit.models.fused_layers import check_fused_ops_available, install_fused_ops
from ascend_edit.models.loading import PARTITIONED_SOURCES, TORCH_DTYPES, load_teacher
from ascend_edit.models.surgery import (
    LayerPlan,
    build_plan,
    collect_layer_stats,
    edit_model,
    plan_entries,
    plan_from_entries,
    plan_is_measured,
    plan_with_windows,
    saved_plan,
)
from ascend_edit.run_dir import MEASURED_PLAN
from ascend_edit.train.compile import apply_compile, apply_experts_implementation, compile_mode
from ascend_edit.train.stage import record_inputs

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


def set_aside_if_main(out_dir: Path, env: DistEnv) -> None:
    """`engine.resume=false`: an earlier run's outputs in `out_dir` are moved aside (rank 0), never reused."""
    from ascend_edit.run_dir import set_aside_previous_run
    from ascend_edit.train.engine import barrier

    if env.is_main:
        aside = set_aside_previous_run(out_dir)
        if aside is not None:
            log.warning("engine.resume=false: the earlier run's checkpoints and outputs in %s were moved to %s "
                        "(nothing deleted); this run starts over", out_dir, aside)
    barrier()


def prepare(cfg: RootConfig) -> Prepared | None:
    """Device and process group, teacher, data, calibration statistics, plan and edited model."""
    env = distributed.discover()
    device = resolve_device(cfg.device.type, local_rank=env.local_rank, dtype=cfg.device.dtype)
    if env.msrun_scheduler:  # msrun's scheduler process runs no training
        return None
    distributed.init_process_group(device.dist_backend, env)
    seed_everything(cfg.device.seed)
    set_cpu_threads(cfg.device.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.engine.resume:
        set_aside_if_main(out_dir, env)
    if env.is_main:  # what eval will check its teacher and data against
        record_inputs(out_dir, cfg)

    check_fused_ops_available(cfg.model.fused_ops, device_type=device.type)  # before hours of loading, not after
    zero3 = partitioned_teacher_config(cfg)
    model, tokenizer = load_teacher(cfg.model, device=device.torch_device, zero3=zero3)
    if cfg.eval.suite and tokenizer is not None:  # what would stop the end-of-run suite, before hours of training
        if cfg.eval.passkey_trials:
            check_passkey_contexts(tokenizer, cfg.eval.passkey_contexts)
        check_suite_before_training(cfg, getattr(model.config, "max_position_embeddings", None))
    if zero3 is not None:  # calibration and the first evaluations gather one module at a time
        from ascend_edit.models.zero3 import install_gathered_forward

        install_gathered_forward(model)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, model.config.vocab_size)
    eval_batches = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), cfg.eval.batch_size,
                              device.torch_device)
    calibration = calibration_batches(cfg, model, tokenizer, train_set, device.torch_device)
    sensitivity = None
    target = cfg.target
    earlier = earlier_plan(cfg, out_dir)
    if earlier is not None:  # measured when the run (or the stage-1 job) started: the trained weights follow it
        plan, source = earlier
        log.info("layer plan taken from %s (measured when that run started): %s", source,
                 [(e.layer_idx, e.kind, e.kv_lora_rank or e.window) for e in plan])
        stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
        edit_model(model, plan, target, stats, **({"gather": _gathered()} if zero3 is not None else {}))
        return _finish(cfg, device, env, model, tokenizer, train_set, eval_batches, plan, out_dir)
    if target.kind == "gate_swa" and target.gate_swa.full_by_sensitivity:
        sensitivity, _ = swa_layer_scores(model, target, calibration[:1], tokenizer)  # gate_swa.selection
    windows = None
    if target.kind == "gate_swa" and target.gate_swa.kv_budget is not None and target.gate_swa.windows:
        target, windows = gate_swa_windows_target_for_budget(model, target, calibration[:1], tokenizer)
    elif target.kind == "gate_swa" and target.gate_swa.kv_budget is not None:
        target = gate_swa_target_for_budget(model, target, calibration[:1], tokenizer)
    plan = build_plan(model.config.num_hidden_layers, target, sensitivity)
    if windows is not None:  # each layer's own window, saved with the plan (save_converted, report.json)
        plan = plan_with_windows(plan, windows)
    stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
    if cfg.target.kind == "mla" and cfg.target.mla.kv_budget and cfg.target.mla.allocation == "sensitivity":
        from ascend_edit.models.budget import plan_with_ranks, sensitivity_allocation  # measured per-layer ranks

        layers = [e.layer_idx for e in plan if e.kind == "mla"]
        stats = stats or collect_layer_stats(model, calibration)
        plan = plan_with_ranks(plan, sensitivity_allocation(model, layers, stats, cfg.target, calibration[:1]).ranks)
    if zero3 is not None:  # one teacher attention whole at a time while its target is built and warm-started
        from ascend_edit.models.zero3 import gathered

        edit_model(model, plan, target, stats, gather=gathered)
    else:
        edit_model(model, plan, target, stats)
    if plan_is_measured(cfg.target) and env.is_main:  # as built: edit_model adds the ranks / rotary choices it made
        write_measured_plan(out_dir, getattr(model, "edit_plan", plan))
    return _finish(cfg, device, env, model, tokenizer, train_set, eval_batches, plan, out_dir)


def _gathered():
    from ascend_edit.models.zero3 import gathered

    return gathered


def _finish(cfg: RootConfig, device, env, model, tokenizer, train_set, eval_batches, plan, out_dir) -> Prepared:
    # Teacher and student share every non-attention module, so one swap serves both (NPU only by default).
    install_fused_ops(model, cfg.model.fused_ops, device_type=device.type)
    apply_experts_implementation(cfg.engine.experts_implementation, model)
    apply_compile(compile_mode(cfg.engine.compile, device.type, model), model)
    return Prepared(device, env, model, tokenizer, train_set, eval_batches, plan, out_dir)


def earlier_plan(cfg: RootConfig, out_dir: Path) -> tuple[list[LayerPlan], Path] | None:
    """A measured plan (models/surgery.plan_is_measured) this run goes on from: the one saved by the stage-1
    job `distill.init_from` names, or on a resume the one saved in this run's directory."""
    if not plan_is_measured(cfg.target):
        return None
    if cfg.distill.init_from:
        from ascend_edit.validation import init_from_directory

        return saved_plan([init_from_directory(cfg.distill.init_from)])
    if cfg.engine.resume:
        return saved_plan(out_dir / name for name in ("stage-layerwise", "converted")) or read_measured_plan(out_dir)
    return None


def write_measured_plan(out_dir: Path, plan: list[LayerPlan]) -> None:
    """Save the plan measured at the start, before stage 1 trains under it (written whole, then renamed in)."""
    tmp = out_dir / f"{MEASURED_PLAN}.tmp"
    tmp.write_text(json.dumps({"plan": plan_entries(plan)}))
    os.replace(tmp, out_dir / MEASURED_PLAN)


def read_measured_plan(out_dir: Path) -> tuple[list[LayerPlan], Path] | None:
    """The plan `write_measured_plan` saved in this run directory, or None when there is none. A damaged one is
    refused: measuring again could choose another plan for the weights trained so far."""
    path = out_dir / MEASURED_PLAN
    if not path.is_file():
        return None
    try:
        return plan_from_entries(json.loads(path.read_text())["plan"]), path
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}): the run's checkpoints were trained under "
                         "the layer plan it held; restore it, or start over with engine.resume=false") from None


def calibration_batches(cfg: RootConfig, model: nn.Module, tokenizer: Any, train_set, device: torch.device
                        ) -> list[dict]:
    """The warm start's calibration batches: the first training sequences, or (target.calibration_source=teacher)
    as many sequences sampled from the teacher."""
    sequences = cfg.target.calibration_batches * cfg.eval.batch_size
    if cfg.target.calibration_source == "teacher" and sequences:
        source = sample_calibration_set(model, tokenizer, sequences, cfg.data.seq_len, cfg.device.seed)
    else:
        source = train_set
    return batches_of(source, range(min(sequences, len(source))), cfg.eval.batch_size, device)


def partitioned_teacher_config(cfg: RootConfig) -> dict | None:
    """The ZeRO-3 config to build the teacher partitioned with (models/zero3.py), or None to load it whole.

    Partitioned when the run's first engine is DeepSpeed ZeRO-3 and everything before it touches the teacher
    one layer at a time: calibration forwards and per-layer surgery (MLA or GateSWA with fixed ranks and
    full layers). Choices that read every layer's weights at once (KV budgets, sensitivity-chosen layers),
    identity targets (a deep copy of the attention) load it whole, as before; so do tasks other than `convert`.
    A stage-2-only run loads its saved weights into the partitions one tensor at a time
    (models/checkpoint.py `load_converted_weights`)."""
    engine, target, distill = cfg.engine, cfg.target, cfg.distill
    whole_layers_at_once = (target.kind == "identity" or target.mla.kv_budget is not None
                            or (target.kind == "gate_swa" and (target.gate_swa.full_by_sensitivity > 0
                                                               or target.gate_swa.kv_budget is not None)))
    first_engine_takes_it = ((distill.stage in ("layerwise", "both") and distill.layerwise.steps > 0)
                             or (distill.stage in ("model_level", "both") and distill.model_level.steps > 0))
    if (cfg.task != "convert" or engine.kind != "deepspeed" or engine.zero_stage != 3
            or cfg.model.source not in PARTITIONED_SOURCES or whole_layers_at_once or not first_engine_takes_it):
        return None
    from ascend_edit.models.zero3 import zero3_init_config

    return zero3_init_config(TORCH_DTYPES[cfg.model.dtype], offload_params=engine.offload_params)


def gate_swa_target_for_budget(model: torch.nn.Module, target: TargetConfig, batches: list[dict],
                               tokenizer=None) -> TargetConfig:
    """`target` with `gate_swa.full_layers` chosen by measured sensitivity under `gate_swa.kv_budget`."""
    from ascend_edit.models.budget import gate_swa_for_budget

    swa = target.gate_swa
    assert swa.kv_budget is not None
    try:
        chosen, _ = gate_swa_for_budget(cast(PreTrainedModel, model), target, batches, swa.kv_budget,
                                        swa.kv_budget_context, tokenizer)
    except ValueError as err:  # a budget below what all-sliding layers hold
        raise ConfigError(f"target.gate_swa.kv_budget={swa.kv_budget}: {err}") from err
    log.info("gate_swa: full layers %s under %.1f %% of the teacher's KV at %d tokens (over the %s)",
             chosen.full_layers, 100 * swa.kv_budget, swa.kv_budget_context,
             "converted layers" if target.layers is not None else "layers")
    return replace(target, gate_swa=chosen)


def gate_swa_windows_target_for_budget(model: torch.nn.Module, target: TargetConfig, batches: list[dict],
                                       tokenizer=None) -> tuple[TargetConfig, dict[int, int]]:
    """(`target` with the explicit `full_layers`, {layer: window, 0 = full}): each layer's attention chosen
    among full and `gate_swa.windows` by measured cost under `gate_swa.kv_budget` (models/budget.py)."""
    from ascend_edit.models.budget import gate_swa_windows_for_budget

    swa = target.gate_swa
    assert swa.kv_budget is not None and swa.windows
    try:
        chosen, allocation = gate_swa_windows_for_budget(cast(PreTrainedModel, model), target, batches,
                                                         swa.kv_budget, swa.kv_budget_context, tokenizer)
    except ValueError as err:  # a budget below what all layers at the smallest window hold
        raise ConfigError(f"target.gate_swa.kv_budget={swa.kv_budget}: {err}") from err
    log.info("gate_swa: per-layer windows %s (0 = full) under %.1f %% of the teacher's KV at %d tokens "
             "(%d of %d tokens held)", list(allocation.windows.values()), 100 * swa.kv_budget,
             swa.kv_budget_context, allocation.tokens, allocation.budget_tokens)
    return replace(target, gate_swa=chosen), allocation.windows
