"""Per-layer sensitivity of the converted model's output to each layer's conversion.

One layer at a time runs its warm-started target while every other layer runs the teacher; the KL of the
final next-token distribution to the teacher's, on calibration batches, is that layer's sensitivity.
Layers are restored to the teacher afterwards.

* `swa_sensitivity`: the layer slides (GateSWA), for choosing which layers stay full. On batches that carry a
  `score_mask` (the pass-key probes of models/retrieval_probe.py) only the masked positions count — the
  answer's prediction — so the score is how much sliding that layer alone breaks a long-range fetch
  (`retrieval_sensitivity`).
* `swa_window_sensitivity`: the same at several windows, for choosing each layer's window under a KV budget
  (models/budget.py `windows_for_budget`); `retrieval_window_sensitivity` on the pass-key probes.
* `mla_sensitivity`: the layer is an MLA of latent rank r, for a few candidate r: the output error each
  layer's rank costs, which models/budget.py turns into a per-layer weight for sharing a KV budget (an
  early layer's error passes through every later layer; the K/V spectrum alone cannot see that).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ascend_edit.config import TargetConfig
from ascend_edit.models.surgery import build_plan, decoder_layers, edit_model, edited_attentions, set_mode

if TYPE_CHECKING:
    from ascend_edit.attention.gate_swa import GateSWAAttention


@torch.no_grad()
def _kl_of_each_layer(model: nn.Module, batches: list[dict]) -> dict[int, float]:
    """{layer: summed batch-mean KL(teacher || model with only that layer's target)} of an edited model;
    restores the untouched teacher attentions afterwards. A batch's `score_mask` ([batch, seq] bool) limits
    the KL to those positions and averages it over them (nats per scored token)."""
    return {idx: kls[None] for idx, kls in _kl_of_each_layer_at(model, batches, {None: lambda _: None}).items()}


@torch.no_grad()
def _kl_of_each_layer_at(model: nn.Module, batches: list[dict], variants: Mapping) -> dict[int, dict]:
    """{layer: {variant: KL}} as `_kl_of_each_layer`, once per variant: `variants[v](target)` sets a layer's
    target to variant v before it alone runs (e.g. its window). The teacher's reference runs once per batch."""
    modules = {m.layer_idx: m for m in edited_attentions(model)}
    scores = {idx: dict.fromkeys(variants, 0.0) for idx in modules}
    try:
        for batch in batches:
            kwargs = dict(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False)
            set_mode(model, "teacher")
            reference = F.log_softmax(model(**kwargs).logits.float(), -1)
            for idx, module in modules.items():
                module.mode = "student"
                for variant, apply in variants.items():
                    apply(module.target)
                    logp = F.log_softmax(model(**kwargs).logits.float(), -1)
                    scores[idx][variant] += _kl(logp, reference, batch.get("score_mask"))
                module.mode = "teacher"
    finally:
        for layer in decoder_layers(model):  # back to the untouched teacher
            layer.self_attn = layer.self_attn.teacher if hasattr(layer.self_attn, "teacher") else layer.self_attn
    return scores


def _kl(logp: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        return float(F.kl_div(logp, reference, log_target=True, reduction="batchmean"))
    per_token = F.kl_div(logp[mask], reference[mask], log_target=True, reduction="none").sum(-1)
    return float(per_token.mean())


@torch.no_grad()
def swa_sensitivity(model: PreTrainedModel, cfg: TargetConfig, batches: list[dict]) -> list[float]:
    """KL when each layer alone slides (window and sinks of `cfg.gate_swa`); one value per layer."""
    window = cfg.gate_swa.window
    scores = swa_window_sensitivity(model, cfg, batches, [window])
    return [scores[i][window] if i in scores else 0.0 for i in range(model.config.num_hidden_layers)]


@torch.no_grad()
def swa_window_sensitivity(model: PreTrainedModel, cfg: TargetConfig, batches: list[dict], windows: Sequence[int]
                           ) -> dict[int, dict[int, float]]:
    """{layer: {window: KL}} when each converted layer alone slides at each of `windows` (sinks of `cfg.gate_swa`).

    The warm-started GateSWA target does not depend on its window (the teacher's projections, a neutral gate),
    so one edit serves every window: only the layer's `window` changes between forwards. Cost per batch: one
    teacher forward plus one per (layer, window), i.e. 1 + L * len(windows) (`swa_sensitivity`: 1 + L)."""
    if not windows or any(w < 1 for w in windows):
        raise ValueError(f"target.gate_swa.windows={list(windows)}: need at least one window, each >= 1")
    num_layers = model.config.num_hidden_layers
    all_sliding = dataclasses.replace(cfg, init="warm", gate_swa=dataclasses.replace(
        cfg.gate_swa, full_by_sensitivity=0, full_every=0, full_layers=[], kv_budget=None, windows=[],
        window=max(windows)))
    edit_model(model, build_plan(num_layers, all_sliding), all_sliding)

    def at(window: int):
        def apply(target: nn.Module) -> None:
            cast("GateSWAAttention", target).window = window  # every edited layer here is a GateSWA target

        return apply

    scores = _kl_of_each_layer_at(model, batches, {w: at(w) for w in sorted(set(windows))})
    del model.edit_plan  # the model is the untouched teacher again
    return scores


@torch.no_grad()
def retrieval_window_sensitivity(model: PreTrainedModel, cfg: TargetConfig, batches: list[dict],
                                 windows: Sequence[int], tokenizer=None, seed: int = 0) -> dict[int, dict[int, float]]:
    """`swa_window_sensitivity` on the pass-key probes of `retrieval_sensitivity` (KL at the answer tokens)."""
    from ascend_edit.models.retrieval_probe import calibration_probes

    probes = calibration_probes(batches, cfg.gate_swa.retrieval_probes, tokenizer, seed)
    return swa_window_sensitivity(model, cfg, probes, windows)


@torch.no_grad()
def retrieval_sensitivity(model: PreTrainedModel, cfg: TargetConfig, batches: list[dict], tokenizer=None,
                          seed: int = 0) -> list[float]:
    """KL at the answer tokens of `cfg.gate_swa.retrieval_probes` pass-key probes built from the calibration
    `batches`' text (models/retrieval_probe.py) when each layer alone slides; one value per layer."""
    from ascend_edit.models.retrieval_probe import calibration_probes

    probes = calibration_probes(batches, cfg.gate_swa.retrieval_probes, tokenizer, seed)
    return swa_sensitivity(model, cfg, probes)


@torch.no_grad()
def mla_sensitivity(model: PreTrainedModel, cfg: TargetConfig, stats: Mapping, batches: list[dict],
                    ranks: Sequence[int], layers: Sequence[int] | None = None) -> dict[int, dict[int, float]]:
    """{layer: {rank: KL}} when each layer alone is a warm-started MLA of latent `rank` (others: teacher).

    A rank above a layer's largest useful rank (`max_rank`, see models/budget.py) is still built — the
    warm start then keeps every direction — so callers pass candidate ranks within the layers' widths.
    """
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else list(layers)
    curves: dict[int, dict[int, float]] = {i: {} for i in layers}
    for rank in sorted(set(ranks)):
        one_rank = dataclasses.replace(cfg, init="warm", layers=layers, mla=dataclasses.replace(
            cfg.mla, kv_lora_rank=rank, kv_budget=None))
        edit_model(model, build_plan(num_layers, one_rank), one_rank, dict(stats))
        for idx, kl in _kl_of_each_layer(model, batches).items():
            curves[idx][rank] = kl
    if hasattr(model, "edit_plan"):
        del model.edit_plan  # the model is the untouched teacher again
    return curves
