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
to free a parameter its hooks hold). `close()` removes the hooks and then either

* keeps the model partitioned (`keep_partitioned=True`, what `ascend-edit convert` does): the parameters stay
  ZeRO-3 parameters, each rank holding its partition, and `models/zero3.GatheredForward` hooks make each
  module whole for its own no-grad forward only. The next stage's `deepspeed.initialize` takes them as they
  are (DeepSpeed converts only parameters that are not ZeRO-3 parameters yet — the path of any model built
  under `zero.Init`), and a partitioned model is written out one tensor at a time (`save_converted`); or
* gathers every parameter for good, so the caller gets an ordinary `nn.Module` with full weights on every
  rank (gathered through the public `GatheredParameters`, then registered as new plain parameters).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ascend_edit.config import ConfigError, EngineConfig, StageConfig
from ascend_edit.device import DeviceInfo
from ascend_edit.train.checkpoint_io import (  # noqa: F401  (CheckpointDir, read_trainable_weights: re-exported)
    DEEPSPEED_DIR,
    DEEPSPEED_GLOBALS,
    CheckpointDir,
    barrier,
    load_torch_engine,
    load_trainable_file,
    rank_and_world,
    read_trainable_weights,
    require_finite,
    save_torch_engine,
    scan_deepspeed_pickles,
    verify_manifest,
)
from ascend_edit.train.offload import StreamedOffloadAdamW, clip_gradients
from ascend_edit.train.precision import Precision, deepspeed_param_dtype, frozen_dtype, hold_in_fp32, restore_dtypes
from ascend_edit.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


# ----------------------------------------------------------------------------------------------------
# Optimizer and LR schedule (shared by both engines, so their trajectories can be compared)
# ----------------------------------------------------------------------------------------------------


