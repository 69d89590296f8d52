"""Recall rows (data/recall.py): a span, more text, the span again — exact layout, deterministic, in the mix."""
from __future__ import annotations

import pytest

from ascend_edit.config import ConfigError, MixSourceConfig
from ascend_edit.data.mix import SourceSpec, build_mix
from ascend_edit.data.recall import pack_recall, recall_rows
from tests.unit.test_data import make_tokenizer


def test_every_row_repeats_its_opening_span_at_its_end_and_reads_the_stream_in_order():
    stream = list(range(10_000))  # distinct tokens: a row's content says exactly where it came from
    seq_len = 64
    rows = recall_rows(stream, seq_len, seed=3)
    assert len(rows) > 100
    start = 0
    for row in rows:
        assert len(row) == seq_len
        fresh = next(i for i in range(1, seq_len) if row[i] != row[i - 1] + 1)  # where A's copy starts
        span = seq_len - fresh
        assert seq_len // 16 <= span <= seq_len // 3
        assert row[:fresh] == stream[start:start + fresh]  # A and B: the next unread text
        assert row[fresh:] == row[:span]  # A again, closing the row
        start += fresh
    assert len(stream) - start < seq_len  # only a tail shorter than a row is left
    spans = {seq_len - next(i for i in range(1, seq_len) if row[i] != row[i - 1] + 1) for row in rows}
    assert len(spans) > 5  # the copy distance varies from row to row


def test_rows_are_a_function_of_the_seed():
    stream = list(range(5_000))
    assert recall_rows(stream, 48, seed=1) == recall_rows(stream, 48, seed=1)
    assert recall_rows(stream, 48, seed=1) != recall_rows(stream, 48, seed=2)
    with pytest.raises(ValueError, match="seq_len >= 6"):
        recall_rows(stream, 4, seed=0)


def test_packed_recall_rows_are_one_document_per_sequence():
    docs = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(30)]
    tokenizer = make_tokenizer(docs)
    packed = pack_recall(docs, tokenizer, seq_len=32, seed=0)
    assert len(packed) > 10
    for i in range(len(packed)):
        item = packed[i]
        assert int(item["position_ids"][0]) == 0 and int(item["position_ids"][-1]) == 31  # one document, uncut
        assert bool(item["loss_mask"][:-1].all())  # every position but the last predicts a token of the row
    with pytest.raises(ValueError, match="too little text"):
        pack_recall(docs[:1], tokenizer, seq_len=4096, seed=0)


def test_a_mix_source_with_repeat_spans_trains_on_recall_rows_and_never_evaluates_on_them(tmp_path):
    docs = [f"doc{i} " + " ".join(f"d{i}x{j}" for j in range(30)) for i in range(20)]
    (tmp_path / "a").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "a" / f"{i:02d}.txt").write_text(doc)
    tokenizer = make_tokenizer(docs)
    specs = [SourceSpec("files", 0.5, eval=True, path=str(tmp_path / "a")),
             SourceSpec("files", 0.5, path=str(tmp_path / "a"), repeat_spans=True)]
    mix, held_out = build_mix(specs, tokenizer, seq_len=24, eval_fraction=0.2, seed=0)
    recall = mix.sources[1]
    for i in range(len(recall)):
        ids = recall[i]["input_ids"].tolist()
        assert any(ids[-n:] == ids[:n] for n in range(24 // 16, 24 // 3 + 1))
    plain_eval = build_mix(specs[:1], tokenizer, seq_len=24, eval_fraction=0.2, seed=0)[1]
    assert held_out.input_ids.equal(plain_eval.input_ids)  # the held-out set is the plain source's
    with pytest.raises(ConfigError, match=r"data.mix\[news\]: repeat_spans and eval"):
        MixSourceConfig(name="news", eval=True, repeat_spans=True)

