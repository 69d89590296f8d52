"""The held-out suite on tiny models: identity conversions match the teacher exactly; the passkey
generator puts the key where it says; the out-of-domain set is disjoint from every training source."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import EvalConfig, MLAConfig, TargetConfig
from ascend_edit.data.heldout import check_disjoint, document_hash, python_docs_documents
from ascend_edit.eval.long_context import token_stream, window_batches, windows
from ascend_edit.eval.metrics import compare, paired_logits
from ascend_edit.eval.passkey import check_passkey_contexts, make_grid, make_sample, needle_tokens
from ascend_edit.eval.suite import HeldOut, run_suite
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model
from tests.helpers.tiny_checkpoint import char_tokenizer, synthetic_corpus

TEXTS = synthetic_corpus(60, seed=3)
SMALL = EvalConfig(contexts=[32, 96, 4096], sequences=2, batch_tokens=64, passkey_contexts=[128, 192],
                   passkey_depths=[0.0, 0.5, 1.0], passkey_trials=2, domains=["in_domain"], passkey_filler="in_domain")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(TEXTS + ["0123456789 What is the pass key? The pass key is. Remember it."])


def edited(kind: str, **target):
    model = tiny_model("qwen3", vocab_size=128)
    cfg = TargetConfig(kind=kind, init="random" if kind != "identity" else "warm", calibration_batches=0, **target)
    return edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg)


def test_identity_conversion_matches_the_teacher_everywhere(tokenizer):
    teacher, student = paired_logits(edited("identity"))
    results = run_suite(teacher, student, tokenizer, SMALL, {"in_domain": HeldOut("in_domain", "test", TEXTS)},
                        max_positions=512)
    assert results["skipped_contexts"] == [4096]  # longer than the model's positions
    other = {"in_domain": HeldOut("in_domain", "test", TEXTS[1:])}
    assert results["text_sha256"]["in_domain"] != run_suite(teacher, student, tokenizer, SMALL, other,
                                                            max_positions=64)["text_sha256"]["in_domain"]
    quality = results["quality"]["in_domain"]
    assert sorted(quality, key=int) == ["32", "96"]
    for metrics in quality.values():
        assert metrics["student"]["teacher_kl"] == 0.0
        assert metrics["student"]["top1_agreement"] == 1.0
        assert metrics["student"]["ppl"] == metrics["teacher"]["ppl"]
        assert metrics["sequences"] == 2
    passkey = results["passkey"]
    assert passkey["student"] == passkey["teacher"]
    assert len(passkey["teacher"]) == 2 and len(passkey["teacher"][0]) == 3


def test_a_real_conversion_differs_from_the_teacher(tokenizer):
    """The same suite tells a changed model apart (so the identity result above is not vacuous)."""
    teacher, student = paired_logits(edited("mla", mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8,
                                                                 qk_nope_head_dim=8, v_head_dim=16)))
    stream = token_stream(TEXTS, tokenizer, 2 * 64)
    metrics = compare(teacher, student, window_batches(windows(stream, 64, 2), 4096))
    assert metrics["student"]["teacher_kl"] > 0.01
    assert metrics["student"]["top1_agreement"] < 1.0
    assert metrics["teacher"]["tokens"] == 2 * 63


def test_windows_are_whole_causal_sequences(tokenizer):
    stream = token_stream(TEXTS, tokenizer, 1000)
    ids = windows(stream, 100, 4)
    assert ids.shape == (4, 100) and ids.flatten().tolist() == stream[:400]
    batches = window_batches(ids, 250)
    assert [len(b["input_ids"]) for b in batches] == [2, 2]
    assert batches[0]["position_ids"][1].tolist() == list(range(100))
    assert batches[0]["loss_mask"].sum() == 2 * 99


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_generator_places_the_key_where_it_says(tokenizer, depth):
    filler = token_stream(TEXTS, tokenizer, 500)
    sample = make_sample(tokenizer, filler, 200, depth, "48213", offset=17)
    assert len(sample.input_ids) == 200
    start, end = sample.key_span
    assert tokenizer.decode(sample.input_ids[start:end]).replace(" ", "") == "48213"
    a_start, a_end = sample.answer_span
    assert a_end == 200 and sample.input_ids[a_start:a_end] == sample.input_ids[start:end]
    needle = tokenizer.decode(sample.input_ids[sample.needle_start:end])
    assert needle.replace(" ", "").startswith("Thepasskeyis48213")
    room = 200 - (end - start) * 3 - len(tokenizer(" The pass key is. Remember it. is the pass key.")["input_ids"])
    room -= len(tokenizer(" What is the pass key? The pass key is")["input_ids"])
    assert abs(sample.needle_start - depth * room) <= 1
    assert sample.input_ids[:sample.needle_start] == [filler[(17 + i) % len(filler)] for i in range(sample.needle_start)]


def test_passkey_grid_is_deterministic_from_its_seed(tokenizer):
    filler = token_stream(TEXTS, tokenizer, 500)
    grid = make_grid(tokenizer, filler, [128, 160], [0.0, 1.0], trials=3, seed=7)
    again = make_grid(tokenizer, filler, [128, 160], [0.0, 1.0], trials=3, seed=7)
    other = make_grid(tokenizer, filler, [128, 160], [0.0, 1.0], trials=3, seed=8)
    assert grid == again and grid != other
    assert len(grid) == 12 and len({s.key for s in grid}) > 1


def test_out_of_domain_check_refuses_shared_documents_and_passages():
    ood = ["Alpha beta gamma delta epsilon zeta eta theta.\n\nIota kappa lambda mu nu xi omicron pi rho.", "x y z w"]
    check_disjoint(ood, ["something else entirely, with many more words than eight here"], "ood")
    with pytest.raises(ValueError, match="not held out"):
        check_disjoint(ood, ["x   y z\nw"], "ood")  # the same document, wrapped differently
    with pytest.raises(ValueError, match="1 passage"):
        check_disjoint(ood, ["Preface.\n\nIota kappa lambda mu nu xi omicron pi rho."], "ood")


def test_python_docs_is_prose_and_deterministic():
    docs = python_docs_documents()
    assert len(docs) > 50 and sum(len(d) for d in docs) > 100_000
    assert [document_hash(d) for d in docs] == [document_hash(d) for d in python_docs_documents()]
    lines = [line for d in docs for line in d.splitlines() if line]
    assert not any(line.startswith(" ") for line in lines)  # code blocks dropped


@pytest.mark.slow
def test_python_docs_shares_nothing_with_any_training_source():
    """Every text source a conversion can train on out of the box: both Shakespeare editions (whole works
    and passages) and every named source of a training mix."""
    from ascend_edit.assets import shakespeare_dir
    from ascend_edit.data import load_documents
    from ascend_edit.data.mix import NAMED_SOURCES, SourceSpec, source_documents

    ood = python_docs_documents()
    for edition in ("modern", "folio"):
        for passages in (False, True):
            docs = load_documents(shakespeare_dir(edition), format="text", split_on_blank_lines=passages)
            check_disjoint(ood, docs, f"shakespeare {edition}")
    for name in NAMED_SOURCES:
        if name != "files":  # the user's own files: checked at run time against the run's training documents
            check_disjoint(ood, source_documents(SourceSpec(name)), name)


def test_passkey_contexts_too_short_for_the_needle_are_named_before_any_sample(tokenizer):
    needed = needle_tokens(tokenizer)
    filler = token_stream(TEXTS, tokenizer, 500)
    make_sample(tokenizer, filler, needed + 1, 0.5, "48213")  # one token of filler: the smallest that works
    check_passkey_contexts(tokenizer, [needed + 1, 160])
    with pytest.raises(ValueError, match=f"eval.passkey_contexts: {needed} is shorter than the needle"):
        check_passkey_contexts(tokenizer, [160, needed])
    with pytest.raises(ValueError, match="shorter than the needle"):
        make_sample(tokenizer, filler, needed - 1, 0.5, "48213")


def test_eval_config_rejects_bad_values():
    from ascend_edit.config import ConfigError

    with pytest.raises(ConfigError, match="eval.contexts: 1 must be >= 2"):
        EvalConfig(contexts=[64, 1])
    with pytest.raises(ConfigError, match="eval.passkey_depths"):
        EvalConfig(passkey_depths=[1.5])
    with pytest.raises(ConfigError, match="eval.domains"):
        EvalConfig(domains=["wikipedia"])
    torch.manual_seed(0)


@pytest.mark.parametrize("settings, named", [
    ({"passkey_depths": []}, "eval.passkey_depths is empty"),
    ({"passkey_contexts": []}, "eval.passkey_contexts is empty"),
    ({"contexts": [], "passkey_trials": 0}, "eval.contexts is empty"),
    ({"domains": [], "passkey_trials": 0}, "eval.domains is empty"),
])
def test_an_eval_grid_that_measures_nothing_is_refused(settings, named):
    """Each once passed the checks and ended a conversion with a ZeroDivisionError or an empty table."""
    from ascend_edit.config import ConfigError

    with pytest.raises(ConfigError, match=named):
        EvalConfig(**settings)
    EvalConfig(**settings, suite=False)  # no suite: nothing to measure is fine


def test_contexts_beyond_the_model_are_refused_when_nothing_is_left(tokenizer):
    from ascend_edit.eval.suite import check_measurable

    check_measurable(EvalConfig(contexts=[64, 4096], passkey_trials=0), max_positions=512)  # 64 fits
    with pytest.raises(ValueError, match="all longer than the model's 512 positions"):
        check_measurable(EvalConfig(contexts=[4096], passkey_trials=0), max_positions=512)
    with pytest.raises(ValueError, match="eval.passkey_contexts"):
        check_measurable(EvalConfig(contexts=[4096], passkey_contexts=[8192]), max_positions=512)
    check_measurable(EvalConfig(contexts=[4096], passkey_contexts=[256]), max_positions=512)  # passkey still runs


def test_suite_text_is_tokenized_as_training_packs_it():
    """Windows of a BOS-adding tokenizer (Llama, Mistral) carried no BOS while every training row did: the suite
    scored text the conversion never trained on. Each document now starts as packing starts it."""
    from tokenizers import processors

    from ascend_edit.data.packing import tokenize_documents

    with_bos = char_tokenizer(TEXTS)  # <unk> (id 2) stands in for a BOS the tokenizer adds to every document
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<unk> $A",
                                                                             special_tokens=[("<unk>", 2)])
    packed = [i for doc in tokenize_documents(TEXTS[:3], with_bos) for i in doc]
    stream = token_stream(TEXTS[:3], with_bos, 10_000)
    assert stream == packed and stream.count(2) == 3 and stream[0] == 2
