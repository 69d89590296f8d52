"""Initialisation of target modules: random (a learnable target from scratch) or warm from the teacher.

Warm starts:
* GateSWA / identity: copy q/k/v/o (and Qwen3's q/k norms). The gate starts at σ(0) = 1/2 with zero
  input weights, and o_proj is scaled by 2 to compensate, so the converted layer computes exactly
  the teacher's function at step 0 while the gate sits where its gradient is largest.
* MLA: a whitened joint SVD of the stacked key (position-free part) and value projections gives
  the latent down/up projections; the shared RoPE key takes, per kept frequency, the principal
  direction across KV heads. Whitening by the covariance of the layer's real inputs makes the
  low-rank fit minimise the error on actual activations, not on weights. `whitening_shrinkage` pulls
  that covariance toward a scaled identity, so directions the calibration text barely excites (but
  other text does) are not dropped for free.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, cast

import torch
from torch import nn

from ascend_edit.attention.geometry import AttentionGeometry
from ascend_edit.attention.rope import rope_dims

if TYPE_CHECKING:
    from ascend_edit.attention.gate_swa import GateSWAAttention
    from ascend_edit.attention.mla import MLAAttention


@dataclass
class LayerStats:
    """Statistics of one teacher attention layer's inputs, gathered on calibration batches."""

    input_cov: torch.Tensor  # E[x x^T] of the attention input, [hidden, hidden], float64
    q_rms: float = 1.0  # mean RMS of a query head before q_norm (Qwen3), for linearising the norm
    k_rms: float = 1.0
    tokens: int = 0


def init_random(module: nn.Module, std: float = 0.02) -> None:
    """The paper's learnable target: normal(0, std) weights, zero biases, unit norms."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(weight := getattr(sub, "weight", None), torch.Tensor) and weight.dim() == 1:
            nn.init.ones_(weight)


@torch.no_grad()
def init_gate_swa_from_teacher(target: GateSWAAttention, teacher: nn.Module) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(target, name).load_state_dict(getattr(teacher, name).state_dict())
    for name in ("q_norm", "k_norm"):
        if getattr(target, name, None) is not None:
            getattr(target, name).load_state_dict(getattr(teacher, name).state_dict())
    if target.gate_proj is not None:
        nn.init.zeros_(target.gate_proj.weight)
        nn.init.zeros_(target.gate_proj.bias)
        target.o_proj.weight.mul_(2.0)  # σ(0) = 1/2 on every head: undo it


def shrink_covariance(cov: torch.Tensor, alpha: float, toward: str = "identity") -> torch.Tensor:
    """(1 - alpha) C + alpha T, T = (tr C / d) I (`identity`: the same total energy spread over every
    direction) or T = diag(C) (`diagonal`: each input dim keeps its own scale, only the correlations
    measured on the calibration text are pulled toward zero).

    alpha = 0 returns C itself (the whitening as measured); alpha = 1 with `identity` a scaled identity,
    under which the whitened SVDs are plain weight SVDs."""
    if alpha == 0:
        return cov
    if toward == "diagonal":
        return (1 - alpha) * cov + alpha * torch.diag(torch.diagonal(cov))
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1 - alpha) * cov + alpha * (torch.trace(cov) / d) * eye


def _matrix_sqrt(cov: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Symmetric square root of a covariance, damped relative to its mean eigenvalue."""
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0) + damping * evals.clamp_min(0).mean().clamp_min(1e-12)
    return (evecs * evals.sqrt()) @ evecs.T


