"""Budget-aware conversion: share a KV-cache budget across layers by what each layer needs.

MLA (`target.mla.kv_budget`): a layer's latent of rank c keeps the first c singular values of its
whitened keys and values (attention/init.py `latent_spectrum`; the warm start keeps exactly those).
Each layer's energy is normalised to 1, so the loss of a layer is the fraction of its activation
energy it drops. Sharing a fixed number of latent dimensions to minimise the summed loss is a separable
problem with non-increasing gains (squared singular values are sorted), so greedy water-filling — give
the next `rank_multiple` dimensions to the layer that keeps the most energy with them — is optimal
(exactly so for `rank_multiple=1`).

Energy alone treats every layer alike, but an early layer's error passes through every later layer and
some layers barely move the output. `allocation=sensitivity` weights each layer's dropped energy by how
much it moves the final next-token distribution: models/sensitivity.py measures the KL to the teacher
when only that layer is a warm-started MLA of a few candidate ranks; fitting KL_i(r) = a_i + w_i *
dropped_i(r) (least squares; a_i is the rank-independent part, e.g. the shared RoPE key) gives the
weight w_i, and the greedy step then gives the next dimensions to the largest w_i * energy gain — still
non-increasing per layer, so still optimal for the fitted model.

Bytes: an MLA layer caches `kv_lora_rank + qk_rope_head_dim` values per token; the teacher caches
`2 * num_kv_heads * head_dim`. A budget given as a fraction of the teacher's KV bytes over the converted
layers becomes a whole number of latent dimensions; the allocation spends exactly that many and never
gives a layer more than the teacher's KV width (nor more than the latent can use).

GateSWA (`full_layers_for_budget`): which layers keep full attention at a given context length, most
sensitive first (models/sensitivity.py), as many as the budget pays for. `swa_layer_scores` ranks the layers
by `target.gate_swa.selection`: `text` (the KL on calibration text when the layer alone slides), `retrieval`
(the KL at the answer of synthetic pass-key probes built from the same training text — the layers that
fetch from far back, which text KL barely sees) or `both`: each score divided by its sum over the layers
(a share, so neither unit dominates) and mixed as (1 - retrieval_weight) * text + retrieval_weight * retrieval.

GateSWA with per-layer windows (`target.gate_swa.windows`, `windows_for_budget`): each converted layer gets full
attention or one of the candidate windows. A layer's cost of window w is the KL when it alone slides at w
(models/sensitivity.py `swa_window_sensitivity`, scored by `selection`; full attention costs 0: the warm-started
full layer is the teacher's). Tokens held at `context`: a sliding layer min(context, w - 1 + sink_tokens) — what
its cache keeps (attention/cache_layers.py `SinkWindowLayer`, eval/kv.py), as `full_layers_for_budget` counts —
a full layer `context`. Minimising the summed cost within floor(kv_fraction * context * layers) tokens is a
multiple-choice knapsack, solved exactly by dynamic programming over the integer token budget (in units of
the greatest common divisor of the options' token counts).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ascend_edit.attention.geometry import read_geometry
from ascend_edit.attention.init import LayerStats, latent_spectrum
from ascend_edit.config import GateSWAConfig

ALLOCATIONS = ("spectrum", "uniform", "sensitivity")
SELECTIONS = ("text", "retrieval", "both")


@dataclass(frozen=True)
class RankAllocation:
    """Per-layer latent ranks chosen for a budget, with what they keep."""

    ranks: dict[int, int]  # layer -> kv_lora_rank
    retained: dict[int, float]  # layer -> fraction of its whitened K/V energy the latent keeps
    values_per_token: int  # cached values per token over the converted layers (latent + rope)
    teacher_values_per_token: int
    weights: dict[int, float] | None = None  # allocation=sensitivity: KL per unit of dropped energy
    measured: dict[int, dict[int, float]] | None = None  # allocation=sensitivity: {layer: {rank: KL}}

    @property
    def kv_fraction(self) -> float:
        return self.values_per_token / self.teacher_values_per_token


def budget_latent_dims(kv_fraction: float, teacher_widths: Sequence[int], rope_dim: int, rank_multiple: int = 1
                       ) -> int:
    """Latent dimensions (summed over layers) that `kv_fraction` of the teacher's KV values per token pays
    for, after every layer's RoPE key; rounded down to a multiple of `rank_multiple`."""
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"target.mla.kv_budget={kv_fraction} must be in (0, 1] (a fraction of the teacher's KV bytes)")
    values = math.floor(kv_fraction * sum(teacher_widths) + 1e-9)
    latent = values - rope_dim * len(teacher_widths)
    latent -= latent % rank_multiple
    if latent < rank_multiple * len(teacher_widths):
        raise ValueError(f"target.mla.kv_budget={kv_fraction}: {values} values per token cannot hold a RoPE key of "
                         f"{rope_dim} plus a latent of at least {rank_multiple} in each of {len(teacher_widths)} layers")
    return latent


