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
    sample_calibration_set,
    sample_documents,
    split_documents,
    start_token_id,
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
                        ({"rows": 1, "tokens": 8, "min_words": -1}, "teacher_text.min_words"),
                        # logits / 1e-45 overflow: sampling failed with a RuntimeError traceback
                        ({"rows": 1, "tokens": 8, "temperature": 1e-45}, r"teacher_text.temperature=1e-45 is below")):
        with pytest.raises(ValueError, match=key):
            SamplingSpec(**kwargs)
    blocker = tmp_path / "a_file"
    blocker.write_text("user data")
    with pytest.raises(ValueError, match="teacher_text.out: .* is a file"):
        write_documents(blocker, ["a document"], {})
    assert blocker.read_text() == "user data"
    with pytest.raises(ValueError, match="no documents"):
        write_documents("/nonexistent/never/created", [], {})


def test_calibration_set_sampled_from_the_teacher(model, tokenizer):
    """target.calibration_source=teacher: one sampled row per sequence, each a start token then seq_len - 1 sampled
    tokens, a single document per row; deterministic per seed; the pipeline's calibration batches use it."""
    data = sample_calibration_set(model, tokenizer, sequences=6, seq_len=12, seed=3)
    assert len(data) == 6
    start = start_token_id(tokenizer, model.config)
    item = data[0]
    assert item["input_ids"].shape == (12,) and int(item["input_ids"][0]) == start
    assert torch.equal(item["position_ids"], torch.arange(12))  # one document per row, positions from 0
    again = sample_calibration_set(model, tokenizer, sequences=6, seq_len=12, seed=3)
    other = sample_calibration_set(model, tokenizer, sequences=6, seq_len=12, seed=4)
    rows = torch.stack([data[i]["input_ids"] for i in range(6)])
    assert torch.equal(rows, torch.stack([again[i]["input_ids"] for i in range(6)]))
    assert not torch.equal(rows, torch.stack([other[i]["input_ids"] for i in range(6)]))

    from ascend_edit.config import DataConfig, DeviceConfig, EvalConfig, RootConfig, TargetConfig
    from ascend_edit.train.prepare import calibration_batches

    cfg = RootConfig(target=TargetConfig(calibration_batches=2, calibration_source="teacher"),
                     data=DataConfig(seq_len=12), eval=EvalConfig(batch_size=3), device=DeviceConfig(seed=3))
    batches = calibration_batches(cfg, model, tokenizer, train_set=None, device=torch.device("cpu"))
    assert [b["input_ids"].shape for b in batches] == [(3, 12), (3, 12)]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), rows)  # the same seed, the same rows


def test_start_token_falls_back_to_the_model_config_and_bad_source_names_its_key():
    class NoSpecialTokens:
        bos_token_id = None
        eos_token_id = None

    class Config:
        bos_token_id = None
        eos_token_id = [7, 8]

    assert start_token_id(NoSpecialTokens(), Config()) == 7
    assert start_token_id(None, Config()) == 7
    Config.eos_token_id = None
    with pytest.raises(ValueError, match="neither a BOS nor an EOS .*target.calibration_source=data"):
        start_token_id(None, Config())
    from ascend_edit.config import ConfigError, TargetConfig

    with pytest.raises(ConfigError, match="target.calibration_source"):
        TargetConfig(calibration_source="wikipedia")
