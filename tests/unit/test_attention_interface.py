"""The targets' dense attention goes through transformers' attention-interface registry (issue 15).

`model.attn_implementation` reaches MLA and GateSWA: eager gives sdpa's results (prefill and static-cache
decode), a function a user registers with `transformers.AttentionInterface` is the one the targets call,
and transformers' implementations that would ignore the targets' masks are refused with one line.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ascend_edit.attention.gate_swa import GateSWAAttention
from ascend_edit.attention.interface import attention_function, target_implementation_problem
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.config import ConfigError, GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.validation import check_attn_implementation
from tests.helpers.converted import converted_tiny
from tests.integration.test_decode_static import padded_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW, SINKS = 6, 2
MLA = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24)  # v dim != q/k dim
TARGETS = {
    "mla": TargetConfig(kind="mla", init="random", mla=MLA),
    "gate_swa": TargetConfig(kind="gate_swa", init="random",
                             gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_every=2)),
}
NEW_TOKENS = 2 * WINDOW  # decode runs past the window: the ring cache's masks are exercised

# A user's own attention function, registered the way transformers documents it (with the mask
# function its teacher layers should get); it counts who calls it and computes sdpa's result.
COUNTING = "ascend_edit_test_counting"
CALLS: Counter[str] = Counter()


def counting_attention(module, query, key, value, attention_mask, **kwargs):
    CALLS[type(module).__name__] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(COUNTING, counting_attention)
AttentionMaskInterface.register(COUNTING, sdpa_mask)


def converted(target: str, naive_mla: bool) -> torch.nn.Module:
    model = converted_tiny(TARGETS[target])
    if naive_mla:  # decode through the dense path too, not the absorbed kernel
        for module in model.modules():
            if isinstance(module, MLAAttention):
                module.path = "naive"
    return model.eval()


def run(model, implementation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill logits, and greedy tokens + their scores decoded through a static cache."""
    model.set_attn_implementation(implementation)
    ids, mask = padded_prompts()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             cache_implementation="static", return_dict_in_generate=True, output_scores=True)
    return logits, out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize(("target", "naive_mla"), [("mla", False), ("mla", True), ("gate_swa", False)])
def test_eager_gives_sdpa_results_in_prefill_and_static_decode(target: str, naive_mla: bool):
    model = converted(target, naive_mla)
    _, mask = padded_prompts()
    logits, tokens, scores = run(model, "sdpa")
    eager_logits, eager_tokens, eager_scores = run(model, "eager")
    real = mask.bool()  # padded positions' outputs are never read
    torch.testing.assert_close(eager_logits[real], logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(eager_tokens, tokens)
    torch.testing.assert_close(eager_scores, scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_registered_function_is_called_by_the_targets(target: str):
    kind = {"mla": MLAAttention, "gate_swa": GateSWAAttention}[target].__name__
    model = converted(target, naive_mla=True)
    want = run(model, "sdpa")
    check_attn_implementation(COUNTING, TARGETS[target].kind)  # accepted at config time
    CALLS.clear()
    got = run(model, COUNTING)
    layers = model.config.num_hidden_layers
    # every target layer, on every forward: the prefill, then generate's prefill and decode steps
    assert CALLS[kind] >= layers * (2 + NEW_TOKENS - 1) * (1 if target == "mla" else 0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the counting function computes sdpa's result


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "paged|eager", "flex_attention",
                                  "kernels-community/flash-attn3"])
@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_an_implementation_that_ignores_the_targets_masks_is_refused_in_one_line(name: str, kind: str):
    with pytest.raises(ConfigError) as error:
        check_attn_implementation(name, kind)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"model.attn_implementation={name!r}")
    assert "sdpa" in message and "eager" in message
    check_attn_implementation(name, "identity")  # the teacher's own attention takes any of them
    # and a target reached some other way (a loaded export) refuses it at its first forward
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation=name))
    with pytest.raises(ValueError, match="model.attn_implementation"):
        attention_function(module)


@pytest.mark.parametrize("name", ["sdpa", "eager", COUNTING])
def test_allowed_implementations(name: str):
    assert target_implementation_problem(name) is None
    check_attn_implementation(name, "mla")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_an_exported_checkpoints_targets_call_the_registered_function(target: str, tmp_path):
    """The auto_map code bundled into a checkpoint looks the function up the same way."""
    from ascend_edit.models.export import export_converted, load_exported

    cfg = TARGETS[target]
    if target == "mla":  # with the latent norm it would export as native deepseek_v3, not through auto_map
        cfg = dataclasses.replace(cfg, mla=dataclasses.replace(MLA, latent_norm=False))
    result = export_converted(converted_tiny(cfg), tmp_path / "hf")
    assert result.format == "auto_map"
    exported = load_exported(tmp_path / "hf", trust_remote_code=True)
    want = run(exported, "sdpa")
    CALLS.clear()
    got = run(exported, COUNTING)
    kind = {"mla": "MLAAttention", "gate_swa": "GateSWAAttention"}[target]
    assert CALLS[kind] > 0
    assert type(next(m for m in exported.modules() if type(m).__name__ == kind)).__module__ != (
        MLAAttention if target == "mla" else GateSWAAttention).__module__  # the checkpoint's own copy
    assert all(torch.equal(a, b) for a, b in zip(got, want))
