"""The edited model a torch-engine or DeepSpeed stage checkpoint was trained on, with its trained weights.

A stage checkpoint (`<run>/checkpoints/step-<stage>-<n>/`) holds the trainable weights only: the model is
rebuilt from the run's saved config (`.hydra/config.yaml`) and teacher, then those weights go on top.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ascend_edit.config import RootConfig, to_typed
from ascend_edit.device import seed_everything
from ascend_edit.models.checkpoint import RUN_CANDIDATES
from ascend_edit.models.loading import TORCH_DTYPES, load_teacher
from ascend_edit.models.surgery import LayerPlan, build_plan, edit_model, plan_is_measured, saved_plan, set_mode
from ascend_edit.run_dir import saved_run_config
from ascend_edit.train.checkpoint_io import read_trainable_weights


def _run_config(run_dir: Path) -> RootConfig:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        raise FileNotFoundError(f"{saved} is missing: a stage checkpoint is rebuilt from its run's saved config")
    raw = saved_run_config(run_dir)  # relative teacher paths against where the run was started
    raw.output_dir = str(run_dir)  # saved as an interpolation into Hydra's runtime, unset here
    merged = OmegaConf.merge(OmegaConf.structured(RootConfig), raw)
    assert isinstance(merged, DictConfig)  # merged onto RootConfig's schema
    return to_typed(merged)


def _run_plan(cfg: RootConfig, run_dir: Path, num_layers: int) -> list[LayerPlan]:
    if plan_is_measured(cfg.target):
        # The plan came from data measured when the run started (full layers, windows, ranks, rotary
        # frequencies): a rebuild measuring without that data would choose otherwise, with the same or other
        # shapes. Take the one the run saved, which holds each layer's kind and its rank / window (plan_entries).
        found = saved_plan(run_dir / name for name in RUN_CANDIDATES)
        if found is None:
            raise NotImplementedError("this run chose its plan (full layers, windows, ranks or rotary frequencies) on "
                                      f"measured data and has saved no converted model yet ({' / '.join(RUN_CANDIDATES)}): "
                                      "its plan is unknown")
        return found[0]
    return build_plan(num_layers, cfg.target)


def rebuild_from_engine_checkpoint(checkpoint: Path, dtype: torch.dtype | None = None):
    """(edited model in student mode, tokenizer) with the weights of a stage checkpoint, in `dtype` (None:
    the run's model.dtype). The model is built in that dtype before the fp32 trained weights go in: built in
    a narrower run dtype and widened afterwards, an fp32 export would hold their bf16 rounding."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent  # <run>/checkpoints/step-<stage>-<n>
    cfg = _run_config(run_dir)
    seed_everything(cfg.device.seed)  # as the convert task did before building the teacher (config source)
    model_cfg = cfg.model
    if dtype is not None:
        model_cfg = dataclasses.replace(model_cfg, dtype=next(k for k, v in TORCH_DTYPES.items() if v == dtype))
    model, tokenizer = load_teacher(model_cfg)
    plan = _run_plan(cfg, run_dir, model.config.num_hidden_layers)
    edit_model(model, plan, dataclasses.replace(cfg.target, init="random"))
    trained = read_trainable_weights(checkpoint)  # torch engine or any ZeRO stage, consolidated
    own = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(own))
    if unknown:
        raise ValueError(f"{checkpoint}: weights {unknown[:4]} do not exist in the model its run config builds")
    if not any(".self_attn.target." in name for name in trained):
        raise ValueError(f"{checkpoint}: holds no target weights")
    mismatched = [f"{name} {tuple(value.shape)} vs {tuple(own[name].shape)}" for name, value in trained.items()
                  if value.shape != own[name].shape]
    if mismatched:
        raise ValueError(f"{checkpoint}: weight shapes differ from the model its run's saved config builds "
                         f"({', '.join(mismatched[:3])}): was {run_dir / '.hydra' / 'config.yaml'} changed?")
    with torch.no_grad():
        for name, value in trained.items():
            own[name].copy_(value)
    set_mode(model, "student")
    return model.eval(), tokenizer