# Devices whose fused AdamW kernel torch ships. Fused is one pass over each tensor; torch's default on the
# CPU is a per-tensor loop of ~10 separate passes, which is what a host-offloaded optimizer (DeepSpeed
# offload_optimizer steps this optimizer on its fp32 host copies) would otherwise pay every step.
_FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def make_optimizer(params: list[nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters. A torch optimizer also under DeepSpeed: no JIT-built ops."""
    if not params:
        raise ValueError("no trainable parameters: check the stage's `trainable` policy and the layer plan")
    fused = all(p.device.type in _FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95), fused=fused)


def make_offloaded_optimizer(params: list[nn.Parameter], stage: StageConfig) -> StreamedOffloadAdamW:
    """`make_optimizer`'s AdamW with its fp32 state in host memory, stepped on the device (train/offload.py)."""
    if not params:
        raise ValueError("no trainable parameters: check the stage's `trainable` policy and the layer plan")
    return StreamedOffloadAdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95))


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
                 cfg: EngineConfig, accumulation: int, precision: Precision | None = None):
        if accumulation < 1:
            raise ValueError(f"accumulation={accumulation} must be >= 1")
        self.model, self.objective, self.params = model, objective, params
        self.cfg, self.accumulation = cfg, accumulation
        # Without a precision policy the parameters train as they are (callers that manage dtypes themselves).
        self.precision = precision or Precision(master_fp32=False)
        self.offloaded = cfg.offload_optimizer
        if self.offloaded and self.precision.loss_scaling:
            raise ValueError("engine.offload_optimizer=true with engine.kind=torch has no fp16 loss scaling: "
                             "use model.dtype=bf16 device.dtype=bf16, or engine.kind=deepspeed")
        # fp32 masters: the trainable weights are fp32 for the stage, the forward autocasts (precision.py);
        # offloaded, the masters live in host memory instead and the weights keep the model's dtype.
        self._held_dtypes = hold_in_fp32(params) if self.precision.master_fp32 and not self.offloaded else {}
        self.scaler = self.precision.grad_scaler()
        # fp16: the last skipped step was the grad scaler lowering its scale (its normal start-up search from
        # 2**16), not a broken run: the loop does not count it towards engine.max_consecutive_skips
        self.loss_scale_backoff = False
        self.optimizer = make_offloaded_optimizer(params, stage) if self.offloaded else make_optimizer(params, stage)
        self.scheduler = make_scheduler(self.optimizer, stage)

    @property
    def lr(self) -> float:
        return cast(float, self.scheduler.get_last_lr()[0])  # make_optimizer's lr is a float, not a tensor

    def describe(self) -> dict[str, Any]:
        """What a checkpoint of this engine can be resumed by (compared on load)."""
        return {"engine": self.kind, "world_size": 1, **({"offload_optimizer": True} if self.offloaded else {})}

    def _gradients(self) -> list[torch.Tensor]:
        if isinstance(self.optimizer, StreamedOffloadAdamW):
            return self.optimizer.grads  # fp32 accumulators; the parameters hold no .grad
        return [p.grad for p in self.params if p.grad is not None]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with self.precision.forward_context():
            return self.objective(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accumulation
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def micro_step(self) -> None:
        """Gradients accumulate until `step`."""

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the global gradient norm before clipping."""
        if self.scaler is not None:  # fp16: true gradients for the norm; skips the update on inf/nan
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self._gradients(), self.cfg.grad_clip)
        self.loss_scale_backoff = False
        if not math.isfinite(norm):
            # A NaN/inf gradient: no update, and neither the optimizer state nor the schedule moves.
            # The caller sees the non-finite norm and counts the step as skipped.
            if self.scaler is not None:
                self.scaler.update()  # lower the fp16 loss scale (the inf was recorded by unscale_)
                # below a scale of 1 the overflow is in the gradients themselves, not in the scaling
                self.loss_scale_backoff = self.scaler.get_scale() >= 1.0
            self.skip_step()
            return norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> bool:
        """Drop this step's gradients without any update (a non-finite loss or gradient); True: withheld."""
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, directory: Path) -> None:
        """Trainable weights (safetensors); optimizer, schedule and loss scale (safetensors + JSON).
        Refuses non-finite values."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        # offloaded: the fp32 masters are the trainable weights (the parameters are their rounding)
        weights = self.optimizer.masters() if isinstance(self.optimizer, StreamedOffloadAdamW) else self.params
        save_torch_engine(directory, {names[id(p)]: w for p, w in zip(self.params, weights, strict=True)},
                          self.optimizer, self.scheduler, self.scaler)

    def load(self, directory: Path) -> None:
        load_torch_engine(directory, dict(self.model.named_parameters()), self.optimizer, self.scheduler,
                          self.scaler)
        if isinstance(self.optimizer, StreamedOffloadAdamW):  # the masters, unrounded
            saved = load_trainable_file(directory)
            names = {id(p): name for name, p in self.model.named_parameters()}
            self.optimizer.load_masters([saved[names[id(p)]] for p in self.params])

    def close(self, keep_partitioned: bool = False) -> None:
        """The model never left PyTorch's hands; the trainable weights go back to the model's dtype.
        (`keep_partitioned`: only ZeRO-3 partitions; accepted for the engines' common surface.)"""
        if isinstance(self.optimizer, StreamedOffloadAdamW):
            self.optimizer.close()
        restore_dtypes(self.params, self._held_dtypes)


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
    zero.update(checked_zero_options(cfg.zero_options))
    config: dict[str, Any] = {
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
    if param_dtype != torch.float32 and cfg.zero_stage in (1, 2):
        # Accumulate the micro-batches' gradients in fp32 (by default DeepSpeed adds them up in the module's
        # bf16/fp16). ZeRO-1/2 then keep an fp32 gradient buffer on the device, and with offload_optimizer
        # the gradients cross to the host once per optimizer step instead of once per micro-batch.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def checked_zero_options(options: dict[str, Any]) -> dict[str, Any]:
    """`engine.zero_options`, each key checked against DeepSpeed's own ZeRO config model, so that a typo
    is one line naming the key (DeepSpeed would reject it later with a validation traceback)."""
    if not options:
        return {}
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    field_of = {name: name for name in DeepSpeedZeroConfig.model_fields}
    field_of.update({f.alias: name for name, f in DeepSpeedZeroConfig.model_fields.items() if f.alias})
    seen: dict[str, str] = {}
    for key in options:
        if key not in field_of:
            raise ConfigError(f"engine.zero_options.{key} is not a DeepSpeed zero_optimization key")
        if field_of[key] in seen:  # a setting under its name and its stage3_* alias
            raise ConfigError(f"engine.zero_options.{key} and engine.zero_options.{seen[field_of[key]]} are the "
                              "same DeepSpeed setting: keep one")
        seen[field_of[key]] = key
    return dict(options)


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
                 cfg: EngineConfig, accumulation: int, micro_batch: int, world_size: int, device: DeviceInfo,
                 precision: Precision | None = None):
        if device.type == "npu":
            os.environ.setdefault("DS_ACCELERATOR", "npu")
        import deepspeed

        from ascend_edit.models.zero3 import release_gathered_forward

        # A teacher loaded partitioned (train/prepare.py) was gathered module by module for its forwards so
        # far; from here DeepSpeed's own hooks own its parameters.
        release_gathered_forward(model)
        self.model, self.params, self.cfg, self.world_size = model, params, cfg, world_size
        self._unrecorded_norm: float | None = None
        self._withheld_norm: float | None = None  # ZeRO-0: the non-finite norm of a step it did not apply
        optimizer = make_optimizer(params, stage)
        # DeepSpeed's bf16/fp16 mode keeps the fp32 masters: the module stays in the compute dtype.
        param_dtype = params[0].dtype if precision is None else deepspeed_param_dtype(precision, params,
                                                                                      frozen_dtype(model))
        config = deepspeed_config(cfg, micro_batch=micro_batch, accumulation=accumulation, world_size=world_size,
                                  param_dtype=param_dtype)
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
            if self._unrecorded_norm is not None and not math.isfinite(self._unrecorded_norm):
                self._step_without_update()
                # DeepSpeed's bf16/fp16 wrapper records the norm of the zeroed gradients (0.0): `step` must
                # report this one, or the loop would log a normal step and never count the skip
                self._withheld_norm = self._unrecorded_norm
                return
        # DeepSpeed counts micro-batches and updates only at the accumulation boundary. ZeRO 1-3 skip a
        # step whose gradient norm is NaN/inf themselves (overflow check), schedule included.
        self.engine.step()

    def _step_without_update(self) -> None:
        """ZeRO-0 has no overflow check (ZeRO 1-3 skip such a step themselves). DeepSpeed's step must still
        run, so its micro-batch bookkeeping stays right, and it needs gradients to clip: it runs on zeroed
        gradients, then the weights, optimizer state and schedule are put back as they were. Copies of the
        trainable weights and their optimizer state are held meanwhile (ZeRO-0 replicates them anyway)."""
        weights = [p.detach().clone() for p in self.params]
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        schedule = self.scheduler.state_dict()
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()
        self.engine.step()
        with torch.no_grad():
            for p, saved in zip(self.params, weights):
                p.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(schedule)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def skip_step(self) -> bool:
        """A non-finite loss. The update already ran in the last `micro_step` unless DeepSpeed skipped it
        for a non-finite gradient norm (as a NaN/inf loss almost always gives): True when it was skipped.
        DeepSpeed exposes no way to discard partitioned gradients that are finite."""
        return not math.isfinite(self.step())

    def step(self) -> float:
        """The update already happened in the last `micro_step`; returns its global norm before clipping."""
        if self._withheld_norm is not None:
            withheld, self._withheld_norm = self._withheld_norm, None
            return withheld
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._unrecorded_norm
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> None:
        # Never checkpoint a non-finite weight: this rank's trainable parameters (its ZeRO-3 partition).
        require_finite(((f"trainable[{i}]", getattr(p, "ds_tensor", p).detach()) for i, p in enumerate(self.params)),
                       f"a checkpoint in {directory}")
        # Every rank writes its partition. Frozen weights are not saved: they come from the teacher.
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_DIR, save_latest=False,
                                    exclude_frozen_parameters=True)
        if self.cfg.zero_stage == 0 and rank_and_world()[0] == 0:
            # ZeRO-0's module file also keeps frozen tied aliases and buffers: the reader needs the trainable
            # names, in the optimizer's order (its fp32 masters follow that order)
            names = {id(p): name for name, p in self.model.named_parameters()}
            (Path(directory) / ZERO0_NAMES).write_text(json.dumps([names[id(p)] for p in self.params]))

    def load(self, directory: Path) -> None:
        if not (Path(directory) / DEEPSPEED_DIR).is_dir():
            raise FileNotFoundError(f"{directory} holds no DeepSpeed state (deepspeed/)")
        # DeepSpeed unpickles its files (weights_only=False): before handing them over, check they are the
        # files this run wrote (manifest) and name no code beyond DeepSpeed's own checkpoint types.
        verify_manifest(directory)
        scan_deepspeed_pickles(directory)
        # Not strict: the checkpoint holds the trainable weights only.
        path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_DIR, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def close(self, keep_partitioned: bool = False) -> None:
        """Remove DeepSpeed's hooks. Under ZeRO-3 either leave every parameter partitioned, gathered module by
        module for no-grad forwards (`keep_partitioned`: every rank must then run the same forwards and
        writes), or first make every parameter whole again on every rank."""
        if self.engine is None:  # closed already
            return
        partitioned = self.cfg.zero_stage == 3
        full = _gathered_parameters(self.model) if partitioned and not keep_partitioned else None
        self.engine.destroy()
        if full is not None:
            _replace_parameters(self.model, full)
        elif partitioned:
            from ascend_edit.models.zero3 import install_gathered_forward

            install_gathered_forward(self.model)
        self.engine = self.optimizer = self.scheduler = None


