"""MLA target: DeepSeek-style multi-head latent attention as a drop-in for a teacher attention.

Parameter names and math follow transformers' `DeepseekV3Attention` (non-interleaved RoPE), so a
dense model converted to MLA exports as a native `deepseek_v3` checkpoint:

    q        = q_proj(x)                      or q_b_proj(q_a_layernorm(q_a_proj(x)))
    c, k_r   = split(kv_a_proj_with_mqa(x))   c: latent [kv_lora_rank], k_r: shared RoPE key [rope]
    c        = kv_a_layernorm(c)
    k_n, v   = split(kv_b_proj(c))            per head: [qk_nope_head_dim], [v_head_dim]
    score_h  = (q_n·k_n + RoPE(q_r)·RoPE(k_r)) * (qk_nope + qk_rope)^-0.5

The cache holds only `c` and `RoPE(k_r)`: kv_lora_rank + qk_rope_head_dim values per token and layer.

Two explicit paths compute the same function:
* naive    — decompress k_n, v for every cached token and run standard attention (training, prefill);
* absorbed — fold kv_b_proj's key half into the query and its value half after attention, so the
             scores are taken in latent space and nothing is decompressed (decode).

Qwen3's per-head q_norm / k_norm have no place in this layout and are dropped: the latent RMSNorm
(kv_a_layernorm) bounds key scale instead. The warm start folds their weights into the projections
(see attention/init.py); distillation learns what the per-token normalisation did.

Einsum letters: b batch, s query positions, t key positions, h heads, d head dims, c latent, r rope.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from ascend_edit.attention.geometry import AttentionGeometry
from ascend_edit.attention.interface import attention_function
from ascend_edit.attention.masks import as_bool_mask
from ascend_edit.attention.rope import apply_rope, leading_rope, select_rope
from ascend_edit.config import MLAConfig
from ascend_edit.kernels.masks import TensorKeyedCache
from ascend_edit.kernels.registry import MLA_ABSORBED_ATTENTION, SLIDING_WINDOW_ATTENTION, resolve

PATHS = ("auto", "naive", "absorbed")


class MLAAttention(nn.Module):
    def __init__(self, geometry: AttentionGeometry, cfg: MLAConfig, config=None):
        super().__init__()
        if cfg.qk_rope_head_dim > geometry.head_dim and not getattr(cfg, "rope_frequencies", None):
            raise ValueError(
                f"layer {geometry.layer_idx}: qk_rope_head_dim={cfg.qk_rope_head_dim} exceeds the teacher "
                f"head_dim={geometry.head_dim} (the rotary part reuses the teacher's highest frequencies)"
            )
        self.layer_idx = geometry.layer_idx
        self.config = config  # the model config: transformers' attention interfaces read it
        self.num_heads = geometry.num_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        # Teacher frequency of each rotary pair (target.mla.rope_selection=measured); None: the r/2 highest.
        # A plain tuple, not a buffer: checkpoints and exports carry it in their plan / config, and a buffer
        # would come back uninitialised from a meta-device build. Its index tensor is made once per device.
        chosen = getattr(cfg, "rope_frequencies", None)
        self.rope_frequencies: tuple[int, ...] | None = tuple(chosen) if chosen else None
        self._rope_index: dict[torch.device, torch.Tensor] = {}
        if self.rope_frequencies is not None and (len(self.rope_frequencies) * 2 != cfg.qk_rope_head_dim
                                                  or not all(0 <= f < geometry.head_dim // 2 for f in self.rope_frequencies)):
            raise ValueError(f"layer {geometry.layer_idx}: target.mla.rope_frequencies={list(self.rope_frequencies)} do not give "
                             f"{cfg.qk_rope_head_dim // 2} pairs among the teacher's {geometry.head_dim // 2} frequencies")
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        self.scaling = self.qk_head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = 1  # keys are already per head after decompression
        self.path = "auto"
        self.kernel_backend = "auto"  # kernels.registry backend for the absorbed (decode) op
        self._kernels: dict[tuple[str, str, bool], object] = {}
        bias = geometry.qkv_bias
        hidden, heads = geometry.hidden_size, geometry.num_heads

        # A teacher with a query bias (Qwen2; attention_bias=True) keeps it on the projection that outputs the query
        # (deepseek_v3 has none there: such a conversion exports through auto_map).
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(cfg.q_lora_rank, eps=geometry.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * self.qk_head_dim, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = (DeepseekV3RMSNorm(cfg.kv_lora_rank, eps=geometry.rms_norm_eps)
                               if cfg.latent_norm else nn.Identity())
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, hidden, bias=bias)

    # ----------------------------------------------------------------------------------------------
    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        b, s, _ = x.shape
        return q.view(b, s, self.num_heads, self.qk_head_dim).transpose(1, 2)  # [b, h, s, d]

    def compress_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [b, 1, s, c] (normalised) and the un-rotated shared RoPE key [b, 1, s, r]."""
        b, s, _ = x.shape
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        return latent.view(b, 1, s, self.kv_lora_rank), k_rope.view(b, 1, s, self.qk_rope_head_dim)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [h, d_nope, c], W_uv [h, d_v, c]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    # ----------------------------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask=None,
                cache=None, **kwargs):
        b, s, _ = hidden_states.shape
        if cache is not None and not torch.compiler.is_compiling():
            self._kernel(hidden_states.device.type, False)  # the decode kernel, resolved before any compiled step
        q = self.project_query(hidden_states)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.compress_kv(hidden_states)

        if self.rope_frequencies is None:
            cos, sin = _per_forward(position_embeddings, ("rope", self.qk_rope_head_dim),
                                    lambda: leading_rope(*position_embeddings, self.qk_rope_head_dim))
        else:  # layers choose their own frequencies: a gather of [b, s, r] each, not shared
            cos, sin = select_rope(*position_embeddings, self._rope_index_on(position_embeddings[0].device))
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)
        # Cache slot (= index in the stream of tokens fed) of each query: an int for dynamic caches, a
        # device tensor for static ones (read before the update, which advances it in place). Every layer of
        # a forward reads the same value (the cache's layers advance together): derived once per forward,
        # keyed also by the length's in-place version, which every update advances.
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        state = past._version if isinstance(past, torch.Tensor) else past
        q_slot = _per_forward((attention_mask, position_embeddings[0]), ("q_slot", s, state),
                              lambda: past + torch.arange(s, device=hidden_states.device))
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        if self._use_absorbed(s, cache):
            out = self.absorbed_attention(q_nope, q_rope, latent, k_rope, attention_mask, q_slot)
        else:
            out = self.naive_attention(q_nope, q_rope, latent, k_rope, attention_mask)
        return self.o_proj(out.reshape(b, s, -1)), None

    def _rope_index_on(self, device: torch.device) -> torch.Tensor:
        index = self._rope_index.get(device)
        if index is None:
            assert self.rope_frequencies is not None, "only layers with chosen frequencies gather them"
            index = self._rope_index[device] = torch.tensor(self.rope_frequencies, dtype=torch.long, device=device)
        return index

    def _kernel(self, device_type: str, needs_grad: bool):
        """The registry's absorbed-attention kernel, resolved once per (backend, device, grad) and kept: a
        compiled decode step then finds it without tracing the registry's lazy import."""
        key = (self.kernel_backend, device_type, needs_grad)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = resolve(MLA_ABSORBED_ATTENTION, self.kernel_backend,
                                                  device_type=device_type, needs_grad=needs_grad)
        return kernel

    def _use_absorbed(self, q_len: int, cache) -> bool:
        if self.path != "auto":
            return self.path == "absorbed"
        # Decode: a few queries against a long latent cache, no gradient — absorption reads only latents.
        return cache is not None and q_len <= 8 and not torch.is_grad_enabled()

    def naive_attention(self, q_nope, q_rope, latent, k_rope, attention_mask):
        """Decompress keys/values and attend per head. Returns [b, s, h, d_v]."""
        b, _, t, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, t, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if q.device.type == "npu" and attention_mask is None and q.shape[2] == t:
            # Plain causal without a cache: npu_fusion_attention with the compressed causal mask, via the
            # sliding-window op with window 0 (it pads v's head dim to q/k's; see docs/npu.md).
            kernel = resolve(SLIDING_WINDOW_ATTENTION, "auto", device_type="npu", needs_grad=torch.is_grad_enabled())
            pos = torch.arange(t, device=q.device).expand(b, t)
            out = kernel(q, k, v, q_pos=pos, k_pos=pos, window=0, sink_tokens=0, scale=self.scaling)
            return out.transpose(1, 2)
        # transformers' attention function for config._attn_implementation, with transformers' own mask
        out, _ = attention_function(self)(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return out

    def absorbed_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, q_slot=None):
        """Attend in latent space without decompressing the cache. Returns [b, s, h, d_v].

        The kernel masks by positions, so transformers' mask [b, 1, s, t] is turned into slot indices
        without a host sync: a key is a slot whose column some query may see (not padding, not an empty
        static slot), a query sees the keys up to its own slot `q_slot` [s]. That is exactly the causal
        mask with padding that transformers builds, and keeps the step capturable as a graph.
        """
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)
        b, _, s, _ = q_latent.shape
        t = latent.shape[2]
        if q_slot is None:  # a cache holding exactly the keys seen so far
            q_slot = torch.arange(t - s, t, device=latent.device)
        given = as_bool_mask(attention_mask)
        k_pos = _per_forward((attention_mask,), ("k_pos", b, t), lambda: _key_slots(given, b, t, latent.device))
        kernel = self._kernel(latent.device.type, torch.is_grad_enabled())
        out_latent = kernel(q_latent, q_rope, latent[:, 0], k_rope[:, 0], q_pos=q_slot.expand(b, s), k_pos=k_pos,
                            scale=self.scaling)
        return torch.einsum("bhsc,hvc->bshv", out_latent, w_uv)


# Every layer of one forward gets the same rotary tables and mask objects: what the layers derive from them
# alone (the rotary part's tables, the key slots) is built once per forward in eager runs and CUDA-graph
# captures, instead of as a few extra kernels in every layer of every decode step.
_PER_FORWARD: TensorKeyedCache = TensorKeyedCache(max_entries=8)


def _per_forward(tensors, params, build):
    if torch.compiler.is_compiling() or all(t is None for t in tensors):  # a trace fuses these ops anyway
        return build()
    return _PER_FORWARD.get_or_build(tensors, params, build)


def _key_slots(given: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """Slot index of each key [b, t], -1 where no query of the forward may see it (padding, empty slots)."""
    k_pos = torch.arange(t, device=device).expand(b, t)
    if given is None:
        return k_pos
    return torch.where(given[:, 0, :, :t].any(dim=-2), k_pos, -1)