def allocate_ranks(spectra: Mapping[int, torch.Tensor], total: int, max_rank: Mapping[int, int],
                   rank_multiple: int = 1, allocation: str = "spectrum",
                   weights: Mapping[int, float] | None = None) -> dict[int, int]:
    """Share `total` latent dimensions across layers; returns {layer: rank}, summing to `total` exactly.

    Every layer gets at least `rank_multiple` and at most `max_rank[layer]` (rounded down to the
    multiple). `spectrum`: greedy water-filling on each layer's normalised squared singular values;
    `sensitivity`: the same with each layer's energy scaled by `weights[layer]` (sensitivity_weights);
    `uniform`: the same rank everywhere (the remainder, in multiples, to the first layers).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"target.mla.allocation={allocation!r} is not one of {ALLOCATIONS}")
    if allocation == "sensitivity" and (weights is None or any(i not in weights for i in spectra)):
        raise ValueError("target.mla.allocation=sensitivity needs a measured weight for every layer "
                         "(models/sensitivity.py mla_sensitivity, then sensitivity_weights)")
    m = rank_multiple
    if m < 1 or total % m:
        raise ValueError(f"latent budget {total} is not a multiple of rank_multiple={m}")
    layers = sorted(spectra)
    caps = {i: max_rank[i] - max_rank[i] % m for i in layers}
    if any(caps[i] < m for i in layers):
        raise ValueError(f"a layer's largest rank is below rank_multiple={m}: {caps}")
    if not m * len(layers) <= total <= sum(caps.values()):
        raise ValueError(f"target.mla.kv_budget: a latent budget of {total} dimensions cannot be met with ranks "
                         f"between {m} and what each layer's latent can hold (at most {sum(caps.values())} in all); "
                         "choose a smaller target.mla.kv_budget")
    ranks = {i: m for i in layers}
    left = total - m * len(layers)
    if allocation == "uniform":
        while left:
            for i in layers:
                if left and ranks[i] < caps[i]:
                    ranks[i] += m
                    left -= m
        return ranks
    energy = {i: spectra[i].double().pow(2) / spectra[i].double().pow(2).sum().clamp_min(1e-30) for i in layers}
    if allocation == "sensitivity":
        assert weights is not None  # checked above
        energy = {i: energy[i] * weights[i] for i in layers}

    def gain(i: int) -> float:  # energy the next m dimensions of layer i keep
        return float(energy[i][ranks[i]: ranks[i] + m].sum())

    heap = [(-gain(i), i) for i in layers if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while left:
        _, i = heapq.heappop(heap)
        ranks[i] += m
        left -= m
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-gain(i), i))
    return ranks


def retained_energy(spectrum: torch.Tensor, rank: int) -> float:
    """Fraction of a layer's whitened K/V energy a latent of `rank` keeps."""
    energy = spectrum.double().pow(2)
    return float(energy[:rank].sum() / energy.sum().clamp_min(1e-30))


