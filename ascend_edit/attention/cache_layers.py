"""Cache layers that make the converted model's memory really drop during generation.

MLA layers need nothing special: they store the normalised latent and the rotated shared RoPE key
as a single-"head" key/value pair, so transformers' own `DynamicLayer` holds exactly
`kv_lora_rank + qk_rope_head_dim` values per token.

Sliding-window layers with sink tokens use `SinkWindowLayer`: it keeps the first `sink_tokens`
positions plus the last `window - 1` tokens (all a later query can see) and drops the rest, so it
holds at most `sink_tokens + window - 1` tokens whatever the context length.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SinkWindowLayer(DynamicLayer):
    """A bounded KV cache layer for sliding-window attention with sink tokens.

    Besides keys/values it records each slot's position ([b, t], per row, so left padding works)
    and its absolute index in the stream of tokens fed to the cache ([t]); the attention builds its
    mask from positions and gathers transformers' padding mask by index.
    """

    # Reported as a full layer: transformers then builds full-length masks for the model, which the
    # full-attention layers use as is and this layer indexes into (see `indices`).
    is_sliding = False

    def __init__(self, window: int, sink_tokens: int):
        super().__init__()
        self.window = window
        self.sink_tokens = sink_tokens
        self.positions: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self.cumulative_length = 0

    def update_window(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new states; return keys, values, positions and indices visible to this step's queries."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = positions.new_empty(positions.shape[0], 0)
            self.indices = positions.new_empty(0)
        new_len = key_states.shape[-2]
        new_indices = torch.arange(
            self.cumulative_length, self.cumulative_length + new_len, device=positions.device
        )
        self.cumulative_length += new_len
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        all_positions = torch.cat([self.positions, positions.to(self.positions.dtype)], dim=-1)
        all_indices = torch.cat([self.indices, new_indices])

        # Keep what a *future* query can still see: the last window-1 tokens and the sinks.
        recent = all_indices >= self.cumulative_length - (self.window - 1)
        sink = (all_positions < self.sink_tokens).any(dim=0)
        keep = (recent | sink).nonzero().squeeze(-1)
        self.keys, self.values = keys.index_select(-2, keep), values.index_select(-2, keep)
        self.positions, self.indices = all_positions.index_select(-1, keep), all_indices.index_select(0, keep)
        return keys, values, all_positions, all_indices

    def update(self, key_states, value_states, *args, **kwargs):
        """Generic Cache API: positions default to absolute indices (no padding information)."""
        b, s = key_states.shape[0], key_states.shape[-2]
        start = self.cumulative_length
        positions = torch.arange(start, start + s, device=key_states.device).expand(b, s)
        keys, values, _, _ = self.update_window(key_states, value_states, positions)
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.positions, self.indices, self.cumulative_length = None, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowLayer cannot be cropped: evicted tokens are gone")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


def sink_window_layer(cache: Cache, layer_idx: int, window: int, sink_tokens: int) -> SinkWindowLayer:
    """The `SinkWindowLayer` of `cache` at `layer_idx`, installed on first use.

    `generate()` builds a `DynamicCache` from the config, which knows nothing of converted layers;
    an empty layer slot is swapped for the bounded one the first time this layer writes to it.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, SinkWindowLayer):
        if layer.get_seq_length() > 0:
            raise RuntimeError(f"cache layer {layer_idx} already holds unbounded states")
        layer = SinkWindowLayer(window, sink_tokens)
        cache.layers[layer_idx] = layer
    return layer
