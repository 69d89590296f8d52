"""Regional compilation of the frozen dense blocks (MLP, RMSNorm) of every decoder layer.

The attention path switches between teacher and target at run time, so only the blocks around it
are compiled: each compiles once and is reused by every layer of the same shape. Fusing SiLU·mul
and the norms cuts both time and saved activations (fused kernels keep fewer intermediates for
backward). MoE blocks are left alone: their routing is data dependent.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from torch import nn

from ascend_edit.models.surgery import decoder_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "layers", "blocks", "off")
_BLOCKS = ("mlp", "input_layernorm", "post_attention_layernorm")


def compile_mode(mode: str, device_type: str, model: nn.Module) -> str:
    """Resolve `engine.compile` to layers | blocks | off for this model and device.

    auto: CUDA only (CPU compile time outweighs short runs; NPU graph mode goes through torchair,
    not wired here). Whole layers when every block is dense and no layer runs the sliding-window
    path, whose mask bookkeeping is data dependent; dense blocks otherwise.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"engine.compile={mode!r} is not one of {COMPILE_MODES}")
    if mode != "auto":
        return mode
    if device_type != "cuda":
        return "off"
    layers = decoder_layers(model)
    dense = not any(_is_moe(getattr(layer, "mlp", layer)) for layer in layers)
    sliding = any(getattr(m, "is_sliding", False) for m in model.modules())
    return "layers" if dense and not sliding else "blocks"


def apply_compile(mode: str, model: nn.Module) -> None:
    if mode == "layers":
        compile_whole_layers(model)
    elif mode == "blocks":
        compile_dense_blocks(model)


def _is_moe(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "moe" in name or "sparse" in name or hasattr(module, "experts")


def compile_dense_blocks(model: nn.Module) -> int:
    """Compile each decoder layer's dense MLP and norms in place; returns how many were compiled."""
    count = 0
    for layer in decoder_layers(model):
        for name in _BLOCKS:
            block = getattr(layer, name, None)
            if block is None or _is_moe(block):
                continue
            block.compile(dynamic=False)
            count += 1
    log.info("compiled %d dense blocks", count)
    return count


def compile_whole_layers(model: nn.Module) -> int:
    """Compile each decoder layer as one region (attention included), for dense models whose
    attention path has no data-dependent Python (MLA); fuses RoPE, norms and residuals too."""
    layers = decoder_layers(model)
    for layer in layers:
        if _is_moe(getattr(layer, "mlp", layer)):
            raise ValueError("whole-layer compile does not support MoE blocks; use compile_dense_blocks")
        layer.compile(dynamic=False)
    return len(layers)


EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "batched_mm", "eager")


def apply_experts_implementation(mode: str, model: nn.Module) -> str | None:
    """Choose how MoE experts run (transformers' experts interface; a no-op for dense models).

    auto keeps transformers' default, grouped GEMM over the tokens sorted by expert (`grouped_mm`: one
    kernel for all experts, no Python loop), which falls back to a portable implementation where the
    device has no grouped GEMM kernel. `eager` (a loop over the experts hit) is for comparison only.
    Returns the implementation in use, None for a dense model.
    """
    if mode not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"engine.experts_implementation={mode!r} is not one of {list(EXPERTS_IMPLEMENTATIONS)}")
    if not any(_is_moe(getattr(layer, "mlp", layer)) for layer in decoder_layers(model)):
        return None
    if mode != "auto":
        cast("PreTrainedModel", model).set_experts_implementation(mode)  # a transformers MoE model (above)
    chosen = getattr(model.config, "_experts_implementation", None) or "eager"
    log.info("MoE experts implementation: %s", chosen)
    return chosen
