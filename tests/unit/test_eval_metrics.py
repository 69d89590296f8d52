"""The teacher reference kept between evaluations: same numbers as recomputing, one teacher forward per batch."""
from __future__ import annotations

import copy

import pytest
import torch

from ascend_edit.config import MLAConfig, TargetConfig
from ascend_edit.eval.metrics import TeacherReference, compare, copyable_mask, evaluate, paired_logits
from ascend_edit.models.surgery import build_plan, edit_model, set_mode
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


def move_shared_weights(model) -> None:
    """What a stage 2 with distill.model_level.trainable=all does to the edited model's own teacher path."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.1)
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.add_(0.05 * torch.randn_like(param))


def test_a_moved_head_without_the_frozen_teacher_is_refused():
    model, data = edited(), batches()
    reference = TeacherReference(data)
    evaluate(model, data, "teacher", reference)
    move_shared_weights(model)
    with pytest.raises(ValueError, match="no longer the teacher"):
        evaluate(model, data, reference=reference)


def test_after_shared_weights_train_the_teacher_is_the_frozen_copy():
    """Teacher numbers and the student's KL stay measured against the original model, not the moved path."""
    model, data = edited(), batches()
    original = copy.deepcopy(model)  # as distill.model_level.frozen_teacher makes it before stage 2
    reference = TeacherReference(data)
    teacher_before = evaluate(model, data, "teacher", reference)
    move_shared_weights(model)
    moved_path = evaluate(model, data, "teacher")  # what the old code compared against
    assert moved_path["ppl"] != teacher_before["ppl"]

    reference.use_teacher(original)
    assert evaluate(model, data, "teacher", reference) == teacher_before
    student = evaluate(model, data, reference=reference)
    kl = tokens = 0.0
    with torch.no_grad():
        for batch in data:
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
            set_mode(original, "teacher")
            log_p = torch.log_softmax(original(**kwargs).logits[batch["loss_mask"]].float(), dim=-1)
            set_mode(model, "student")
            log_q = torch.log_softmax(model(**kwargs).logits[batch["loss_mask"]].float(), dim=-1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            tokens += int(batch["loss_mask"].sum())
    assert student["teacher_kl"] == pytest.approx(kl / tokens, rel=1e-5)


def test_paired_logits_take_the_teacher_from_the_frozen_copy():
    model, data = edited(), batches(1)
    original = copy.deepcopy(model)
    move_shared_weights(model)
    teacher_logits, student_logits = paired_logits(model, original)
    own_teacher, own_student = paired_logits(model)
    batch = data[0]
    with torch.no_grad():
        set_mode(original, "teacher")
        expected = original(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        set_mode(original, "student")
        assert torch.equal(teacher_logits(batch), expected)
        assert not torch.equal(own_teacher(batch), expected)
        assert torch.equal(student_logits(batch), own_student(batch))


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


def test_frozen_teacher_copy_is_the_teacher_path_without_the_targets():
    from ascend_edit.config import ModelLevelConfig
    from ascend_edit.distill.model_level import frozen_teacher
    from ascend_edit.models.surgery import edited_attentions

    model, batch = edited(), batches(1)[0]
    targets = [module.target for module in edited_attentions(model)]
    assert frozen_teacher(model, ModelLevelConfig(trainable="target")) is None
    teacher = frozen_teacher(model, ModelLevelConfig(trainable="all"))
    # the model keeps its own targets; the copy holds none of their parameters
    assert [module.target for module in edited_attentions(model)] == targets
    target_params = sum(p.numel() for t in targets for p in t.parameters())
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in model.parameters()) - target_params
    assert not any(p.requires_grad for p in teacher.parameters())
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    with torch.no_grad():
        set_mode(model, "teacher")
        assert torch.equal(teacher(**kwargs).logits, model(**kwargs).logits)
        set_mode(teacher, "student")
        with pytest.raises(RuntimeError, match="frozen teacher copy"):
            teacher(**kwargs)
    set_mode(model, "student")


def test_copyable_tokens_are_those_whose_bigram_occurred_earlier_in_the_same_document():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4], [5, 5, 5, 6, 5, 5, 7]])
    whole_rows = torch.arange(7).expand(2, 7)
    # row 0: (1,2) (2,3) (3,1) (1,2)* (2,3)* (3,4); row 1: (5,5) (5,5)* (5,6) (6,5) (5,5)* (5,7); last: no target
    assert copyable_mask(ids, whole_rows).tolist() == [[False, False, False, True, True, False, False],
                                                       [False, True, False, False, True, False, False]]
    # a packed row whose second document starts at index 3: its (1,2) and (2,3) are new there
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    assert copyable_mask(ids[:1], packed).tolist() == [[False, False, False, False, False, False, False]]


