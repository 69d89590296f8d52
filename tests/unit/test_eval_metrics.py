"""The teacher reference kept between evaluations: same numbers as recomputing, one teacher forward per batch."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import MLAConfig, TargetConfig
from ascend_edit.eval.metrics import TeacherReference, evaluate
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model


def edited():
    model = tiny_model("qwen3", seed=0)
    target = TargetConfig(kind="mla", init="random",
                          mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    torch.manual_seed(1)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    return model.eval()


def batches(count: int = 3):
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 256, (2, 16), generator=generator)
        mask = torch.rand(2, 16, generator=generator) > 0.2
        out.append({"input_ids": ids, "position_ids": torch.arange(16).expand(2, 16), "loss_mask": mask})
    return out


def count_model_forwards(model) -> list[int]:
    calls = [0]
    model.get_submodule("model").register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_reference_gives_the_same_numbers_with_one_teacher_forward_per_batch():
    model, data = edited(), batches()
    fresh = [evaluate(model, data, "teacher"), evaluate(model, data)]
    calls = count_model_forwards(model)
    reference = TeacherReference(data)
    kept = [evaluate(model, data, "teacher", reference), evaluate(model, data, reference=reference)]
    assert kept == fresh  # to the bit: the head on the kept states is the model's own product
    assert reference.head_reproduces_logits is True
    assert calls[0] == 3 + 3  # the teacher once per batch, then the student once per batch
    evaluate(model, data, reference=reference)
    assert calls[0] == 6 + 3  # a later evaluation runs the student only


def test_a_trained_head_drops_the_kept_states():
    model, data = edited(), batches()
    reference = TeacherReference(data)
    evaluate(model, data, "teacher", reference)
    with torch.no_grad():  # as distill.model_level.trainable=all would move it
        model.get_output_embeddings().weight.mul_(1.1)
    calls = count_model_forwards(model)
    assert evaluate(model, data, reference=reference) == evaluate(model, data)
    assert calls[0] == 2 * (3 + 3)  # both ran the teacher path again


def test_a_head_that_does_not_reproduce_the_logits_keeps_the_full_forward(monkeypatch):
    model, data = edited(), batches()
    # an architecture whose CausalLM scales its logits after the head: the head alone no longer matches
    monkeypatch.setattr(type(model), "forward", _scaled_logits(type(model).forward))
    reference = TeacherReference(data)
    first = evaluate(model, data, reference=reference)
    assert reference.head_reproduces_logits is False
    assert evaluate(model, data, reference=reference) == first  # kept states would give unscaled logits


def _scaled_logits(forward):
    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out
    return scaled


def test_reference_refuses_other_batches():
    model = edited()
    with pytest.raises(ValueError, match="other evaluation batches"):
        evaluate(model, batches(), reference=TeacherReference(batches()))
