"""Megatron/MindSpeed indexed corpora (`data.source=indexed`): read back what a writer made from the format's
spec, pack like the in-memory packer, split by document, shard across ranks, and refuse damaged files in
one line naming data.path."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ascend_edit.data import ResumableDistributedSampler, pack_token_documents
from ascend_edit.data.indexed import (
    IndexedDataError,
    IndexedPackedDataset,
    indexed_train_eval,
    open_indexed,
    split_spans,
)
from tests.helpers.cli_runner import run_cli

# Megatron-LM's dtype codes (megatron/core/datasets/indexed_dataset.py, DType)
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_indexed(prefix, documents, dtype=np.uint16, sequences_per_document=1, magic=b"MMIDIDX\x00\x00",
                  version=1, code=None):
    """An indexed dataset written from the format's description, independently of the reader: each document
    cut into `sequences_per_document` sequences; .bin = all tokens back to back; .idx = header, int32 lengths,
    int64 byte pointers, int64 document indices (0, ..., sequence count)."""
    lengths, doc_index = [], [0]
    with open(f"{prefix}.bin", "wb") as data:
        for doc in documents:
            for piece in np.array_split(np.asarray(doc, dtype=dtype), sequences_per_document):
                data.write(piece.tobytes())
                lengths.append(len(piece))
            doc_index.append(len(lengths))
    itemsize = np.dtype(dtype).itemsize
    pointers = [0]
    for length in lengths[:-1]:
        pointers.append(pointers[-1] + length * itemsize)
    with open(f"{prefix}.idx", "wb") as index:
        index.write(magic)
        index.write(struct.pack("<Q", version))
        index.write(struct.pack("<B", CODES[dtype] if code is None else code))
        index.write(struct.pack("<Q", len(lengths)))
        index.write(struct.pack("<Q", len(doc_index)))
        index.write(struct.pack(f"<{len(lengths)}i", *lengths))
        index.write(struct.pack(f"<{len(pointers)}q", *pointers))
        index.write(struct.pack(f"<{len(doc_index)}q", *doc_index))
    return str(prefix)


def documents(count=40, vocab=200, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(3, 30))).tolist() for _ in range(count)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
@pytest.mark.parametrize("sequences_per_document", [1, 2])
def test_documents_read_back_in_every_dtype(tmp_path, dtype, sequences_per_document):
    docs = documents(vocab=120)
    prefix = write_indexed(tmp_path / "corpus_text_document", docs, dtype, sequences_per_document)
    corpus = open_indexed(prefix)
    assert corpus.num_documents == len(docs) and corpus.tokens.dtype == np.dtype(dtype)
    assert isinstance(corpus.tokens, np.memmap)  # mapped, not read into memory
    for i, doc in enumerate(docs):
        assert corpus.document(i).tolist() == doc
    assert open_indexed(prefix + ".bin").num_documents == len(docs)  # a suffix is read as the prefix


def test_rows_equal_in_memory_packing_of_the_same_documents(tmp_path):
    docs = documents(count=30)
    corpus = open_indexed(write_indexed(tmp_path / "c", docs, sequences_per_document=2))
    rows = IndexedPackedDataset(corpus, split_spans(corpus, np.zeros(len(docs), bool))["train"], seq_len=16,
                                vocab_size=256)
    expected = pack_token_documents(docs, 16)
    assert len(rows) == len(expected) and rows.dropped_tokens == expected.dropped_tokens
    for i in range(len(rows)):
        for name, value in expected[i].items():
            assert torch.equal(rows[i][name], value), (i, name)


def test_split_by_document_covers_the_corpus_and_is_seeded(tmp_path):
    docs = [[7 + d] * 20 for d in range(60)]  # a token id tells which document it came from
    prefix = write_indexed(tmp_path / "c", docs)
    train, held_out = indexed_train_eval(prefix, seq_len=10, eval_fraction=0.2, seed=1, vocab_size=256)
    ids = {name: {int(t) for i in range(len(s)) for t in s[i]["input_ids"]}
           for name, s in (("train", train), ("eval", held_out))}
    assert ids["train"].isdisjoint(ids["eval"])  # no document on both sides
    assert ids["train"] | ids["eval"] == {7 + d for d in range(60)}
    assert 0 < held_out.num_documents < 30 and train.num_documents + held_out.num_documents == 60
    again, _ = indexed_train_eval(prefix, seq_len=10, eval_fraction=0.2, seed=1, vocab_size=256)
    other, _ = indexed_train_eval(prefix, seq_len=10, eval_fraction=0.2, seed=2, vocab_size=256)
    assert torch.equal(again[0]["input_ids"], train[0]["input_ids"])
    assert {int(t) for i in range(len(other)) for t in other[i]["input_ids"]} != ids["train"]


def test_split_offsets_cached_once_and_memory_mapped(tmp_path):
    prefix = write_indexed(tmp_path / "c", documents(count=80))
    in_memory, held_in_memory = indexed_train_eval(prefix, seq_len=8, eval_fraction=0.2, seed=0, vocab_size=256)
    cached, held_cached = indexed_train_eval(prefix, seq_len=8, eval_fraction=0.2, seed=0, vocab_size=256,
                                             cache_dir=tmp_path / "cache")
    (directory,) = (tmp_path / "cache").iterdir()
    assert isinstance(cached.starts, np.memmap) and isinstance(cached.ends, np.memmap)
    for ours, theirs in ((cached, in_memory), (held_cached, held_in_memory)):
        assert len(ours) == len(theirs) > 0
        for i in range(len(ours)):
            assert all(torch.equal(ours[i][k], theirs[i][k]) for k in theirs[i])
    stamp = (directory / "meta.json").stat().st_mtime_ns
    again, _ = indexed_train_eval(prefix, seq_len=16, eval_fraction=0.2, seed=0, vocab_size=256,
                                  cache_dir=tmp_path / "cache")  # seq_len is not part of the key: rows are lazy
    assert (directory / "meta.json").stat().st_mtime_ns == stamp and len(again) == len(cached) // 2
    indexed_train_eval(prefix, seq_len=8, eval_fraction=0.2, seed=5, vocab_size=256, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # another split is another cache


def test_ranks_read_disjoint_rows_and_the_sampler_resumes(tmp_path):
    train, _ = indexed_train_eval(write_indexed(tmp_path / "c", documents(count=80)), seq_len=8,
                                  eval_fraction=0.1, seed=0, vocab_size=256)
    world, batch = 2, 4
    samplers = [ResumableDistributedSampler(len(train), batch, rank, world, seed=3) for rank in range(world)]
    steps = len(train) // batch
    seen = [[i for step in iter(s) for i in step] for s in samplers]
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0]) | set(seen[1])) == steps * batch
    resumed = ResumableDistributedSampler(len(train), batch, 0, world, seed=3)
    resumed.load_state_dict(samplers[0].state_at_step(2))
    fresh = list(iter(ResumableDistributedSampler(len(train), batch, 0, world, seed=3)))
    assert next(iter(resumed)) == fresh[2]


def one_line_error(prefix, match, **kwargs):
    with pytest.raises(IndexedDataError, match=match) as info:
        indexed_train_eval(prefix, seq_len=8, eval_fraction=0.1, seed=0, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.path=")
    return message


def test_damaged_or_foreign_files_are_one_line(tmp_path):
    docs = documents()
    one_line_error(write_indexed(tmp_path / "magic", docs, magic=b"TNTIDX\x00\x00\x00"), "not a Megatron")
    one_line_error(write_indexed(tmp_path / "version", docs, version=2), "index version 2")
    one_line_error(write_indexed(tmp_path / "float", docs, dtype=np.int32, code=7), "float32 values")
    one_line_error(write_indexed(tmp_path / "code", docs, dtype=np.int32, code=42), "unknown dtype code 42")
    one_line_error(str(tmp_path / "absent"), "does not exist")
    truncated_bin = write_indexed(tmp_path / "short_bin", docs)
    with open(truncated_bin + ".bin", "r+b") as f:
        f.truncate(10)
    one_line_error(truncated_bin, r"short_bin\.bin is truncated")
    longer_bin = write_indexed(tmp_path / "long_bin", docs)
    with open(longer_bin + ".bin", "ab") as f:
        f.write(b"\0" * 200)
    one_line_error(longer_bin, r"long_bin\.bin is longer than its index describes")
    # an index saying uint16 over a .bin written as int32 (two preprocessing runs): every other token a 0
    write_indexed(tmp_path / "wide", docs, dtype=np.int32)
    write_indexed(tmp_path / "narrow", docs, dtype=np.uint16)
    (tmp_path / "narrow.bin").write_bytes((tmp_path / "wide.bin").read_bytes())
    one_line_error(str(tmp_path / "narrow"), r"narrow\.bin is longer .*fits 4-byte tokens, not the index's uint16")
    truncated_idx = write_indexed(tmp_path / "short_idx", docs)
    size = (tmp_path / "short_idx.idx").stat().st_size
    with open(truncated_idx + ".idx", "r+b") as f:
        f.truncate(size - 9)
    one_line_error(truncated_idx, r"short_idx\.idx is truncated")
    header_only = write_indexed(tmp_path / "header", docs)
    with open(header_only + ".idx", "r+b") as f:
        f.truncate(12)
    one_line_error(header_only, "truncated")


def test_token_ids_must_fit_the_vocabulary(tmp_path):
    prefix = write_indexed(tmp_path / "c", documents(vocab=1000), dtype=np.int32)
    message = one_line_error(prefix, "outside the model's vocabulary of 500", vocab_size=500)
    assert "tokenized with the teacher's own tokenizer" in message
    # uint8 ids always fit a vocabulary of 256 or more: no scan needed, and every row still checked
    small = write_indexed(tmp_path / "u8", documents(vocab=250), dtype=np.uint8)
    train, _ = indexed_train_eval(small, seq_len=8, eval_fraction=0.1, seed=0, vocab_size=256)
    assert int(train[0]["input_ids"].max()) < 256


def test_too_little_held_out_data_is_one_line(tmp_path):
    # twenty one-token documents: about two are held out, far fewer tokens than one sequence of 8
    prefix = write_indexed(tmp_path / "c", [[5 + d] for d in range(20)])
    one_line_error(prefix, "held-out documents", vocab_size=256)


def test_indexed_data_needs_a_path_where_a_task_reads_it():
    from ascend_edit.config import ConfigError, DataConfig, RootConfig

    for task in ("convert", "ablation", "eval"):
        with pytest.raises(ConfigError, match="data.path is required when data.source=indexed"):
            RootConfig(task=task, data=DataConfig(source="indexed"))
    # `plan` sizes a run from the model's config alone: no corpus path to give yet
    assert RootConfig(task="plan", data=DataConfig(source="indexed")).data.path is None


def test_tiny_conversion_reads_an_indexed_corpus_through_the_cli(tmp_path):
    """experiment=tiny (random Qwen3, no tokenizer) with data=indexed: the corpus needs no tokenizer."""
    prefix = write_indexed(tmp_path / "corpus_text_document", documents(count=120, vocab=250))
    run = run_cli(["experiment=tiny", "data=indexed", f"data.path={prefix}", "data.seq_len=32",
                   "data.eval_fraction=0.2", "eval.suite=false", "export.enabled=false",
                   f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "indexed corpus" in run.stdout + run.stderr  # the rows came from the .bin/.idx pair
    assert len(list((tmp_path / "cache").glob("indexed-*/train.starts.npy"))) == 1
    bad = run_cli(["experiment=tiny", "data=indexed", f"data.path={tmp_path / 'missing'}",
                   f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path, timeout=300)
    lines = [line for line in bad.stderr.splitlines() if line.startswith("ascend-edit: error:")]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(lines) == 1, bad.stderr[-2000:]
    assert "data.path=" in lines[0] and "does not exist" in lines[0]


def test_data_indexed_composes_through_hydra():
    from tests.unit.test_config_cli import compose_typed

    cfg = compose_typed(["data=indexed", "data.path=/data/corpus_text_document"])
    assert cfg.data.source == "indexed" and cfg.data.path == "/data/corpus_text_document"


def test_checks_and_spans_work_across_chunks(tmp_path, monkeypatch):
    import ascend_edit.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHECK_CHUNK", 3)  # every check and split crosses many chunk boundaries
    docs = documents(count=20)
    prefix = write_indexed(tmp_path / "c", docs, sequences_per_document=2)
    corpus = open_indexed(prefix)
    assert [corpus.document(i).tolist() for i in range(len(docs))] == docs
    spans = split_spans(corpus, np.zeros(len(docs), bool))["train"]
    assert spans.ends.tolist() == np.cumsum([len(d) for d in docs]).tolist()
    sequences = 2 * len(docs)
    with open(prefix + ".idx", "r+b") as f:  # sequence 7's pointer off by one token (a chunk boundary is at 6)
        f.seek(34 + 4 * sequences + 8 * 7)
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(34 + 4 * sequences + 8 * 7)
        f.write(struct.pack("<q", pointer + 2))
    one_line_error(prefix, "not the sequences laid back to back")


def test_a_16_bit_corpus_for_a_large_vocabulary_is_flagged(tmp_path, caplog):
    """preprocess_data.py writes uint16 only for tokenizers below 65,500 tokens: not Qwen3's 151,936."""
    prefix = write_indexed(tmp_path / "c", documents(count=60), dtype=np.uint16)
    with caplog.at_level("WARNING", logger="ascend_edit.data.indexed"):
        indexed_train_eval(prefix, seq_len=8, eval_fraction=0.2, seed=0, vocab_size=151936)
    assert "teacher's tokenizer" in caplog.text
