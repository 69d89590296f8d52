"""Decode on Ascend NPUs through ``torch_npu.npu_fused_infer_attention_score`` (no backward).

Two entry points:

* :func:`sliding_window_decode` -- op A for a few queries against a cache (GateSWA decode).
* :func:`mla_absorbed_attention` -- op B, MLA in absorbed form: the latent cache is both key and
  value, the decoupled RoPE parts go in as ``query_rope`` / ``key_rope``.

Facts relied on (torch_npu API reference, ``npu_fused_infer_attention_score``; see ``docs/npu.md``):
``atten_mask`` bool, True = masked out; layout BNSD; ``num_heads`` / ``num_key_value_heads``;
``sparse_mode=3`` is bottom-right causal with the compressed 2048 x 2048 mask; ``query_rope`` /
``key_rope`` (MLA) require latent D = 512, rope D = 64, a single KV head, 32 / 64 / 128 query
heads, fp16 / bf16, and at most 16 query tokens (the strictest statement of the constraints we
found; shapes outside them fall back to the eager reference, logged once per reason).

Sliding-window decode -- how the window and the sinks reach the op:

* **compact** (one query, keys one consecutive run of positions, the same in every row): the window
  is the last ``window`` keys and the sinks are the first ``sink_tokens`` positions, so the op gets
  ``[sink keys outside the window] ++ [last window keys]`` as K/V and needs no mask at all. The
  sink tokens are ordinary keys here (FIA v2's ``sink`` argument is a learned per-head logit, a
  different mechanism).
* **explicit** (a ring-buffer cache, empty slots, several queries): a ``[b, 1, s, t]`` mask over the
  keys the cache holds. The project's sink-window cache keeps at most ``sink + window - 1`` keys,
  so this mask is small; ``pre_tokens`` cannot express the window here because index distance is not
  position distance in a ring buffer.
"""
from __future__ import annotations

import logging

import torch

from ..contract import mla_contract, sliding_window_contract
from ..masks import dense_visibility
from ..reference import mla_absorbed_attention as mla_reference
from ._torch_npu import import_torch_npu, log_once
from .fusion_attention import SPARSE_CAUSAL, UNLIMITED_TOKENS, compressed_causal_mask

__all__ = ["mla_absorbed_attention", "mla_fused_infer_unfit_reason", "sliding_window_decode"]

MLA_LATENT_DIM = 512
MLA_ROPE_DIM = 64
MLA_QUERY_HEADS = (32, 64, 128)
MLA_MAX_QUERIES = 16
MLA_DTYPES = (torch.float16, torch.bfloat16)


def _infer(query, key, value, *, atten_mask=None, actual_seq_lengths_kv=None, query_rope=None, key_rope=None,
           num_key_value_heads: int, scale: float, sparse_mode: int = 0) -> torch.Tensor:  # fmt: skip
    out, _ = import_torch_npu().npu_fused_infer_attention_score(
        query,
        key,
        value,
        atten_mask=atten_mask,
        actual_seq_lengths_kv=actual_seq_lengths_kv,
        query_rope=query_rope,
        key_rope=key_rope,
        num_heads=query.shape[1],
        scale=scale,
        pre_tokens=UNLIMITED_TOKENS,
        next_tokens=UNLIMITED_TOKENS if sparse_mode == 0 else 0,
        input_layout="BNSD",
        num_key_value_heads=num_key_value_heads,
        sparse_mode=sparse_mode,
    )
    return out