def _grad_norm(params: list[nn.Parameter]) -> float | None:
    """2-norm of the whole gradients held in `.grad`; None when there are none (ZeRO keeps its own)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def gather_whole(params: list[nn.Parameter] | list[torch.Tensor]):
    """Context in which the ZeRO-3 parameters `params` are whole on every rank, read-only (DeepSpeed's public
    `GatheredParameters`; this module is the one place that imports DeepSpeed)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gather_to_modify(params: list[nn.Parameter] | list[torch.Tensor]):
    """Context in which the ZeRO-3 parameters `params` are whole on every rank; what rank 0 writes into them is
    partitioned again on exit (DeepSpeed's public `GatheredParameters` with `modifier_rank=0`)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def partition_parameters(module: nn.Module, ds_config: dict) -> None:
    """Make every parameter of `module` that is not a ZeRO-3 parameter yet one, each rank keeping its partition
    (DeepSpeed's public `zero.Init(module=...)`: as if the module had been built inside `zero.Init`)."""
    import deepspeed

    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)


def accelerator_device_name() -> str:
    """The current rank's accelerator as DeepSpeed names it (where NCCL / HCCL collectives need their tensors)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def _gathered_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    """A plain, whole copy of every parameter of a ZeRO-3 model, by the id of the parameter it copies.

    Gathered through DeepSpeed's public `GatheredParameters`, one module's parameters at a time. The full
    model was resident on every rank before the stage (teacher loading, calibration, warm start), so the
    copies need no more memory than that did.
    """
    import deepspeed

    full: dict[int, nn.Parameter] = {}
    for module in model.modules():
        fresh = [p for p in module.parameters(recurse=False) if id(p) not in full]
        if fresh:
            with deepspeed.zero.GatheredParameters(fresh, modifier_rank=None):
                for p in fresh:
                    full[id(p)] = nn.Parameter(p.data.detach().clone(), requires_grad=p.requires_grad)
    return full


def _replace_parameters(model: nn.Module, full: dict[int, nn.Parameter]) -> None:
    """Register the whole copies in place of the partitioned parameters they were gathered from (a tied
    parameter gets its one copy in every module that holds it). The partitioned ones, with DeepSpeed's
    bookkeeping on them, are dropped with the engine; a next ZeRO-3 engine partitions the copies afresh.
    DeepSpeed's external-parameter registrations (the LM head the KD loss reads) sit on the engine's own
    `_ObjectiveModule`, the module running when the objective reads it, and go with the engine too."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, full[id(p)])


