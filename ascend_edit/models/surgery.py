"""Model surgery: a per-layer plan turns a teacher into an edited model with learnable targets.

The plan is data — one entry per decoder layer, validated against the layer count — so a hybrid
model is a list, not branches in the model code.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import PretrainedConfig

from ascend_edit.attention.edited import MODES, EditedAttention
from ascend_edit.attention.geometry import read_geometry
from ascend_edit.attention.init import (
    LayerStats,
    choose_rope_frequencies,
    init_gate_swa_from_teacher,
    init_mla_from_teacher,
    init_random,
)
from ascend_edit.config import GateSWAConfig, TargetConfig
from ascend_edit.hf.modeling import converted_attention

if TYPE_CHECKING:
    from ascend_edit.attention.gate_swa import GateSWAAttention
    from ascend_edit.attention.mla import MLAAttention

log = logging.getLogger(__name__)

LAYER_KINDS = ("keep", "identity", "mla", "swa", "full")  # swa/full: GateSWA sliding / full layers


@dataclass(frozen=True)
class LayerPlan:
    layer_idx: int
    kind: str  # one of LAYER_KINDS
    kv_lora_rank: int | None = None  # MLA: this layer's latent rank (budget-aware plans); None: the config's
    window: int | None = None  # GateSWA "swa": this layer's window (per-layer budget plans); None: the config's
    # MLA: the teacher frequency of each rotary pair (target.mla.rope_selection=measured); None: the r/2 highest
    rope_frequencies: tuple[int, ...] | None = None

    @property
    def converted(self) -> bool:
        return self.kind != "keep"


def plan_entries(plan: Iterable[LayerPlan]) -> list[list]:
    """The plan as JSON: [layer, kind], plus the layer's latent rank where a budget chose it, plus (after the
    rank or null) the layer's window where a budget chose it, plus (after those or nulls) the layer's rotary
    frequencies where they were measured; entries without them are written as before."""
    entries = []
    for e in plan:
        entry: list = [e.layer_idx, e.kind]
        extras = [e.kv_lora_rank, e.window, list(e.rope_frequencies) if e.rope_frequencies is not None else None]
        while extras and extras[-1] is None:
            extras.pop()
        entries.append(entry + extras)
    return entries


def plan_is_measured(cfg: TargetConfig) -> bool:
    """Whether the layer plan comes from calibration data (full layers, windows, ranks or rotary frequencies
    chosen on it) rather than from the config alone: then a run that goes on — a resume, a stage-2 job, a
    rebuilt checkpoint — must take the plan it saved, since measuring again (other batches, other device)
    can choose differently for the same trained weights."""
    swa, mla = cfg.gate_swa, cfg.mla
    if cfg.kind == "gate_swa":
        return bool(swa.full_by_sensitivity or swa.kv_budget is not None)
    return cfg.kind == "mla" and bool(mla.kv_budget or mla.rope_selection == "measured")


def saved_plan(directories: Iterable[Path]) -> tuple[list[LayerPlan], Path] | None:
    """The plan saved with the first converted model found in `directories` (its CONVERTED_MARKER file)."""
    for directory in directories:
        meta = Path(directory) / "ascend_edit.json"  # models/checkpoint.CONVERTED_MARKER
        if meta.is_file():
            entries = json.loads(meta.read_text()).get("plan")
            if entries:
                return plan_from_entries(entries), meta
    return None


def plan_from_entries(entries: Iterable[list]) -> list[LayerPlan]:
    """The plan `plan_entries` wrote."""
    plan = []
    for entry in entries:
        if len(entry) > 4 and entry[4] is not None:
            entry = [*entry[:4], tuple(entry[4])]
        plan.append(LayerPlan(*entry))
    return plan


def plan_with_windows(plan: list[LayerPlan], windows: dict[int, int]) -> list[LayerPlan]:
    """The GateSWA plan with each converted layer's budgeted attention: window 0 = full, else sliding at it."""
    out = []
    for entry in plan:
        if entry.layer_idx not in windows or entry.kind not in ("swa", "full"):
            out.append(entry)
            continue
        window = windows[entry.layer_idx]
        out.append(dataclasses.replace(entry, kind="full", window=None) if window == 0
                   else dataclasses.replace(entry, kind="swa", window=window))
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise NotImplementedError(f"{type(model).__name__} has no model.layers: not a decoder-only HF model")
    return layers