@sliding_window_contract
def sliding_window_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int,
    sink_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Op A (no segments, no grad) through the fused inference op. Returns ``[b, h, s, dv]``."""
    t, hk = k.shape[2], k.shape[1]
    q = q.contiguous()
    keys = _compact_keys(q_pos, k_pos, window, sink_tokens)
    if keys is not None:
        k_c = torch.cat([k[:, :, :keys[0]], k[:, :, t - keys[1]:]], dim=2).contiguous()
        v_c = torch.cat([v[:, :, :keys[0]], v[:, :, t - keys[1]:]], dim=2).contiguous()
        return _infer(q, k_c, v_c, num_key_value_heads=hk, scale=scale)
    vis = dense_visibility(q_pos, k_pos, window=window, sink_tokens=sink_tokens)  # [b, s, t], t = cache size
    empty_rows = ~vis.any(dim=-1, keepdim=True)
    vis[..., :1] |= empty_rows  # never send a fully masked row
    out = _infer(q, k.contiguous(), v.contiguous(), atten_mask=~vis[:, None], num_key_value_heads=hk, scale=scale)
    return out.masked_fill(empty_rows[:, None], 0.0)


def _compact_keys(q_pos, k_pos, window, sink_tokens) -> tuple[int, int] | None:
    """(leading sink keys, trailing window keys) when one query sees exactly those; else None."""
    s, t = q_pos.shape[1], k_pos.shape[1]
    if s != 1:
        return None
    first = k_pos[:, :1]
    expected = first + torch.arange(t, device=k_pos.device)
    facts = torch.stack([
        (k_pos == expected).all(),
        (first == first[:1]).all(),
        (first >= 0).all(),
        (q_pos[:, 0] == k_pos[:, -1]).all(),  # the query is the newest key
    ]).all()
    if not bool(facts):  # one host sync per decode step (shared by the layers through the ids)
        return None
    p0 = int(first[0, 0])
    if window == 0 or window >= t:
        return 0, t
    in_window = window
    sinks = max(0, min(sink_tokens - p0, t - window))  # sink positions present and outside the window
    return sinks, in_window


def _valid_prefix_lengths(q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[int] | None:
    """Per row, the number L of valid keys when they are positions 0..L-1 followed only by empty
    slots (a static cache) and the queries are the newest of them; None otherwise.

    Several queries need every row full (``sparse_mode=3`` aligns the causal mask to the end of
    the keys), a single query takes any prefix through ``actual_seq_lengths_kv``. One host sync.
    """
    s, t = q_pos.shape[1], k_pos.shape[1]
    if s > t:
        return None
    ar = torch.arange(t, device=k_pos.device)
    valid = k_pos >= 0
    lengths = valid.sum(dim=1)  # [b]
    prefix = (valid == (ar[None] < lengths[:, None])).all() & ((k_pos == ar[None]) | ~valid).all()
    tail = (q_pos == lengths[:, None] - s + torch.arange(s, device=q_pos.device)[None]).all()
    full = (lengths == t).all() if s > 1 else torch.ones((), dtype=torch.bool, device=k_pos.device)
    ok = bool((prefix & tail & full & (lengths >= s).all()).item())
    return lengths.tolist() if ok else None


def mla_fused_infer_unfit_reason(q_latent, q_rope, latent, k_rope) -> str | None:
    """Why these shapes cannot go through the fused op's MLA mode (None: they can)."""
    h, s, c = q_latent.shape[1], q_latent.shape[2], q_latent.shape[3]
    r = q_rope.shape[3]
    if c != MLA_LATENT_DIM or r != MLA_ROPE_DIM:
        return f"latent/rope dims {c}/{r} (the op takes {MLA_LATENT_DIM}/{MLA_ROPE_DIM})"
    if h not in MLA_QUERY_HEADS:
        return f"{h} query heads (the op takes {MLA_QUERY_HEADS})"
    if s > MLA_MAX_QUERIES:
        return f"{s} queries (the op takes at most {MLA_MAX_QUERIES})"
    if q_latent.dtype not in MLA_DTYPES:
        return f"dtype {q_latent.dtype} (the op takes fp16 / bf16)"
    return None


@mla_contract
def mla_absorbed_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Op B through the fused inference op's MLA mode; logged eager fallback where it does not fit."""
    reason = mla_fused_infer_unfit_reason(q_latent, q_rope, latent, k_rope)
    s, t = q_latent.shape[2], latent.shape[1]
    kv_lengths = None
    if reason is None:
        kv_lengths = _valid_prefix_lengths(q_pos, k_pos)
        if kv_lengths is None:
            reason = "positions are not a causal cache prefix (0..L-1 then empty slots, queries the newest)"
    if reason is not None or kv_lengths is None:  # kv_lengths is None exactly when there is a reason
        log_once(f"mla:{reason}", "npu MLA decode: eager fallback because of %s", reason, level=logging.WARNING)
        return mla_reference(q_latent, q_rope, latent, k_rope, q_pos=q_pos, k_pos=k_pos, scale=scale)
    kv = latent[:, None].contiguous()  # [b, 1, t, c]: key and value are the same latent tensor
    return _infer(
        q_latent.contiguous(),
        kv,
        kv,
        atten_mask=None if s == 1 else compressed_causal_mask(latent.device),
        actual_seq_lengths_kv=None if all(n == t for n in kv_lengths) else kv_lengths,
        query_rope=q_rope.contiguous(),
        key_rope=k_rope[:, None].contiguous(),
        num_key_value_heads=1,
        scale=scale,
        sparse_mode=0 if s == 1 else SPARSE_CAUSAL,
    )
