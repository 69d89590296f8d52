"""KV accounting from shapes equals the bytes a real cache holds after generate()."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.eval.kv import kv_layout, kv_table, measured_cache_bytes, total_bytes
from ascend_edit.models.surgery import build_plan, edit_model, set_mode
from tests.conftest import tiny_model

CASES = {
    "mla": TargetConfig(kind="mla", init="random",
                        mla=MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    "gate_swa": TargetConfig(kind="gate_swa", init="random",
                             gate_swa=GateSWAConfig(window=8, sink_tokens=2, full_every=4)),
}


def _generate(model, prompt_len=5, new_tokens=35, batch=2):
    prompt = torch.randint(0, 256, (batch, prompt_len))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    return out.past_key_values, out.sequences.shape[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_measured_cache_bytes_match_accounting(case):
    cfg = CASES[case]
    model = edit_model(tiny_model("qwen3"), build_plan(4, cfg), cfg)
    cache, length = _generate(model)
    # The cache holds every token but the last generated one (it is returned, never fed back).
    held = length - 1
    expected = total_bytes(kv_layout(model, "student"), held, bytes_per_value=4, batch=2)
    assert measured_cache_bytes(cache) == expected

    set_mode(model, "teacher")
    teacher_cache, _ = _generate(model)
    assert measured_cache_bytes(teacher_cache) == total_bytes(kv_layout(model, "teacher"), held, 4, batch=2)
    assert measured_cache_bytes(cache) < measured_cache_bytes(teacher_cache)


def test_reduction_figures_for_qwen3_8b_shapes():
    """Qwen3-8B: 8 KV heads x 128 x 2 values/token vs MLA 512 + 64; GateSWA 1-in-4 full, window 1024."""
    from ascend_edit.config import ModelConfig
    from ascend_edit.models.build import edited_shape_model

    model_cfg = ModelConfig(source="config", arch="qwen3", dtype="bf16", overrides=dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936))
    mla = kv_table(edited_shape_model(model_cfg, TargetConfig(kind="mla")), context=32768)
    assert mla["teacher_bytes_per_token"] == 36 * 2 * 8 * 128 * 2
    assert mla["converted_bytes_per_token"] == 36 * (512 + 64) * 2
    assert mla["reduction_pct"] == pytest.approx(100 * (1 - 576 / 2048))

    swa_cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=1024, sink_tokens=4, full_every=4))
    swa = kv_table(edited_shape_model(model_cfg, swa_cfg), context=32768)
    full_layers, swa_layers = 9, 27
    expected = (full_layers * 32768 + swa_layers * (1024 - 1 + 4)) * 2 * 8 * 128 * 2
    assert swa["converted_total_bytes"] == expected