def full_layer_choice(num_layers: int, cfg: GateSWAConfig, sensitivity: list[float] | None = None) -> set[int]:
    """Which GateSWA layers keep full attention: explicit list, every k-th, or the most sensitive."""
    if cfg.full_layers:
        bad = [i for i in cfg.full_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"target.gate_swa.full_layers {bad} out of range for {num_layers} layers")
        return set(cfg.full_layers)
    if cfg.full_every:
        return set(range(cfg.full_every - 1, num_layers, cfg.full_every))
    if cfg.kv_budget is not None:  # chosen on data in train/prepare.py, then saved as full_layers
        raise ValueError("target.gate_swa.kv_budget: the full layers are measured on calibration data by a "
                         "conversion run; give target.gate_swa.full_layers (from that run's plan) here")
    if cfg.full_by_sensitivity:
        if sensitivity is None:
            raise ValueError("target.gate_swa.full_by_sensitivity needs measured layer sensitivities")
        ranked = sorted(range(num_layers), key=lambda i: -sensitivity[i])
        return set(ranked[: cfg.full_by_sensitivity])
    return set()


def build_plan(num_layers: int, cfg: TargetConfig, sensitivity: list[float] | None = None) -> list[LayerPlan]:
    convert = set(range(num_layers)) if cfg.layers is None else set(cfg.layers)
    bad = sorted(i for i in convert if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"target.layers {bad} out of range: the model has {num_layers} layers")
    full = full_layer_choice(num_layers, cfg.gate_swa, sensitivity) if cfg.kind == "gate_swa" else set()
    plan = []
    for i in range(num_layers):
        if i not in convert:
            kind = "keep"
        elif cfg.kind == "gate_swa":
            kind = "full" if i in full else "swa"
        else:
            kind = cfg.kind
        plan.append(LayerPlan(i, kind))
    return plan


def validate_plan(plan: list[LayerPlan], num_layers: int) -> None:
    if len(plan) != num_layers:
        raise ValueError(f"plan has {len(plan)} entries for a model with {num_layers} layers")
    for i, entry in enumerate(plan):
        if entry.layer_idx != i or entry.kind not in LAYER_KINDS:
            raise ValueError(f"plan entry {i} is invalid: {entry}")
        if entry.window is not None and (entry.kind != "swa" or entry.window < 1):
            raise ValueError(f"plan entry {i}: a window ({entry.window}) belongs to a sliding layer and is >= 1")


def make_target(entry: LayerPlan, teacher_attn: nn.Module, cfg: TargetConfig, model_config) -> nn.Module:
    if entry.kind == "identity":
        read_geometry(teacher_attn, model_config)  # refuses an attention layout the package cannot convert
        target = copy.deepcopy(teacher_attn)
    else:
        mla = cfg.mla if entry.kv_lora_rank is None else dataclasses.replace(cfg.mla, kv_lora_rank=entry.kv_lora_rank)
        if entry.rope_frequencies is not None:
            mla = dataclasses.replace(mla, rope_frequencies=list(entry.rope_frequencies))
        # A budgeted window is the layer's own; the config's `window` serves the others.
        swa = cfg.gate_swa if entry.window is None else dataclasses.replace(cfg.gate_swa, window=entry.window)
        # A shape-only (meta) teacher gets shape-only targets: built on the CPU, nn.Linear's own init of an
        # 8B model's targets took 20 s and 7 GB of host memory per `plan` / `inspect`. Real teachers keep
        # building on the CPU, so a random init draws the same numbers whatever the device.
        shape_only = any(p.is_meta for p in teacher_attn.parameters())
        with torch.device("meta") if shape_only else nullcontext():
            target = converted_attention(entry.kind, teacher_attn, model_config, mla=mla, gate_swa=swa)
    ref = cast(nn.Linear, teacher_attn.q_proj).weight  # read_geometry has checked it is an nn.Linear
    return target.to(device=ref.device, dtype=ref.dtype)


def initialise_target(target: nn.Module, entry: LayerPlan, teacher_attn: nn.Module, init: str,
                      model_config, stats: LayerStats | None, whitening_shrinkage: float = 0.0,
                      shrink_toward: str = "identity") -> dict:
    if entry.kind == "identity":
        return {}
    if init == "random":
        init_random(target)
        return {}
    if entry.kind == "mla":
        # make_target built the module of the entry's kind
        mla = cast("MLAAttention", target)
        return init_mla_from_teacher(mla, teacher_attn, read_geometry(teacher_attn, model_config), stats,
                                     whitening_shrinkage, shrink_toward)
    init_gate_swa_from_teacher(cast("GateSWAAttention", target), teacher_attn)
    return {}