def test_compare_splits_the_excess_between_copyable_and_novel_tokens():
    torch.manual_seed(0)
    vocab = 11
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "position_ids": torch.arange(8)[None], "loss_mask": torch.tensor([[True] * 7 + [False]])}
    teacher_logits = torch.randn(1, 8, vocab)
    copy = copyable_mask(ids, batch["position_ids"])  # positions 3 and 4
    # the student equals the teacher on novel tokens and is off on copyable ones
    student_logits = teacher_logits + 3.0 * copy[..., None] * torch.randn(1, 8, vocab)
    result = compare(lambda b: teacher_logits, lambda b: student_logits, [batch])["student"]
    split = result["by_copyability"]
    assert split["copyable_fraction"] == pytest.approx(2 / 7)
    assert split["teacher_kl_novel"] == pytest.approx(0.0, abs=1e-6)
    assert split["teacher_kl_copyable"] == pytest.approx(result["teacher_kl"] * 7 / 2, rel=1e-5)
    assert split["excess_nll_novel"] == pytest.approx(0.0, abs=1e-6)


def test_a_head_partitioned_after_the_states_were_kept_falls_back_to_forwards(monkeypatch):
    """A teacher loaded whole (a budget or sensitivity pass needs it) and partitioned by ZeRO-3 after stage 1: the
    head has no local values, so the kept states are dropped and the teacher's forwards give the numbers (was: a
    false 'LM head trained' error that ended the run after stage 1)."""
    from ascend_edit.eval import metrics

    model, data = edited(), batches()
    reference = TeacherReference(data)
    want = evaluate(model, data, reference=reference)  # keeps states and the head's fingerprint
    assert reference.head_reproduces_logits is True
    partitioned = torch.nn.Linear(1, 1, bias=False)
    partitioned.weight = torch.nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside a gather
    real_head = metrics._head
    monkeypatch.setattr(metrics, "_head", lambda m: partitioned if m is model else real_head(m))
    reference.check_teacher_unmoved(model)  # nothing to compare: no error
    monkeypatch.setattr(metrics, "_head", lambda m: partitioned if m is model else real_head(m))
    calls = count_model_forwards(model)
    # the forward path computes the teacher's logits itself (the model's own, gathered head)
    every_row = slice(0, 2)
    got = [reference.logits(model, i, every_row) for i in range(len(data))]
    assert reference.head_reproduces_logits is False and calls[0] == len(data)
    monkeypatch.setattr(metrics, "_head", real_head)
    fresh = TeacherReference(data)
    for index, logits in enumerate(got):
        torch.testing.assert_close(logits, fresh.logits(model, index, every_row))
    assert want == evaluate(model, data, reference=fresh)


def unchunked(model, data, which="student") -> dict:
    """The metrics as evaluate() formed them before it ran row groups and token chunks: whole-batch fp32."""
    import math

    import torch.nn.functional as F

    nll = kl = agree = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in data:
            mask = batch["loss_mask"]
            targets = torch.roll(batch["input_ids"], -1, dims=1)[mask]
            kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
            set_mode(model, "teacher")
            teacher_logp = F.log_softmax(model(**kwargs).logits[mask].float(), dim=-1)
            set_mode(model, which)
            logp = F.log_softmax(model(**kwargs).logits[mask].float(), dim=-1)
            set_mode(model, "student")
            nll += float(-logp.gather(-1, targets[:, None]).sum())
            kl += float((teacher_logp.exp() * (teacher_logp - logp)).sum())
            agree += float((teacher_logp.argmax(-1) == logp.argmax(-1)).sum())
            tokens += int(mask.sum())
    return {"ppl": math.exp(nll / tokens), "teacher_kl": kl / tokens, "top1_agreement": agree / tokens,
            "tokens": tokens}