def sensitivity_weights(spectra: Mapping[int, torch.Tensor], measured: Mapping[int, Mapping[int, float]],
                        floor: float = 1e-3) -> dict[int, float]:
    """Per-layer KL per unit of dropped whitened energy, fitted to measured {layer: {rank: KL}}.

    Least squares of KL_i(r) = a_i + w_i * dropped_i(r) over the measured ranks (one rank: a_i = 0). A
    layer whose output error does not grow as it drops energy gets a small positive weight (`floor`
    times the largest), so ties still follow the spectrum and no layer is starved by noise.
    """
    weights = {}
    for i, curve in measured.items():
        drops = torch.tensor([1.0 - retained_energy(spectra[i], r) for r in curve], dtype=torch.float64)
        kls = torch.tensor(list(curve.values()), dtype=torch.float64)
        if len(curve) == 1:
            w = float(kls[0] / drops[0].clamp_min(1e-12))
        else:
            dx, dy = drops - drops.mean(), kls - kls.mean()
            w = float((dx * dy).sum() / (dx * dx).sum().clamp_min(1e-24))
        weights[i] = w if math.isfinite(w) else 0.0
    largest = max([w for w in weights.values() if w > 0], default=1.0)
    return {i: max(w, floor * largest) for i, w in weights.items()}


