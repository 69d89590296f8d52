"""MoE experts implementation: transformers' grouped GEMM by default, eager on request, same results."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.train.compile import apply_experts_implementation
from tests.conftest import tiny_model


def test_auto_keeps_grouped_mm_and_dense_models_are_untouched():
    assert apply_experts_implementation("auto", tiny_model("qwen3_moe")) == "grouped_mm"
    assert apply_experts_implementation("auto", tiny_model("qwen3")) is None
    with pytest.raises(ValueError, match="engine.experts_implementation="):
        apply_experts_implementation("loop", tiny_model("qwen3_moe"))


def test_grouped_mm_and_eager_agree_forward_and_backward():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("grouped_mm", "eager"):
        model = tiny_model("qwen3_moe", seed=0).train()
        assert apply_experts_implementation(impl, model) == impl
        model.requires_grad_(True)
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        results[impl] = (loss.detach(), model.model.layers[0].mlp.experts.gate_up_proj.grad.clone())
    # float32 on the CPU; the two implementations sum the experts' outputs in different orders
    torch.testing.assert_close(results["grouped_mm"][0], results["eager"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["grouped_mm"][1], results["eager"][1], rtol=1e-4, atol=1e-6)
