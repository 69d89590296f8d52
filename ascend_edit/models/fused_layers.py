"""Fused decoder-layer ops (RMSNorm, RoPE, SwiGLU) by module swapping, chosen once per run.

On Ascend, ``torch.compile`` is off, so the norms, rotary embeddings and gated MLP activations of
every teacher and student layer would run as chains of small eager ops. :func:`install_fused_ops`
resolves one kernel per op through the registry (``ascend_edit.kernels``: ``rms_norm``,
``rotary_embedding``, ``swiglu``; each with an eager reference) and

* replaces every RMSNorm module (Llama / Qwen2 / Qwen3 incl. Qwen3's per-head ``q_norm`` /
  ``k_norm``, DeepSeek-V3's latent norms) by :class:`FusedRMSNorm`, which *shares* the original
  ``weight`` parameter -- state-dict keys, checkpoints and exports are unchanged;
* replaces every gated SiLU MLP (``gate_proj`` / ``up_proj`` / ``down_proj``) by
  :class:`FusedSwiGLUMLP`, which keeps the same three ``Linear`` children;
* replaces every stock Llama-family attention (the teacher's, inside ``EditedAttention`` or in
  kept layers) by :class:`~ascend_edit.models.fused_attention.FusedRotaryAttention`, which shares its
  children and applies the teacher's RoPE with the rotary kernel before calling transformers'
  attention interface;
* hands the rotary kernel to ``ascend_edit.attention.rope`` (``set_rope_kernel``), the one function
  the converted attention targets (GateSWA, MLA's decoupled rope part) apply RoPE with.

Nothing is monkey-patched: modules are swapped by ``setattr`` on their parent, as the attention
targets are; no transformers class or function is changed.

``enabled="auto"`` swaps only on NPU; on CPU / CUDA the model is left as it is (CUDA fuses these
ops by regional ``torch.compile``). Every backend can be overridden by name in the config.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ascend_edit.attention.geometry import rope_attention_scaling
from ascend_edit.config import FusedOpsConfig
from ascend_edit.kernels.registry import (
    RMS_NORM,
    ROTARY_EMBEDDING,
    SWIGLU,
    KernelUnavailableError,
    backend_name,
    resolve,
)
from ascend_edit.models.fused_attention import SUPPORTED, FusedRotaryAttention, swappable

log = logging.getLogger(__name__)

class FusedRMSNorm(nn.Module):
    """RMSNorm through a registry kernel; shares the replaced module's ``weight``."""

    def __init__(self, weight: nn.Parameter, eps: float, kernel: Callable[..., torch.Tensor]):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.kernel = kernel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.kernel(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, kernel={self.kernel.__module__}"


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with the replaced MLP's own Linear children."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 kernel: Callable[..., torch.Tensor]):  # fmt: skip
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernel(self.gate_proj(x), self.up_proj(x)))


def _rms_eps(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm module, or None when ``module`` is not one we can swap."""
    if not type(module).__name__.endswith("RMSNorm") or isinstance(module, FusedRMSNorm):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if eps is not None else None


def _is_swiglu_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fused_ops_on(cfg: FusedOpsConfig, device_type: str) -> bool:
    """Whether the fused ops are swapped in: `enabled=on`, or `auto` on an NPU."""
    return cfg.enabled == "on" or (cfg.enabled == "auto" and device_type == "npu")


def check_fused_ops_available(cfg: FusedOpsConfig, *, device_type: str) -> None:
    """Before the teacher loads: every backend `cfg` names for a swap that will happen can run on `device_type`
    (a known backend on the wrong device, or without its package, was a traceback after the model loaded)."""
    cfg.check()
    if not fused_ops_on(cfg, device_type):
        return
    for op in (RMS_NORM, ROTARY_EMBEDDING, SWIGLU):
        backend = getattr(cfg, op)
        try:
            resolve(op, backend, device_type=device_type, needs_grad=True)
        except KernelUnavailableError as err:
            raise ValueError(f"model.fused_ops.{op}={backend}: {' '.join(str(err).split())}") from None


def install_fused_ops(model: nn.Module, cfg: FusedOpsConfig, *, device_type: str) -> dict[str, str]:
    """Swap in the fused ops for ``device_type``; returns ``{op: backend}`` (empty: nothing changed)."""
    check_fused_ops_available(cfg, device_type=device_type)
    if not fused_ops_on(cfg, device_type):
        log.info("fused decoder ops: off on %s (enabled=%s); layers keep their own modules", device_type, cfg.enabled)
        return {}
    chosen: dict[str, str] = {}
    kernels: dict[str, Callable[..., torch.Tensor]] = {}
    backends = {op: getattr(cfg, op) for op in (RMS_NORM, ROTARY_EMBEDDING, SWIGLU)}
    factor = rope_attention_scaling(getattr(model, "config", None))
    if factor != 1.0 and backends[ROTARY_EMBEDDING] != "eager":
        # YaRN / LongRoPE fold their attention factor into cos and sin; the fused rotary ops document inputs in
        # [-1, 1] only, so those teachers rotate eagerly.
        log.warning("fused decoder ops: the rope's attention factor %.4g puts cos / sin outside [-1, 1], which the "
                    "fused rotary ops do not take: rotary_embedding -> eager", factor)
        backends[ROTARY_EMBEDDING] = "eager"
    for op, backend in backends.items():
        kernels[op] = resolve(op, backend, device_type=device_type, needs_grad=True)
        chosen[op] = backend_name(op, backend, device_type=device_type, needs_grad=True)

    norms = [(n, m, eps) for n, m in model.named_modules() if (eps := _rms_eps(m)) is not None]
    for name, module, eps in norms:
        _swap(model, name, FusedRMSNorm(module.weight, eps, kernels[RMS_NORM]))
    mlps = [(n, m) for n, m in model.named_modules() if _is_swiglu_mlp(m)]
    for name, module in mlps:
        _swap(model, name, FusedSwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj, kernels[SWIGLU]))

    # After the norms: a Qwen3 attention takes its (now fused) q_norm / k_norm along as children.
    attentions = [(n, m) for n, m in model.named_modules() if swappable(m)]
    for name, module in attentions:
        _swap(model, name, FusedRotaryAttention(module, kernels[ROTARY_EMBEDDING]))
    kept = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in SUPPORTED
                   and not isinstance(m, FusedRotaryAttention)})  # fmt: skip
    if kept:
        log.warning("fused decoder ops: %s modules carry hooks or their own forward; they keep eager RoPE",
                    ", ".join(kept))

    from ascend_edit.attention import rope

    rope.set_rope_kernel(kernels[ROTARY_EMBEDDING])
    log.info(
        "fused decoder ops on %s: rms_norm -> %s (%d modules), swiglu -> %s (%d MLPs), rotary_embedding -> %s "
        "(%d teacher attentions + the converted targets)",
        device_type, chosen[RMS_NORM], len(norms), chosen[SWIGLU], len(mlps), chosen[ROTARY_EMBEDDING],
        len(attentions),
    )  # fmt: skip
    return chosen