def make_engine(model: nn.Module, objective: Objective, params: list[nn.Parameter], stage: StageConfig,
                cfg: EngineConfig, *, accumulation: int, micro_batch: int, world_size: int, device: DeviceInfo,
                precision: Precision | None = None):
    """The engine `cfg.kind` names, for one stage of training (`precision`: see train/precision.py)."""
    if cfg.kind == "deepspeed":
        return DeepSpeedEngine(model, objective, params, stage, cfg, accumulation, micro_batch, world_size, device,
                               precision)
    if world_size > 1:
        raise ValueError("engine=torch runs in one process; use engine=zero0..zero3 under a launcher")
    return TorchEngine(model, objective, params, stage, cfg, accumulation, precision)


def consolidated_zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 trainable weights of a DeepSpeed stage checkpoint (any ZeRO stage), consolidated on the
    CPU in one process, by the model's parameter names. The caller verifies and scans the files first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any((Path(checkpoint) / DEEPSPEED_DIR).glob("*optim_states.pt")):
        state = _zero0_trainable_weights(Path(checkpoint) / DEEPSPEED_DIR / "mp_rank_00_model_states.pt")
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_DIR,
                                                         exclude_frozen_parameters=True)
    # The engine wraps the model in _ObjectiveModule, whose attribute is `model`.
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


ZERO0_NAMES = "trainable_names.json"  # beside deepspeed/ in a ZeRO-0 stage checkpoint


def _zero0_trainable_weights(path: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 writes no optimizer partitions (DeepSpeed's consolidation cannot read it): the trainable weights
    are the module's, and a 16-bit module's fp32 masters are its optimizer wrapper's `fp32_groups`, in the
    same order. Loaded without running code: tensors plus the DeepSpeed classes the pickle scan allows."""
    import importlib

    allowed = []
    for name in DEEPSPEED_GLOBALS:
        owner, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(owner), attr))
    with torch.serialization.safe_globals(allowed):
        saved = torch.load(path, map_location="cpu", weights_only=True)
    module = saved["module"]
    names_file = path.parent.parent / ZERO0_NAMES
    if names_file.is_file():  # the wrapper (_ObjectiveModule) prefixes the model's names with `model.`
        module = {f"model.{name}": module[f"model.{name}"] for name in json.loads(names_file.read_text())}
    weights = {name: tensor.float() for name, tensor in module.items()}
    optimizer = saved.get("optimizer") or {}
    masters = [t for group in optimizer.get("fp32_groups", []) for t in group]
    if masters:
        if [tuple(t.shape) for t in masters] != [tuple(t.shape) for t in weights.values()]:
            raise ValueError(f"{path}: the optimizer's fp32 masters do not match the module's trainable weights")
        weights = {name: master.float() for name, master in zip(weights, masters)}
    return weights