def edit_model(model: nn.Module, plan: list[LayerPlan], cfg: TargetConfig,
               stats: dict[int, LayerStats] | None = None,
               gather: Callable[[nn.Module], AbstractContextManager] | None = None) -> nn.Module:
    """Wrap every converted layer's attention in an EditedAttention (in place); returns the model.

    `gather(attention)`: a context that makes one teacher attention's weights whole while its target is built
    and warm-started (a ZeRO-3 partitioned teacher: models/zero3.py `gathered`)."""
    layers = decoder_layers(model)
    validate_plan(plan, len(layers))
    if cfg.kind == "mla" and cfg.mla.rope_selection == "measured" and all(e.rope_frequencies is None for e in plan):
        chosen = rope_frequency_choice(model, [e.layer_idx for e in plan if e.kind == "mla"], stats, cfg.mla, gather)
        plan = [dataclasses.replace(e, rope_frequencies=chosen[e.layer_idx]) if e.layer_idx in chosen else e
                for e in plan]
        log.info("rotary frequencies kept per layer (measured): %s", [list(f) for f in chosen.values()])
    if cfg.kind == "mla" and cfg.mla.kv_budget is not None and all(e.kv_lora_rank is None for e in plan):
        from ascend_edit.models.budget import mla_rank_allocation, plan_with_ranks

        allocation = mla_rank_allocation(model, [e.layer_idx for e in plan if e.kind == "mla"], stats, cfg.mla,
                                         frequencies=_planned_frequencies(plan, cfg.mla))
        plan = plan_with_ranks(plan, allocation.ranks)
        log.info("KV budget %.3f of the converted layers' teacher KV: ranks %s", allocation.kv_fraction, list(allocation.ranks.values()))
    for entry, layer in zip(plan, layers):
        if not entry.converted:
            continue
        teacher_attn = cast(nn.Module, layer.self_attn)
        if isinstance(teacher_attn, EditedAttention):
            raise ValueError(f"layer {entry.layer_idx} is already edited")
        with gather(teacher_attn) if gather is not None else nullcontext():
            target = make_target(entry, teacher_attn, cfg, model.config)
            info = initialise_target(target, entry, teacher_attn, cfg.init, model.config,
                                     (stats or {}).get(entry.layer_idx), cfg.mla.whitening_shrinkage,
                                 cfg.mla.whitening_shrinkage_toward)
        if info:
            log.debug("layer %d init: %s", entry.layer_idx, info)
        layer.self_attn = EditedAttention(teacher_attn, target, entry.layer_idx)
    # kept on the model for accounting and export (nn.Module's __setattr__ is typed for tensors and modules only)
    model.edit_plan = plan  # type: ignore[assignment]
    set_mode(model, "student")
    return model


