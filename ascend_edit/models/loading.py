"""Load the teacher: a local HF checkpoint (safetensors or GGUF), the bundled real SmolLM2, or a config."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ascend_edit.config import ModelConfig

log = logging.getLogger(__name__)

# model_type -> what the surgery knows how to convert (all use q/k/v/o_proj + RoPE position embeddings)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_supported(model: PreTrainedModel) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"architecture '{model_type}' ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def build_from_config(arch: str, overrides: dict, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> PreTrainedModel:
    """Random weights from an HF config class (tests, speed and memory runs), built directly on
    `device` ("meta" for shapes only; an accelerator for large shapes, whose CPU init takes minutes)."""
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.arch={arch!r} is not one of {list(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.for_model(arch, **dict(overrides))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_teacher(cfg: ModelConfig, attn_implementation: str | None = None, device: torch.device | str = "cpu"):
    """Returns (model on `device`, tokenizer or None). The model is in eval mode with gradients off."""
    dtype = TORCH_DTYPES[cfg.dtype]
    attn = attn_implementation or cfg.attn_implementation
    tokenizer = None
    if cfg.source == "config":
        model = build_from_config(cfg.arch, cfg.overrides, dtype, device)
    elif cfg.source == "smollm2":
        from ascend_edit.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.path {path} does not exist")
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    check_supported(model)
    model.to(device)
    model.set_attn_implementation(attn)
    model.eval().requires_grad_(False)
    log.info("teacher: %s, %d layers, %.1fM parameters", model.config.model_type,
             model.config.num_hidden_layers, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer
