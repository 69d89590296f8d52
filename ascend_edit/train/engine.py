"""Optimisation engines: plain PyTorch, or DeepSpeed ZeRO 0-3 (this is the only module that imports deepspeed).

Both engines own one distillation stage. They are built on the model, the stage's objective and the
trainable parameters only — the teacher and every frozen shared weight stay out of the optimizer —
and give the train loop the same small surface:

    loss, metrics = engine.forward(batch)   # objective(model, batch)
    engine.backward(loss); engine.micro_step()   # once per micro-batch
    grad_norm = engine.step()               # once per optimizer step (after the last micro-batch)
    engine.save(dir) / engine.load(dir)     # trainable weights, optimizer, LR schedule
    engine.close()                          # hand the model back as a plain module

ZeRO-3 notes. While an engine lives, the model's parameters are partitioned across ranks and gathered
by DeepSpeed's module hooks. The objective runs *inside* the DeepSpeed engine's forward (the model and
objective are wrapped as one module), so a weight the objective reads directly — the LM head in the
chunked KD loss — is found by DeepSpeed's external-parameter discovery and gathered for the forward
and the backward; an extra `GatheredParameters` there would fight that bookkeeping (DeepSpeed refuses
to free a parameter its hooks hold). `close()` gathers every parameter for good and removes the hooks,
so evaluation, export and the next stage see an ordinary `nn.Module` with full weights on every rank.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ascend_edit.config import EngineConfig, StageConfig
from ascend_edit.device import DeviceInfo
from ascend_edit.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


# ----------------------------------------------------------------------------------------------------
# Process-group helpers (no-ops in one process)
# ----------------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------
# Optimizer and LR schedule (shared by both engines, so their trajectories can be compared)
# ----------------------------------------------------------------------------------------------------


def make_optimizer(params: list[nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters. A torch optimizer also under DeepSpeed: no JIT-built ops."""
    if not params:
        raise ValueError("no trainable parameters: check the stage's `trainable` policy and the layer plan")
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay over the stage's optimizer steps (see `schedule.warmup_cosine`)."""
    multiplier = functools.partial(warmup_cosine, total_steps=stage.steps, warmup_steps=stage.warmup_steps,
                                   min_lr_ratio=stage.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ----------------------------------------------------------------------------------------------------
# Plain PyTorch
# ----------------------------------------------------------------------------------------------------


class TorchEngine:
    """One process: AdamW, gradient accumulation (the step's loss is the mean of its micro-batch losses)
    and global-norm clipping."""

    kind = "torch"

    def __init__(self, model: nn.Module, objective: Objective, params: list[nn.Parameter], stage: StageConfig,
                 cfg: EngineConfig, accumulation: int):
        if accumulation < 1:
            raise ValueError(f"accumulation={accumulation} must be >= 1")
        self.model, self.objective, self.params = model, objective, params
        self.cfg, self.accumulation = cfg, accumulation
        self.optimizer = make_optimizer(params, stage)
        self.scheduler = make_scheduler(self.optimizer, stage)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def describe(self) -> dict[str, Any]:
        """What a checkpoint of this engine can be resumed by (compared on load)."""
        return {"engine": self.kind, "world_size": 1}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def micro_step(self) -> None:
        """Gradients accumulate until `step`."""

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the global gradient norm before clipping."""
        # An infinite bound measures the norm without clipping.
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, directory: Path) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        state = {"params": {names[id(p)]: p.detach().cpu() for p in self.params},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, Path(directory) / "engine.pt")

    def load(self, directory: Path) -> None:
        path = Path(directory) / "engine.pt"
        if not path.exists():
            raise FileNotFoundError(f"{directory} holds no TorchEngine state (engine.pt)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        own = dict(self.model.named_parameters())
        missing = sorted(set(state["params"]) - set(own))
        if missing:
            raise ValueError(f"{directory}: checkpoint parameters {missing[:5]} do not exist in this model")
        with torch.no_grad():
            for name, value in state["params"].items():
                own[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        """Nothing to release: the model never left PyTorch's hands."""


# ----------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO
# ----------------------------------------------------------------------------------------------------


def deepspeed_config(cfg: EngineConfig, *, micro_batch: int, accumulation: int, world_size: int,
                     param_dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config for one stage.

    `param_dtype` is the dtype of the trainable parameters: bf16/fp16 parameters turn on DeepSpeed's
    mixed precision (fp32 master weights in the optimizer); fp32 parameters train in fp32.
    """
    for name, value in (("micro_batch", micro_batch), ("accumulation", accumulation), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
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
        "bf16": {"enabled": param_dtype == torch.bfloat16},
        "fp16": {"enabled": param_dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's own Adam would JIT-build an op
        # Offload steps the same torch AdamW on the host copies (DeepSpeed would insist on its CPU Adam).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the train loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


class _ObjectiveModule(nn.Module):
    """The model and its objective as one module whose forward returns `(loss, metrics)`.

    DeepSpeed must see the loss come out of its own forward: that is where it hooks the backward
    prologue (gradient-accumulation boundary, ZeRO reduction state). The objectives call sub-modules
    (`model.model`), so the model alone cannot be the engine's module.
    """

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 (optionally with CPU offload) around a torch AdamW and our LR schedule.

    Only the trainable parameters reach the optimizer: ZeRO 1/2 partition their optimizer state and
    gradients, frozen weights stay untouched replicas. ZeRO-3 also partitions every parameter of the
    model — frozen ones included, as ZeRO-3 does — for the lifetime of the engine (see `close`).
    """

    kind = "deepspeed"

    def __init__(self, model: nn.Module, objective: Objective, params: list[nn.Parameter], stage: StageConfig,
                 cfg: EngineConfig, accumulation: int, micro_batch: int, world_size: int, device: DeviceInfo):
        if device.type == "npu":
            os.environ.setdefault("DS_ACCELERATOR", "npu")
        import deepspeed

        self.model, self.params, self.cfg, self.world_size = model, params, cfg, world_size
        self._unrecorded_norm: float | None = None
        optimizer = make_optimizer(params, stage)
        config = deepspeed_config(cfg, micro_batch=micro_batch, accumulation=accumulation, world_size=world_size,
                                  param_dtype=params[0].dtype)
        # The schedule is built on DeepSpeed's optimizer (a callable), so it drives the wrapped param groups.
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_ObjectiveModule(model, objective), model_parameters=params, optimizer=optimizer,
            lr_scheduler=functools.partial(make_scheduler, stage=stage), config=config)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.kind, "zero_stage": self.cfg.zero_stage, "world_size": self.world_size}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by the accumulation steps itself; ranks' gradients are averaged

    def micro_step(self) -> None:
        if self.cfg.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # Without ZeRO, DeepSpeed clips fp32 gradients without recording their norm; measure it here,
            # where the gradients are whole and already averaged over ranks.
            self._unrecorded_norm = _grad_norm(self.params)
        self.engine.step()  # DeepSpeed counts micro-batches and updates only at the accumulation boundary

    def step(self) -> float:
        """The update already happened in the last `micro_step`; returns its global norm before clipping."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._unrecorded_norm
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        # Every rank writes its partition. Frozen weights are not saved: they come from the teacher.
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        if not (Path(directory) / "deepspeed").is_dir():
            raise FileNotFoundError(f"{directory} holds no DeepSpeed state (deepspeed/)")
        # Not strict: the checkpoint holds the trainable weights only.
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def close(self) -> None:
        """Remove DeepSpeed's hooks; under ZeRO-3 first make every parameter whole again on every rank."""
        if self.engine is None:  # closed already
            return
        if self.cfg.zero_stage == 3:
            _unpartition(self.model)
        self.engine.destroy()
        self.engine = self.optimizer = self.scheduler = None


