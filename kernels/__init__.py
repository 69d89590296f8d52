"""Fused attention kernels for ascend_edit, installed as ``ascend_edit.kernels``.

Two ops, each with an eager reference in :mod:`.reference` (the specification) and faster
backends chosen by name through :mod:`.registry`::

    from ascend_edit.kernels import resolve, SLIDING_WINDOW_ATTENTION
    attend = resolve(SLIDING_WINDOW_ATTENTION, "auto", device_type="cuda", needs_grad=True)
    out = attend(q, k, v, q_pos=pos, k_pos=pos, window=1024, sink_tokens=1, scale=d**-0.5)

Importing this package imports neither ``torch_npu`` nor ``triton``: backends load on first use.
"""
from .registry import (
    MLA_ABSORBED_ATTENTION,
    SLIDING_WINDOW_ATTENTION,
    KernelUnavailableError,
    available_backends,
    ops,
    resolve,
)

__all__ = [
    "MLA_ABSORBED_ATTENTION",
    "SLIDING_WINDOW_ATTENTION",
    "KernelUnavailableError",
    "available_backends",
    "ops",
    "resolve",
]
