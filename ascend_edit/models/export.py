"""Export a converted model as a Hugging Face checkpoint that loads wherever the ecosystem expects.

Three formats, tried in this order (`native="auto"`):

* `deepseek_v3` — every layer MLA over a dense teacher (Llama, Qwen2/3, Mistral): a stock
  `deepseek_v3` config with a dense MLP in every layer (`first_k_dense_replace = num_hidden_layers`).
  Loads with no `trust_remote_code`; transformers' cache then holds only latents.
* `teacher` — GateSWA without gates and sinks (or identity layers): the teacher's own architecture,
  with `layer_types` / `sliding_window` marking the sliding layers. Also stock transformers.
* `auto_map` — everything else (gates, sink tokens, MLA without the latent norm, MoE teachers,
  partial conversions): the teacher's architecture with the package's attention modules, shipped as
  self-contained code in the checkpoint (`ascend_edit.hf.bundle`), loaded with `trust_remote_code=True`.

`native="always"` refuses (ValueError listing why) instead of falling back to `auto_map`;
`native="never"` always writes `auto_map`. Nothing is moved into place before it has been loaded back
from disk with `from_pretrained` and its logits compared with the model it came from (and, for MLA,
its cache checked to hold latents) — an export that would not load back is refused. That check never
runs code from the checkpoint: native formats load with stock transformers classes, `auto_map` with
the package's own classes (of which the shipped files are a copy). A non-finite weight is refused
before anything is written, and an existing non-empty output directory is replaced only when asked.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DeepseekV3Config, PretrainedConfig, PreTrainedModel
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3ForCausalLM,
    DeepseekV3RotaryEmbedding,
)

from ascend_edit.attention.edited import EditedAttention
from ascend_edit.attention.gate_swa import GateSWAAttention
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.eval.kv import measured_cache_bytes
from ascend_edit.hf.bundle import CAUSAL_LM_CLASS, CONFIG_CLASS, MODEL_TYPE, write_modeling_code
from ascend_edit.hf.modeling import AscendEditCausalLMMixin
from ascend_edit.models.checkpoint import cast_parameters, converted_state_dict, fresh_rotary_buffers, swap_in
from ascend_edit.models.surgery import decoder_layers
from ascend_edit.train.checkpoint_io import (
    MANIFEST,
    first_non_finite,
    manifested_ancestor,
    read_manifest,
    unlisted_files,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

NATIVE_MODES = ("auto", "always", "never")
FORMATS = ("deepseek_v3", "teacher", "auto_map")
DENSE_TEACHERS = ("llama", "mistral", "qwen2", "qwen3")
# transformers' DeepseekV3Attention builds its latent (and query) RMSNorm with this fixed epsilon.
DEEPSEEK_LATENT_NORM_EPS = 1e-6
# Verification: max |logit difference| relative to the largest reference logit, both in fp32.
VERIFY_RTOL = 1e-4


class ExportError(ValueError):
    """The model cannot be exported as asked (the message says why), or the export did not load back."""


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    format: str  # one of FORMATS
    blockers: dict[str, list[str]]  # native format considered -> why it cannot express this model
    max_rel_logit_diff: float | None  # reloaded vs in-framework model (None: verification skipped)
    cache_bytes_per_token: float | None  # measured on the reloaded model's cache after the probe
    serving_notes: list[str] = field(default_factory=list)  # shape rules other servers (vLLM) need
    probe_tokens: int | None = None  # the probe's length (sliding layers hold all of a probe shorter than long)


# ------------------------------------------------------------------------------------------------
# What the converted model is made of
# ------------------------------------------------------------------------------------------------
def _converted_attention(layer: nn.Module) -> nn.Module:
    attn = cast(nn.Module, layer.self_attn)
    return attn.target if isinstance(attn, EditedAttention) else attn


def conversion_spec(model: nn.Module) -> dict:
    """The per-layer plan and target shapes, read off the model's own modules (stored in config.json)."""
    plan = getattr(model, "edit_plan", None)
    if plan is None:
        raise ExportError(f"{type(model).__name__} has no edit_plan: not a converted model "
                          "(build it with models.surgery.edit_model or models.checkpoint.load_converted)")
    attns = [_converted_attention(layer) for layer in decoder_layers(model)]
    # Latent ranks may differ per layer (budget-aware plans); every other MLA dim is shared.
    ranks = [a.kv_lora_rank if isinstance(a, MLAAttention) else None for a in attns]
    mla = {_mla_shape(a)[1:] for a in attns if isinstance(a, MLAAttention)}
    # Windows may differ per layer too (budget-aware GateSWA plans); sinks and gate are shared.
    windows = [a.window if isinstance(a, GateSWAAttention) else None for a in attns]
    swa = {a.window for a in attns if isinstance(a, GateSWAAttention) and a.is_sliding}
    gates = {(a.sink_tokens, a.gate) for a in attns if isinstance(a, GateSWAAttention)}
    if len(mla) > 1 or len(gates) > 1:
        raise ExportError("converted layers differ in shape (MLA dims, sinks or gate): one config cannot "
                          f"describe them ({sorted(mla) or sorted(gates)})")
    spec: dict = {"plan": [entry.kind for entry in plan]}
    if mla:
        keys = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank", "latent_norm")
        spec["mla"] = dict(zip(keys, (max(r for r in ranks if r is not None), *mla.pop())))
        if len({r for r in ranks if r is not None}) > 1:
            spec["kv_lora_ranks"] = ranks  # per layer (None where not MLA); hf/modeling.py reads it
        frequencies = [list(a.rope_frequencies) if isinstance(a, MLAAttention) and a.rope_frequencies is not None
                       else None for a in attns]
        if any(f is not None for f in frequencies):
            spec["rope_frequencies"] = frequencies  # per layer (None: the r/2 highest); hf/modeling.py reads it
    if gates:
        (sink_tokens, gate), window = gates.pop(), max(swa, default=0)
        spec["gate_swa"] = {"window": window, "sink_tokens": sink_tokens, "gate": gate}
        if len(swa) > 1:
            spec["gate_swa_windows"] = windows  # per layer (0: full, None: not GateSWA); hf/modeling.py reads it
    return spec


