"""Shared fixtures: tiny models built from config (nothing downloaded) and device-based skips."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.device import npu_available
from ascend_edit.models.loading import build_from_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
ARCHS = ("qwen3", "llama", "qwen2", "qwen3_moe")


def tiny_model(arch: str = "qwen3", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = {**TINY, **(MOE if arch == "qwen3_moe" else {}), **overrides}
    model = build_from_config(arch, cfg)
    model.set_attn_implementation("sdpa")
    return model.eval()


DEVICE_MARKERS = {"cuda": torch.cuda.is_available, "npu": npu_available}


def pytest_collection_modifyitems(config, items):
    """One place decides skips from device availability: a test marked cuda/npu runs only there."""
    for item in items:
        for marker, available in DEVICE_MARKERS.items():
            if marker in item.keywords and not available():
                item.add_marker(pytest.mark.skip(reason=f"needs a {marker} device"))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: token-for-token comparisons of decode paths must not depend on how a
    reduction was split across threads (tests use it through `pytest.mark.usefixtures`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
