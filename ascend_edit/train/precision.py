"""Training precision: which dtype the forward runs in, and fp32 master copies of the trainable weights.

The policy (DESIGN rule 11):
* the frozen teacher and every frozen shared weight stay in the dtype they were loaded in
  (`model.dtype`, bf16 for the large recipes) — they are never updated, so they need no master copy;
* the trainable target weights are held in fp32 while a stage trains: they *are* the master copy, so
  an update smaller than a bf16 ulp is not rounded away;
* the forward runs under `torch.autocast` in `device.dtype` (matmuls in bf16/fp16 on the device's fast
  units, fp32 weights cast on the fly);
* fp16 scales the loss with `torch.amp.GradScaler` (its 5-bit exponent underflows small gradients);
* under DeepSpeed its own bf16/fp16 mode keeps the fp32 masters inside the optimizer, so the module
  stays in the compute dtype and no second mechanism is added (see `deepspeed_param_dtype`).

`device.dtype=auto` means bf16 on an accelerator and the weights' own dtype on the CPU (most CPUs have
no fast bf16 matmul, but a bf16-held model cannot run an fp32 forward without an fp32 copy).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    """compute: the forward's dtype (autocast when narrower than fp32); master_fp32: hold the trainable
    weights in fp32 while training; device_type: for autocast and the grad scaler."""

    compute: torch.dtype = torch.float32
    device_type: str = "cpu"
    master_fp32: bool = True

    @property
    def autocast(self) -> bool:
        return self.compute != torch.float32

    @property
    def loss_scaling(self) -> bool:
        return self.compute == torch.float16

    def forward_context(self):
        """Autocast to the compute dtype (a no-op context in fp32)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.loss_scaling else None


def frozen_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen floating-point weights are held in (fp32 for a model with none frozen)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return torch.float32


def resolve_precision(requested: str, device_type: str, weight_dtype: torch.dtype) -> Precision:
    """`device.dtype` (auto | bf16 | fp16 | fp32) for a model whose frozen weights are `weight_dtype`.

    Refused, in one line each: fp16 on the CPU; a forward wider than the frozen weights (fp32 compute on
    a bf16-held model would need a second, fp32 copy of the whole teacher: set model.dtype=fp32 instead).
    """
    if requested != "auto" and requested not in DTYPES:
        raise ValueError(f"device.dtype={requested!r} is not one of {['auto', *DTYPES]}")
    if requested == "auto":
        compute = weight_dtype if device_type == "cpu" else torch.bfloat16
        if device_type != "cpu" and weight_dtype == torch.float16:
            compute = torch.float16  # fp16 weights: bf16 compute would mix the two 16-bit formats
    else:
        compute = DTYPES[requested]
    if compute == torch.float16 and device_type == "cpu":
        if requested == "auto":
            raise ValueError("model.dtype=fp16 on the CPU: device.dtype=auto computes in the weights' dtype there, "
                             "and the CPU has no fast fp16 matmul; set model.dtype=fp32 or bf16")
        raise ValueError("device.dtype=fp16 is not supported on the CPU (no fast fp16 matmul); use bf16 or fp32")
    compute_name, weight_name = _NAMES.get(compute, compute), _NAMES.get(weight_dtype, weight_dtype)
    if torch.finfo(compute).bits > torch.finfo(weight_dtype).bits:
        raise ValueError(f"device.dtype={compute_name} is wider than the frozen weights (model.dtype={weight_name}): "
                         f"set model.dtype={compute_name} or device.dtype={weight_name}")
    if compute != weight_dtype and torch.finfo(compute).bits == torch.finfo(weight_dtype).bits:
        raise ValueError(f"device.dtype={compute_name} with model.dtype={weight_name} would mix two 16-bit formats "
                         f"in one forward: set device.dtype={weight_name} or model.dtype={compute_name}")
    return Precision(compute=compute, device_type=device_type)


def check_deepspeed_dtype(compute: torch.dtype, weight_dtype: torch.dtype) -> None:
    """DeepSpeed runs the module as it is (no autocast): the forward's dtype must be the weights'."""
    if compute != weight_dtype:
        raise ValueError(f"engine=deepspeed runs the forward in the module's own dtype: device.dtype="
                         f"{_NAMES.get(compute)} needs model.dtype={_NAMES.get(compute)}")


@torch.no_grad()
def hold_in_fp32(params: list[nn.Parameter]) -> dict[int, torch.dtype]:
    """Make the trainable parameters fp32 masters in place (same Parameter objects, so optimizer and
    module references stay valid); returns their original dtypes for `restore_dtypes`."""
    original = {}
    for param in params:
        original[id(param)] = param.dtype
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return original


@torch.no_grad()
def restore_dtypes(params: list[nn.Parameter], original: dict[int, torch.dtype]) -> None:
    """Give the parameters back in the dtype the model holds them in (after a stage: evaluation and
    export run without autocast, so a mixed-dtype module would fail there)."""
    for param in params:
        dtype = original.get(id(param), param.dtype)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def deepspeed_param_dtype(precision: Precision, params: list[nn.Parameter], weight_dtype: torch.dtype
                          ) -> torch.dtype:
    """The dtype DeepSpeed's module must hold under `precision`; its bf16/fp16 mode then keeps the fp32
    masters in the optimizer. The frozen weights must already be in that dtype: DeepSpeed runs the module
    as it is (no autocast), so mixed dtypes would meet in one matmul."""
    check_deepspeed_dtype(precision.compute, weight_dtype)
    with torch.no_grad():
        for param in params:
            if param.is_floating_point() and param.dtype != precision.compute:
                param.data = param.data.to(precision.compute)
    return precision.compute
