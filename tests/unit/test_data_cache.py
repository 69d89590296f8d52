"""Tokenize-once data cache: same sequences as in-memory packing, reused without tokenizing, keyed by its
inputs, and read by ranks in disjoint shards through the resumable sampler."""
from __future__ import annotations

import torch

from ascend_edit.data import ResumableDistributedSampler, pack_token_documents, tokenize_documents
from ascend_edit.data.cache import PackingKey, cached_train_eval, tokenizer_identity


class CountingTokenizer:
    """Character-level stand-in for an HF tokenizer (BOS 1, EOS 2), counting its calls."""

    name_or_path = "chars"
    bos_token_id, eos_token_id = 1, 2

    def __init__(self):
        self.calls = 0

    def get_vocab(self):
        return {chr(c): c for c in range(32, 127)}

    def __call__(self, texts, add_special_tokens=True, verbose=False):
        self.calls += 1
        return {"input_ids": [[1] + [ord(ch) for ch in text] for text in texts]}


DOCS = [f"document {i} " + "word " * (i % 7 + 1) for i in range(60)]


def key(seq_len=16, eval_fraction=0.0):
    return PackingKey(data={"docs": "DOCS"}, tokenizer=tokenizer_identity(CountingTokenizer()), seq_len=seq_len,
                      eval_fraction=eval_fraction, seed=0)


def test_cache_matches_in_memory_packing(tmp_path):
    tokenizer = CountingTokenizer()
    train, held_out = cached_train_eval(tmp_path, key(), lambda: iter(DOCS), tokenizer)
    expected = pack_token_documents(tokenize_documents(DOCS, CountingTokenizer()), 16)
    assert held_out is None and len(train) == len(expected)
    for i in (0, 1, len(train) // 2, len(train) - 1):
        for name, value in expected[i].items():
            assert torch.equal(train[i][name], value), (i, name)


def test_second_run_does_no_tokenization(tmp_path):
    first = CountingTokenizer()
    cached_train_eval(tmp_path, key(eval_fraction=0.2), lambda: iter(DOCS), first)
    assert first.calls > 0
    second = CountingTokenizer()

    def no_reading():
        raise AssertionError("a reused cache must not read the documents")

    train, held_out = cached_train_eval(tmp_path, key(eval_fraction=0.2), no_reading, second)
    assert second.calls == 0
    assert len(train) > 0 and held_out is not None and len(held_out) > 0
    # another packing setting is another cache
    other, _ = cached_train_eval(tmp_path, key(seq_len=8, eval_fraction=0.2), lambda: iter(DOCS), second)
    assert second.calls > 0 and other.seq_len == 8
    assert len({p.name for p in tmp_path.iterdir()}) == 2


def test_ranks_read_disjoint_shards_and_the_sampler_resumes(tmp_path):
    train, _ = cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer())
    world, batch = 2, 4
    samplers = [ResumableDistributedSampler(len(train), batch, rank, world, seed=3) for rank in range(world)]
    steps = len(train) // batch
    seen = [[idx for step in list(iter(s))[:steps] for idx in step] for s in samplers]
    assert set(seen[0]).isdisjoint(seen[1])  # each row belongs to one rank's shard
    assert len(set(seen[0]) | set(seen[1])) == steps * batch
    # resumable: a sampler restored at step 2 continues with the same indices
    resumed = ResumableDistributedSampler(len(train), batch, 0, world, seed=3)
    resumed.load_state_dict(samplers[0].state_at_step(2))
    fresh = list(iter(ResumableDistributedSampler(len(train), batch, 0, world, seed=3)))
    assert next(iter(resumed)) == fresh[2]


def test_files_source_through_the_data_config(tmp_path):
    from ascend_edit.config import DataConfig
    from ascend_edit.data.cache import load_cached

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    cfg = DataConfig(source="files", path=str(corpus), split_on_blank_lines=True, seq_len=16, eval_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    tokenizer = CountingTokenizer()
    train, _ = load_cached(cfg, tokenizer, seed=0)
    calls = tokenizer.calls
    again, _ = load_cached(cfg, tokenizer, seed=0)
    assert calls > 0 and tokenizer.calls == calls and len(again) == len(train) > 0
    corpus.write_text("\n\n".join(DOCS[:40]))  # the data changed: a new cache
    changed, _ = load_cached(cfg, tokenizer, seed=0)
    assert tokenizer.calls > calls and len(changed) < len(train)


def test_a_cache_file_cut_short_is_named_with_the_fix(tmp_path):
    """A cache file shorter than its manifest says (a full disk, an interrupted copy) is named with what to delete,
    instead of numpy's 'mmap length is greater than file size'."""
    import pytest

    cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer())
    directory = next(tmp_path.iterdir())
    damaged = directory / "train.input_ids.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"data.cache_dir: .*train.input_ids.bin is damaged .*delete"):
        cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer())


def _corpus_config(tmp_path, docs, eval_fraction=0.2, cache=True):
    from ascend_edit.config import DataConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    return DataConfig(source="files", path=str(corpus), split_on_blank_lines=True, seq_len=16,
                      eval_fraction=eval_fraction, cache_dir=str(tmp_path / "cache") if cache else None)


