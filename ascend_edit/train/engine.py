"""Optimisation engines: plain PyTorch, or DeepSpeed ZeRO (the only module that imports deepspeed).

Both take the trainable parameters only — the teacher and every frozen shared weight stay out of
the optimizer — and expose the same small surface to the train loop: `backward`, `step`, `lr`,
`save` / `load`.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ascend_edit.config import EngineConfig, StageConfig
from ascend_edit.device import DeviceInfo
from ascend_edit.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


def _optimizer_and_schedule(params: list[nn.Parameter], stage: StageConfig):
    if not params:
        raise ValueError("no trainable parameters: check the trainable policy and the plan")
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95))
    schedule = functools.partial(warmup_cosine, total_steps=stage.steps, warmup_steps=stage.warmup_steps,
                                 min_lr_ratio=stage.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class TorchEngine:
    """Single-process AdamW with gradient accumulation and clipping."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], stage: StageConfig, cfg: EngineConfig,
                 accumulation: int):
        self.model, self.params, self.cfg, self.accumulation = model, params, cfg, accumulation
        self.optimizer, self.scheduler = _optimizer_and_schedule(params, stage)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def micro_step(self) -> None:
        """Gradients accumulate until `step`."""

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip) if self.cfg.grad_clip > 0 else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {"params": {names[id(p)]: p.detach().cpu() for p in self.params},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                own[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path, extra: dict) -> None:
        torch.save({"engine": self.state_dict(), **extra}, directory / "state.pt")

    def load(self, directory: Path) -> dict:
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
        self.load_state_dict(state.pop("engine"))
        return state


def deepspeed_config(cfg: EngineConfig, stage: StageConfig, micro_batch: int, accumulation: int,
                     world_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config rendered from the engine and stage configs."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the train loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 with a torch AdamW (no JIT-built ops) and our LR schedule."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], stage: StageConfig, cfg: EngineConfig,
                 accumulation: int, micro_batch: int, world_size: int, device: DeviceInfo):
        if device.type == "npu":
            os.environ.setdefault("DS_ACCELERATOR", "npu")
        import deepspeed

        optimizer, scheduler = _optimizer_and_schedule(params, stage)
        config = deepspeed_config(cfg, stage, micro_batch, accumulation, world_size, device.autocast_dtype)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.params = params

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed scales by 1/accumulation itself

    def step(self) -> float:
        # DeepSpeed counts micro-steps; the loop calls `step` once per micro-batch through `micro_step`.
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def micro_step(self) -> None:
        self.engine.step()

    def save(self, directory: Path, extra: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag="engine", client_state=extra)

    def load(self, directory: Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(directory), tag="engine")
        return client_state or {}


def make_engine(model, params, stage: StageConfig, cfg: EngineConfig, *, accumulation: int, micro_batch: int,
                world_size: int, device: DeviceInfo):
    if cfg.kind == "deepspeed":
        return DeepSpeedEngine(model, params, stage, cfg, accumulation, micro_batch, world_size, device)
    if world_size > 1:
        raise ValueError("engine=torch runs in one process; use engine=zero0..zero3 under a launcher")
    return TorchEngine(model, params, stage, cfg, accumulation)


class CheckpointDir:
    """Atomic, rotating checkpoints: write into `<name>.tmp`, rename when complete, keep the last K."""

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def _complete(self) -> list[Path]:
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-") and
                 not p.name.endswith(".tmp")]
        return sorted(found, key=lambda p: (p.name.split("-")[1], int(p.name.split("-")[2])))

    def latest(self, stage: str) -> Path | None:
        mine = [p for p in self._complete() if p.name.split("-")[1] == stage]
        return mine[-1] if mine else None

    def save(self, engine, stage: str, step: int, extra: dict, is_main: bool) -> Path:
        final = self.root / f"step-{stage}-{step}"
        tmp = self.root / f"step-{stage}-{step}.tmp"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save(tmp, extra)
        _barrier()
        if is_main:
            os.replace(tmp, final) if not final.exists() else (shutil.rmtree(final), os.replace(tmp, final))
            for old in [p for p in self._complete() if p.name.split("-")[1] == stage][: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
