"""Text sampled from the teacher (ascend_edit/data/teacher_text.py): the sampler's filtering, the cut into
documents, determinism, and the file a mix reads."""
from __future__ import annotations

import json

import pytest
import torch

from ascend_edit.data.mix import SourceSpec, build_mix
from ascend_edit.data.sources import load_documents
from ascend_edit.data.teacher_text import (
    META_FILE,
    TEXT_FILE,
    SamplingSpec,
    nucleus_sample,
    sample_documents,
    split_documents,
    write_documents,
)
from tests.conftest import tiny_model
from tests.unit.test_data import make_tokenizer

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([" ".join(WORDS)])


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("qwen3", vocab_size=len(tokenizer))


def test_nucleus_sampling_never_draws_outside_the_top_p_set():
    # probabilities 0.5 / 0.3 / 0.15 / 0.05: top_p 0.6 keeps the first two (0.5 < 0.6 <= 0.8)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    drawn = nucleus_sample(logits, 1.0, 0.6, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == counts[3] == 0
    assert 0.55 < counts[0] / 4000 < 0.70  # renormalised: 0.5 / 0.8 = 0.625
    everything = nucleus_sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(torch.bincount(everything, minlength=4).nonzero().flatten().tolist()) == {0, 1, 2, 3}


def test_a_tiny_top_p_is_greedy_and_temperature_sharpens():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    greedy = nucleus_sample(logits, 1.0, 1e-6, torch.Generator().manual_seed(2))
    assert torch.equal(greedy, logits.argmax(-1))
    cold = nucleus_sample(logits, 1e-3, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(cold, logits.argmax(-1))


def test_rows_are_cut_at_end_tokens_and_short_pieces_dropped(tokenizer):
    eos, a, b, c = tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["w1", "w2", "w3"])
    row = [a, b, c, eos, a, eos, eos, c, b, a, c]
    docs = split_documents(row, {eos}, tokenizer, min_words=2)
    assert docs == ["w1 w2 w3", "w3 w2 w1 w3"]  # the one-word piece and the empty one are dropped
    assert split_documents(row, {eos}, tokenizer, min_words=0) == ["w1 w2 w3", "w1", "w3 w2 w1 w3"]


def test_sampling_is_deterministic_per_seed_and_fills_every_row(model, tokenizer):
    spec = SamplingSpec(rows=5, tokens=24, batch_size=2, seed=7, min_words=0)
    first = sample_documents(model, tokenizer, spec)
    assert first == sample_documents(model, tokenizer, spec)
    assert first != sample_documents(model, tokenizer, SamplingSpec(rows=5, tokens=24, batch_size=2, seed=8,
                                                                    min_words=0))
    # no end token is ever a stopping point: every row is sampled for all its tokens, so the documents hold
    # rows x tokens tokens less the end tokens they were cut at
    tokens = sum(len(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in first)
    assert 0 < tokens <= 5 * 24
    assert all(not doc.startswith(" ") and doc for doc in first)


def test_written_text_is_a_mix_source_and_never_overwrites(tmp_path, model, tokenizer):
    docs = sample_documents(model, tokenizer, SamplingSpec(rows=4, tokens=40, batch_size=4, min_words=0))
    path = write_documents(tmp_path / "tt", docs, {"teacher": "tiny"})
    assert path == tmp_path / "tt" / TEXT_FILE
    assert load_documents(path, format="jsonl") == docs
    meta = json.loads((tmp_path / "tt" / META_FILE).read_text())
    assert meta["documents"] == len(docs) and meta["teacher"] == "tiny"
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        write_documents(tmp_path / "tt", ["something else entirely"], {})
    assert path.read_bytes() == before
    specs = [SourceSpec("files", 1.0, eval=True, path=str(path), format="jsonl")]
    mix, held_out = build_mix(specs, tokenizer, seq_len=8, eval_fraction=0.25, seed=0)
    assert len(mix) > 0 and len(held_out) > 0


def test_bad_specs_name_their_key(tmp_path):
    for kwargs, key in (({"rows": 0, "tokens": 8}, "teacher_text.rows"), ({"rows": 1, "tokens": 8, "top_p": 0},
                        "teacher_text.top_p"), ({"rows": 1, "tokens": 8, "temperature": 0}, "teacher_text.temperature"),
                        ({"rows": 1, "tokens": 8, "min_words": -1}, "teacher_text.min_words")):
        with pytest.raises(ValueError, match=key):
            SamplingSpec(**kwargs)
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    with pytest.raises(ValueError, match="teacher_text.out: .* is a file"):
        write_documents(blocker, ["a document"], {})
    assert blocker.read_text() == "user data"
    with pytest.raises(ValueError, match="no documents"):
        write_documents("/nonexistent/never/created", [], {})