def _mla_shape(attn: MLAAttention) -> tuple:
    return (attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim, attn.v_head_dim, attn.q_lora_rank,
            not isinstance(attn.kv_a_layernorm, nn.Identity))


# ------------------------------------------------------------------------------------------------
# Native deepseek_v3
# ------------------------------------------------------------------------------------------------
def deepseek_v3_config(base, spec: dict, attention_bias: bool) -> DeepseekV3Config:
    """A dense `deepseek_v3` config equivalent to an all-MLA conversion of `base`.

    The rotary part keeps the teacher's r/2 highest frequencies, which is a width-r rotary embedding
    with theta' = theta^(r/head_dim). Heads are not grouped (num_key_value_heads = num_attention_heads:
    transformers would otherwise repeat the already per-head decompressed keys). Embeddings are untied
    because vLLM's DeepSeek model has no tied-embedding path; RoPE is interleaved (see
    `_interleave_rope_rows`) because vLLM's DeepSeek MLA always rotates interleaved pairs.
    """
    mla, layers = spec["mla"], base.num_hidden_layers
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    rope = dict(base.rope_parameters)
    rope["rope_theta"] = float(rope["rope_theta"]) ** (mla["qk_rope_head_dim"] / head_dim)
    return DeepseekV3Config(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_attention_heads,
        kv_lora_rank=mla["kv_lora_rank"], q_lora_rank=mla["q_lora_rank"], qk_rope_head_dim=mla["qk_rope_head_dim"],
        qk_nope_head_dim=mla["qk_nope_head_dim"], v_head_dim=mla["v_head_dim"],
        # dense MLP in every layer; the MoE fields are set to their smallest valid values, unused
        first_k_dense_replace=layers, n_routed_experts=1, n_shared_experts=1, n_group=1, topk_group=1,
        num_experts_per_tok=1, moe_intermediate_size=base.intermediate_size, routed_scaling_factor=1.0,
        num_mtp_layers=0, hidden_act=base.hidden_act, max_position_embeddings=base.max_position_embeddings,
        initializer_range=base.initializer_range, rms_norm_eps=base.rms_norm_eps,
        pad_token_id=base.pad_token_id, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
        tie_word_embeddings=False, rope_parameters=rope, rope_interleave=True,
        attention_bias=attention_bias, attention_dropout=0.0,
    )