@pytest.mark.parametrize("forward_tokens,chunk", [(16, 5), (17, 1), (32, 7), (4096, 1024)])
def test_row_groups_and_token_chunks_give_the_whole_batch_metrics(monkeypatch, forward_tokens, chunk):
    """Evaluation runs each batch in row groups of at most EVAL_FORWARD_TOKENS tokens and forms fp32 log-probs
    METRIC_CHUNK_TOKENS at a time (an 8B model's 4 x 4,096 x 152K batch held 46 GiB of fp32 temporaries); the
    numbers are the whole-batch ones, for both paths and in compare()."""
    from ascend_edit.eval import metrics

    model, data = edited(), batches()
    three_rows = {key: torch.cat([value, value[:1]]) for key, value in data[0].items()}  # uneven groups: [2, 1]
    data.append(three_rows)
    want = [unchunked(model, data, "teacher"), unchunked(model, data)]
    monkeypatch.setattr(metrics, "EVAL_FORWARD_TOKENS", forward_tokens)
    monkeypatch.setattr(metrics, "METRIC_CHUNK_TOKENS", chunk)
    sizes = [r.stop - r.start for r in metrics.row_groups(data[0])]
    assert sizes == ([1, 1] if forward_tokens < 32 else [2])
    assert [r.stop - r.start for r in metrics.row_groups(three_rows)] == ([1, 1, 1] if forward_tokens < 32 else
                                                                          [2, 1] if forward_tokens == 32 else [3])
    calls = count_model_forwards(model)
    got = [evaluate(model, data, "teacher"), evaluate(model, data)]
    groups = sum(len(metrics.row_groups(batch)) for batch in data)
    assert calls[0] == 3 * groups  # the teacher per group in both calls (fresh references), the student once
    for have, expected in zip(got, want):
        assert have["tokens"] == expected["tokens"]
        for key in ("ppl", "teacher_kl", "top1_agreement"):
            assert have[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    teacher_fn, student_fn = paired_logits(model)
    both = compare(teacher_fn, student_fn, data)
    assert both["teacher"]["ppl"] == pytest.approx(want[0]["ppl"], rel=1e-5)
    assert both["student"]["ppl"] == pytest.approx(want[1]["ppl"], rel=1e-5)
    assert both["student"]["teacher_kl"] == pytest.approx(want[1]["teacher_kl"], rel=1e-5, abs=1e-6)
    assert both["student"]["top1_agreement"] == pytest.approx(want[1]["top1_agreement"], rel=1e-6)
    assert both["student"]["tokens"] == want[1]["tokens"]


def test_a_diverged_student_gets_an_infinite_perplexity_not_an_overflow():
    from ascend_edit.eval.metrics import perplexity

    assert perplexity(2.0) == pytest.approx(7.389056)
    assert perplexity(709.0) < float("inf") and perplexity(800.0) == float("inf")
    vocab = 7
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "position_ids": torch.arange(4)[None],
             "loss_mask": torch.tensor([[True, True, True, False]])}
    teacher_logits = torch.zeros(1, 4, vocab)
    student_logits = torch.zeros(1, 4, vocab)
    student_logits[..., 0] = 5000.0  # every target (ids 2, 3, 4) about 5,000 nats away
    result = compare(lambda b: teacher_logits, lambda b: student_logits, [batch])
    assert result["student"]["ppl"] == float("inf") and result["teacher"]["ppl"] == pytest.approx(vocab)


def test_the_copyable_share_is_left_out_when_one_kind_of_token_beats_the_teacher():
    """A share above 100 % (novel tokens better than the teacher's) was printed as e.g. 2,727 %."""
    vocab = 11
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "position_ids": torch.arange(8)[None], "loss_mask": torch.tensor([[True] * 7 + [False]])}
    targets = torch.roll(ids, -1, dims=1)
    copy = copyable_mask(ids, batch["position_ids"])
    teacher_logits = torch.zeros(1, 8, vocab)
    student_logits = torch.zeros(1, 8, vocab)
    onehot = torch.nn.functional.one_hot(targets, vocab).float()
    student_logits += onehot * torch.where(copy, -2.0, 0.5)[..., None]  # worse on copyable, better on novel
    split = compare(lambda b: teacher_logits, lambda b: student_logits, [batch])["student"]["by_copyability"]
    assert split["excess_nll_copyable"] > 0 > split["excess_nll_novel"]
    assert split["excess_share_copyable"] is None
    student_logits = torch.zeros(1, 8, vocab) + onehot * torch.where(copy, -2.0, -0.1)[..., None]  # worse on both
    split = compare(lambda b: teacher_logits, lambda b: student_logits, [batch])["student"]["by_copyability"]
    assert 0.5 < split["excess_share_copyable"] < 1.0
