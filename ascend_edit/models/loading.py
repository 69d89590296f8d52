"""Load the teacher: a local HF checkpoint (safetensors or GGUF), the bundled real SmolLM2, or a config.

Nothing is ever downloaded (`local_files_only=True`). The files of a local checkpoint are checked
before any weight is read (`check_model_files`), and its config can be read alone (`teacher_config`),
so a bad `model.*` value or a damaged file is one line naming the key, not a traceback from deep
inside transformers.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from ascend_edit.config import ModelConfig

log = logging.getLogger(__name__)


class ModelInputError(ValueError):
    """The teacher's files are missing, truncated or unreadable; the message names the config key."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GGUF_MAGIC = b"GGUF"

# model_type -> what the surgery knows how to convert (all use q/k/v/o_proj + RoPE position embeddings)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTITIONED_SOURCES = ("hf", "config")  # built by from_pretrained / from_config, which honour zero.Init


def check_supported(model: PreTrainedModel) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"architecture '{model_type}' ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    check_full_attention(model.config)


def teacher_sliding_window(config: PretrainedConfig) -> int | None:
    """The window of a teacher whose own attention slides (Mistral's `sliding_window`, Qwen2/3's
    `use_sliding_window` + `layer_types`), or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if getattr(config, "use_sliding_window", None) is False:
        return None  # Qwen2/Qwen3 keep a sliding_window value that is off unless use_sliding_window is set
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def check_full_attention(config: PretrainedConfig) -> None:
    """A teacher that already slides is refused: the targets replace full attention, and its window would be lost
    in native exports and in the KV accounting that reports what a conversion saves."""
    window = teacher_sliding_window(config)
    if window is not None:
        raise NotImplementedError(
            f"the teacher's own attention slides (sliding_window={window}{', layer_types' if getattr(config, 'layer_types', None) else ''}): "
            "ascend_edit converts full-attention teachers only (a model whose window never applies at its lengths "
            "can say so with sliding_window: null in its config; model.overrides.sliding_window=null for "
            "model.source=config)")


def build_from_config(arch: str, overrides: dict, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> PreTrainedModel:
    """Random weights from an HF config class (tests, speed and memory runs), built directly on
    `device` ("meta" for shapes only; an accelerator for large shapes, whose CPU init takes minutes)."""
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.arch={arch!r} is not one of {list(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.for_model(arch, **dict(overrides))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_safetensors(file: Path, key: str) -> None:
    """A safetensors file must hold its whole header and every byte its header points at."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ModelInputError(f"{key}: {file.name} is truncated ({size:,} bytes, shorter than its "
                                      f"{header_len:,}-byte header)")
            header = json.loads(handle.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelInputError(f"{key}: {file.name} is not a safetensors file ({_first_line(err)})") from None
    end = 8 + header_len + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < end:
        raise ModelInputError(f"{key}: {file.name} is truncated ({size:,} bytes, its header needs {end:,})")


def check_gguf(file: Path, key: str) -> None:
    """A GGUF file must start with the GGUF magic and hold every tensor its header lists."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelInputError(f"{key} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
    except (ValueError, IndexError, struct.error, OSError) as err:
        # The reader maps the file and cuts it into arrays; an array the file ends in the middle of comes
        # out short, and numpy refuses its shape. Any other failure is damage we cannot name better.
        message = _first_line(err)
        cut_short = "reshape" in message or "size must be a divisor" in message or isinstance(err, IndexError)
        problem = "is truncated: its data ends early" if cut_short else "is damaged"
        raise ModelInputError(f"{key} {problem} ({size:,} bytes; GGUF reader: {message})") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if size < end:
        raise ModelInputError(f"{key} is truncated ({size:,} bytes, its tensors need {end:,})")


def check_model_files(cfg: ModelConfig, verify_gguf: bool = True, weights: bool = True) -> None:
    """model.source=hf: the directory, its config, weights and (if given) GGUF file exist and are whole.

    Cheap: reads headers only. `verify_gguf` also walks the GGUF tensor table (seconds for large files).
    `weights=False` checks the config only (tasks that build shapes, e.g. `plan` on a login node holding only
    config.json).
    """
    if cfg.source != "hf":
        return
    assert cfg.path is not None  # ModelConfig requires it with source=hf
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ModelInputError(f"model.path={cfg.path} does not exist (nothing is downloaded: give a local directory)")
    if path.is_file():
        hint = (f"; for a GGUF file give model.path={path.parent} model.gguf_file={path.name}"
                if path.suffix == ".gguf" else "")
        raise ModelInputError(f"model.path={cfg.path} is a file, not a checkpoint directory{hint}")
    if cfg.gguf_file:
        gguf = path / cfg.gguf_file
        if not gguf.is_file():
            present = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelInputError(f"model.gguf_file={cfg.gguf_file} is not a file in model.path={cfg.path} "
                                  f"(nothing is downloaded; GGUF files there: {present or 'none'})")
        if verify_gguf:
            check_gguf(gguf, f"model.gguf_file={cfg.gguf_file}")
        return
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; for a GGUF checkpoint add model.gguf_file={ggufs[0]}" if ggufs else ""
        raise ModelInputError(f"model.path={cfg.path} has no config.json: not a Hugging Face checkpoint{hint}")
    if not weights:
        return
    found = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise ModelInputError(f"model.path={cfg.path} has a config.json but no weights (expected one of "
                              f"{', '.join(WEIGHT_FILES)}; nothing is downloaded)")
    if found[0] == "model.safetensors":
        check_safetensors(path / "model.safetensors", f"model.path={cfg.path}")
    elif found[0].endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((path / found[0]).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelInputError(f"model.path={cfg.path}: {found[0]} is not a valid weight index "
                                  f"({_first_line(err)})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelInputError(f"model.path={cfg.path}: {found[0]} lists shards that are missing: {missing}")
        for shard in shards:
            if shard.endswith(".safetensors"):
                check_safetensors(path / shard, f"model.path={cfg.path}")


def teacher_config(cfg: ModelConfig, weights: bool = True) -> PretrainedConfig:
    """The teacher's Hugging Face config without its weights (checks the files of a local checkpoint; with
    `weights=False` only its config)."""
    if cfg.source == "config":
        if cfg.arch not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model.arch={cfg.arch!r} is not one of {list(SUPPORTED_MODEL_TYPES)}")
        try:
            config = AutoConfig.for_model(cfg.arch, **dict(cfg.overrides))
        except Exception as err:  # transformers' config validation has its own error classes
            raise ModelInputError(f"model.overrides: {' '.join(str(err).split())}") from err
        check_config_overrides(config, dict(cfg.overrides))
        return config
    if cfg.source == "smollm2":
        from ascend_edit.assets import smollm2_gguf

        gguf = smollm2_gguf()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    check_model_files(cfg, verify_gguf=False, weights=weights)  # AutoConfig reads a GGUF's tensor table anyway
    assert cfg.path is not None  # ModelConfig requires it with source=hf
    path = Path(cfg.path).expanduser()
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for one bad file
        if cfg.gguf_file:
            check_gguf(path / cfg.gguf_file, f"model.gguf_file={cfg.gguf_file}")  # names a truncated file
        key = f"model.gguf_file={cfg.gguf_file}" if cfg.gguf_file else f"model.path={cfg.path}"
        raise ModelInputError(f"{key}: the model config in {path / (cfg.gguf_file or 'config.json')} could not "
                              f"be read: {_first_line(err)}") from err


# Sizes of a random-weights teacher that must be positive integers (model.overrides of model.source=config)
_POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
                   "num_experts", "num_experts_per_tok", "moe_intermediate_size")  # the last three: MoE configs
# Keys that only a mixture-of-experts config reads: on a dense architecture the config stores them and the model
# ignores them, so a user who meant an MoE teacher would get a dense one with no word
_EXPERT_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_local_experts",
                "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size", "norm_topk_prob")


def check_config_overrides(config: PretrainedConfig, overrides: dict) -> None:
    """A random-weights teacher's `model.overrides`: a size that cannot build a model fails deep inside torch with
    no key named; named here. (Unknown keys are not refused: some a modeling file reads, e.g. Qwen3-MoE's head_dim,
    are not fields of its config class.)"""
    dense = sorted(key for key in _EXPERT_KEYS if key in overrides
                   and not hasattr(AutoConfig.for_model(config.model_type), key))
    if dense:
        moe = [arch for arch in SUPPORTED_MODEL_TYPES if hasattr(AutoConfig.for_model(arch), dense[0])]
        raise ModelInputError(f"model.overrides.{dense[0]}: model.arch={config.model_type} is a dense architecture "
                              f"and ignores it (experts need one of {moe})")
    for key in _POSITIVE_SIZES:
        value = getattr(config, key, None)
        if key in overrides and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelInputError(f"model.overrides.{key}={value} must be a positive integer")
    experts, chosen = getattr(config, "num_experts", None), getattr(config, "num_experts_per_tok", None)
    if {"num_experts", "num_experts_per_tok"} & set(overrides) and experts and chosen and chosen > experts:
        raise ModelInputError(f"model.overrides: num_experts_per_tok={chosen} is more than num_experts={experts} "
                              "(each token picks that many of them)")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if {"num_attention_heads", "num_key_value_heads"} & set(overrides) and heads and kv_heads and heads % kv_heads:
        raise ModelInputError(f"model.overrides: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")


def check_teacher_type(config: PretrainedConfig) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"architecture '{model_type}' is not supported; "
                                  f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_full_attention(config)


def load_teacher(cfg: ModelConfig, attn_implementation: str | None = None, device: torch.device | str = "cpu",
                 zero3: dict | None = None):
    """Returns (model on `device`, tokenizer or None). The model is in eval mode with gradients off.

    `zero3`: a DeepSpeed ZeRO-3 config (models/zero3.py `zero3_init_config`): the model is built under
    `deepspeed.zero.Init`, each rank holding only its partition from the first weight read (model.source
    hf or config; DeepSpeed places the partitions on the accelerator it runs on).
    """
    if zero3 is not None:
        if cfg.source not in PARTITIONED_SOURCES:
            raise ValueError(f"model.source={cfg.source}: a partitioned (ZeRO-3) load needs model.source "
                             f"one of {list(PARTITIONED_SOURCES)}")
        from ascend_edit.models.zero3 import partitioned_construction

        with partitioned_construction(zero3):
            model, tokenizer = _build_teacher(cfg, dtype=TORCH_DTYPES[cfg.dtype], device=None)
    else:
        model, tokenizer = _build_teacher(cfg, dtype=TORCH_DTYPES[cfg.dtype], device=device)
    check_supported(model)
    if zero3 is None:
        model.to(device)
    model.set_attn_implementation(attn_implementation or cfg.attn_implementation)
    model.eval().requires_grad_(False)
    log.info("teacher: %s, %d layers, %.1fM parameters%s", model.config.model_type,
             model.config.num_hidden_layers, sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
             / 1e6, " (ZeRO-3 partitioned)" if zero3 is not None else "")
    return model, tokenizer


def _build_teacher(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str | None):
    """(model, tokenizer or None) from `cfg`; a config-built model is made on `device` (None: where
    zero.Init puts it)."""
    tokenizer = None
    if cfg.source == "config":
        assert cfg.arch is not None  # ModelConfig requires it with source=config
        if device is None:  # under zero.Init: DeepSpeed allocates the partitions
            config = AutoConfig.for_model(cfg.arch, **dict(cfg.overrides))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = build_from_config(cfg.arch, cfg.overrides, dtype, device)
    elif cfg.source == "smollm2":
        from ascend_edit.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        check_model_files(cfg)
        assert cfg.path is not None  # ModelConfig requires it with source=hf
        path = Path(cfg.path).expanduser()
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:  # the tokenizer first: it is cheap, and a broken one should not cost a weight load
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as err:  # missing files: OSError; damaged ones: ValueError, JSON, tokenizers errors
            raise ModelInputError(f"model.path={cfg.path}: its tokenizer could not be loaded: "
                                  f"{_first_line(err)}") from err
        check_tokenizer(tokenizer, None, f"model.path={cfg.path}")  # empty: refused before the weights load
        try:
            model, info = cast(tuple[Any, dict], AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs))
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise ModelInputError(f"model.path={cfg.path}: the weights could not be loaded: "
                                  f"{_first_line(err)}") from err
        check_loading_info(info, f"model.path={cfg.path}")
        check_tokenizer(tokenizer, model.config, f"model.path={cfg.path}")
    return model, tokenizer


def check_tokenizer(tokenizer, config: PretrainedConfig | None, key: str) -> None:
    """Refuse a tokenizer that cannot be the model's: transformers builds an empty one for a directory without
    tokenizer files (every text then encodes to nothing, and an export would ship it), and one with more tokens
    than the model's vocabulary gives ids the embedding does not have."""
    size = len(tokenizer)
    if size < 2:
        raise ModelInputError(f"{key}: its tokenizer is empty ({size} token): the directory has no usable tokenizer "
                              "files (tokenizer.json / tokenizer.model); copy the teacher's tokenizer there")
    if config is not None and size > config.vocab_size:
        raise ModelInputError(f"{key}: its tokenizer has {size:,} tokens, more than the model's vocabulary of "
                              f"{config.vocab_size:,}: not this model's tokenizer")


def check_loading_info(info: dict, key: str) -> None:
    """Refuse a checkpoint whose weights do not match its config: transformers fills missing tensors with random
    values and drops unexpected ones with a log line, which would distil from a teacher that is not the one named
    (e.g. a converted run's directory, whose attention weights have other names)."""
    problems = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        shown = "; ".join(f"{kind.replace('_', ' ')} ({len(names)}): {', '.join(map(str, names[:4]))}"
                          + (", ..." if len(names) > 4 else "") for kind, names in problems.items())
        raise ModelInputError(f"{key}: the weights do not match the checkpoint's config.json ({shown}); "
                              "is this the original model's directory?")
