"""KV-cache accounting: bytes per token and per layer from the plan, and bytes actually held.

The accounted numbers come from shapes alone; `measured_cache_bytes` sums the tensors a real cache
holds after `generate`, so tests can check one against the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers.cache_utils import Cache

from ascend_edit.attention.edited import EditedAttention
from ascend_edit.attention.gate_swa import GateSWAAttention
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.models.surgery import decoder_layers


@dataclass(frozen=True)
class LayerKV:
    layer_idx: int
    kind: str  # gqa | mla | swa
    values_per_token: int  # cached scalars per token (keys + values, or latent + rope key)
    max_tokens: int | None  # bounded cache (sliding window + sinks); None = grows with context

    def tokens_held(self, context: int) -> int:
        return context if self.max_tokens is None else min(context, self.max_tokens)

    def bytes_at(self, context: int, bytes_per_value: int, batch: int = 1) -> int:
        return batch * self.tokens_held(context) * self.values_per_token * bytes_per_value


def _attention_kv(attn: nn.Module, layer_idx: int) -> LayerKV:
    if isinstance(attn, MLAAttention):
        return LayerKV(layer_idx, "mla", attn.kv_lora_rank + attn.qk_rope_head_dim, None)
    if isinstance(attn, GateSWAAttention):
        per_token = 2 * attn.num_kv_heads * attn.head_dim
        if attn.is_sliding:
            # what the dynamic cache holds; the static ring (attention/cache_layers.StaticSinkWindowLayer)
            # allocates sinks + window + 1 slots: the new token's slot is written before attention reads it,
            # and one slot stays empty (README)
            return LayerKV(layer_idx, "swa", per_token, attn.window - 1 + attn.sink_tokens)
        return LayerKV(layer_idx, "gqa", per_token, None)
    # a teacher attention (read_geometry's layouts); nn.Module's typing cannot know its attributes
    head_dim = cast(int, attn.head_dim)
    num_kv = cast(nn.Linear, attn.k_proj).out_features // head_dim
    return LayerKV(layer_idx, "gqa", 2 * num_kv * head_dim, None)


def kv_layout(model: nn.Module, which: str = "student") -> list[LayerKV]:
    """Per-layer cache layout of the teacher or of the converted (student) model."""
    layouts = []
    for idx, layer in enumerate(decoder_layers(model)):
        attn = cast(nn.Module, layer.self_attn)
        if isinstance(attn, EditedAttention):
            attn = attn.teacher if which == "teacher" else attn.target
        layouts.append(_attention_kv(attn, idx))
    return layouts


def total_bytes(layout: list[LayerKV], context: int, bytes_per_value: int, batch: int = 1) -> int:
    return sum(layer.bytes_at(context, bytes_per_value, batch) for layer in layout)


def measured_cache_bytes(cache: Cache) -> int:
    """Bytes of key/value (or latent/rope) tensors held by a transformers cache, metadata excluded."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def kv_table(model: nn.Module, context: int, bytes_per_value: int = 2) -> dict:
    """Teacher vs converted bytes per token (averaged over layers at `context`) and in total."""
    teacher, student = kv_layout(model, "teacher"), kv_layout(model, "student")
    t_total = total_bytes(teacher, context, bytes_per_value)
    s_total = total_bytes(student, context, bytes_per_value)
    return {
        "context": context,
        "bytes_per_value": bytes_per_value,
        "teacher_bytes_per_token": t_total / context,
        "converted_bytes_per_token": s_total / context,
        "teacher_total_bytes": t_total,
        "converted_total_bytes": s_total,
        "reduction_pct": 100.0 * (1 - s_total / t_total) if t_total else 0.0,
        "layers": [(t, s) for t, s in zip(teacher, student)],
    }