def rope_frequency_choice(model: nn.Module, layers: Iterable[int], stats: Mapping[int, LayerStats] | None, mla_cfg,
                          gather: Callable[[nn.Module], AbstractContextManager] | None = None) -> dict[int, tuple[int, ...]]:
    """Per MLA layer, the teacher rotary frequencies its shared RoPE key keeps under
    `target.mla.rope_selection=measured` (attention/init.py `choose_rope_frequencies`)."""
    blocks = decoder_layers(model)
    if any(p.is_meta for p in model.parameters()):
        # A shape-only teacher (`plan`, `inspect`): nothing to measure, and the choice keeps the shapes. A RoPE key
        # wider than one head needs a list (a frequency per pair, repeats for further KV-head directions).
        pairs = mla_cfg.qk_rope_head_dim // 2
        chosen = {}
        for idx in layers:
            half = read_geometry(cast(nn.Module, blocks[idx].self_attn), model.config).head_dim // 2
            if pairs > half:
                chosen[idx] = tuple(i % half for i in range(pairs))
        return chosen
    inv_freq = teacher_inv_freq(model)
    chosen = {}
    for idx in layers:
        attn = cast(nn.Module, blocks[idx].self_attn)
        with gather(attn) if gather is not None else nullcontext():
            choice = tuple(choose_rope_frequencies(attn, read_geometry(attn, model.config), (stats or {}).get(idx),
                                                   mla_cfg, inv_freq, mla_cfg.rope_selection_context))
        if choice != tuple(range(mla_cfg.qk_rope_head_dim // 2)):  # the default's own choice stays the default
            chosen[idx] = choice
    return chosen


def _planned_frequencies(plan: list[LayerPlan], mla_cfg) -> dict[int, tuple[int, ...]] | None:
    """Each MLA layer's rotary frequencies as the targets will be built (plan entry, else the config's); None
    where neither sets them anywhere (budget.py then measures the config's choice itself)."""
    chosen = {e.layer_idx: e.rope_frequencies or (tuple(mla_cfg.rope_frequencies) if mla_cfg.rope_frequencies else None)
              for e in plan if e.kind == "mla"}
    planned = {i: f for i, f in chosen.items() if f is not None}
    return planned if planned or mla_cfg.rope_selection != "measured" else None


def teacher_inv_freq(model: nn.Module) -> torch.Tensor:
    """The rotary frequencies (radians per token) of the teacher's head dims' pairs: its rotary module's own
    (so rope scaling is included), else the plain `rope_theta` ones."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if isinstance(inv_freq, torch.Tensor) and not inv_freq.is_meta:
        return inv_freq.detach().float().cpu()
    config = cast(PretrainedConfig, model.config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def edited_attentions(model: nn.Module) -> list[EditedAttention]:
    return [m for m in model.modules() if isinstance(m, EditedAttention)]


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    for module in edited_attentions(model):
        module.mode = mode
        module.pair = None


TRAINABLE_POLICIES = ("target", "target+norms", "all")


def set_trainable(model: nn.Module, policy: str) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze by policy. Teacher attentions always stay frozen."""
    if policy not in TRAINABLE_POLICIES:
        raise ValueError(f"trainable={policy!r} is not one of {TRAINABLE_POLICIES}")
    model.requires_grad_(False)
    for module in edited_attentions(model):
        module.target.requires_grad_(True)
    for param in shared_trained(model, policy):
        param.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def shared_trained(model: nn.Module, policy: str) -> list[nn.Parameter]:
    """The parameters outside the target attentions that `policy` trains: the norms (`target+norms`) or every
    weight but the teacher attentions (`all`); none for `target`."""
    if policy == "target+norms":
        return [param for name, module in model.named_modules()
                if "norm" in type(module).__name__.lower() and ".teacher" not in name and ".target" not in name
                for param in module.parameters()]
    if policy == "all":
        return [param for name, param in model.named_parameters() if ".teacher." not in name and ".target." not in name]
    return []


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable / frozen teacher-attention / shared (everything else) parameter counts."""
    counts = {"target": 0, "teacher_attention": 0, "shared": 0, "trainable": 0}
    for name, param in model.named_parameters():
        if ".teacher." in name:
            counts["teacher_attention"] += param.numel()
        elif ".target." in name:
            counts["target"] += param.numel()
        else:
            counts["shared"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
    return counts


@torch.no_grad()
def collect_layer_stats(model: nn.Module, batches: Iterable[dict], layers: Iterable[int] | None = None
                        ) -> dict[int, LayerStats]:
    """Input covariance (and Qwen3 q/k RMS) of each teacher attention on real batches.

    Forward pre-hooks read the attention inputs; only statistics are kept, never activations.
    """
    all_layers = decoder_layers(model)
    wanted = set(range(len(all_layers))) if layers is None else set(layers)
    sums: dict[int, dict] = {}
    handles = []

    def hook_for(idx: int, attn: nn.Module):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            acc = sums.setdefault(idx, {"cov": 0.0, "n": 0, "q": 0.0, "k": 0.0})
            acc["cov"] = acc["cov"] + x.T @ x
            acc["n"] += x.shape[0]
            if getattr(attn, "q_norm", None) is not None:
                d = attn.head_dim
                q_proj, k_proj = cast(nn.Linear, attn.q_proj), cast(nn.Linear, attn.k_proj)  # read_geometry's layouts
                q = q_proj(x.to(q_proj.weight.dtype)).view(x.shape[0], -1, d).double()
                k = k_proj(x.to(k_proj.weight.dtype)).view(x.shape[0], -1, d).double()
                acc["q"] += q.pow(2).mean(-1).sqrt().sum() / q.shape[1]
                acc["k"] += k.pow(2).mean(-1).sqrt().sum() / k.shape[1]

        return hook

    for idx, layer in enumerate(all_layers):
        attn = cast(nn.Module, layer.self_attn)
        attn = attn.teacher if isinstance(attn, EditedAttention) else attn
        if idx in wanted:
            handles.append(attn.register_forward_pre_hook(hook_for(idx, attn), with_kwargs=True))
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"))
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for idx, acc in sums.items():
        n = max(acc["n"], 1)
        stats[idx] = LayerStats(
            input_cov=acc["cov"] / n,
            q_rms=float(acc["q"] / n) if acc["q"] else 1.0,
            k_rms=float(acc["k"] / n) if acc["k"] else 1.0,
            tokens=acc["n"],
        )
    return stats


def unwrap_targets(model: nn.Module) -> nn.Module:
    """Replace each EditedAttention by its target (drops teacher attentions; for export)."""
    for layer in decoder_layers(model):
        if isinstance(layer.self_attn, EditedAttention):
            layer.self_attn = layer.self_attn.target
    return model
