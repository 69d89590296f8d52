"""The teacher's own attention with its rotary embedding through a registry kernel.

transformers' Llama-family attention classes apply RoPE inside their ``forward`` with a module-level
function, so a fused rotary op cannot reach them by swapping a child module, and patching that
function (or the class) is ruled out. :class:`FusedRotaryAttention` therefore replaces the whole
attention *module*, by ``setattr`` on its parent -- the way ``models/surgery.py`` puts the attention
targets in:

* it holds the replaced module's own children (q / k / v / o projections and, for Qwen3, the
  per-head ``q_norm`` / ``k_norm``, which ``install_fused_ops`` has already swapped for fused
  RMSNorms) and its plain attributes (``config``, ``layer_idx``, ``head_dim``, ``scaling``,
  ``num_key_value_groups``, ``is_causal``, ``sliding_window``, ...), so parameters are shared,
  state-dict keys are unchanged, and everything that reads those attributes keeps working;
* its ``forward`` repeats the stock forward step by step, applies RoPE to q and k with the chosen
  ``rotary_embedding`` kernel (contract ``kernel(x [b, h, s, d], cos [b, s, d], sin [b, s, d])``),
  and then calls transformers' attention interface for ``config._attn_implementation`` -- the same
  ``ALL_ATTENTION_FUNCTIONS`` lookup, with the class's own eager function as the default.

A custom function registered through ``transformers.AttentionInterface`` would not do: it is called
*after* RoPE has been applied, so it could not fuse it.

Only classes whose forward has been checked against this one are swapped (``SUPPORTED``); any other
attention, or an instance that already carries hooks or its own ``forward`` (e.g. accelerate's
device-map wrappers), keeps its stock forward, and ``install_fused_ops`` logs how many were skipped.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["SUPPORTED", "FusedRotaryAttention", "swappable"]

# Attention classes whose forward FusedRotaryAttention reproduces, and where each takes the
# ``sliding_window`` it hands the attention interface from: its own attribute, its config, or not at all.
SUPPORTED: dict[str, str | None] = {
    "LlamaAttention": None,
    "MistralAttention": "config",
    "Qwen2Attention": "attribute",
    "Qwen3Attention": "attribute",
    "Qwen3MoeAttention": "attribute",
}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def swappable(module: nn.Module) -> bool:
    """Whether ``module`` is a stock attention of a supported class that can be replaced safely."""
    if type(module).__name__ not in SUPPORTED or isinstance(module, FusedRotaryAttention):
        return False
    if "forward" in vars(module) or any(getattr(module, h, None) for h in _HOOKS):
        return False  # someone already wraps this instance: swapping it would drop their wrapper
    if module._parameters or module._buffers:
        return False  # the supported classes hold everything in children; anything else is unknown
    return callable(getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None))


class FusedRotaryAttention(nn.Module):
    """A Llama-family attention (see ``SUPPORTED``) whose q / k rotary goes through ``rotary``."""

    # Taken over from the replaced module in __init__ (declared for readers and type checkers).
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    config: Any
    layer_idx: int
    head_dim: int
    scaling: float
    attention_dropout: float

    def __init__(self, attention: nn.Module, rotary: Callable[..., torch.Tensor]):
        super().__init__()
        if not swappable(attention):
            raise ValueError(f"{type(attention).__name__} cannot be replaced by FusedRotaryAttention")
        for name, value in vars(attention).items():  # config, layer_idx, head_dim, scaling, training, ...
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, child in attention.named_children():
            setattr(self, name, child)
        self.replaced = type(attention).__name__
        self._sliding_window_from = SUPPORTED[self.replaced]
        self._eager_attention = sys.modules[type(attention).__module__].eager_attention_forward
        self.rotary = rotary

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # the name before transformers renamed it
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if q_norm is not None and k_norm is not None:  # Qwen3: per-head norms before RoPE
            query, key = q_norm(query), k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = self.rotary(query, cos, sin), self.rotary(key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._eager_attention
        )
        if self._sliding_window_from == "attribute":
            kwargs["sliding_window"] = self.sliding_window
        elif self._sliding_window_from == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        out, weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # fmt: skip
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    def extra_repr(self) -> str:
        return f"replaces={self.replaced}, rotary={self.rotary.__module__}.{self.rotary.__name__}"
