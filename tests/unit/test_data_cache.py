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
