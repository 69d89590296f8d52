"""GateSWA full layers chosen by a retrieval probe (target.gate_swa.selection): the probes are built from training
text with keys the evaluation never uses, the answer-only KL finds the layer that fetches from far back, the
text / retrieval / both scores combine as stated, and the byte budget holds whatever the selection."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ascend_edit.config import ConfigError, GateSWAConfig, TargetConfig
from ascend_edit.eval.passkey import NEEDLE, QUESTION, make_grid
from ascend_edit.models.budget import combine_swa_scores, full_layers_for_budget, gate_swa_for_budget
from ascend_edit.models.retrieval_probe import KEY_DIGITS, calibration_probes, make_probes
from ascend_edit.models.sensitivity import retrieval_sensitivity, swa_sensitivity
from ascend_edit.models.surgery import decoder_layers
from tests.conftest import tiny_model
from tests.helpers.tiny_checkpoint import char_tokenizer, synthetic_corpus

TRAIN = synthetic_corpus(40, seed=5)
HELD_OUT = ["zebra quixotic jukebox whizzing vexed nymph." * 3, "quartz sphinx judge of my vow." * 3]
MARKERS = ("zebra", "quixotic", "jukebox", "quartz", "sphinx")  # words only the held-out text has


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(TRAIN + HELD_OUT + ["0123456789 What is the pass key? Which number was secret? Keep it in "
                                              "mind. Remember it. TS"])


def train_batches(tokenizer, batch: int = 2, seq: int = 160) -> list[dict]:
    ids = [t for doc in TRAIN for t in tokenizer(doc, add_special_tokens=False)["input_ids"]]
    return [{"input_ids": torch.tensor(ids[:batch * seq]).view(batch, seq)}]


def test_markers_are_only_in_the_held_out_text():
    assert not any(m in doc for m in MARKERS for doc in TRAIN)
    assert all(any(m in doc for doc in HELD_OUT) for m in MARKERS)


def test_probes_use_training_text_and_keys_the_evaluation_never_draws(tokenizer):
    batches = train_batches(tokenizer)
    probes = make_probes([int(t) for t in batches[0]["input_ids"].flatten()], 160, 6, tokenizer, seed=0)
    assert probes.input_ids.shape == probes.score_mask.shape == (6, 160)
    texts = ["".join(tokenizer.convert_ids_to_tokens(row)) for row in probes.input_ids.tolist()]  # char tokens
    for text, key, row, mask in zip(texts, probes.keys, probes.input_ids, probes.score_mask):
        assert not any(m in text for m in MARKERS)  # no held-out text in any probe
        assert QUESTION not in text and not any(piece in text for piece in NEEDLE)  # not the evaluation's wording
        assert len(key) == KEY_DIGITS and text.endswith(" " + key) and text.count(key) == 3  # needle twice, answer
        answer = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
        scored = mask.nonzero().flatten()
        assert scored.tolist() == list(range(160 - len(answer) - 1, 159))  # positions that predict the answer
        assert row[scored + 1].tolist() == answer
    # the evaluation's keys (five digits, seeded by eval.seed) are never the probe's, whatever the eval seed
    filler = tokenizer(HELD_OUT[0], add_special_tokens=False)["input_ids"]
    eval_keys = {s.key for seed in range(5) for s in make_grid(tokenizer, filler, [160], [0.0, 0.5, 1.0], 4, seed)}
    assert eval_keys and eval_keys.isdisjoint(probes.keys)
    again = make_probes([int(t) for t in batches[0]["input_ids"].flatten()], 160, 6, tokenizer, seed=0)
    assert torch.equal(again.input_ids, probes.input_ids)  # deterministic
    other = make_probes([int(t) for t in batches[0]["input_ids"].flatten()], 160, 6, tokenizer, seed=1)
    assert other.keys != probes.keys  # the seed names the stream
    assert max(probes.depths) < 0.9 and len(set(probes.depths)) == 6  # spread, far from the question


def test_probe_batches_follow_the_calibration_shape_without_a_tokenizer():
    batches = [{"input_ids": torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))}]
    probes = calibration_probes(batches, 5, tokenizer=None)
    assert [b["input_ids"].shape for b in probes] == [(2, 64), (2, 64), (1, 64)]
    assert all(int(b["score_mask"].sum()) == KEY_DIGITS * len(b["input_ids"]) for b in probes)
    allowed = set(batches[0]["input_ids"].flatten().tolist())
    assert all(set(b["input_ids"].flatten().tolist()) <= allowed for b in probes)  # copy probe of filler ids
    with pytest.raises(ValueError, match="context 16 is shorter than the needle .* raise data.seq_len"):
        calibration_probes([{"input_ids": batches[0]["input_ids"][:, :16]}], 1)


def test_answer_kl_finds_the_only_layer_that_can_fetch():
    """Every layer but one has its attention muted (o_proj = 0): sliding a muted layer changes nothing, so
    the retrieval score is exactly zero there and the selection must pick the live layer."""
    model = tiny_model("llama", seed=0)
    live = 2
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            if i != live:
                layer.self_attn.o_proj.weight.zero_()
    batches = [{"input_ids": torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))}]
    cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=4, sink_tokens=1, selection="retrieval",
                                                               retrieval_probes=4))
    scores = retrieval_sensitivity(model, cfg, batches)
    assert scores[live] > 0 and all(s == pytest.approx(0.0, abs=1e-6) for i, s in enumerate(scores) if i != live)
    assert full_layers_for_budget(scores, 0.3, 64, 4, 1) == [live]  # a budget that pays for one full layer


def test_a_mask_over_every_position_is_the_text_kl_per_token():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(2))
    cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=4, sink_tokens=1))
    text = swa_sensitivity(model, cfg, [{"input_ids": ids}])
    masked = swa_sensitivity(model, cfg, [{"input_ids": ids, "score_mask": torch.ones(2, 48, dtype=torch.bool)}])
    torch.testing.assert_close(torch.tensor(masked) * 48, torch.tensor(text), rtol=1e-4, atol=1e-7)


def test_scores_combine_as_shares_of_their_sums():
    text, retrieval = [4.0, 1.0, 1.0, 2.0], [0.0, 0.1, 3.0, 0.1]
    assert combine_swa_scores(text, retrieval, "text") == text
    assert combine_swa_scores(None, retrieval, "retrieval") == retrieval
    both = combine_swa_scores(text, retrieval, "both", 0.5)
    expected = [0.5 * t / 8.0 + 0.5 * r / 3.2 for t, r in zip(text, retrieval)]
    assert both == pytest.approx(expected)
    one_full = dict(kv_fraction=0.3, context=64, window=4, sink_tokens=1)  # pays for exactly one full layer
    assert full_layers_for_budget(text, **one_full) == [0]
    assert full_layers_for_budget(retrieval, **one_full) == [2]
    assert full_layers_for_budget(both, **one_full) == [2]
    assert full_layers_for_budget(combine_swa_scores(text, retrieval, "both", 0.0), **one_full) == [0]
    with pytest.raises(ValueError, match=r"^target\.gate_swa\.selection=both: the both scores were not measured"):
        combine_swa_scores(text, None, "both")
    with pytest.raises(ValueError, match=r"^target\.gate_swa\.selection='kl' is not one of"):
        combine_swa_scores(text, retrieval, "kl")


@pytest.mark.parametrize("field, value, message", [
    ("selection", "kl", r"^target\.gate_swa\.selection='kl' is not one of \['text', 'retrieval', 'both'\]$"),
    ("retrieval_weight", 1.5, r"^target\.gate_swa\.retrieval_weight=1\.5 must be in \[0\.0, 1\.0\]$"),
    ("retrieval_probes", 0, r"^target\.gate_swa\.retrieval_probes=0 must be >= 1$"),
])
def test_bad_selection_settings_are_one_line_naming_the_key(field, value, message):
    with pytest.raises(ConfigError, match=message):
        GateSWAConfig(**{field: value})


@pytest.mark.parametrize("selection", ["retrieval", "both"])
def test_selection_end_to_end_keeps_the_byte_budget_and_the_teacher(selection, tokenizer):
    model = tiny_model("llama", seed=0, vocab_size=max(256, len(tokenizer)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = train_batches(tokenizer, batch=2, seq=192)
    target = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=8, sink_tokens=2, selection=selection,
                                                                  retrieval_probes=3))
    measured: dict = {}
    swa, scores = gate_swa_for_budget(model, target, batches, 0.5, 192, tokenizer, measured)
    again, scores_again = gate_swa_for_budget(model, target, batches, 0.5, 192, tokenizer)
    layers = model.config.num_hidden_layers
    assert len(scores) == layers and scores == scores_again and swa.full_layers == again.full_layers
    assert sorted(measured) == (["retrieval"] if selection == "retrieval" else ["retrieval", "text"])
    assert all(len(v) == layers and all(s >= 0 for s in v) for v in measured.values())
    # tokens cached at 192: a full layer holds 192, a sliding one 8 - 1 + 2; within 50 % of the teacher, and
    # one more full layer would not fit
    cached = lambda full: 192 * full + 9 * (layers - full)  # noqa: E731
    assert cached(len(swa.full_layers)) <= 0.5 * 192 * layers < cached(len(swa.full_layers) + 1)
    assert swa.full_layers == full_layers_for_budget(scores, 0.5, 192, 8, 2) and swa.kv_budget is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "edit_plan")  # measured, then the untouched teacher again


def test_prepare_passes_the_tokenizer_to_the_selection(tokenizer):
    from ascend_edit.train.prepare import gate_swa_target_for_budget

    model = tiny_model("llama", seed=0, vocab_size=max(256, len(tokenizer)))
    budgeted = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=8, sink_tokens=2, kv_budget=0.5,
                                                                    kv_budget_context=192, selection="both"))
    chosen = gate_swa_target_for_budget(model, budgeted, train_batches(tokenizer, seq=192), tokenizer)
    again = gate_swa_target_for_budget(model, dataclasses.replace(budgeted), train_batches(tokenizer, seq=192),
                                       tokenizer)
    assert chosen.gate_swa.full_layers == again.gate_swa.full_layers and chosen.gate_swa.selection == "both"


class _Oracle(torch.nn.Module):
    """Stand-in model: predicts the true next token everywhere except at the positions in `wrong`."""

    def __init__(self, vocab: int, wrong: tuple[int, ...] = ()):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids, **_):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        for pos in self.wrong:
            nxt[:, pos] = (nxt[:, pos] + 1) % self.vocab
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})()


def test_a_probe_counts_as_retrieved_only_when_every_answer_token_is_right():
    from ascend_edit.models.retrieval_probe import answers_retrieved

    batches = calibration_probes([{"input_ids": torch.randint(3, 200, (2, 64),
                                                              generator=torch.Generator().manual_seed(0))}], 3)
    assert answers_retrieved(_Oracle(256), batches) == 1.0
    assert answers_retrieved(_Oracle(256, wrong=(64 - 3,)), batches) == 0.0  # one answer token wrong
    assert answers_retrieved(_Oracle(256, wrong=(10,)), batches) == 1.0  # a filler token wrong: not scored


def test_the_full_layer_budget_counts_the_converted_layers_only():
    """With target.layers a subset, layers kept as they are hold every token: the budget is spent over the converted
    ones (as per-layer windows spend it); counted over all, a kept layer's tokens were never charged."""
    model = tiny_model("llama", seed=0)
    batches = [{"input_ids": torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))}]
    cfg = TargetConfig(kind="gate_swa", layers=[0, 1], gate_swa=GateSWAConfig(window=16, sink_tokens=0, full_every=0))
    chosen, _ = gate_swa_for_budget(model, cfg, batches, 0.5, 64)
    assert chosen.full_layers == []  # 2 sliding layers hold 2 x 15 tokens; one full one (64 + 15) passes 0.5 x 2 x 64
    chosen, _ = gate_swa_for_budget(model, cfg, batches, 0.9, 64)
    assert len(chosen.full_layers) == 1 and set(chosen.full_layers) <= {0, 1}
