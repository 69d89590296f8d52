"""Op A through ``torch.nn.attention.flex_attention`` (CUDA, forward and backward).

The visibility rule of ``kernels/masks.py`` becomes a ``mask_mod``; ``create_block_mask`` turns
it into a block-sparse ``BlockMask`` so the fused kernel skips blocks outside the window, which
is where the speed-up over a dense SDPA mask comes from.

* The flex kernel is compiled once per process (``torch.compile(flex_attention)``); calling
  flex without compile would materialise the full score matrix.
* A ``BlockMask`` depends on the *values* of the position / segment tensors, so it is cached
  per identity of those tensors (plus window, sinks and shapes): all layers of one forward
  pass share one mask, and a new batch builds a new one (``TensorKeyedCache``).
* CPU has no flex backward; the registry never picks this backend there.
* Rows with no visible key come out as zeros (flex's documented behaviour for fully masked rows).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .contract import sliding_window_contract
from .masks import TensorKeyedCache, visible

__all__ = ["sliding_window_attention", "sliding_window_block_mask"]

_BLOCK_MASKS: TensorKeyedCache[BlockMask] = TensorKeyedCache(max_entries=8)
_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_kernel() -> Callable[..., torch.Tensor]:
    """The compiled flex kernel, built on first use (compiling at import would slow every import)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _make_mask_mod(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_seg: torch.Tensor | None,
    k_seg: torch.Tensor | None,
    window: int,
    sink_tokens: int,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``mask_mod`` closing over this batch's ids.

    A fresh closure per batch (the pattern of flex's document-masking examples) lets the
    compiled kernel treat the captured tensors as inputs instead of recompiling for each batch.
    Window and sink count are captured as 0-d tensors for the same reason: as Python ints,
    every distinct window size would compile its own kernel.
    """
    window_t = torch.tensor(window, dtype=k_pos.dtype, device=k_pos.device)
    sinks_t = torch.tensor(sink_tokens, dtype=k_pos.dtype, device=k_pos.device)

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(
            q_pos[batch, q_idx],
            k_pos[batch, kv_idx],
            window=window_t,
            sink_tokens=sinks_t,
            q_seg=None if q_seg is None else q_seg[batch, q_idx],
            k_seg=None if k_seg is None else k_seg[batch, kv_idx],
        )

    return mask_mod


def sliding_window_block_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int,
    sink_tokens: int,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> BlockMask:
    """The ``BlockMask`` of contract A for ``[b, s]`` / ``[b, t]`` ids (cached per tensor identity)."""
    b, s = q_pos.shape
    t = k_pos.shape[1]

    def build() -> BlockMask:
        mask_mod = _make_mask_mod(q_pos, k_pos, q_seg, k_seg, window, sink_tokens)
        return create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=t, device=q_pos.device)

    if torch.compiler.is_compiling():  # tensors are traced proxies: identity means nothing here
        return build()
    return _BLOCK_MASKS.get_or_build((q_pos, k_pos, q_seg, k_seg), (window, sink_tokens, b, s, t), build)


@sliding_window_contract
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    scale: float,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Op A via flex attention (contract in ``kernels/reference.py``). Returns ``[b, h, s, dv]``.

    ``compiled=False`` runs flex's unfused reference path (forward only on CPU); it exists for
    tests of the mask logic on machines without a GPU.
    """
    block_mask = sliding_window_block_mask(
        q_pos, k_pos, window=window, sink_tokens=sink_tokens, q_seg=q_seg, k_seg=k_seg
    )
    # flex_attention's decorator leaves it untyped to mypy; without return_lse / return_aux it returns a Tensor
    kernel = _flex_kernel() if compiled else cast(Callable[..., torch.Tensor], flex_attention)
    return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
