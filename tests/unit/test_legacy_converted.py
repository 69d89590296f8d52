"""Converted models saved before the MLA target kept a teacher's query bias (2026-12-05) still load, unchanged."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ascend_edit.config import MLAConfig, TargetConfig
from ascend_edit.models.checkpoint import WEIGHTS_FILE, load_converted, load_converted_weights, save_converted
from ascend_edit.models.surgery import build_plan, edit_model
from ascend_edit.train.checkpoint_io import write_manifest
from tests.conftest import tiny_model

TARGET = TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                v_head_dim=16))


def old_style_save(directory: Path) -> torch.Tensor:
    """A Qwen2 MLA conversion written the way the earlier code wrote it: no query bias (which computed as zero).
    Returns the logits that model gave."""
    model = edit_model(tiny_model("qwen2"), build_plan(4, TARGET), TARGET)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "MLAAttention":
                module.q_proj.bias.zero_()
        logits = model(torch.arange(12)[None]).logits
    save_converted(model, TARGET, directory)
    weights = load_file(str(directory / WEIGHTS_FILE))
    dropped = {name: tensor for name, tensor in weights.items() if not name.endswith("q_proj.bias")}
    assert len(dropped) < len(weights)
    save_file(dropped, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_manifest(directory)
    return logits


def test_an_mla_conversion_saved_without_query_biases_loads_as_it_computed(tmp_path):
    want = old_style_save(tmp_path / "converted")
    with torch.no_grad():
        got = load_converted(tmp_path / "converted")(torch.arange(12)[None]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the stage hand-off too (stage-layerwise/ into a freshly edited model, whose warm start set a bias)
    fresh = edit_model(tiny_model("qwen2"), build_plan(4, TARGET), TARGET)
    load_converted_weights(fresh, tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(fresh(torch.arange(12)[None]).logits, want, rtol=1e-5, atol=1e-5)
