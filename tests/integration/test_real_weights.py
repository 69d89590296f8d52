"""Surgery on the real SmolLM2-135M (Llama architecture) — fetched by the project's own set-up."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.eval.kv import kv_layout, measured_cache_bytes, total_bytes
from ascend_edit.eval.metrics import evaluate
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from ascend_edit.assets import load_smollm2, shakespeare_dir
    from ascend_edit.data import build_train_eval, load_documents
    from ascend_edit.data.batches import batches_of

    model, tokenizer = load_smollm2()
    docs = load_documents(shakespeare_dir(), format="text", max_documents=8)
    train, held_out = build_train_eval(docs, tokenizer, 128, eval_fraction=0.25)
    return model, tokenizer, batches_of(train, range(8), 4, "cpu"), batches_of(held_out, range(8), 4, "cpu")


@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_surgery_on_smollm2_generates_with_a_smaller_cache(smollm2, kind):
    model, tokenizer, calibration, held_out = smollm2
    cfg = TargetConfig(kind=kind, mla=MLAConfig(kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32,
                                                v_head_dim=64, latent_norm=False),
                       gate_swa=GateSWAConfig(window=32, sink_tokens=4, full_every=3))
    import copy

    edited = edit_model(copy.deepcopy(model), build_plan(30, cfg), cfg, collect_layer_stats(model, calibration))
    metrics = evaluate(edited, held_out)
    teacher = evaluate(edited, held_out, "teacher")
    # Warm starts must stay close to the teacher (random targets sit at KL > 5 nats/token).
    assert metrics["teacher_kl"] < 1.5, metrics
    assert metrics["ppl"] < 3 * teacher["ppl"]

    prompt = tokenizer("To be, or not to be, that is the", return_tensors="pt")
    with torch.no_grad():
        out = edited.generate(**prompt, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    held = out.sequences.shape[1] - 1
    measured = measured_cache_bytes(out.past_key_values)
    assert measured == total_bytes(kv_layout(edited, "student"), held, bytes_per_value=4)
    assert measured < total_bytes(kv_layout(edited, "teacher"), held, bytes_per_value=4)
    text = tokenizer.decode(out.sequences[0, prompt["input_ids"].shape[1]:])
    assert len(text.strip()) > 0
