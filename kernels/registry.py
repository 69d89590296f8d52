"""Choose an attention kernel by name: ``resolve(op, backend, device_type=..., needs_grad=...)``.

Attention modules never branch on the device; they resolve their kernel once (when built) and
call it. ``backend="auto"`` picks by device and by whether a gradient is needed:

=============================  ==========================  ========================
op                             device                      auto choice
=============================  ==========================  ========================
``sliding_window_attention``   npu                         ``npu``
                               cuda                        ``triton`` (``flex`` without Triton)
                               cpu / other                 ``sdpa``
``mla_absorbed_attention``     cuda, no grad (decode)      ``triton``
                               npu, no grad (decode)       ``npu``
                               with grad, cpu              ``eager``
``rms_norm``                   npu                         ``npu``
``rotary_embedding``           npu                         ``npu`` (``mindspeed`` on request)
``swiglu``                     npu                         ``npu``
(the three fused ops)          cpu / cuda / other          ``eager``
=============================  ==========================  ========================

On CUDA the fused decoder-layer ops stay eager: regional ``torch.compile`` fuses them there.

``triton`` (sliding window + sinks, forward and backward) serves CUDA training and prefill and hands
the layouts it does not cover to ``flex`` (whose block mask skips out-of-window blocks in both
passes); any backend can be named explicitly to override the choice. Each backend module
is imported only when first resolved, so ``torch_npu`` and ``triton`` stay unimported unless used.
Each attention backend's entry point checks its inputs with its op's decorator from ``contract.py``,
so a bad call gets the same message whichever backend was chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "SLIDING_WINDOW_ATTENTION",
    "MLA_ABSORBED_ATTENTION",
    "RMS_NORM",
    "ROTARY_EMBEDDING",
    "SWIGLU",
    "FUSED_LAYER_OPS",
    "ATTENTION_OPS",
    "KernelUnavailableError",
    "resolve",
    "available_backends",
    "backend_name",
    "ops",
]

logger = logging.getLogger(__name__)

SLIDING_WINDOW_ATTENTION = "sliding_window_attention"
MLA_ABSORBED_ATTENTION = "mla_absorbed_attention"
RMS_NORM = "rms_norm"
ROTARY_EMBEDDING = "rotary_embedding"
SWIGLU = "swiglu"
FUSED_LAYER_OPS = (RMS_NORM, ROTARY_EMBEDDING, SWIGLU)
ATTENTION_OPS = (SLIDING_WINDOW_ATTENTION, MLA_ABSORBED_ATTENTION)  # the ops exported checkpoints carry
_NPU = frozenset({"npu"})
_ANY_DEVICE: frozenset[str] = frozenset()


class KernelUnavailableError(RuntimeError):
    """A known backend was asked for where it cannot run (wrong device, missing package, grad)."""


@dataclass(frozen=True)
class _Backend:
    module: str  # relative to this package
    function: str
    device_types: frozenset[str] = _ANY_DEVICE  # empty: every device
    supports_grad: bool = True
    requires_package: str | None = None  # checked with find_spec, never imported to check

    def load(self) -> Callable[..., object]:
        return getattr(importlib.import_module(self.module, __package__), self.function)


_REGISTRY: dict[str, dict[str, _Backend]] = {
    SLIDING_WINDOW_ATTENTION: {
        "eager": _Backend(".reference", "sliding_window_attention"),
        "sdpa": _Backend(".sdpa", "sliding_window_attention"),
        # CPU flex has no backward; the unfused CPU forward is for tests only.
        "flex": _Backend(".flex", "sliding_window_attention", device_types=frozenset({"cuda"})),
        "npu": _Backend(
            ".npu.fusion_attention",
            "sliding_window_attention",
            device_types=frozenset({"npu"}),
            requires_package="torch_npu",
        ),
        # Plain self-attention layouts in the Triton kernel, the rest through flex (the CUDA default
        # when Triton is installed: benchmarks/swa_sweep.py measured it ahead of flex on an H200).
        "triton": _Backend(
            ".triton.sliding_window",
            "sliding_window_attention",
            device_types=frozenset({"cuda"}),
            requires_package="triton",
        ),
    },
    MLA_ABSORBED_ATTENTION: {
        "eager": _Backend(".reference", "mla_absorbed_attention"),
        "triton": _Backend(
            ".triton.mla_decode",
            "mla_absorbed_attention",
            device_types=frozenset({"cuda"}),
            supports_grad=False,
            requires_package="triton",
        ),
        "npu": _Backend(
            ".npu.infer_attention",
            "mla_absorbed_attention",
            device_types=_NPU,
            supports_grad=False,
            requires_package="torch_npu",
        ),
    },
    RMS_NORM: {
        "eager": _Backend(".fused_reference", "rms_norm"),
        "npu": _Backend(".npu.fused_ops", "rms_norm", device_types=_NPU, requires_package="torch_npu"),
    },
    ROTARY_EMBEDDING: {
        "eager": _Backend(".fused_reference", "rotary_embedding"),
        "npu": _Backend(".npu.fused_ops", "rotary_embedding", device_types=_NPU, requires_package="torch_npu"),
        "mindspeed": _Backend(
            ".npu.fused_ops", "rotary_embedding_mindspeed", device_types=_NPU, requires_package="mindspeed"
        ),
    },
    SWIGLU: {
        "eager": _Backend(".fused_reference", "swiglu"),
        "npu": _Backend(".npu.fused_ops", "swiglu", device_types=_NPU, requires_package="torch_npu"),
    },
}

_logged: set[tuple[str, str]] = set()


def ops() -> tuple[str, ...]:
    """Names of the ops that can be resolved."""
    return tuple(_REGISTRY)


def available_backends(op: str, device_type: str | None = None) -> tuple[str, ...]:
    """Backends registered for ``op``; with ``device_type``, only those that can run there."""
    backends = _backends_of(op)
    if device_type is None:
        return tuple(backends)
    return tuple(name for name, spec in backends.items() if _unavailable_reason(spec, device_type) is None)


def backend_name(op: str, backend: str = "auto", *, device_type: str, needs_grad: bool) -> str:
    """The backend name ``resolve`` would pick (``backend`` itself unless it is "auto")."""
    _backends_of(op)
    return _auto_choice(op, device_type, needs_grad) if backend == "auto" else backend


def resolve(op: str, backend: str = "auto", *, device_type: str, needs_grad: bool) -> Callable[..., object]:
    """The kernel implementing ``op`` with ``backend`` on ``device_type`` ("cpu", "cuda", "npu", ...).

    Raises ``ValueError`` for an unknown op or backend name and ``KernelUnavailableError`` for a
    known backend that cannot run here (other device, package missing, or a forward-only kernel
    when ``needs_grad``). The choice is logged once per (op, backend).
    """
    backends = _backends_of(op)
    name = _auto_choice(op, device_type, needs_grad) if backend == "auto" else backend
    spec = backends.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}; valid: 'auto', {_quoted(backends)}")
    reason = _unavailable_reason(spec, device_type)
    if reason is None and needs_grad and not spec.supports_grad:
        reason = "it is forward-only and a gradient is needed"
    if reason is not None:
        usable = available_backends(op, device_type)
        raise KernelUnavailableError(
            f"backend {name!r} for op {op!r} cannot run on device type {device_type!r}: {reason}; "
            f"usable there: {', '.join(repr(n) for n in usable) or 'none'}"
        )
    if (op, name) not in _logged:
        _logged.add((op, name))
        logger.info("kernel: %s -> %s (device=%s, needs_grad=%s)", op, name, device_type, needs_grad)
    return spec.load()


def _backends_of(op: str) -> dict[str, _Backend]:
    backends = _REGISTRY.get(op)
    if backends is None:
        raise ValueError(f"unknown kernel op {op!r}; valid: {_quoted(_REGISTRY)}")
    return backends


def _auto_choice(op: str, device_type: str, needs_grad: bool) -> str:
    if op == SLIDING_WINDOW_ATTENTION:
        # The Triton kernel is 1.55x flex forward + backward on an H200 (docs/benchmarks.md) and hands
        # layouts it does not cover to flex itself; flex remains the choice where Triton is missing.
        cuda = "triton" if _has_package("triton") else "flex"
        return {"npu": "npu", "cuda": cuda}.get(device_type, "sdpa")
    if op in FUSED_LAYER_OPS:
        return "npu" if device_type == "npu" else "eager"
    if device_type == "cuda" and not needs_grad and _has_package("triton"):
        return "triton"
    if device_type == "npu" and not needs_grad:
        return "npu"
    return "eager"


def _unavailable_reason(spec: _Backend, device_type: str) -> str | None:
    if spec.device_types and device_type not in spec.device_types:
        return f"it runs only on {', '.join(sorted(spec.device_types))}"
    if spec.requires_package is not None and not _has_package(spec.requires_package):
        return f"package {spec.requires_package!r} is not installed"
    return None


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)
