"""What a target needs to know about the teacher attention it replaces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes and options of one teacher attention layer, read off the module and its config."""

    layer_idx: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    qkv_bias: bool  # Qwen2 has q/k/v biases; Llama and Qwen3 do not
    o_bias: bool
    has_qk_norm: bool  # Qwen3: per-head RMSNorm on q and k before RoPE
    rms_norm_eps: float
    # YaRN / LongRoPE scale cos and sin by this factor: every rotated q.k score carries its square (1 otherwise)
    rope_attention_scaling: float = 1.0

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


# Attribute names every supported teacher attention uses (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE).
_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj")


def read_geometry(attn: nn.Module, config) -> AttentionGeometry:
    """Read the geometry of a Hugging Face attention module; fail clearly on unknown layouts."""
    missing = [name for name in _REQUIRED if not isinstance(getattr(attn, name, None), nn.Linear)]
    if missing:
        raise NotImplementedError(
            f"unsupported attention module {type(attn).__name__}: it has no separate "
            f"{', '.join(missing)} projections (supported: Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE layouts)"
        )
    # checked above (nn.Module's typing cannot know a submodule's class)
    q_proj, k_proj, o_proj = (cast(nn.Linear, getattr(attn, name)) for name in ("q_proj", "k_proj", "o_proj"))
    layer_idx = cast(int, attn.layer_idx)  # every supported teacher attention knows its layer
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_heads = q_proj.out_features // head_dim
    num_kv_heads = k_proj.out_features // head_dim
    if num_heads % num_kv_heads:
        raise ValueError(f"layer {layer_idx}: {num_heads} query heads do not group over {num_kv_heads} KV heads")
    q_norm = getattr(attn, "q_norm", None)
    return AttentionGeometry(
        layer_idx=layer_idx,
        hidden_size=q_proj.in_features,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        scaling=float(getattr(attn, "scaling", head_dim**-0.5)),
        qkv_bias=q_proj.bias is not None,
        o_bias=o_proj.bias is not None,
        has_qk_norm=q_norm is not None,
        rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        rope_attention_scaling=rope_attention_scaling(config),
    )


def rope_attention_scaling(config) -> float:
    """The factor transformers' rotary embedding multiplies cos and sin by for this config's rope type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        return 1.0  # default: no scaling
    # on the CPU explicitly: targets are built under torch.device("meta") when a converted checkpoint is
    # assembled, and the init functions' tensors could not be read there (every scaled rope type failed)
    with torch.device("cpu"):
        return float(ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[1])
