"""Lazy access to ``torch_npu`` and MindSpeed for the NPU kernel adapters, and once-only logging.

Importing ``torch_npu`` without the CANN runtime breaks, so adapters import it inside functions,
through here, and importing any adapter module is free on machines without Ascend software.
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

logger = logging.getLogger("ascend_edit.kernels.npu")
_logged: set[str] = set()


def import_torch_npu() -> ModuleType:
    try:
        import torch_npu
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the NPU kernels need torch_npu (pip install 'ascend_edit[npu]' on a machine with the CANN "
            "toolkit); use backend 'sdpa' or 'eager' elsewhere"
        ) from exc
    return torch_npu


def import_mindspeed_rotary() -> ModuleType:
    try:
        return importlib.import_module("mindspeed.ops.npu_rotary_position_embedding")
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "backend 'mindspeed' needs MindSpeed (pip install 'ascend_edit[mindspeed]', or build the NPU image "
            "with MINDSPEED_REF set); use backend 'npu' or 'eager' instead"
        ) from exc


def log_once(key: str, message: str, *args: object, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process (fallbacks repeat every layer)."""
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message, *args)