def _grad_norm(params: list[nn.Parameter]) -> float | None:
    """2-norm of the whole gradients held in `.grad`; None when there are none (ZeRO keeps its own)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _unpartition(model: nn.Module) -> None:
    """Replace each ZeRO-3 partitioned parameter of `model` by a plain full copy (ties kept).

    One module's parameters are gathered at a time. The full model was resident on every rank before
    the stage (teacher loading, calibration, warm start), so this needs no more memory than that did.
    External-parameter registrations DeepSpeed made on the model's modules point at the old
    parameters and are dropped (a next ZeRO-3 engine discovers the new ones again).
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if hasattr(module, "ds_external_parameters"):
            for _, stale in list(module.ds_external_parameters()):
                unregister_external_parameter(module, stale)
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if hasattr(p, "ds_id")]
        fresh = [p for _, p in own if id(p) not in replaced]
        if fresh:
            with deepspeed.zero.GatheredParameters(fresh, modifier_rank=None):
                for p in fresh:
                    replaced[id(p)] = nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad)
        for name, p in own:
            setattr(module, name, replaced[id(p)])


def make_engine(model: nn.Module, objective: Objective, params: list[nn.Parameter], stage: StageConfig,
                cfg: EngineConfig, *, accumulation: int, micro_batch: int, world_size: int, device: DeviceInfo):
    """The engine `cfg.kind` names, for one stage of training."""
    if cfg.kind == "deepspeed":
        return DeepSpeedEngine(model, objective, params, stage, cfg, accumulation, micro_batch, world_size, device)
    if world_size > 1:
        raise ValueError("engine=torch runs in one process; use engine=zero0..zero3 under a launcher")
    return TorchEngine(model, objective, params, stage, cfg, accumulation)


