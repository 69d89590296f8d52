"""Modeling code shipped inside exported checkpoints that stock transformers cannot express (`auto_map`).

An exported model is the teacher's own architecture (its transformers class, loaded from transformers)
with the attention of the converted layers replaced by the package's targets, built by the same
`converted_attention` that `models.surgery` uses in the framework. The checkpoint's `config.json`
carries the per-layer plan:

    "ascend_edit": {"plan": ["mla", "mla", "keep", ...],          # one entry per decoder layer
                    "mla": {...MLAConfig fields...},
                    "gate_swa": {"window": ..., "sink_tokens": ..., "gate": ...}}

Budget-aware plans add per-layer lists: "kv_lora_ranks" (MLA latent ranks) and "gate_swa_windows" (GateSWA
windows, 0 for a full layer, null for a layer that is not GateSWA); "gate_swa"."window" is then the largest.
Measured rotary choices add "rope_frequencies" (per layer, the teacher frequency of each rotary pair).

Exported checkpoints do not import this module from the package: `ascend_edit.hf.bundle` copies it,
with every package module it needs, into the checkpoint as `ascend_edit_*.py` files whose imports are
made relative, and writes the entry file `modeling_ascend_edit.py` with the two classes bound to the
teacher's architecture (`AscendEditConfig`, `AscendEditForCausalLM`). The set needs only torch and
transformers.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from torch import nn
from transformers.cache_utils import Cache

from ascend_edit.attention.gate_swa import GateSWAAttention, install_bounded_cache_layers
from ascend_edit.attention.geometry import read_geometry
from ascend_edit.attention.mla import MLAAttention

# Plan entries whose layer keeps the architecture's own attention module ("identity" is a trained copy
# of the teacher attention with the same parameter names).
TEACHER_LAYOUT_KINDS = ("keep", "identity")
CONVERTED_KINDS = ("mla", "swa", "full")


def converted_attention(kind: str, teacher_attn: nn.Module, config, mla=None, gate_swa=None) -> nn.Module:
    """The target module for one converted plan entry, shaped from the architecture's attention it replaces.

    The one builder of targets: model surgery passes the run's `MLAConfig` / `GateSWAConfig`, exported
    checkpoints the same fields from `config.ascend_edit`; `mla.kv_lora_rank` is this layer's latent rank.
    """
    geometry = read_geometry(teacher_attn, config)
    if kind == "mla":
        return MLAAttention(geometry, mla, config=config)
    if kind in ("swa", "full"):
        return GateSWAAttention(
            geometry,
            window=gate_swa.window if kind == "swa" else 0,
            sink_tokens=gate_swa.sink_tokens,
            gate=gate_swa.gate,
            config=config,
            q_norm=getattr(teacher_attn, "q_norm", None),
            k_norm=getattr(teacher_attn, "k_norm", None),
        )
    raise ValueError(f"unknown plan entry {kind!r}: expected one of {TEACHER_LAYOUT_KINDS + CONVERTED_KINDS}")


def install_converted_attention(model: nn.Module, config) -> None:
    """Replace the attention of every converted layer of a freshly built CausalLM, per `config.ascend_edit`."""
    spec = getattr(config, "ascend_edit", None)
    if not isinstance(spec, dict) or "plan" not in spec:
        raise ValueError("config has no 'ascend_edit' entry with a layer plan: not an ascend_edit export")
    layers = cast(nn.ModuleList, model.get_submodule("model.layers"))  # a decoder-only transformers model
    if len(spec["plan"]) != len(layers):
        raise ValueError(f"the plan has {len(spec['plan'])} entries for {len(layers)} decoder layers")
    for idx, (layer, kind) in enumerate(zip(layers, spec["plan"])):
        if kind in TEACHER_LAYOUT_KINDS:
            continue
        mla: SimpleNamespace | None = None
        gate_swa: SimpleNamespace | None = None
        if kind == "mla":
            fields = dict(spec["mla"])
            if spec.get("kv_lora_ranks"):  # budget-aware: each layer its own latent rank
                fields["kv_lora_rank"] = spec["kv_lora_ranks"][idx]
            if spec.get("rope_frequencies"):  # measured rotary frequencies, per layer (None: the r/2 highest)
                fields["rope_frequencies"] = spec["rope_frequencies"][idx]
            mla = SimpleNamespace(**fields)
        elif kind in ("swa", "full"):
            fields = dict(spec["gate_swa"])
            if kind == "swa" and spec.get("gate_swa_windows"):  # budget-aware: each layer its own window
                fields["window"] = spec["gate_swa_windows"][idx]
            gate_swa = SimpleNamespace(**fields)
        teacher_attn = cast(nn.Module, layer.self_attn)
        layer.self_attn = converted_attention(kind, teacher_attn, config, mla=mla, gate_swa=gate_swa)


def has_sinks(model: nn.Module) -> bool:
    """Whether any layer slides with sink tokens: the one attention whose result depends on absolute positions."""
    return any(isinstance(m, GateSWAAttention) and m.is_sliding and m.sink_tokens > 0 for m in model.modules())


class AscendEditCausalLMMixin:
    """Put before the teacher's CausalLM class: builds it, then swaps in the converted attentions.

    Everything else (forward, loss, generation, caches, weight tying, MoE routing) is the teacher
    architecture's own transformers code.
    """

    def __init__(self, config, *args, **kwargs):
        # the next class in the MRO is the teacher's CausalLM (see above), which takes the config
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        install_converted_attention(cast(nn.Module, self), config)
        self._has_sinks = has_sinks(cast(nn.Module, self))  # fixed by the plan; read on every forward

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """transformers decides whether a MoE model may use its fast expert kernels (grouped GEMM) by reading the
        class's own module for its experts decorator; the experts are the teacher class's (next in the MRO), so its
        module answers. Without this an exported Qwen3-MoE ran the Python loop over experts."""
        teacher = next((base for base in cls.__mro__[1:] if base.__module__.startswith("transformers.models.")
                        and hasattr(base, "_can_set_experts_implementation")), None)
        return bool(teacher is not None and teacher._can_set_experts_implementation())

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """The teacher's forward, with positions counted over each row's real tokens when a padded 2-D
        `attention_mask` comes without `position_ids` (as `generate` already counts them). Sliding layers keep the
        first `sink_tokens` *positions* visible: with transformers' default positions (0, 1, ... whatever the
        padding) a left-padded row's sinks would be its padding, and its logits would change with the padding."""
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and self._has_sinks:
            length = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,  # type: ignore[misc]
                               position_ids=position_ids, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """transformers' cache for `generate`, with the sliding GateSWA layers' bounded slots in it from the start
        (so assisted decoding's past recording reaches them; see `install_bounded_cache_layers`)."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]
        cache = model_kwargs.get("cache")
        install_bounded_cache_layers(cast(nn.Module, self), cache)
        if getattr(generation_config, "is_assistant", False) and isinstance(cache, Cache):
            cache.activate_past_recording()  # a draft model's cache: transformers asked for recording before we installed
        return result
