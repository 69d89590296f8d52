"""Cache layers that make the converted model's memory really drop during generation.

MLA layers need nothing special: they store the normalised latent and the rotated shared RoPE key
as a single-"head" key/value pair, so transformers' own `DynamicLayer` / `StaticLayer` hold exactly
`kv_lora_rank + qk_rope_head_dim` values per token.

Sliding-window layers with sink tokens get a bounded layer in place of the one transformers built
from the config (which knows nothing of converted layers), installed by `sink_window_layer`:

* `SinkWindowLayer` (dynamic caches): keeps the first `sink_tokens` positions plus the last
  `window - 1` tokens (all a later query can see) and drops the rest.
* `StaticSinkWindowLayer` (static caches, `generate(..., cache_implementation="static")`): a
  preallocated ring of `sink_tokens + window + 1` slots (fewer for a shorter cache) written in place, with each slot's position
  kept in a tensor, so a decode step has fixed shapes, no host synchronisation and can be captured
  by `torch.compile` / CUDA graphs.

Both are sized by the attention layer that installs them (its own `window`), so layers with different windows
(budget-aware plans, models/budget.py `windows_for_budget`) each get their own bound; rings of one window share
their bookkeeping (`StaticSinkWindowLayer.leader`), rings of another window form a group of their own.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer


class SinkWindowLayer(DynamicLayer):
    """A bounded KV cache layer for sliding-window attention with sink tokens.

    Besides keys/values it records each slot's position ([b, t], per row, so left padding works)
    and its absolute index in the stream of tokens fed to the cache ([t]); the attention builds its
    mask from positions and gathers transformers' padding mask by index.

    Columns are shared by the batch's rows (transformers' mask is gathered by column), so a column is kept while
    any row needs it: unpadded rows hold `sink_tokens + window - 1`, but in a left-padded batch each row's sinks
    sit in other columns and every row keeps them all — up to the spread of the padding more per row. The static
    ring (`StaticSinkWindowLayer`) keeps per-row sink slots and holds exactly `sink_tokens + window - 1`.
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
        self.real: torch.Tensor | None = None  # [b, kept]: False for padding
        self.cumulative_length = 0
        # transformers' rollback protocol (assisted decoding, prompt lookup): while recording, nothing is evicted,
        # so `crop` can take back tokens; `crop` then bounds the layer again.
        self.record_past = False

    def update_window(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
        real: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new states; return keys, values, positions and indices visible to this step's queries.
        `real` [b, s]: False for padding (transformers gives left padding position 1, which is no sink)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = positions.new_empty(positions.shape[0], 0)
            self.indices = positions.new_empty(0)
            self.real = torch.ones_like(self.positions, dtype=torch.bool)
        assert self.keys is not None and self.values is not None  # allocated on the first update
        assert self.positions is not None and self.indices is not None and self.real is not None
        real = torch.ones_like(positions, dtype=torch.bool) if real is None else real.to(positions.device)
        new_len = key_states.shape[-2]
        new_indices = torch.arange(
            self.cumulative_length, self.cumulative_length + new_len, device=positions.device
        )
        self.cumulative_length += new_len
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        all_positions = torch.cat([self.positions, positions.to(self.positions.dtype)], dim=-1)
        all_indices = torch.cat([self.indices, new_indices])
        all_real = torch.cat([self.real, real.expand_as(positions)], dim=-1)

        self.keys, self.values, self.positions, self.indices, self.real = keys, values, all_positions, all_indices, all_real
        if not self.record_past:
            self._evict()
        return keys, values, all_positions, all_indices

    def _evict(self) -> None:
        """Keep what a *future* query can still see: the last window-1 tokens and the sinks (real tokens only)."""
        assert self.keys is not None and self.values is not None  # called after an update
        assert self.positions is not None and self.indices is not None and self.real is not None
        recent = self.indices >= self.cumulative_length - (self.window - 1)
        sink = ((self.positions < self.sink_tokens) & self.real).any(dim=0)
        self._keep((recent | sink).nonzero().squeeze(-1))

    def _keep(self, columns: torch.Tensor) -> None:
        assert self.keys is not None and self.values is not None  # called after an update
        assert self.positions is not None and self.indices is not None and self.real is not None
        self.keys, self.values = self.keys.index_select(-2, columns), self.values.index_select(-2, columns)
        self.positions, self.indices = self.positions.index_select(-1, columns), self.indices.index_select(0, columns)
        self.real = self.real.index_select(-1, columns)

    def activate_past_recording(self) -> None:
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last `-tokens_to_remove` tokens (transformers' convention: a negative count; 0 only bounds
        the layer again), then keep what a later query can see. Needs the tokens the shorter stream's window holds:
        they are there while past recording is on (transformers turns it on for assisted decoding) or while nothing
        has been evicted yet."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if not self.is_initialized or self.indices is None:
            return
        length = self.cumulative_length + tokens_to_remove
        if length < 0:
            raise ValueError(f"crop({tokens_to_remove}): the layer holds a stream of {self.cumulative_length} tokens")
        needed = torch.arange(max(length - (self.window - 1), 0), length, device=self.indices.device)
        if not bool(torch.isin(needed, self.indices).all()):
            raise RuntimeError(
                f"a GateSWA sink/window cache layer cannot be cropped back to {length} tokens: tokens that window "
                "needs were evicted (it was not recording past states); assisted decoding and prompt lookup work on "
                "an exported model (ascend-edit export), whose generate puts these layers in the cache before "
                "recording starts")
        self.cumulative_length = length
        self._keep((self.indices < length).nonzero().squeeze(-1))
        self._evict()  # recording goes on until transformers turns it off: each rollback starts from here

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
        self.positions, self.indices, self.real, self.cumulative_length = None, None, None, 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.real is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.real = self.real.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.real is not None:
            self.positions, self.real = self.positions[indices, ...], self.real[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.real is not None:
            rows = beam_idx.to(self.positions.device)
            self.positions, self.real = self.positions.index_select(0, rows), self.real.index_select(0, rows)


T = TypeVar("T")


def _same_tensors(refs: list[weakref.ref[torch.Tensor] | None], versions: list[int],
                  tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether `tensors` are the very objects `refs` point to, unmodified since (`versions`)."""
    for ref, version, tensor in zip(refs, versions, tensors):
        if tensor is None or ref is None:
            if tensor is not None or ref is not None:
                return False
        elif ref() is not tensor or tensor._version != version:
            return False
    return True


@dataclass
class RingWrite:
    """Where one forward's new tokens go in a ring, from `StaticSinkWindowLayer.plan_write`.

    Decode (`tail` is None): `slots` [b, 1] is each row's slot, `slot_positions` [b, 1] the position
    stored there and `positions_after` [b, slots] the ring's positions after the write (an elementwise select,
    so a compiled step computes it in the kernel that builds the mask from it, where a scatter would be a
    kernel of its own). Prefill: `slots` [n] are the window slots of the new tokens `tail` (the last n <= window)
    and `slot_positions` [b, n] their positions; `sink_columns` / `sink_found` [b, sinks] say which new
    token, if any, holds sink position p of each row.
    """

    slots: torch.Tensor
    slot_positions: torch.Tensor
    tail: slice | None = None
    sink_columns: torch.Tensor | None = None
    sink_found: torch.Tensor | None = None
    positions_after: torch.Tensor | None = None


class StaticSinkWindowLayer(StaticLayer):
    """A preallocated ring buffer for sliding-window attention with sink tokens (static caches).

    Slots ``[0, sink_tokens)`` hold each row's sink tokens (slot = position), slots
    ``[sink_tokens, sink_tokens + window)`` the last `window` tokens fed (slot = stream index mod
    window); the last slot stays empty (position -1): sinks are now gathered into their slots rather
    than scattered with every other token sent to a scratch slot, and the layout is kept as it was.
    `positions` [b, slots] holds each slot's position, -1 for an empty slot, a padding token or a
    window slot whose token lives in a sink slot, so attention masks by position alone and sees
    every visible key exactly once. Storage never moves after the first write.

    A decode step (one new token) writes first and then attends over the ring: the slot it overwrites
    held the token `window` steps back, which the new query can no longer see. Longer inputs (prefill)
    attend over the ring plus the new tokens, then write (see `GateSWAAttention`).

    Reported as a full layer of `max_cache_len` tokens: transformers then builds full-length masks that
    the full-attention layers use as they are; this layer reads only its rows' padding from them.

    Every ring of one cache with the same window and sinks sees the same tokens, so its bookkeeping
    (slots, positions, the mask) is the same in all of them: the lowest-indexed one, the group's
    `leader`, plans each forward once and the others take its plan (`shared_plan`), so a decode step
    costs each further ring two indexed writes of its states, not the whole bookkeeping again.
    """

    is_sliding = False
    is_croppable = False  # slots are overwritten in place: transformers refuses assisted decoding up front

    def __init__(self, max_cache_len: int, window: int, sink_tokens: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.window = window
        self.sink_tokens = sink_tokens
        # Window slots: `window`, or fewer when the whole cache is shorter — a static cache never holds more than
        # max_cache_len tokens, so a ring of sinks + (max_cache_len - sinks) window slots never overwrites a token
        # a query can still see, and the "bounded" layer is never larger than the full layer it replaces.
        self.slot_window = max(1, min(window, max_cache_len - sink_tokens))
        self.num_slots = sink_tokens + self.slot_window + 1
        self.positions: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # [b]: 0..b-1, allocated with the ring
        self.holds_tokens = False  # Python-side: a prefill into an empty ring need not attend over it
        self.leader: StaticSinkWindowLayer = self
        self._plan: tuple[list[weakref.ref[torch.Tensor] | None], list[int], object] | None = None
        self._traced_plan: tuple[tuple[torch.Tensor | None, ...], object] | None = None  # see shared_plan

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.num_slots)
        self.keys = torch.zeros((*shape, self.k_head_dim), dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros((*shape, self.v_head_dim), dtype=value_states.dtype, device=self.device)
        self.positions = torch.full((self.batch_size, self.num_slots), -1, dtype=torch.long, device=self.device)
        self.rows = torch.arange(self.batch_size, device=self.device)  # each row's index, for the decode write
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            # Fixed addresses: compiled graphs and CUDA graphs may mutate them in place.
            for tensor in (self.keys, self.values, self.positions, self.rows, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor,
              real: torch.Tensor) -> None:
        """Store new states [b, hk, s, d] with their positions [b, s]; `real` [b, s] is False for padding."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.apply_write(key_states, value_states, self.plan_write(positions, real))

    def plan_write(self, positions: torch.Tensor, real: torch.Tensor) -> RingWrite:
        """Where tokens with `positions` [b, s] (`real` False for padding) go; reads the ring, changes nothing."""
        s = positions.shape[-1]
        stream = self.cumulative_length + torch.arange(s, device=self.device)  # stream index of each new token
        positions = positions.to(torch.long)
        is_sink = real & (positions < self.sink_tokens)
        if s == 1:
            # Decode: a sink skips its window slot, whose old token is `window` steps back and never a sink
            # itself (sinks never enter window slots): invisible either way.
            slot = torch.where(is_sink, positions, self.sink_tokens + stream % self.slot_window)  # [b, 1]
            slot_positions = torch.where(real, positions, -1)
            assert self.positions is not None  # the ring is initialized before planning
            written = torch.arange(self.num_slots, device=self.device) == slot  # [b, slots], one True per row
            after = torch.where(written, slot_positions, self.positions)
            return RingWrite(slot, slot_positions, positions_after=after)
        # Window slots: only the last `window` new tokens can still be seen by a later query (with fewer slots,
        # what the tail leaves out lies among the first `sinks` tokens of the stream: padding or sinks).
        tail = slice(max(s - self.slot_window, 0), s)
        slots = self.sink_tokens + stream[tail] % self.slot_window
        window_pos = torch.where(real & ~is_sink, positions, -1)[:, tail]
        if not self.sink_tokens:
            return RingWrite(slots, window_pos, tail)
        # Sink p of a row is the real token at position p (positions of a row's real tokens are distinct):
        # a [b, s, sinks] match, not a scatter of every new token (which would all collide on one slot).
        match = is_sink[:, :, None] & (positions[:, :, None] == torch.arange(self.sink_tokens, device=self.device))
        return RingWrite(slots, window_pos, tail, match.to(torch.uint8).argmax(dim=1), match.any(dim=1))

    def apply_write(self, key_states: torch.Tensor, value_states: torch.Tensor, plan: RingWrite) -> None:
        """Store new states [b, hk, s, d] where `plan` (of this ring or its leader) puts them; in place."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.holds_tokens:
            self.holds_tokens = True
        keys, values, positions = self.keys, self.values, self.positions
        assert keys is not None and values is not None and positions is not None  # allocated above
        if plan.tail is None:  # decode: one indexed write per state buffer; the positions as the plan has them after
            # keys[row, :, slot of the row] = the row's new key: an index_put_, which a compiled step writes in place.
            # (A scatter_ into this buffer, a graph input, is traced as an out-of-place scatter plus a copy back:
            # inductor then copies the whole ring twice per step for one slot's worth of new data.)
            slots = plan.slots[:, 0]
            assert self.rows is not None  # allocated with the ring
            keys[self.rows, :, slots] = key_states[:, :, 0]
            values[self.rows, :, slots] = value_states[:, :, 0]
            assert plan.positions_after is not None  # every decode plan carries them
            positions.copy_(plan.positions_after)
            self.cumulative_length.add_(1)
            return
        keys.index_copy_(2, plan.slots, key_states[:, :, plan.tail])
        values.index_copy_(2, plan.slots, value_states[:, :, plan.tail])
        positions.index_copy_(1, plan.slots, plan.slot_positions)
        if plan.sink_columns is not None and plan.sink_found is not None:
            sinks = self.sink_tokens
            found = plan.sink_found[:, None, :, None]
            for buffer, states in ((keys, key_states), (values, value_states)):
                b, h, _, d = states.shape
                picked = states.gather(2, plan.sink_columns[:, None, :, None].expand(b, h, sinks, d))
                buffer[:, :, :sinks] = torch.where(found, picked, buffer[:, :, :sinks])
            sink_pos = torch.arange(sinks, device=self.device).expand_as(plan.sink_found)
            positions[:, :sinks] = torch.where(plan.sink_found, sink_pos, positions[:, :sinks])
        self.cumulative_length.add_(key_states.shape[-2])

    def shared_plan(self, key: tuple[torch.Tensor | None, ...], build: Callable[[], T]) -> T:
        """`build()` once per forward for the ring's whole group (see the class docstring).

        The leader builds on every call and keeps the result with `key` (the forward's position ids and
        mask: identity and in-place version); a ring of the same group later in the same forward gets it
        back. A CUDA-graph capture of the eager step records the shared plan.

        Under torch.compile (one trace of the whole step) the leader keeps its traced plan with the traced key
        tensors, and a ring later in the same trace takes it when its key is the very same traced tensors: the
        step's graph then holds one plan, not one per ring. A ring traced without its leader (a graph of its
        own) finds no matching key and builds its own plan.
        """
        if key[0] is None:
            return build()
        if torch.compiler.is_compiling():
            return self._traced_shared_plan(key, build)
        leader = self.leader
        if leader is self:
            value = build()
            self._plan = ([None if t is None else weakref.ref(t) for t in key],
                          [-1 if t is None else t._version for t in key], value)
            return value
        held = leader._plan
        if held is not None and _same_tensors(held[0], held[1], key):
            return cast(T, held[2])
        return build()

    def _traced_shared_plan(self, key: tuple[torch.Tensor | None, ...], build: Callable[[], T]) -> T:
        leader = self.leader
        if leader is self:
            value = build()
            self._traced_plan = (key, value)
            return value
        held = leader._traced_plan
        if held is not None and len(held[0]) == len(key) and all(a is b for a, b in zip(held[0], key)):
            return cast(T, held[1])
        return build()

    def update(self, key_states, value_states, *args, **kwargs):
        """Generic Cache API (no padding information): positions are stream indices; returns the ring."""
        s = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = (self.cumulative_length + torch.arange(s, device=self.device)).expand(key_states.shape[0], s)
        self.write(key_states, value_states, positions, torch.ones_like(positions, dtype=torch.bool))
        return self.keys, self.values

    def assume_filled(self, length: int) -> None:
        """Benchmarks: make the ring describe a prompt of `length` tokens (positions 0..length-1) without
        running it; the stored states are left as they are. Needs an initialized layer."""
        assert self.positions is not None, "assume_filled needs an initialized layer"
        stream = torch.arange(max(length - self.slot_window, 0), length, device=self.device)
        self.positions.fill_(-1)
        slots = self.sink_tokens + stream % self.slot_window
        self.positions[:, slots] = torch.where(stream < self.sink_tokens, -1, stream)
        sinks = min(self.sink_tokens, length)
        self.positions[:, :sinks] = torch.arange(sinks, device=self.device)
        self.cumulative_length.fill_(length)
        self.holds_tokens = length > 0

    def reset(self) -> None:
        super().reset()
        if self.positions is not None:
            self.positions.fill_(-1)
        self.holds_tokens = False
        self._plan = None
        self._traced_plan = None

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a GateSWA static ring cache cannot be cropped (its slots are overwritten in place): use the "
                           "dynamic cache for assisted decoding or prompt lookup")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            assert self.keys is not None and self.values is not None and self.positions is not None
            for tensor in (self.keys, self.values, self.positions):
                tensor.copy_(tensor.index_select(0, beam_idx.to(self.device)))


def sink_window_layer(cache: Cache, layer_idx: int, window: int,
                      sink_tokens: int) -> SinkWindowLayer | StaticSinkWindowLayer:
    """The bounded layer of `cache` at `layer_idx`, installed on first use.

    `generate()` builds a `DynamicCache` or `StaticCache` from the config, which knows nothing of
    converted layers; an empty layer slot is swapped for the bounded one of the same kind (a ring for
    static caches) the first time this layer writes to it — in the prefill, before any compiled step.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, (SinkWindowLayer, StaticSinkWindowLayer)):
        return layer
    assert isinstance(layer, CacheLayerMixin)  # an attention layer's slot (not a linear-attention or dummy one)
    if layer.is_initialized and int(layer.get_seq_length()) > 0:  # once per generation, before any compiled step
        raise RuntimeError(f"cache layer {layer_idx} already holds unbounded states")
    if isinstance(layer, StaticLayer):
        layer = StaticSinkWindowLayer(layer.max_cache_len, window, sink_tokens)
        # Layers install in forward order: the first ring of the same shape leads the group.
        layer.leader = next((other for other in cache.layers[:layer_idx] if isinstance(other, StaticSinkWindowLayer)
                             and (other.window, other.sink_tokens) == (window, sink_tokens)), layer)
    else:
        layer = SinkWindowLayer(window, sink_tokens)
    cache.layers[layer_idx] = layer
    return layer
