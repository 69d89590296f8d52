"""Converted-model weights written one tensor at a time into shards (models/checkpoint.py): one shard is the
`model.safetensors` a single `save_file` of the whole state writes, byte for byte; several are Hugging Face's
sharded layout, and every reader takes both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ascend_edit.config import MLAConfig, ModelConfig, TargetConfig
from ascend_edit.models.checkpoint import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    converted_state_dict,
    converted_weight_files,
    load_converted,
    load_converted_weights,
    read_converted_weights,
    save_converted,
)
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, edit_model
from ascend_edit.train.checkpoint_io import NonFiniteTensorError

TARGET = TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                v_head_dim=16))


@pytest.fixture
def model():
    teacher, _ = load_teacher(ModelConfig(source="config", arch="qwen3", dtype="fp32", overrides=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, max_position_embeddings=512)))
    torch.manual_seed(0)
    edit_model(teacher, build_plan(teacher.config.num_hidden_layers, TARGET), TARGET)
    return teacher


def test_one_shard_is_byte_identical_to_one_save_file(model, tmp_path: Path):
    directory = save_converted(model, TARGET, tmp_path / "converted")
    reference = tmp_path / "reference.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in converted_state_dict(model).items()}
    save_file(state, str(reference), metadata={"format": "pt"})
    assert not (directory / WEIGHTS_INDEX).exists()
    assert (directory / WEIGHTS_FILE).read_bytes() == reference.read_bytes()


def test_several_shards_reload_exactly(model, tmp_path: Path):
    state = converted_state_dict(model)
    largest = max(t.numel() * t.element_size() for t in state.values())
    directory = save_converted(model, TARGET, tmp_path / "converted", shard_bytes=largest)
    files = converted_weight_files(directory)
    index = json.loads((directory / WEIGHTS_INDEX).read_text())
    assert len(files) > 2 and not (directory / WEIGHTS_FILE).exists()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    read = read_converted_weights(directory)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    reloaded = load_converted(directory)  # the readers take the sharded layout
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in read.items())
    with torch.no_grad():  # the targets: shared weights must stay the teacher's (load_converted_weights checks)
        for name, p in model.named_parameters():
            if ".self_attn.target." in name:
                p.zero_()
    load_converted_weights(model, directory)
    assert all(torch.equal(converted_state_dict(model)[k], state[k]) for k in state)


def test_a_non_finite_weight_writes_nothing(model, tmp_path: Path):
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if ".target." in name).fill_(float("nan"))
    with pytest.raises(NonFiniteTensorError, match="holds NaN or inf"):
        save_converted(model, TARGET, tmp_path / "converted")
    assert not any(tmp_path.iterdir())