@torch.no_grad()
def init_mla_from_teacher(target: MLAAttention, teacher: nn.Module, geometry: AttentionGeometry,
                          stats: LayerStats | None, whitening_shrinkage: float = 0.0,
                          shrink_toward: str = "identity") -> dict[str, float]:
    """Warm-start an MLAAttention from a GQA teacher. Returns fit diagnostics.

    `whitening_shrinkage`, `shrink_toward` (target.mla.whitening_shrinkage / _toward): see shrink_covariance.

    Shapes: H query heads, G KV heads, d teacher head dim, r rope, n nope, v value head dim, c latent.
    """
    g = geometry
    H, G, d = g.num_heads, g.num_kv_heads, g.head_dim
    r, n, v, c = target.qk_rope_head_dim, target.qk_nope_head_dim, target.v_head_dim, target.kv_lora_rank
    D = g.hidden_size
    maps = _linear_maps(teacher, g, stats, target.scaling, rope_frequencies(target), whitening_shrinkage,
                        shrink_toward)
    f64, cov, cov_half = maps.f64, maps.cov, maps.cov_half
    group_of_head = maps.group_of_head

    # --- shared RoPE key: per rotary pair, a principal direction across the G KV heads ---
    shared_k_rope, shared_k_rope_bias, q_rope = _shared_rope_key(maps, rope_frequencies(target))

    # --- position-free part: per KV head, fit n key dims and v value dims, then a joint SVD ---
    rows, q_nope, out_maps = _position_free_rows(maps, n, v)
    # The teacher rotated every dim with cos/sin scaled by the rope's attention factor (YaRN), so each of its
    # scores carries the factor squared; the rotary part still gets it from the rope, the position-free part not.
    q_nope = q_nope * g.rope_attention_scaling**2
    whitened = rows[:, :D] @ cov_half
    u, s, _ = torch.linalg.svd(whitened, full_matrices=False)
    rank = min(c, u.shape[1])
    up = torch.zeros(rows.shape[0], c, **f64)
    up[:, :rank] = u[:, :rank]
    down = up.T @ rows  # [c, D + 1]: latent = down[:, :D] x + down[:, D]
    energy_kept = float((s[:rank] ** 2).sum() / (s**2).sum().clamp_min(1e-30))

    # The latent RMSNorm divides each token's latent by its RMS: fold the typical RMS into kv_b_proj.
    has_norm = isinstance(target.kv_a_layernorm, nn.Module) and hasattr(target.kv_a_layernorm, "weight")
    latent_rms = math.sqrt(float(torch.trace(down[:, :D] @ cov @ down[:, :D].T)) / c + 1e-12) if has_norm else 1.0

    k_up = up[: G * n].view(G, n, c)[group_of_head]  # [H, n, c]
    v_up = up[G * n :].view(G, v, c)[group_of_head]  # [H, v, c]
    dtype = target.kv_b_proj.weight.dtype
    target.kv_b_proj.weight.copy_(torch.cat([k_up, v_up], dim=1).reshape(H * (n + v), c).to(dtype) * latent_rms)
    target.kv_a_proj_with_mqa.weight.copy_(torch.cat([down[:, :D], shared_k_rope]).to(dtype))
    if target.kv_a_proj_with_mqa.bias is not None:
        target.kv_a_proj_with_mqa.bias.copy_(torch.cat([down[:, D], shared_k_rope_bias]).to(dtype))
    if has_norm:
        target.get_parameter("kv_a_layernorm.weight").fill_(1.0)  # the typical RMS is folded into kv_b_proj above
    query = torch.cat([q_nope, q_rope], dim=1).reshape(H * (n + r), D + 1)
    q, q_bias = query[:, :D].to(dtype), query[:, D]
    out_proj = target.q_proj if target.q_lora_rank is None else target.q_b_proj
    if out_proj.bias is None and bool(q_bias.abs().max() > 0):
        raise ValueError("the teacher's query projection has a bias and the MLA target's has none")
    if out_proj.bias is not None:
        out_proj.bias.copy_(q_bias.to(dtype))
    if target.q_lora_rank is None:
        target.q_proj.weight.copy_(q)
    else:
        _low_rank_query(target, q, cov_half)
    teacher_o = _projection(teacher, "o_proj")
    wo = teacher_o.weight.to(**f64).view(D, H, d)
    wo = torch.einsum("Dhd,hvd->Dhv", wo, torch.stack(out_maps)[group_of_head])
    target.o_proj.weight.copy_(wo.reshape(D, H * v).to(dtype))
    if target.o_proj.bias is not None:
        bias = teacher_o.bias if teacher_o.bias is not None else torch.zeros(D, device=f64["device"])
        target.o_proj.bias.copy_(bias.to(dtype))
    return {"latent_energy_kept": energy_kept, "latent_rms": latent_rms}


class _Float64(TypedDict):
    """Keyword arguments that place a tensor in float64 on the teacher's device."""

    dtype: torch.dtype
    device: torch.device


def _projection(attn: nn.Module, name: str) -> nn.Linear:
    """A teacher projection by name: read_geometry has checked it is an nn.Linear (nn.Module's typing
    cannot know a submodule's class)."""
    return cast(nn.Linear, getattr(attn, name))