# ----------------------------------------------------------------------------------------------------
# Checkpoint directories
# ----------------------------------------------------------------------------------------------------


class CheckpointDir:
    """Atomic, rotating checkpoints under `root`, one directory per (stage, step): `step-<stage>-<step>/`.

    A checkpoint is written into `step-<stage>-<step>.tmp/` by every rank and renamed by rank 0 once all
    ranks are done, so a directory without `.tmp` is always complete; a leftover `.tmp` (a run killed
    mid-save) is ignored and overwritten. Only the newest `keep_last` checkpoints of a stage are kept.
    Multi-node runs need `root` on a filesystem all nodes share.

    Contents: `trainer_state.json` (rank 0: step, sampler, history, what wrote it), `rank-<r>.pt` (each
    rank's RNG state) and the engine's own files (`engine.pt` or `deepspeed/`).
    """

    STATE_FILE = "trainer_state.json"

    def __init__(self, root: Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 (the newest checkpoint is what resume reads)")
        self.root, self.keep_last = Path(root), keep_last

    @staticmethod
    def _parse(path: Path) -> tuple[str, int] | None:
        parts = path.name.split("-")
        if len(parts) != 3 or parts[0] != "step" or not parts[2].isdigit() or not path.is_dir():
            return None  # includes `*.tmp`: its step part is not a number
        return parts[1], int(parts[2])

    def complete(self, stage: str) -> list[Path]:
        """This stage's finished checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [(parsed[1], p) for p in self.root.iterdir() if (parsed := self._parse(p)) and parsed[0] == stage]
        return [p for _, p in sorted(found)]

    def latest(self, stage: str) -> Path | None:
        done = self.complete(stage)
        return done[-1] if done else None

    def save(self, engine, stage: str, step: int, state: dict, rank_state: dict) -> Path:
        """Write a checkpoint (every rank calls this); returns its final path."""
        if "-" in stage or not stage:
            raise ValueError(f"stage name {stage!r} must be non-empty and contain no '-'")
        rank, _ = rank_and_world()
        final, tmp = self.root / f"step-{stage}-{step}", self.root / f"step-{stage}-{step}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(rank_state, tmp / f"rank-{rank}.pt")
        if rank == 0:
            meta = {"stage": stage, "step": step, **engine.describe(), **state}
            (tmp / self.STATE_FILE).write_text(json.dumps(meta, indent=1))
        barrier()
        if rank == 0:
            if final.exists():  # the same step written again (a rerun): the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete(stage)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Restore `engine` from checkpoint `path`; returns (rank 0's state, this rank's state)."""
        path = Path(path)
        state_file = path / self.STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: no {self.STATE_FILE}")
        state = json.loads(state_file.read_text())
        wanted = engine.describe()
        written = {key: state.get(key) for key in wanted}
        if written != wanted:
            raise ValueError(f"{path} was written by {written} and cannot be resumed by {wanted}: resume with the "
                             "same engine, ZeRO stage and number of processes, or set engine.resume=false")
        rank, _ = rank_and_world()
        rank_file = path / f"rank-{rank}.pt"
        if not rank_file.exists():
            raise FileNotFoundError(f"{path} has no state for rank {rank} ({rank_file.name})")
        engine.load(path)
        return state, torch.load(rank_file, map_location="cpu", weights_only=False)


def read_trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 trainable weights of a stage checkpoint, by the model's parameter names, whatever
    engine and ZeRO stage wrote it (DeepSpeed partitions are consolidated on the CPU, one process)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "engine.pt").exists():
        return torch.load(checkpoint / "engine.pt", map_location="cpu", weights_only=False)["params"]
    if (checkpoint / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed",
                                                         exclude_frozen_parameters=True)
        # The engine wraps the model in _ObjectiveModule, whose attribute is `model`.
        return {name.removeprefix("model."): tensor for name, tensor in state.items()}
    raise FileNotFoundError(f"{checkpoint} holds no engine weights (engine.pt or deepspeed/)")