def _interleave_rope_rows(weight: torch.Tensor, rope_dim: int, block: int) -> torch.Tensor:
    """Reorder the rotary rows of a projection from rotate-half to interleaved pairs.

    Rows come in blocks of `block` (one per head, or one for kv_a_proj_with_mqa) whose last `rope_dim`
    rows are rotary; rotate-half pairs row i with row i + r/2, DeepSeek's interleaved layout pairs
    2i with 2i+1. transformers' interleaved RoPE returns its output in rotate-half order, so the
    cache and every score are bit-identical to the non-interleaved model.
    """
    half = rope_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    rows = weight.reshape(-1, block, *weight.shape[1:])
    rope = rows[:, block - rope_dim:][:, order]
    return torch.cat([rows[:, : block - rope_dim], rope], dim=1).reshape(weight.shape)


def _deepseek_v3_state(state: dict[str, torch.Tensor], spec: dict) -> dict[str, torch.Tensor]:
    """The converted weights under deepseek_v3's layout: interleaved rotary rows, an explicit lm_head."""
    mla = spec["mla"]
    rope, qk_head = mla["qk_rope_head_dim"], mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
    out = dict(state)
    for name, tensor in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            out[name] = _interleave_rope_rows(tensor, rope, qk_head)
        elif ".self_attn.kv_a_proj_with_mqa." in name:
            out[name] = _interleave_rope_rows(tensor, rope, mla["kv_lora_rank"] + rope)
    if "lm_head.weight" not in out:  # tied in the teacher: written out (see deepseek_v3_config)
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def _deepseek_v3_blockers(model: PreTrainedModel, spec: dict) -> list[str]:
    base, reasons = model.config, []
    if any(kind != "mla" for kind in spec["plan"]):
        reasons.append("deepseek_v3 needs MLA in every layer; the plan is "
                       f"{sorted(set(spec['plan']))} (partial or mixed conversions go through auto_map)")
    if base.model_type not in DENSE_TEACHERS:
        reasons.append(f"the teacher ({base.model_type}) is not a dense {'/'.join(DENSE_TEACHERS)} model: "
                       "deepseek_v3's MoE layers (sigmoid group-limited router, shared experts) cannot express its MLP")
    if "mla" not in spec:
        return reasons + ["no MLA layer"]
    if not spec["mla"]["latent_norm"]:
        reasons.append("target.mla.latent_norm=false: deepseek_v3 always applies an RMSNorm to the latent")
    if "kv_lora_ranks" in spec:
        reasons.append("budget-aware latent ranks differ per layer; deepseek_v3 has one kv_lora_rank for all layers")
    if "rope_frequencies" in spec:
        reasons.append("the rotary frequencies were chosen per layer (target.mla.rope_selection=measured); "
                       "deepseek_v3 rotates at the r/2 highest")
    attns = [_converted_attention(layer) for layer in decoder_layers(model)]
    mla = next(a for a in attns if isinstance(a, MLAAttention))
    norms = [m for m in (getattr(mla, "kv_a_layernorm", None), getattr(mla, "q_a_layernorm", None))
             if m is not None and not isinstance(m, nn.Identity)]
    query_out = mla.q_proj if mla.q_lora_rank is None else mla.q_b_proj
    if query_out.bias is not None:
        reasons.append("the teacher's query bias (Qwen2, attention_bias=true) is kept on the query projection; "
                       "deepseek_v3's has none")
    if any(abs(m.variance_epsilon - DEEPSEEK_LATENT_NORM_EPS) > 0 for m in norms):
        reasons.append(f"the latent RMSNorm uses eps={norms[0].variance_epsilon} (the teacher's rms_norm_eps); "
                       f"transformers' deepseek_v3 fixes it at {DEEPSEEK_LATENT_NORM_EPS}")
    if reasons:
        return reasons
    bias = mla.kv_a_proj_with_mqa.bias is not None
    config = deepseek_v3_config(base, spec, bias)
    reasons += _rope_blockers(model, config, spec["mla"]["qk_rope_head_dim"])
    with torch.device("meta"):
        scaling = DeepseekV3Attention(config, 0).scaling
    if abs(scaling - mla.scaling) > 1e-12 * mla.scaling:
        reasons.append(f"deepseek_v3 would scale scores by {scaling:.6g}, the converted model by {mla.scaling:.6g}")
    state = _deepseek_v3_state(converted_state_dict(model), spec)
    reasons += _layout_mismatch(DeepseekV3ForCausalLM, config, state)
    return reasons