def candidate_ranks(total: int, num_layers: int, max_rank: int, rank_multiple: int) -> list[int]:
    """Ranks at which to measure sensitivity: half, one and two times the uniform rank of the budget
    (where the allocation moves), as multiples of `rank_multiple` within [rank_multiple, max_rank]."""
    m = rank_multiple
    uniform = max(m, total // num_layers - (total // num_layers) % m)
    picks = {min(max(m, r - r % m), max_rank - max_rank % m) for r in (uniform // 2, uniform, 2 * uniform)}
    return sorted(picks)


def teacher_kv_width(geometry) -> int:
    """Values per token the teacher caches in one layer (keys and values of every KV head)."""
    return 2 * geometry.num_kv_heads * geometry.head_dim


def mla_rank_allocation(model: nn.Module, layers: Sequence[int], stats: Mapping[int, LayerStats] | None,
                        mla_cfg, measured: Mapping[int, Mapping[int, float]] | None = None,
                        frequencies: Mapping[int, Sequence[int]] | None = None) -> RankAllocation:
    """Ranks for the MLA layers `layers` of a teacher `model` under `mla_cfg.kv_budget`.

    `measured` ({layer: {rank: KL}}, models/sensitivity.py) is needed by `allocation=sensitivity` only;
    `sensitivity_allocation` measures it and calls this. `frequencies` ({layer: rotary frequencies}, as the plan
    will build them; None: the config's own choice, measured here when `rope_selection=measured`).
    """
    from ascend_edit.models.surgery import decoder_layers, rope_frequency_choice

    blocks = decoder_layers(model)
    attns = {i: cast(nn.Module, blocks[i].self_attn) for i in layers}
    # The nope part (what the latent compresses) is the dims of the frequencies the RoPE key does not keep.
    if frequencies is None:
        frequencies = (rope_frequency_choice(model, layers, stats, mla_cfg) if mla_cfg.rope_selection == "measured"
                       else {i: mla_cfg.rope_frequencies for i in layers} if mla_cfg.rope_frequencies else {})
    geometries = {i: read_geometry(attns[i], model.config) for i in layers}
    widths = {i: teacher_kv_width(g) for i, g in geometries.items()}
    rope = mla_cfg.qk_rope_head_dim
    total = budget_latent_dims(mla_cfg.kv_budget, list(widths.values()), rope, mla_cfg.rank_multiple)
    if any(p.is_meta for i in layers for p in attns[i].parameters()):
        # A shape-only teacher (inspect / plan on the meta device) has no spectrum: a flat one as long as the
        # cap allocates one rank everywhere (edited_shape_model asks for allocation=uniform and says so).
        if mla_cfg.allocation != "uniform":
            raise ValueError(f"target.mla.allocation={mla_cfg.allocation} needs the teacher's weights")
        spectra = {i: torch.ones(widths[i] - rope) for i in layers}
    else:
        spectra = {i: latent_spectrum(attns[i], geometries[i], (stats or {}).get(i), mla_cfg,
                                      frequencies.get(i)).cpu() for i in layers}
    # A latent wider than the keys and values it compresses adds nothing, and none may cache more
    # than the teacher did.
    max_rank = {i: min(len(spectra[i]), widths[i] - rope) for i in layers}
    weights = None
    if mla_cfg.allocation == "sensitivity":
        if measured is None:
            raise ValueError("target.mla.allocation=sensitivity measures each layer's output error on calibration "
                             "data: build the plan with models.budget.sensitivity_allocation (the convert task "
                             "does), not from the spectrum alone")
        weights = sensitivity_weights(spectra, {i: measured[i] for i in layers})
    ranks = allocate_ranks(spectra, total, max_rank, mla_cfg.rank_multiple, mla_cfg.allocation, weights)
    retained = {i: retained_energy(spectra[i], ranks[i]) for i in layers}
    return RankAllocation(ranks, retained, total + rope * len(layers), sum(widths.values()), weights,
                          {i: dict(measured[i]) for i in layers} if measured is not None else None)


def sensitivity_allocation(model: PreTrainedModel, layers: Sequence[int], stats: Mapping[int, LayerStats],
                           target_cfg, batches: list[dict], ranks: Sequence[int] | None = None) -> RankAllocation:
    """Measure each layer's output error at a few candidate ranks (models/sensitivity.py) on the
    calibration `batches`, then share `target_cfg.mla.kv_budget` by sensitivity-weighted energy."""
    from ascend_edit.models.sensitivity import mla_sensitivity
    from ascend_edit.models.surgery import decoder_layers

    mla = target_cfg.mla
    blocks = decoder_layers(model)
    widths = [teacher_kv_width(read_geometry(cast(nn.Module, blocks[i].self_attn), model.config)) for i in layers]
    total = budget_latent_dims(mla.kv_budget, widths, mla.qk_rope_head_dim, mla.rank_multiple)
    if ranks is None:
        ranks = candidate_ranks(total, len(layers), min(widths) - mla.qk_rope_head_dim, mla.rank_multiple)
    measured = mla_sensitivity(model, target_cfg, stats, batches, ranks, layers)
    return mla_rank_allocation(model, layers, stats, replace(mla, allocation="sensitivity"), measured)


def plan_with_ranks(plan: list, ranks: Mapping[int, int]) -> list:
    """The plan with each MLA layer's own `kv_lora_rank`."""
    return [replace(entry, kv_lora_rank=ranks[entry.layer_idx]) if entry.layer_idx in ranks else entry
            for entry in plan]


def full_layers_for_budget(sensitivity: Sequence[float], kv_fraction: float, context: int, window: int,
                           sink_tokens: int, layers: Sequence[int] | None = None) -> list[int]:
    """GateSWA: the layers that keep full attention under `kv_fraction` of the teacher's KV at `context`.

    A sliding layer holds `window - 1 + sink_tokens` tokens, a full one `context`; layers are promoted
    to full in order of sensitivity (largest first) while the budget pays for it.
    """
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv budget {kv_fraction} must be in (0, 1]")
    layers = list(range(len(sensitivity))) if layers is None else list(layers)
    swa_tokens = min(context, window - 1 + sink_tokens)
    budget = kv_fraction * context * len(layers)
    spent = swa_tokens * len(layers)
    if spent > budget + 1e-9:
        raise ValueError(f"even all-sliding layers hold {swa_tokens} of {context} tokens each, more than the "
                         f"budget of {kv_fraction:.3f} of the teacher's KV")
    full = []
    for i in sorted(layers, key=lambda k: (-sensitivity[k], k)):
        if spent + context - swa_tokens > budget + 1e-9:
            break
        full.append(i)
        spent += context - swa_tokens
    return sorted(full)


def _check_selection(text: object, retrieval: object, selection: str, retrieval_weight: float) -> None:
    """One-line errors for a selection that is unknown, a weight outside [0, 1], or scores it needs but lacks."""
    if selection not in SELECTIONS:
        raise ValueError(f"target.gate_swa.selection={selection!r} is not one of {list(SELECTIONS)}")
    if not 0 <= retrieval_weight <= 1:
        raise ValueError(f"target.gate_swa.retrieval_weight={retrieval_weight} must be in [0, 1]")
    needed = {"text": (text,), "retrieval": (retrieval,), "both": (text, retrieval)}[selection]
    if any(scores is None for scores in needed):
        raise ValueError(f"target.gate_swa.selection={selection}: the {selection} scores were not measured")


def combine_swa_scores(text: Sequence[float] | None, retrieval: Sequence[float] | None, selection: str,
                       retrieval_weight: float = 0.5) -> list[float]:
    """One score per layer for `selection` (text | retrieval | both) from the measured per-layer KLs.

    `text` and `retrieval` are returned as measured; `both` mixes each score's share of its sum over the
    layers, (1 - retrieval_weight) * text share + retrieval_weight * retrieval share."""
    _check_selection(text, retrieval, selection, retrieval_weight)
    if selection == "text":
        return list(cast(Sequence[float], text))
    if selection == "retrieval":
        return list(cast(Sequence[float], retrieval))
    t, r = cast(Sequence[float], text), cast(Sequence[float], retrieval)
    if len(t) != len(r):
        raise ValueError(f"text and retrieval scores cover different layers ({len(t)} vs {len(r)})")

    def shares(scores: Sequence[float]) -> list[float]:
        total = sum(max(s, 0.0) for s in scores)
        return [max(s, 0.0) / total if total > 0 else 0.0 for s in scores]

    return [(1 - retrieval_weight) * a + retrieval_weight * b for a, b in zip(shares(t), shares(r))]


def swa_layer_scores(model: PreTrainedModel, target_cfg, batches: list[dict], tokenizer=None
                     ) -> tuple[list[float], dict[str, list[float]]]:
    """(score per layer by `target_cfg.gate_swa.selection`, {"text": ..., "retrieval": ...} as measured).

    The retrieval probes are built from `batches`' own (training) text; `tokenizer` words them as pass-key
    sentences (without one they are token-level copy probes)."""
    from ascend_edit.models.sensitivity import retrieval_sensitivity, swa_sensitivity

    swa = target_cfg.gate_swa
    measured: dict[str, list[float]] = {}
    if swa.selection in ("text", "both"):
        measured["text"] = swa_sensitivity(model, target_cfg, batches)
    if swa.selection in ("retrieval", "both"):
        measured["retrieval"] = retrieval_sensitivity(model, target_cfg, batches, tokenizer)
    scores = combine_swa_scores(measured.get("text"), measured.get("retrieval"), swa.selection, swa.retrieval_weight)
    return scores, measured


def gate_swa_for_budget(model: PreTrainedModel, target_cfg, batches: list[dict], kv_fraction: float, context: int,
                        tokenizer=None, measured: dict | None = None):
    """(GateSWA config with explicit `full_layers`, per-layer score): the layers whose sliding moves the
    output most on `batches` (models/sensitivity.py; what is scored: `gate_swa.selection`, see
    `swa_layer_scores`) stay full, as many as `kv_fraction` of the teacher's KV at `context` tokens pays for.
    An explicit list exports natively (layer_types) and needs no data to rebuild. `batches` should be as long
    as `context` or the window barely changes what a layer sees. `measured`, if given, receives the text and
    retrieval scores as measured."""
    swa = replace(target_cfg.gate_swa, full_layers=[], full_every=0, full_by_sensitivity=0, kv_budget=None)
    length = min(int(b["input_ids"].shape[-1]) for b in batches)
    if swa.window >= length:  # the window slides nothing on these sequences: every score would read 0
        raise ValueError(f"target.gate_swa.window={swa.window} is not shorter than the {length}-token calibration "
                         "sequences, so every layer's sliding cost reads 0 and the full layers would be arbitrary; "
                         f"raise data.seq_len above {swa.window} (the sequences kv_budget is measured on)")
    scores, parts = swa_layer_scores(model, replace(target_cfg, kind="gate_swa", init="warm", gate_swa=swa), batches,
                                     tokenizer)
    if measured is not None:
        measured.update(parts)
    # Over the converted layers only (target.layers), as the per-layer windows are: a kept layer is the teacher's
    full = full_layers_for_budget(scores, kv_fraction, context, swa.window, swa.sink_tokens, target_cfg.layers)
    return replace(swa, full_layers=full), scores


# ------------------------------------------------------------------------------------------------
# GateSWA: per-layer windows under a KV budget
# ------------------------------------------------------------------------------------------------
FULL = 0  # the window value that stands for full attention in a per-layer choice


@dataclass(frozen=True)
class WindowAllocation:
    """Per-layer GateSWA attention chosen for a budget: {layer: window}, FULL (0) for full attention."""

    windows: dict[int, int]
    tokens: int  # tokens held over the layers at `context`
    budget_tokens: int  # floor(kv_fraction * context * layers)
    context: int
    cost: float  # summed measured cost of the choice
    costs: dict[int, dict[int, float]]  # {layer: {window: cost}} it was chosen from

    @property
    def full_layers(self) -> list[int]:
        return sorted(i for i, w in self.windows.items() if w == FULL)

    @property
    def kv_fraction(self) -> float:
        return self.tokens / (self.context * len(self.windows))


def swa_tokens_held(window: int, sink_tokens: int, context: int) -> int:
    """Tokens a sliding layer's cache holds at `context`: the last window - 1 plus the sinks (SinkWindowLayer)."""
    return min(context, window - 1 + sink_tokens)


def windows_for_budget(costs: Mapping[int, Mapping[int, float]], kv_fraction: float, context: int,
                       sink_tokens: int) -> WindowAllocation:
    """The per-layer choice of full attention or a window in `costs[layer]` ({window: measured cost}) that
    minimises the summed cost with at most floor(kv_fraction * context * layers) tokens held at `context`.

    Exact: a multiple-choice knapsack over an integer budget. best_i[b] = the least summed cost of layers
    0..i-1 holding at most b units, best_i[b] = min over options o of best_{i-1}[b - t_o] + c_i(o) (every
    layer takes exactly one option; infinite where b < t_o). best_0 = 0 everywhere ("at most b"), so best_L[B]
    is the optimum within the budget, and walking the recorded argmins back gives a choice that attains it.
    Units are the gcd of all token counts, which divides every option, so no rounding is involved; the budget
    is rounded down, so it is met exactly or under. Ties go to the option listed first: full attention, then
    larger windows (more context for the same measured cost).
    """
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv budget {kv_fraction} must be in (0, 1]")
    layers = sorted(costs)
    if not layers:
        raise ValueError("no layers to allocate windows to")
    windows = sorted({w for i in layers for w in costs[i]}, reverse=True)
    long = [w for w in windows if w >= context]
    if long or any(w < 1 for w in windows):
        raise ValueError(f"windows {long or windows} are not in [1, context={context}): a window as long as the "
                         "context is full attention")
    if any(set(costs[i]) != set(windows) for i in layers):
        raise ValueError("every layer needs a measured cost at every candidate window")
    options = [FULL, *windows]
    if len(options) > 255:
        raise ValueError(f"{len(windows)} candidate windows: at most 254")
    held = {w: context if w == FULL else swa_tokens_held(w, sink_tokens, context) for w in options}
    budget = math.floor(kv_fraction * context * len(layers) + 1e-9)
    floor_tokens = min(held.values()) * len(layers)
    if floor_tokens > budget:
        raise ValueError(f"even all-sliding layers at the smallest window hold {floor_tokens} tokens at {context}, "
                         f"more than the budget of {kv_fraction:.3f} of the teacher's KV ({budget} tokens)")
    unit = math.gcd(*held.values())
    size = budget // unit + 1
    inf = float("inf")
    best = torch.zeros(size, dtype=torch.float64)
    picks = []  # per layer: the option index chosen for each budget
    for i in layers:
        new = torch.full((size,), inf, dtype=torch.float64)
        pick = torch.zeros(size, dtype=torch.uint8)  # option index: layers x budget bytes of bookkeeping
        for k, w in enumerate(options):
            step = held[w] // unit
            cost = 0.0 if w == FULL else float(costs[i][w])
            if not math.isfinite(cost):
                raise ValueError(f"layer {i}: measured cost {cost} at window {w} is not finite")
            candidate = torch.full((size,), inf, dtype=torch.float64)
            if step < size:  # an option larger than the whole budget never fits
                candidate[step:] = best[: size - step] + cost
            better = candidate < new  # strict: ties keep the earlier option
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.full_like(pick, k), pick)
        best = new
        picks.append(pick)
    chosen: dict[int, int] = {}
    b = size - 1
    for i, pick in zip(reversed(layers), reversed(picks)):
        w = options[int(pick[b])]
        chosen[i] = w
        b -= held[w] // unit
    chosen = dict(sorted(chosen.items()))
    tokens = sum(held[w] for w in chosen.values())
    assert tokens <= budget and b >= 0  # the walk back spends what the table said
    total = sum(0.0 if w == FULL else float(costs[i][w]) for i, w in chosen.items())
    return WindowAllocation(chosen, tokens, budget, context, total, {i: dict(costs[i]) for i in layers})


def combine_window_costs(text: Mapping[int, Mapping[int, float]] | None,
                         retrieval: Mapping[int, Mapping[int, float]] | None, selection: str,
                         retrieval_weight: float = 0.5) -> dict[int, dict[int, float]]:
    """{layer: {window: cost}} for `selection` from the measured per-(layer, window) KLs.

    As `combine_swa_scores`, but a share must stay comparable across windows: each kind is divided by one
    number, its sum over the layers at the smallest window (with one window: exactly combine_swa_scores)."""
    _check_selection(text, retrieval, selection, retrieval_weight)
    if selection != "both":
        measured = cast(Mapping[int, Mapping[int, float]], text if selection == "text" else retrieval)
        return {i: dict(curve) for i, curve in measured.items()}
    t, r = cast(Mapping[int, Mapping[int, float]], text), cast(Mapping[int, Mapping[int, float]], retrieval)
    if set(t) != set(r) or any(set(t[i]) != set(r[i]) for i in t):
        raise ValueError("text and retrieval costs cover different layers or windows")

    def shares(scores: Mapping[int, Mapping[int, float]]) -> dict[int, dict[int, float]]:
        smallest = min(w for curve in scores.values() for w in curve)
        total = sum(max(curve[smallest], 0.0) for curve in scores.values())
        return {i: {w: max(c, 0.0) / total if total > 0 else 0.0 for w, c in curve.items()}
                for i, curve in scores.items()}

    ts, rs = shares(t), shares(r)
    return {i: {w: (1 - retrieval_weight) * ts[i][w] + retrieval_weight * rs[i][w] for w in ts[i]} for i in ts}


def gate_swa_windows_for_budget(model: PreTrainedModel, target_cfg, batches: list[dict], kv_fraction: float,
                                context: int, tokenizer=None, measured: dict | None = None
                                ) -> tuple[GateSWAConfig, WindowAllocation]:
    """(GateSWA config with the explicit `full_layers`, per-layer allocation) for `target_cfg.gate_swa.windows`:
    each converted layer's cost at every candidate window is measured on `batches` (what is scored:
    `gate_swa.selection`), then `windows_for_budget` picks full attention or a window per layer under
    `kv_fraction` of the teacher's KV at `context`. The config's `window` becomes the largest chosen one (the
    plan carries each layer's own: models/surgery.py `plan_with_windows`). Cost: 1 + L * len(windows) forwards
    per calibration batch for text, the same per probe batch for retrieval. `measured`, if given, receives the
    costs as measured ({"text" | "retrieval": {layer: {window: KL}}})."""
    from ascend_edit.models.sensitivity import retrieval_window_sensitivity, swa_window_sensitivity

    swa = target_cfg.gate_swa
    candidates = list(swa.windows)
    length = min(int(b["input_ids"].shape[-1]) for b in batches)
    if max(candidates) >= length:  # such a window slides nothing on these sequences: its cost would read 0
        raise ValueError(f"target.gate_swa.windows={candidates}: windows of {length} tokens or more cost nothing on "
                         f"the {length}-token calibration sequences, so the choice would be arbitrary; raise "
                         f"data.seq_len above {max(candidates)} (the sequences the costs are measured on) or give "
                         "shorter windows")
    probe_cfg = replace(target_cfg, kind="gate_swa", init="warm", gate_swa=replace(
        swa, full_layers=[], full_every=0, full_by_sensitivity=0, kv_budget=None, windows=[]))
    parts: dict[str, dict[int, dict[int, float]]] = {}
    if swa.selection in ("text", "both"):
        parts["text"] = swa_window_sensitivity(model, probe_cfg, batches, candidates)
    if swa.selection in ("retrieval", "both"):
        parts["retrieval"] = retrieval_window_sensitivity(model, probe_cfg, batches, candidates, tokenizer)
    if measured is not None:
        measured.update(parts)
    costs = combine_window_costs(parts.get("text"), parts.get("retrieval"), swa.selection, swa.retrieval_weight)
    allocation = windows_for_budget(costs, kv_fraction, context, swa.sink_tokens)
    sliding = [w for w in allocation.windows.values() if w != FULL]
    chosen = replace(probe_cfg.gate_swa, full_layers=allocation.full_layers, window=max(sliding, default=swa.window))
    return chosen, allocation
