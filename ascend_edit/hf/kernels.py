"""Kernel registry of exported checkpoints: portable backends only.

The package's registry (`ascend_edit.kernels.registry`) imports its backends lazily by module path and
picks Triton, flex or torch_npu kernels by device. An exported checkpoint ships a fixed set of files,
and registering the Triton decode op from a checkpoint could clash with an installed ascend_edit, so
`auto_map` exports swap that registry for this one (`ascend_edit.hf.bundle.SUBSTITUTES`). It serves
each op with a backend that runs forward and backward on every device PyTorch supports — SDPA for the
sliding-window op, the eager reference for absorbed MLA — behind the same `resolve` signature, so the
attention modules run unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

from ascend_edit.kernels.reference import mla_absorbed_attention
from ascend_edit.kernels.sdpa import sliding_window_attention

# Same op names as ascend_edit.kernels.registry (a unit test keeps them equal).
SLIDING_WINDOW_ATTENTION = "sliding_window_attention"
MLA_ABSORBED_ATTENTION = "mla_absorbed_attention"

_PORTABLE: dict[str, tuple[str, Callable[..., object]]] = {
    SLIDING_WINDOW_ATTENTION: ("sdpa", sliding_window_attention),
    MLA_ABSORBED_ATTENTION: ("eager", mla_absorbed_attention),
}


def resolve(op: str, backend: str = "auto", *, device_type: str, needs_grad: bool) -> Callable[..., object]:
    """The portable kernel for `op`; `backend` may be "auto" or that kernel's name."""
    if op not in _PORTABLE:
        raise ValueError(f"unknown attention op {op!r}; valid: {sorted(_PORTABLE)}")
    name, kernel = _PORTABLE[op]
    if backend not in ("auto", name):
        raise ValueError(f"backend {backend!r} for op {op!r} is not shipped with exported checkpoints; "
                         f"use 'auto' or {name!r}")
    return kernel