@dataclass
class _LinearMaps:
    """The teacher attention's projections as float64 linear maps, with the calibration whitening."""

    f64: _Float64
    cov: torch.Tensor  # the calibration covariance as measured
    cov_half: torch.Tensor  # square root of the (shrunk) covariance the fits whiten by
    wq: torch.Tensor  # [H, d, D], scaled for the target's softmax scale
    bq: torch.Tensor  # [H, d], scaled likewise
    wk: torch.Tensor  # [G, d, D]
    wv: torch.Tensor  # [G, d, D]
    bk: torch.Tensor  # [G, d]
    bv: torch.Tensor  # [G, d]
    nope_idx: torch.Tensor
    group_of_head: torch.Tensor  # [H]


def _linear_maps(teacher: nn.Module, g: AttentionGeometry, stats: LayerStats | None, target_scaling: float,
                 frequencies: Sequence[int], whitening_shrinkage: float = 0.0, shrink_toward: str = "identity") -> _LinearMaps:
    H, G, d, D = g.num_heads, g.num_kv_heads, g.head_dim, g.hidden_size
    # Work on the weights' device (SVDs of real-size layers are far faster on an accelerator).
    q_proj, k_proj, v_proj = (_projection(teacher, name) for name in ("q_proj", "k_proj", "v_proj"))
    f64: _Float64 = {"dtype": torch.float64, "device": q_proj.weight.device}
    cov = stats.input_cov.to(**f64) if stats is not None else torch.eye(D, **f64)
    cov_half = _matrix_sqrt(shrink_covariance(cov, whitening_shrinkage, shrink_toward))

    # Linear stand-ins for the teacher's projections; Qwen3's q/k RMSNorm becomes its weight divided
    # by the mean RMS seen on calibration data (exact up to each token's deviation from that mean).
    wq = q_proj.weight.to(**f64).view(H, d, D)
    wk = k_proj.weight.to(**f64).view(G, d, D)
    wv = v_proj.weight.to(**f64).view(G, d, D)
    bq = q_proj.bias.to(**f64).view(H, d) if q_proj.bias is not None else torch.zeros(H, d, **f64)
    bk = k_proj.bias.to(**f64).view(G, d) if k_proj.bias is not None else torch.zeros(G, d, **f64)
    bv = v_proj.bias.to(**f64).view(G, d) if v_proj.bias is not None else torch.zeros(G, d, **f64)
    if g.has_qk_norm:
        q_scale = teacher.get_parameter("q_norm.weight").to(**f64) / (stats.q_rms if stats else 1.0)
        k_scale = teacher.get_parameter("k_norm.weight").to(**f64) / (stats.k_rms if stats else 1.0)
        wq, bq, wk, bk = wq * q_scale[:, None], bq * q_scale, wk * k_scale[:, None], bk * k_scale
    nope_idx = rope_dims(d, frequencies)[1].to(f64["device"])
    group_of_head = torch.arange(H, device=f64["device"]) // (H // G)
    # MLA's softmax scale differs from the teacher's; fold the ratio into the query.
    wq, bq = wq * (g.scaling / target_scaling), bq * (g.scaling / target_scaling)
    return _LinearMaps(f64, cov, cov_half, wq, bq, wk, wv, bk, bv, nope_idx, group_of_head)