def _texts_of(dataset) -> str:
    """The packed rows back as text (CountingTokenizer: BOS 1, EOS 2, characters by code point)."""
    ids = torch.cat([dataset[i]["input_ids"] for i in range(len(dataset))]).tolist()
    return "".join("|" if t in (1, 2) else chr(t) for t in ids)


def test_held_out_documents_are_the_suites_and_never_trained_on(tmp_path):
    """With a cache, the end-of-run suite's in-domain text (run_documents) is the cache's held-out split, and a
    document present twice in the corpus lands on one side only (was: the suite re-split the text another way, so
    most of its 'held-out' documents had been trained on)."""
    from ascend_edit.data.cache import load_cached
    from ascend_edit.data.heldout import run_documents

    docs = [f"doc{i:03d} " + "abc " * (i % 5 + 2) for i in range(60)]
    cfg = _corpus_config(tmp_path, docs + docs[:30])  # 30 documents twice, as scraped corpora have them
    train, held_out = load_cached(cfg, CountingTokenizer(), seed=0)
    train_text, eval_text = _texts_of(train), _texts_of(held_out)
    suite_train, suite_held_out = run_documents(cfg, seed=0)
    assert suite_held_out and set(suite_held_out).isdisjoint(suite_train)
    for doc in suite_held_out:
        assert doc not in train_text
    assert sum(doc in eval_text for doc in suite_held_out) >= len(suite_held_out) - 1  # the last may be cut off
    assert all(doc not in eval_text for doc in suite_train)


def test_in_memory_split_drops_training_copies_of_held_out_documents(caplog):
    from ascend_edit.data.packing import split_held_out

    docs = [f"document {i}" for i in range(50)]
    with caplog.at_level("WARNING"):
        train, held_out = split_held_out(docs + docs, eval_fraction=0.2, seed=0)
    assert held_out and set(train).isdisjoint(held_out)
    assert len(train) == sum(doc not in set(held_out) for doc in docs + docs)  # every other copy still trains
    assert "copies of held-out documents" in caplog.text


def test_a_tokenizer_changed_in_place_or_text_changed_under_the_same_mtime_is_a_new_cache(tmp_path):
    import os

    from tokenizers import normalizers

    from ascend_edit.data.cache import source_identity
    from tests.helpers.tiny_checkpoint import char_tokenizer

    tokenizer = char_tokenizer(["the cat sees the dog"])
    before = tokenizer_identity(tokenizer)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, other token ids for text
    assert tokenizer_identity(tokenizer) != before

    text = tmp_path / "a.txt"
    text.write_text("the cat sees")
    stat = text.stat()
    identity = source_identity(text)
    text.write_text("the dog sees")  # same size; the modification time put back, as `cp -p` or `rsync -t` do
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert text.stat().st_mtime_ns == stat.st_mtime_ns and source_identity(text) != identity


def test_a_cache_finished_first_by_another_run_is_used(tmp_path):
    """Two runs sharing data.cache_dir build the same key at once: the second to finish keeps the first's cache
    (was: OSError 'Directory not empty' after all its tokenizing)."""
    from ascend_edit.data.cache import build_cache

    directory = tmp_path / key().digest()
    build_cache(directory, iter(DOCS), CountingTokenizer(), key())
    build_cache(directory, iter(DOCS), CountingTokenizer(), key())  # as if it had started before the first ended
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]
    train, _ = cached_train_eval(tmp_path, key(), lambda: iter(()), CountingTokenizer())
    assert len(train) > 0


def test_a_damaged_manifest_or_a_foreign_vocabulary_is_one_line(tmp_path):
    import json

    import pytest

    cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer())
    manifest = next(tmp_path.iterdir()) / "meta.json"
    meta = json.loads(manifest.read_text())
    assert meta["max_token_id"] == max(ord(c) for d in DOCS for c in d)
    with pytest.raises(ValueError, match=r"holds token id 119, beyond the model's vocabulary of 100"):
        cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer(), vocab_size=100)
    for damaged in ("", "{not json", json.dumps({k: v for k, v in meta.items() if k != "eval"})):
        manifest.write_text(damaged)
        with pytest.raises(ValueError, match=r"data.cache_dir: .*meta.json is damaged .*delete") as info:
            cached_train_eval(tmp_path, key(), lambda: iter(DOCS), CountingTokenizer())
        assert "\n" not in str(info.value)


def test_a_small_corpus_whose_hash_split_holds_out_nothing_is_one_line(tmp_path):
    import pytest

    from ascend_edit.data.cache import load_cached

    cfg = _corpus_config(tmp_path, DOCS[:3], eval_fraction=0.05)
    with pytest.raises(ValueError, match=r"held-out split got 0 document\(s\).*data.eval_fraction=0.05"):
        load_cached(cfg, CountingTokenizer(), seed=0)
    assert not list((tmp_path / "cache").iterdir())  # no partial cache left behind


def test_an_empty_corpus_with_a_cache_says_it_is_empty(tmp_path):
    """It said "too little data to pack one train sequence", the in-memory path "no non-empty documents"."""
    import pytest

    from ascend_edit.config import DataConfig
    from ascend_edit.data.cache import load_cached

    (tmp_path / "empty.jsonl").write_text("")
    cfg = DataConfig(source="files", path=str(tmp_path / "empty.jsonl"), seq_len=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data.path: no non-empty documents found in .*empty.jsonl"):
        load_cached(cfg, CountingTokenizer(), seed=0)
