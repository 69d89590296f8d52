"""The device layer: the one place that decides npu / cuda / cpu and imports torch_npu.

Everything device-specific that the rest of the package needs — the torch device, the
collective backend, the autocast dtype, synchronisation, memory statistics, seeding — is
answered here, so model and training code never branch on the device type themselves.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICE_TYPES = ("auto", "npu", "cuda", "cpu")
BACKEND_BY_DEVICE = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used on this machine."""


def _import_torch_npu() -> ModuleType | None:
    """Import torch_npu if it is installed and usable; None otherwise.

    torch_npu registers the `npu` device with torch on import. It fails to import without the
    CANN runtime (libhccl.so and friends), which is why it is never a hard dependency.
    """
    try:
        return importlib.import_module("torch_npu")
    except Exception as err:  # ImportError, or OSError from a missing CANN library
        log.debug("torch_npu not usable: %s", err)
        return None


def npu_available() -> bool:
    torch_npu = _import_torch_npu()
    if torch_npu is None:
        return False
    npu = getattr(torch, "npu", None) or getattr(torch_npu, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # a driver problem is "not available", not a crash
        return False


def detect_device_type() -> str:
    """Pick the best accelerator present: npu > cuda > cpu."""
    if npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass(frozen=True)
class DeviceInfo:
    """What the rest of the package needs to know about the device it runs on."""

    type: str  # "npu" | "cuda" | "cpu"
    index: int
    dist_backend: str  # "hccl" | "nccl" | "gloo"
    autocast_dtype: torch.dtype

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type != "cpu" else torch.device("cpu")

    @property
    def name(self) -> str:
        if self.type == "cpu":
            return "cpu"
        return str(_device_module(self.type).get_device_name(self.index))


def _device_module(device_type: str):
    """torch.cuda or torch.npu: both expose the same synchronize / memory-stat API."""
    if device_type == "cpu":
        return None
    module = getattr(torch, device_type, None)
    if module is None:
        raise DeviceUnavailableError(f"torch has no '{device_type}' module (is torch_npu imported?)")
    return module


def resolve_device(requested: str = "auto", *, local_rank: int = 0, dtype: str = "auto") -> DeviceInfo:
    """Turn the configured device name into a usable device, or fail with a one-line reason.

    `local_rank` selects the card of this process (one process per card, as every launcher does).
    `dtype` is the autocast / training precision ("auto": bf16 on accelerators, fp32 on CPU); fp16 is
    refused on CPU because its matmuls are very slow there.
    """
    if requested not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {DEVICE_TYPES}, got '{requested}'")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {('auto', *DTYPES)}, got '{dtype}'")
    device_type = detect_device_type() if requested == "auto" else requested
    shown = dtype
    if dtype == "auto":
        # bf16 halves memory and runs on tensor/cube units; most CPUs have no fast bf16 matmul. Training
        # resolves `auto` against the weights (train/precision.py: on the CPU, the weights' own dtype).
        dtype = "fp32" if device_type == "cpu" else "bf16"
        shown = "auto (training: the weights' dtype)" if device_type == "cpu" else "auto (training: bf16, fp16 for fp16 weights)"

    if device_type == "npu":
        if _import_torch_npu() is None:
            raise DeviceUnavailableError(
                "device=npu needs torch_npu and the Ascend CANN toolkit: install with "
                "`pip install ascend_edit[npu]` on a machine with CANN and `source set_env.sh`"
            )
        if not npu_available():
            raise DeviceUnavailableError("device=npu: torch_npu is installed but reports no NPU")
    elif device_type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("device=cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    elif device_type == "cpu" and dtype == "fp16":
        raise ValueError("dtype=fp16 is not supported on CPU; use bf16 or fp32")

    index = 0
    if device_type != "cpu":
        count = _device_module(device_type).device_count()
        if local_rank >= count:
            raise DeviceUnavailableError(
                f"local rank {local_rank} has no {device_type} card: only {count} visible"
            )
        index = local_rank
        _device_module(device_type).set_device(index)
    info = DeviceInfo(device_type, index, BACKEND_BY_DEVICE[device_type], DTYPES[dtype])
    log.info("device: %s:%d, backend %s, dtype %s", info.type, info.index, info.dist_backend, shown)
    return info


def synchronize(info: DeviceInfo) -> None:
    module = _device_module(info.type)
    if module is not None:
        module.synchronize(info.index)


def reset_peak_memory(info: DeviceInfo) -> None:
    module = _device_module(info.type)
    if module is not None:
        module.reset_peak_memory_stats(info.index)


def memory_stats(info: DeviceInfo) -> dict[str, float]:
    """Allocated / peak / reserved memory in GiB; host RSS for the CPU."""
    gib = 1024**3
    module = _device_module(info.type)
    if module is None:
        import resource

        # ru_maxrss is KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib
        return {"allocated_gib": float("nan"), "peak_gib": peak, "reserved_gib": float("nan")}
    return {
        "allocated_gib": module.memory_allocated(info.index) / gib,
        "peak_gib": module.max_memory_allocated(info.index) / gib,
        "reserved_gib": module.memory_reserved(info.index) / gib,
    }


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. under taskset or Slurm)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_cpu_threads(threads: int) -> None:
    """Apply `device.threads` (0 keeps torch's default). More threads than usable CPUs only oversubscribes them,
    and far more makes the OpenMP runtime crash (a segfault at 100,000), so that is refused by name."""
    if not threads:
        return
    available = usable_cpus()
    if threads > available:
        raise ValueError(f"device.threads={threads} is more than the {available} CPUs this process may use")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device: torch.manual_seed covers cuda and npu)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def _active_npu_module():
    """torch.npu when torch_npu is already imported and reports a card; None otherwise.

    Checked through sys.modules so a checkpoint on a CPU / CUDA machine never imports torch_npu.
    """
    if "torch_npu" not in sys.modules:
        return None
    npu = getattr(torch, "npu", None)
    try:
        return npu if npu is not None and npu.is_available() else None
    except Exception:  # a driver problem means no NPU state to save, not a crash
        return None


def rng_state() -> dict:
    """Every RNG this package draws from, for checkpoints; restored by `set_rng_state`.

    Device generators are lists of uint8 CPU tensors, one per card: "cuda" and, on Ascend, "npu"
    (torch_npu's `torch.npu.get_rng_state_all`, the same API as torch.cuda's).
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = _active_npu_module()
    if npu is not None:
        state["npu"] = npu.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "npu" in state:
        npu = _active_npu_module()
        if npu is None:
            log.warning("checkpoint holds NPU RNG state but no NPU is active here: NPU generators not restored")
        else:
            npu.set_rng_state_all(state["npu"])
