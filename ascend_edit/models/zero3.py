"""ZeRO-3 from the first weight on: the teacher is built partitioned and made whole one piece at a time.

Under `engine.zero_stage=3` no rank should ever hold the whole teacher (Qwen3-30B-A3B in bf16 is 61 GB; a
910B has 64 GB). Three public mechanisms, nothing patched:

* `partitioned_construction` — while open, transformers' own ZeRO-3 integration (`HfDeepSpeedConfig`) is on,
  so `from_pretrained` builds the model under `deepspeed.zero.Init` and loads each checkpoint tensor straight
  into its partitions, and `from_config` initialises it partitioned. Closed again at once, so a model built
  later (export verification, evaluation) is an ordinary one.
* `gathered(module)` — `deepspeed.zero.GatheredParameters` over one module's parameters, read-only
  (`modifier_rank=None`): the conversion surgery makes one attention whole while it builds and warm-starts
  that layer's target.
* `GatheredForward` — forward hooks that gather each module's own parameters for its forward and partition
  them again after it, for the no-grad forwards that run outside a DeepSpeed engine (calibration statistics,
  the teacher's evaluation, and the evaluations between and after the stages: `DeepSpeedEngine.close`
  leaves the model partitioned and installs them). Each DeepSpeed engine removes them
  (`release_gathered_forward`) before it installs its own hooks, which then own the partitioned parameters.
* `gathered_tensors` — one parameter whole at a time, copied to the CPU on the writing rank only: how a
  partitioned model is written out (models/checkpoint.py `save_converted`).

* `partitioned_load_config` / `partition_remaining` / `write_whole` — a saved model rebuilt partitioned
  (models/checkpoint.py `load_converted(zero3=...)`, `load_converted_weights`): the teacher's modules under
  `zero.Init`, the converted attentions partitioned once built, then each stored tensor written into its
  partitions one at a time (rank 0 reads it; `GatheredParameters(modifier_rank=0)` partitions it again). The
  separate `eval` and `export` jobs and stage-2-only conversions under ZeRO-3 load this way.

`GATHER_METER` records the largest number of values made whole at once by these helpers, so a run (and its
tests) can show that nothing bigger than one module was ever materialised outside DeepSpeed's own hooks.

The targets built by the surgery are ordinary parameters (attention only: small next to the experts);
`deepspeed.initialize` partitions them with the rest.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

GATHERED_FORWARD_ATTR = "zero3_gathered_forward"


def zero3_init_config(dtype: torch.dtype, offload_params: bool = False) -> dict[str, Any]:
    """The parts of a DeepSpeed config that `zero.Init` reads: stage 3, parameter offload, parameter dtype
    (DeepSpeed casts to bf16/fp16 when those are enabled, so they follow the teacher's dtype)."""
    zero: dict[str, Any] = {"stage": 3}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


def partitioned_load_config(engine: Any, dtype: torch.dtype) -> dict[str, Any] | None:
    """The `zero.Init` config to build a model partitioned with when the job's engine is ZeRO-3
    (`engine.kind=deepspeed engine.zero_stage=3`, the keys the conversion decides by), else None."""
    if engine.kind != "deepspeed" or engine.zero_stage != 3:
        return None
    return zero3_init_config(dtype, offload_params=engine.offload_params)


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Models built inside are built under `deepspeed.zero.Init` (transformers' ZeRO-3 integration)."""
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # transformers holds only a weak reference: the object must live while models are built
    config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose values live in DeepSpeed's partitions (not in `param.data`)."""
    full = getattr(param, "ds_numel", None)
    return full is not None and param.numel() < full


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def is_zero_param(param: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 has taken over (partitioned, or persistent below its threshold)."""
    return hasattr(param, "ds_id")


def has_zero_params(model: nn.Module) -> bool:
    return any(is_zero_param(p) for p in model.parameters())


def resident_values(model: nn.Module) -> int:
    """Parameter values this rank holds whole right now (each shared parameter once): partitions excluded."""
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


class GatherMeter:
    """The largest number of parameter values made whole at once through this module's helpers."""

    def __init__(self) -> None:
        self.largest = 0

    def record(self, params: Iterable[torch.Tensor]) -> None:
        self.largest = max(self.largest, sum(full_numel(p) for p in params if is_zero_param(p)))

    def reset(self) -> None:
        self.largest = 0


GATHER_METER = GatherMeter()


def gathered(module: nn.Module) -> AbstractContextManager:
    """Every parameter of `module` whole on every rank inside the context (read-only)."""
    from ascend_edit.train.engine import gather_whole

    params = list(module.parameters())
    GATHER_METER.record(params)
    return gather_whole(params)


def gathered_tensors(named: Iterable[tuple[str, torch.Tensor]], writer: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, whole CPU copy) of each tensor, one at a time; `None` in place of the copy on a rank that does
    not write. Every rank must iterate in the same order (each ZeRO-3 parameter is one all-gather). Plain
    tensors (buffers, or a model that was never partitioned) are copied without any collective."""
    for name, tensor in named:
        if not is_zero_param(tensor):
            yield name, tensor.detach().contiguous().cpu() if writer else None
            continue
        from ascend_edit.train.engine import gather_whole  # a ZeRO-3 parameter exists: DeepSpeed is installed

        GATHER_METER.record([tensor])
        with gather_whole([tensor]):
            # a copy: the gathered values are released when the context closes
            yield name, tensor.detach().to("cpu", copy=True).contiguous() if writer else None


def partition_remaining(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Partition every parameter of `model` that is not a ZeRO-3 parameter yet (modules added after the
    partitioned construction: the converted attentions); ZeRO-3 parameters are left as they are."""
    from ascend_edit.train.engine import partition_parameters

    partition_parameters(model, ds_config)


def write_whole(param: torch.Tensor, value: Callable[[], torch.Tensor], writer: bool) -> None:
    """Set `param` to the whole tensor `value()`. A ZeRO-3 parameter is gathered alone, the writing rank
    (rank 0) copies `value()` in — only it reads the value — and DeepSpeed partitions it again on exit:
    collective, every rank calls this for the same parameters in the same order. Any other tensor is
    copied on every rank."""
    with torch.no_grad():
        if not is_zero_param(param):
            param.copy_(value())
            return
        from ascend_edit.train.engine import gather_to_modify  # a ZeRO-3 parameter exists: DeepSpeed is installed

        GATHER_METER.record([param])
        with gather_to_modify([param]):
            if writer:
                param.data.copy_(value())


def partition_sizes(model: nn.Module) -> list[dict[str, Any]]:
    """Per parameter (each shared one once): its full size, the values this rank holds whole (`numel`, 0 when
    partitioned) and the size of this rank's partition (`ds_tensor`), for checks and reports."""
    rows = []
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", None)
        rows.append({"name": name, "full": full_numel(p), "resident": p.numel(),
                     "partition": int(local.numel()) if local is not None else None})
    return rows


def first_non_finite_anywhere(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The first name whose values hold NaN/inf on any rank, checked on each rank's own partitions (no
    gather); every rank gets the same answer."""
    import torch.distributed as dist

    from ascend_edit.train.engine import accelerator_device_name

    first = len(named)
    for index, (_, tensor) in enumerate(named):
        local = getattr(tensor, "ds_tensor", tensor).detach()
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            first = index
            break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = accelerator_device_name() if dist.get_backend() != "gloo" else "cpu"
        flag = torch.tensor([first], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
    return named[first][0] if first < len(named) else None


class GatheredForward:
    """Forward hooks on every module with parameters of its own: gathered for its forward, partitioned after.
    For no-grad forwards only (a backward would find the gathered values released)."""

    def __init__(self, model: nn.Module):
        self.handles: list[Any] = []
        self.open: dict[int, AbstractContextManager] = {}
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_numel")]
            if own:
                self.handles.append(module.register_forward_pre_hook(self._gather(own)))
                self.handles.append(module.register_forward_hook(self._release))

    def _gather(self, params: list[nn.Parameter]):
        from ascend_edit.train.engine import gather_whole

        # Collectives and parameter swaps: kept out of any compiled region (engine.compile) around the module.
        @torch.compiler.disable
        def hook(module, args):
            GATHER_METER.record(params)
            context = gather_whole(params)
            context.__enter__()
            self.open[id(module)] = context

        return hook

    @torch.compiler.disable
    def _release(self, module, args, output):
        context = self.open.pop(id(module), None)
        if context is not None:
            context.__exit__(None, None, None)

    def remove(self) -> None:
        for context in self.open.values():
            context.__exit__(None, None, None)
        self.open.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install_gathered_forward(model: nn.Module) -> GatheredForward:
    hooks = GatheredForward(model)
    object.__setattr__(model, GATHERED_FORWARD_ATTR, hooks)  # not a module or tensor: kept off nn.Module's books
    return hooks


def release_gathered_forward(model: nn.Module) -> None:
    """Remove the hooks of `install_gathered_forward` (before a DeepSpeed engine takes the model)."""
    hooks = model.__dict__.pop(GATHERED_FORWARD_ATTR, None)
    if hooks is not None:
        hooks.remove()