def _rope_blockers(model: PreTrainedModel, config: DeepseekV3Config, rope_dim: int) -> list[str]:
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "dynamic":
        return ["rope_type=dynamic rescales frequencies by the rotary width at run time: not expressible"]
    teacher = model.model.rotary_emb
    mine = DeepseekV3RotaryEmbedding(config)
    want = teacher.inv_freq.float().cpu()[: rope_dim // 2]
    if not torch.allclose(mine.inv_freq.float(), want, rtol=1e-5, atol=0.0) or \
            abs(mine.attention_scaling - teacher.attention_scaling) > 1e-7:
        return [f"rope_type={rope_type}: a width-{rope_dim} deepseek_v3 rotary embedding does not reproduce the "
                "teacher's highest frequencies"]
    return []


def _layout_mismatch(model_cls: type[PreTrainedModel], config, state: dict[str, torch.Tensor]) -> list[str]:
    """Parameter names/shapes the native class expects but `state` lacks or shapes differently, and extras."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    shapes = sorted(k for k in set(expected) & set(have) if expected[k] != have[k])
    reasons = []
    if missing:
        reasons.append(f"{model_cls.__name__} expects weights the model lacks: {missing[:4]}"
                       f"{' ...' if len(missing) > 4 else ''}")
    if extra:
        reasons.append(f"the model has weights {model_cls.__name__} has no place for: {extra[:4]}"
                       f"{' ...' if len(extra) > 4 else ''}")
    if shapes:
        reasons.append(f"shape mismatch for {shapes[:4]}: expected {[expected[k] for k in shapes[:4]]}, "
                       f"have {[have[k] for k in shapes[:4]]}")
    return reasons


def _deepseek_v3_notes(spec: dict, config: DeepseekV3Config) -> list[str]:
    """Shape rules beyond transformers that decide whether vLLM / vllm-ascend serve the checkpoint as is."""
    mla, notes = spec["mla"], []
    if config.attention_bias:
        notes.append("attention biases: vLLM's DeepSeek MLA has no q/kv_a/o biases; vLLM cannot load this")
    if (config.rope_parameters or {}).get("rope_type", "default") != "default":
        notes.append("non-default rope_type: vLLM's DeepSeek model reinterprets it as deepseek_yarn")
    if (mla["kv_lora_rank"], mla["qk_rope_head_dim"]) != (512, 64):
        notes.append(f"kv_lora_rank={mla['kv_lora_rank']}, qk_rope_head_dim={mla['qk_rope_head_dim']}: the fused MLA "
                     "decode kernels (FlashMLA, vllm-ascend) take 512 + 64 only")
    if mla["qk_nope_head_dim"] != 128 or mla["v_head_dim"] != 128:
        notes.append("vllm-ascend's fused MLA ops expect qk_nope_head_dim = v_head_dim = 128")
    return notes


# ------------------------------------------------------------------------------------------------
# Native teacher architecture (hybrid sliding window via layer_types)
# ------------------------------------------------------------------------------------------------
def teacher_config(base, spec: dict):
    """The teacher's config with `layer_types` / `sliding_window` for the plan's sliding layers."""
    config = copy.deepcopy(base)
    sliding = [kind == "swa" for kind in spec["plan"]]
    if any(sliding):
        config.use_sliding_window = True
        config.sliding_window = spec["gate_swa"]["window"]
        config.layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    return config


def _teacher_blockers(model: PreTrainedModel, spec: dict) -> list[str]:
    base, reasons = model.config, []
    if "mla" in spec:
        return ["MLA layers have no place in the teacher's attention layout"]
    swa = spec.get("gate_swa") or {}
    if swa and swa["gate"] != "none":
        reasons.append(f"gate={swa['gate']}: the teacher architecture has no attention output gate")
    sliding = "swa" in spec["plan"]
    if spec.get("gate_swa_windows"):
        differ = sorted({w for w in spec["gate_swa_windows"] if w})
        reasons.append(f"per-layer windows {differ}: layer_types share one sliding_window; the nearest native layout "
                       f"(every sliding layer at {max(differ)}) caches more and computes other logits")
    if sliding and swa["sink_tokens"]:
        reasons.append(f"sink_tokens={swa['sink_tokens']}: transformers' sliding-window layers keep no sink tokens")
    if sliding and not hasattr(base, "layer_types"):
        reasons.append(f"{type(base).__name__} has no per-layer `layer_types`: it cannot mix sliding and full layers")
    if reasons:
        return reasons
    config = teacher_config(base, spec)
    return _layout_mismatch(type(model), config, converted_state_dict(model))


# ------------------------------------------------------------------------------------------------
# Choice, writing, verification
# ------------------------------------------------------------------------------------------------
def native_blockers(model: PreTrainedModel, spec: dict | None = None) -> dict[str, list[str]]:
    """For the native format that fits the plan, why it cannot express this model (empty list: it can)."""
    spec = spec or conversion_spec(model)
    if "mla" in spec:
        return {"deepseek_v3": _deepseek_v3_blockers(model, spec)}
    return {"teacher": _teacher_blockers(model, spec)}


def choose_format(model: PreTrainedModel, native: str = "auto", spec: dict | None = None) -> tuple[str, dict]:
    """(format, blockers): a native format when it expresses the model and `native` allows it."""
    if native not in NATIVE_MODES:
        raise ExportError(f"native={native!r} is not one of {list(NATIVE_MODES)}")
    if native == "never":
        return "auto_map", {}
    blockers = native_blockers(model, spec)
    fmt, reasons = next(iter(blockers.items()))
    if not reasons:
        return fmt, blockers
    if native == "always":
        raise ExportError(f"native export as {fmt} is impossible (export.native=always): " + "; ".join(reasons))
    return "auto_map", blockers


def _write(model: PreTrainedModel, spec: dict, fmt: str, directory: Path) -> PreTrainedModel:
    base = model.config
    state = {k: v.detach().to("cpu") for k, v in converted_state_dict(model).items()}
    config: PretrainedConfig
    model_cls: type[PreTrainedModel]
    if fmt == "deepseek_v3":
        bias = "model.layers.0.self_attn.kv_a_proj_with_mqa.bias" in state
        config, model_cls = deepseek_v3_config(base, spec, bias), DeepseekV3ForCausalLM
        state = _deepseek_v3_state(state, spec)
    elif fmt == "teacher":
        config, model_cls = teacher_config(base, spec), type(model)
    else:
        auto_map = write_modeling_code(directory, type(base), type(model))
        model_cls = package_auto_map_class(type(base), type(model))
        fields = {k: v for k, v in base.to_dict().items()
                  if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
        # the teacher's config class (subclassed by package_auto_map_class), which keeps extra fields
        config_class = cast(Callable[..., PretrainedConfig], model_cls.config_class)
        config = config_class(**fields, ascend_edit=spec, auto_map=auto_map)
        config.architectures = [CAUSAL_LM_CLASS]
    config = copy.deepcopy(config)
    config.dtype = next(model.parameters()).dtype
    config._attn_implementation = getattr(base, "_attn_implementation", None) or "sdpa"
    exported = _assigned(model_cls, config, state)
    exported.save_pretrained(directory)
    return exported


def package_auto_map_class(config_cls: type, causal_lm_cls: type) -> type[PreTrainedModel]:
    """The `auto_map` model class built from the package's own modules: what `modeling_ascend_edit.py`
    defines (ascend_edit.hf.bundle), without loading the files written into a checkpoint."""
    config_class = type(CONFIG_CLASS, (config_cls,), {"model_type": MODEL_TYPE, "__module__": __name__})
    return type(CAUSAL_LM_CLASS, (AscendEditCausalLMMixin, causal_lm_cls),
                {"config_class": config_class, "__module__": __name__})


def _assigned(model_cls, config, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """An instance of `model_cls` holding exactly `state`: built on meta (no initialisation), weights assigned."""
    with torch.device("meta"):
        exported = model_cls(config)
    missing, unexpected = exported.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        exported.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"weights do not fit {model_cls.__name__}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    fresh_rotary_buffers(exported)  # non-persistent, so still on meta
    return exported


def probe_length(spec: dict, max_positions: int, minimum: int = 32) -> int:
    """Tokens to verify with: past the sliding window and sinks when there are sliding layers."""
    swa = spec.get("gate_swa") or {}
    wanted = max(minimum, swa.get("window", 0) + swa.get("sink_tokens", 0) + 8)
    return min(wanted, max_positions)


@torch.no_grad()
def verify_export(model: PreTrainedModel, directory: Path, fmt: str, spec: dict,
                  seed: int = 0) -> tuple[float, float, int]:
    """Reload `directory` from disk and compare logits with `model` (fp32); returns (max rel diff, cache
    bytes per token, probe tokens). Raises ExportError when they disagree or an MLA cache holds more than latents.
    No code from `directory` runs: `auto_map` is reloaded with the package's own classes."""
    loader: type[PreTrainedModel] | type[AutoModelForCausalLM]
    if fmt == "auto_map":
        loader = package_auto_map_class(type(model.config), type(model))
    else:
        loader = AutoModelForCausalLM
    reloaded = loader.from_pretrained(directory, dtype=torch.float32).eval()
    reference_dtype = next(model.parameters()).dtype
    cast_parameters(model, torch.float32)
    try:
        generator = torch.Generator().manual_seed(seed)
        length = probe_length(spec, model.config.max_position_embeddings)
        ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
        device = next(model.parameters()).device
        want = model(input_ids=ids.to(device)).logits.float().cpu()
        out = reloaded(input_ids=ids, use_cache=True)
    finally:
        cast_parameters(model, reference_dtype)
    diff = float((out.logits.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not diff <= VERIFY_RTOL:
        raise ExportError(f"the exported {fmt} checkpoint does not reproduce the model: max relative logit "
                          f"difference {diff:.2e} > {VERIFY_RTOL:.0e}")
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    if "mla" in spec:
        mla = spec["mla"]
        ranks = spec.get("kv_lora_ranks") or [mla["kv_lora_rank"]] * len(spec["plan"])
        for idx, (kind, layer) in enumerate(zip(spec["plan"], cache.layers)):
            expected = {(2, 1, length, ranks[idx]), (2, 1, length, mla["qk_rope_head_dim"])}
            held = {tuple(layer.keys.shape), tuple(layer.values.shape)}
            if kind == "mla" and held != expected:
                raise ExportError(f"layer {idx} of the reloaded {fmt} model caches {sorted(held)}, not the latent "
                                  f"{sorted(expected)}: the KV savings would be lost")
    return diff, measured_cache_bytes(cache) / (2 * length), length


PROVENANCE_FILE = "ascend_edit_provenance.json"  # the run an export came from: its data and seed (eval's in_domain)


def read_provenance(directory: Path) -> dict | None:
    """The source run's {"run_directory", "data", "seed"} an export recorded, or None for one without it."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        provenance = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): remove it, or re-export the checkpoint") from None
    if not isinstance(provenance, dict) or not {"run_directory", "data", "seed"} <= provenance.keys():
        raise ValueError(f"{path} must hold run_directory, data and seed: remove it, or re-export the checkpoint")
    return provenance


EXPORT_KIND = "ascend-edit export"  # the manifest's "kind" in an export: what export.overwrite may replace


def output_problem(directory: Path, overwrite: bool, shown: str | Path | None = None) -> str | None:
    """Why `directory` cannot take an export (None: it can): a file; a non-empty directory without `overwrite`;
    with it, anything but an earlier export as export wrote it — its manifest says so and lists every file there.
    A config.json alone is no proof: a teacher's model directory, a run's converted/ or a user's folder has one
    too, and overwrite would remove them. `shown`: the path as the user gave it."""
    name = f"export.output={shown or directory}"
    if directory.exists() and not directory.is_dir():
        return f"{name} is a file, not a directory"
    if (model := manifested_ancestor(directory)) is not None:
        return (f"{name} lies inside {model}, whose manifest lists its files: an export there would make every later "
                "load of it refuse it as damaged; choose a directory outside it")
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            return f"{name} exists and is not empty: choose a new directory, or set export.overwrite=true to replace it"
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("kind") != EXPORT_KIND:
            return (f"{name} holds no earlier ascend-edit export (no {MANIFEST} of kind '{EXPORT_KIND}'; exports "
                    "before 2026-12-06 had none): export.overwrite=true replaces an earlier export only; choose a new "
                    "directory")
        added = unlisted_files(directory, manifest["files"])
        if added:
            return (f"{name} holds {added[0]}, which its export did not write: export.overwrite=true would remove it; "
                    "move it out, or choose a new directory")
    return None


def export_converted(model: PreTrainedModel, directory: Path, *, tokenizer=None, native: str = "auto",
                     dtype: torch.dtype | None = None, verify: bool = True, overwrite: bool = False,
                     provenance: dict | None = None) -> ExportResult:
    """Write `model` (a converted model: see `conversion_spec`) as an HF checkpoint into `directory`.

    The checkpoint is written to a sibling temporary directory, loaded back and checked (`verify`), and
    only then moved to `directory`. A non-empty `directory` is refused unless `overwrite`; then it is
    renamed aside, the new one renamed in, and the old one removed — only when it holds an earlier checkpoint
    (config.json), never a directory of other files. `provenance` (the source run's data and
    seed) is written as PROVENANCE_FILE, so that `ascend-edit eval` on the export scores the same in-domain text. The model's parameters are cast to
    `dtype` (default: their own) in place first, so that it is exactly what the checkpoint holds, and its
    rotary buffers are recomputed in fp32, as `from_pretrained` computes them. A NaN/inf weight is refused
    before anything is written.
    """
    directory = Path(directory).expanduser().resolve()  # ("." has no name to put a sibling beside)
    problem = output_problem(directory, overwrite)
    if problem:
        raise ExportError(problem)
    spec = conversion_spec(model)
    dtype = dtype or next(model.parameters()).dtype
    cast_parameters(model, dtype)
    bad = first_non_finite(converted_state_dict(model).items())
    if bad is not None:
        raise ExportError(f"refusing to export: weight {bad} holds NaN or inf (in {dtype})")
    fresh_rotary_buffers(model)
    fmt, blockers = choose_format(model, native, spec)
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        exported = _write(model, spec, fmt, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if provenance is not None:
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        diff, per_token, probe = verify_export(model, tmp, fmt, spec) if verify else (None, None, None)
        write_manifest(tmp, kind=EXPORT_KIND)  # flushes every file first; eval checks it, overwrite reads its kind
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # this call's own temporary directory
        raise
    notes = _deepseek_v3_notes(spec, cast(DeepseekV3Config, exported.config)) if fmt == "deepseek_v3" else []
    if fmt == "auto_map":
        notes.append("auto_map: load with trust_remote_code=True; vLLM / vllm-ascend have no implementation of "
                     "this architecture (serve it through transformers)")
    log.info("exported %s checkpoint to %s", fmt, directory)
    return ExportResult(directory, fmt, blockers, diff, per_token, notes, probe)


def check_exported_files(directory: Path) -> None:
    """Before loading: an export's manifest (since 2026-12-06) catches any changed, cut or missing file by name;
    without one, a cut safetensors file is still named (transformers would fail on it with a traceback)."""
    if (directory / MANIFEST).is_file():
        verify_manifest(directory)
        return
    from ascend_edit.models.loading import check_safetensors

    log.warning("%s has no %s (exported before 2026-12-06, or not by ascend-edit): its files are not verified",
                directory, MANIFEST)
    for file in sorted(directory.glob("*.safetensors")):
        check_safetensors(file, str(directory))


def load_exported(directory: Path, dtype: torch.dtype = torch.float32, *,
                  trust_remote_code: bool = False) -> PreTrainedModel:
    """Load an exported checkpoint the way a user would. An `auto_map` checkpoint runs the Python files it
    ships, so it loads only when the caller asks for that with `trust_remote_code=True`."""
    config = json.loads((Path(directory) / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ExportError(f"{directory} ships its own modeling code (auto_map): load it with "
                          "trust_remote_code=True if you trust that code")
    check_exported_files(Path(directory))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code).eval()
