"""Fused attention and decoder-layer kernels for ascend_edit, installed as ``ascend_edit.kernels``.

Two attention ops, each with an eager reference in :mod:`.reference` (the specification), and three
fused decoder-layer ops (``rms_norm``, ``rotary_embedding``, ``swiglu``) with references in
:mod:`.fused_reference`; faster backends are chosen by name through :mod:`.registry`::

    from ascend_edit.kernels import resolve, SLIDING_WINDOW_ATTENTION
    attend = resolve(SLIDING_WINDOW_ATTENTION, "auto", device_type="cuda", needs_grad=True)
    out = attend(q, k, v, q_pos=pos, k_pos=pos, window=1024, sink_tokens=1, scale=d**-0.5)

Importing this package imports neither ``torch_npu`` nor ``triton``: backends load on first use.
"""
from .registry import (
    FUSED_LAYER_OPS,
    MLA_ABSORBED_ATTENTION,
    RMS_NORM,
    ROTARY_EMBEDDING,
    SLIDING_WINDOW_ATTENTION,
    SWIGLU,
    KernelUnavailableError,
    available_backends,
    ops,
    resolve,
)

__all__ = [
    "FUSED_LAYER_OPS",
    "MLA_ABSORBED_ATTENTION",
    "RMS_NORM",
    "ROTARY_EMBEDDING",
    "SWIGLU",
    "SLIDING_WINDOW_ATTENTION",
    "KernelUnavailableError",
    "available_backends",
    "ops",
    "resolve",
]
