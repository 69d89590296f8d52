"""Exported converted models decode through a static cache exactly as through the dynamic one.

auto_map checkpoints (MLA without the latent norm, gated GateSWA with sinks) and the native
`deepseek_v3` one, loaded back with transformers: `generate(cache_implementation="static")` and the
compiled fixed-shape decode loop (fullgraph) equal dynamic-cache greedy decoding token for token, for
left-padded prompts of different lengths, decoding past the window.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.export import export_converted, load_exported
from ascend_edit.models.static_decode import StaticDecoder
from tests.integration.test_export import converted

pytestmark = pytest.mark.usefixtures("few_cpu_threads")

WINDOW, SINKS = 6, 2
MLA_DEEPSEEK = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, latent_norm=True)
MLA_NO_NORM = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, latent_norm=False)
EXPORTS = {
    "deepseek_v3": TargetConfig(kind="mla", mla=MLA_DEEPSEEK),
    "auto_map-mla": TargetConfig(kind="mla", mla=MLA_NO_NORM),
    "auto_map-gate_swa": TargetConfig(kind="gate_swa",
                                      gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_every=2)),
}
NEW_TOKENS = 3 * WINDOW


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_exported_model_static_and_compiled_decode_equal_dynamic(name: str, tmp_path: Path):
    result = export_converted(converted("qwen3", EXPORTS[name]), tmp_path / "hf")
    assert result.format == name.split("-")[0]
    model = load_exported(tmp_path / "hf", trust_remote_code=result.format == "auto_map")
    model.set_attn_implementation("sdpa")
    ids, mask = padded_prompts()
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
    assert want.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(static, want)
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend="aot_eager")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)
    if name == "auto_map-gate_swa":  # the checkpoint's own copy of the ring class: compare by name
        rings = [layer for layer in decoder.cache.layers if type(layer).__name__ == "StaticSinkWindowLayer"]
        assert len(rings) == 2 and all(r.keys.shape[-2] == SINKS + WINDOW + 1 for r in rings)