def rope_frequencies(target: MLAAttention) -> list[int]:
    """The teacher frequency index of each of the target's rotary pairs (default: the r/2 highest)."""
    chosen = target.rope_frequencies
    return list(chosen) if chosen is not None else list(range(target.qk_rope_head_dim // 2))


def _frequency_directions(maps: _LinearMaps, freq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The principal directions across KV heads of one teacher frequency's whitened key dims (both dims of
    the pair rotate together, so a head's weight is shared by them): columns of u [G, G], and their
    singular values. Signs are fixed so that each direction's weights sum to >= 0."""
    half_d = maps.wk.shape[1] // 2
    whitened = torch.cat([maps.wk[:, freq] @ maps.cov_half, maps.wk[:, freq + half_d] @ maps.cov_half], dim=-1)
    u, s, _ = torch.linalg.svd(whitened, full_matrices=False)  # [G, 2D]
    return u * torch.sign(u.sum(dim=0) + 1e-30), s


def _shared_rope_key(maps: _LinearMaps, frequencies: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared RoPE key's rows [r, D] and bias [r], and every query head's rotary rows [H, r, D].

    Pair j rotates at teacher frequency i = frequencies[j] and carries the k-th principal direction across the
    KV heads of that frequency, k = how many earlier pairs took i: k_g ≈ Σ_k weight_k[g] * pair_k, so head h's
    query absorbs its group's weight. A frequency taken as many times as there are KV heads is exact."""
    G, half_d = maps.wk.shape[0], maps.wk.shape[1] // 2
    taken: Counter[int] = Counter()
    weights = []
    for freq in frequencies:
        u, _ = _frequency_directions(maps, freq)
        if taken[freq] >= G:
            raise ValueError(f"rotary frequency {freq} is listed {taken[freq] + 1} times; {G} KV heads give at most "
                             f"{G} directions")
        weights.append(u[:, taken[freq]])
        taken[freq] += 1
    head_weight = torch.stack(weights)  # [r/2, G]
    weight_per_dim = torch.cat([head_weight, head_weight])  # [r, G]
    index = torch.as_tensor(frequencies, device=maps.wk.device)
    rope_idx = torch.cat([index, index + half_d])
    k_rope_rows = maps.wk[:, rope_idx]  # [G, r, D]
    shared = torch.einsum("rg,grD->rD", weight_per_dim, k_rope_rows)
    bias = torch.einsum("rg,gr->r", weight_per_dim, maps.bk[:, rope_idx])
    query = torch.cat([maps.wq, maps.bq[:, :, None]], dim=-1)  # [H, d, D + 1]: the bias as a last column
    q_rope = query[:, rope_idx] * weight_per_dim.T[maps.group_of_head][:, :, None]  # [H, r, D + 1]
    return shared, bias, q_rope


@torch.no_grad()
def choose_rope_frequencies(teacher: nn.Module, geometry: AttentionGeometry, stats: LayerStats | None, cfg,
                            inv_freq: torch.Tensor, context: int | None) -> list[int]:
    """The r/2 (frequency, direction across KV heads) components of the teacher's rotary keys that the shared
    RoPE key should carry, by measured contribution to the attention scores (`rope_component_scores`); returns
    their frequencies (sorted; a frequency twice = its two leading directions). Components not chosen go to the
    position-free part (whole frequencies) or are dropped (the other directions of a chosen frequency), as with
    the default choice."""
    scored = rope_component_scores(teacher, geometry, stats, cfg, inv_freq, context)
    ranked = sorted(scored, key=lambda item: -item[0])  # stable: a frequency's directions stay in order on ties
    return sorted(freq for _, freq, _ in ranked[: cfg.qk_rope_head_dim // 2])


@torch.no_grad()
def rope_component_scores(teacher: nn.Module, geometry: AttentionGeometry, stats: LayerStats | None, cfg,
                          inv_freq: torch.Tensor, context: int | None) -> list[tuple[float, int, int]]:
    """(score, frequency, direction k) of every rotary component of the teacher's keys.

    Score of direction k of frequency i: its whitened key energy s_k times the query energy that reads it
    (Σ_h |u_k[g(h)]| · RMS of head h's query at i), both from the calibration covariance. With `context`, times
    the error of leaving it position-free instead: 1 - sinc(θ_i · context), the mean of 1 - cos(Δ θ_i) over
    distances Δ uniform in [0, context] (≈ 0 for frequencies that barely turn over the context, ≈ 1 for fast
    ones). The warm start gives a frequency's n-th pair its n-th direction, so a direction's score is capped
    at the previous one's: within a frequency the scores never increase with k."""
    scaling = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    maps = _linear_maps(teacher, geometry, stats, scaling, [], cfg.whitening_shrinkage,
                        cfg.whitening_shrinkage_toward)
    half_d = geometry.head_dim // 2
    theta = inv_freq.to(maps.f64["dtype"]).cpu()
    scored = []
    for freq in range(half_d):
        u, s = _frequency_directions(maps, freq)
        q_rows = torch.cat([maps.wq[:, freq] @ maps.cov_half, maps.wq[:, freq + half_d] @ maps.cov_half], dim=-1)
        q_rms = q_rows.norm(dim=-1)  # [H]
        turn = 1.0
        if context:
            angle = float(theta[freq]) * context
            turn = 1.0 - math.sin(angle) / angle if angle > 0 else 0.0
        ceiling = math.inf
        for k in range(u.shape[1]):
            read = float((u[:, k].abs()[maps.group_of_head] * q_rms).sum())
            ceiling = min(ceiling, float(s[k]) * read * turn)
            scored.append((ceiling, freq, k))
    return scored


def _position_free_rows(maps: _LinearMaps, n: int, v: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Per KV head, the n key dims and v value dims that keep most whitened energy.

    Returns (rows [G*n + G*v, D + 1] with a trailing bias column — what the latent must reproduce —,
    the matching query rows [H, n, D + 1] in head order (bias last), and each KV head's value projection [v, d]).
    """
    f64, cov_half = maps.f64, maps.cov_half
    G, d = maps.wk.shape[0], maps.wk.shape[1]
    k_nope, q_nope, values, out_maps = [], [], [], []
    for kv in range(G):
        keys = maps.wk[kv, maps.nope_idx]  # [d - r, D]
        if n >= keys.shape[0]:
            proj = torch.eye(n, keys.shape[0], **f64)
        else:
            u, _, _ = torch.linalg.svd(keys @ cov_half, full_matrices=False)
            proj = u[:, :n].T  # orthonormal [n, d - r]
        k_nope.append(torch.cat([proj @ keys, (proj @ maps.bk[kv, maps.nope_idx])[:, None]], dim=1))
        for h in (maps.group_of_head == kv).nonzero().squeeze(-1).tolist():
            q_nope.append(torch.cat([proj @ maps.wq[h, maps.nope_idx], (proj @ maps.bq[h, maps.nope_idx])[:, None]], 1))
        if v >= d:
            vproj = torch.eye(v, d, **f64)
        else:
            u, _, _ = torch.linalg.svd(maps.wv[kv] @ cov_half, full_matrices=False)
            vproj = u[:, :v].T
        values.append(torch.cat([vproj @ maps.wv[kv], (vproj @ maps.bv[kv])[:, None]], dim=1))
        out_maps.append(vproj)
    # heads of a group are contiguous, so q_nope is in head order
    return torch.cat(k_nope + values), torch.stack(q_nope), out_maps


@torch.no_grad()
def latent_spectrum(teacher: nn.Module, geometry: AttentionGeometry, stats: LayerStats | None, cfg,
                    frequencies: Sequence[int] | None = None) -> torch.Tensor:
    """Singular values of the whitened keys and values an MLA latent of this shape must carry (descending).

    Keeping the first c of them is what the warm start does with `kv_lora_rank=c`; the squared values
    are the activation energy each latent dimension keeps (used by models/budget.py to share a KV
    budget across layers). `cfg` is the MLA config (rope, nope and value dims are read from it).
    """
    scaling = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    maps = _linear_maps(teacher, geometry, stats, scaling, frequencies or cfg.qk_rope_head_dim,
                        cfg.whitening_shrinkage, cfg.whitening_shrinkage_toward)
    rows, _, _ = _position_free_rows(maps, cfg.qk_nope_head_dim, cfg.v_head_dim)
    return torch.linalg.svdvals(rows[:, : geometry.hidden_size] @ maps.cov_half)


def _low_rank_query(target: MLAAttention, q: torch.Tensor, cov_half: torch.Tensor) -> None:
    """q ≈ q_b (norm(q_a x)): whitened SVD of the full query map, rank q_lora_rank."""
    f64 = q.to(torch.float64)
    u, s, _ = torch.linalg.svd(f64 @ cov_half, full_matrices=False)
    k = target.q_lora_rank
    assert k is not None, "only a low-rank query (target.mla.q_lora_rank set) is fitted here"
    down = u[:, :k].T @ f64  # [k, D]
    target.q_a_proj.weight.copy_(down.to(q.dtype))
    if target.q_a_proj.bias is not None:
        target.q_a_proj.bias.zero_()
    rms = math.sqrt(float((s[:k] ** 2).sum()) / k + 1e-12)  # typical RMS of q_a x under whitening
    target.q_a_layernorm.weight.fill_(1.0)
    target.q_b_proj.weight.copy_((u[:, :k] * rms).to(q.dtype))
