"""data=mix: the weighted stream honours its weights, is deterministic, and resumes exactly."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ascend_edit.config import ConfigError, DataConfig, MixSourceConfig
from ascend_edit.data.mix import (
    MixedDataset,
    SourceSpec,
    block_quotas,
    build_mix,
    mix_documents,
    specs_of,
    wikitext_to_prose,
)
from ascend_edit.data.packing import pack_token_documents
from ascend_edit.data.sampler import ResumableDistributedSampler
from tests.unit.test_data import make_tokenizer


def tagged_source(tag: int, sequences: int, seq_len: int = 8):
    """A packed source whose every token is `tag` * 1000 + the sequence number: items say where they came from."""
    docs = [[tag * 1000 + i] * seq_len for i in range(sequences)]
    return pack_token_documents(docs, seq_len)


def origin(item) -> tuple[int, int]:
    value = int(item["input_ids"][0])
    return divmod(value, 1000)


def test_block_quotas_add_up_and_follow_the_weights():
    assert block_quotas([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    quotas = block_quotas([1, 1, 1], 1024)
    assert sum(quotas) == 1024 and max(quotas) - min(quotas) <= 1
    assert block_quotas([2.0, 0.0], 7) == [7, 0]
    # a small positive weight is drawn (it got no slot: 0.0004 of a 1,024-draw block is 0.4 draws)
    assert block_quotas([1, 1, 1e-4], 1024) == [511, 512, 1]
    assert block_quotas([0.6, 0.3999, 0.0001], 1024) == [613, 410, 1]
    with pytest.raises(ValueError):
        block_quotas([0.0, 0.0], 8)


def test_every_whole_block_holds_each_source_exactly_its_quota():
    sources = [tagged_source(1, 50), tagged_source(2, 7), tagged_source(3, 300)]
    mix = MixedDataset(sources, [0.5, 0.3, 0.2], length=4 * 128, seed=1, block=128)
    for block in range(4):
        counts = Counter(mix.locate(i)[0] for i in range(block * 128, (block + 1) * 128))
        assert [counts[k] for k in range(3)] == mix.quotas == [64, 38, 26]


def test_small_sources_repeat_only_after_every_sequence_was_drawn():
    sources = [tagged_source(1, 5), tagged_source(2, 40)]
    mix = MixedDataset(sources, [0.5, 0.5], length=64, seed=0, block=16)
    draws_of_small = [mix.locate(i)[1] for i in range(64) if mix.locate(i)[0] == 0]
    for start in range(0, len(draws_of_small) - 4, 5):  # each epoch of the small source is a permutation
        assert sorted(draws_of_small[start:start + 5]) == list(range(5))


def test_the_mix_sampler_honours_its_weights():
    """Shuffled training batches (the sampler every stage uses) draw each source at its weight.

    200 steps x 8 sequences = 1,600 draws out of a 4,096-draw epoch; each source's share is within
    4 binomial standard deviations of its weight (sqrt(w(1-w)/1600) <= 0.0125, so <= 0.05).
    """
    weights = [0.6, 0.3, 0.1]
    sources = [tagged_source(1, 100), tagged_source(2, 30), tagged_source(3, 500)]
    mix = MixedDataset(sources, weights, length=4096, seed=7)
    sampler = ResumableDistributedSampler(len(mix), global_batch_size=8, seed=7)
    counts = Counter()
    for step, indices in enumerate(sampler):
        if step == 200:
            break
        counts.update(origin(mix[i])[0] for i in indices)
    total = sum(counts.values())
    for tag, weight in zip((1, 2, 3), weights):
        tolerance = 4 * math.sqrt(weight * (1 - weight) / total)
        assert abs(counts[tag] / total - weight) <= tolerance, (tag, counts[tag] / total, weight)


def test_the_mix_is_deterministic_and_resumes_exactly():
    def fresh():
        sources = [tagged_source(1, 13), tagged_source(2, 29)]
        mix = MixedDataset(sources, [0.7, 0.3], length=200, seed=3, block=32)
        return mix, ResumableDistributedSampler(len(mix), global_batch_size=4, seed=3)

    mix, sampler = fresh()
    run = [[origin(mix[i]) for i in indices] for _, indices in zip(range(120), iter_steps(sampler))]
    # A new process resumes after step 70 from the saved state: same data from there on.
    mix2, sampler2 = fresh()
    sampler2.load_state_dict(sampler.state_at_step(70))
    resumed = [[origin(mix2[i]) for i in indices] for _, indices in zip(range(50), iter_steps(sampler2))]
    assert resumed == run[70:]
    other_seed = MixedDataset([tagged_source(1, 13), tagged_source(2, 29)], [0.7, 0.3], length=200, seed=4, block=32)
    assert [origin(other_seed[i]) for i in range(50)] != [origin(mix[i]) for i in range(50)]


def iter_steps(sampler):
    while True:  # the training loop's pattern: epochs roll over by themselves
        yield from sampler


def test_mix_refuses_mismatched_sources():
    with pytest.raises(ValueError, match="sequence lengths"):
        MixedDataset([tagged_source(1, 4, seq_len=8), tagged_source(2, 4, seq_len=4)], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        MixedDataset([tagged_source(1, 4)], [1, 1])


def test_build_mix_splits_each_source_by_document_and_evaluates_on_the_marked_sources(tmp_path):
    a_docs = [f"alpha{i} " + " ".join(f"a{i}x{j}" for j in range(30)) for i in range(20)]
    b_docs = [f"beta{i} " + " ".join(f"b{i}x{j}" for j in range(30)) for i in range(20)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, (a, b) in enumerate(zip(a_docs, b_docs)):
        (tmp_path / "a" / f"{i:02d}.txt").write_text(a)
        (tmp_path / "b" / f"{i:02d}.txt").write_text(b)
    specs = [SourceSpec("files", 0.25, path=str(tmp_path / "a")),
             SourceSpec("files", 0.75, eval=True, path=str(tmp_path / "b"))]
    tokenizer = make_tokenizer(a_docs + b_docs)
    mix, held_out = build_mix(specs, tokenizer, seq_len=16, eval_fraction=0.2, seed=0)
    train_docs, eval_docs = mix_documents(specs, eval_fraction=0.2, seed=0)
    assert eval_docs and all(doc.startswith("beta") for doc in eval_docs)  # only the eval: true source
    assert not set(eval_docs) & set(train_docs)
    eval_words = {w for doc in eval_docs for w in doc.split()}
    train_ids = {int(t) for i in range(len(mix)) for t in mix[i]["input_ids"]}
    assert not {tokenizer.convert_tokens_to_ids(w) for w in eval_words} & train_ids
    assert len(held_out) > 0 and mix.shares == [0.25, 0.75]


def test_wikitext_becomes_prose():
    raw = ("'''Anarchism''' is a [[political philosophy|philosophy]]{{sfn|Smith|2001}} that rejects "
           "[[hierarchy]].<ref>A book, p. 3</ref> See [http://example.org the site].\n\n"
           "[[File:Flag.svg|thumb|A [[flag]]]]\n{| class=wikitable\n| cell\n|}\n"
           "== History ==\nIt began long ago in many places.\n\n== References ==\n* A reference")
    prose = wikitext_to_prose(raw)
    assert prose.startswith("Anarchism is a philosophy that rejects hierarchy. See the site.")
    assert "\n\nIt began long ago in many places." in prose  # a heading never runs into its paragraph
    for markup in ("[[", "{{", "<ref", "'''", "cell", "reference", "thumb"):
        assert markup not in prose


def test_mix_config_is_validated():
    cfg = DataConfig(source="mix", mix=[MixSourceConfig("shakespeare", 0.5, eval=True), MixSourceConfig("news", 0.5)])
    assert [s.name for s in specs_of(cfg)] == ["shakespeare", "news"]
    with pytest.raises(ConfigError, match="data.mix"):
        DataConfig(source="mix", mix=[])
    with pytest.raises(ConfigError, match="data.mix"):
        MixSourceConfig("poems")
    with pytest.raises(ConfigError, match="path"):
        MixSourceConfig("files")
    with pytest.raises(ConfigError, match="weight"):
        MixSourceConfig("news", weight=-1.0)
    for key, value in (("text_field", "body"), ("split_on_blank_lines", True), ("format", "jsonl")):
        # read by data=files only: a mix took them silently and read its entries' own
        with pytest.raises(ConfigError, match=rf"data.{key} is not read with data.source=mix: .*data.mix\[i\].{key}"):
            DataConfig(source="mix", mix=[MixSourceConfig("news", 1.0)], **{key: value})


def test_a_mix_entry_that_cannot_be_split_is_named_by_its_index_and_path(tmp_path):
    from ascend_edit.data.mix import split_mix

    (tmp_path / "one.txt").write_text("a single document")
    specs = [SourceSpec("files", 0.5, eval=True, path=str(tmp_path / "one.txt")),
             SourceSpec("files", 0.5, path=str(tmp_path / "one.txt"))]
    with pytest.raises(ValueError, match=r"data.mix\[0\] \(source 'files', path .*one.txt\): cannot hold out.*"
                                         r"data.mix\[0\].split_on_blank_lines=true"):
        split_mix(specs, 0.1, 0)


def test_first_items_of_a_mix_are_a_weighted_mix():
    """The warm start calibrates on the first sequences of the training set: they must be a mix too."""
    mix = MixedDataset([tagged_source(1, 100), tagged_source(2, 100)], [0.5, 0.5], seed=0)
    first = Counter(mix.locate(i)[0] for i in range(32))
    assert first[0] >= 8 and first[1] >= 8
    assert torch.equal(mix[5]["input_ids"], mix[5]["input_ids"])


def test_a_held_out_document_is_never_trained_on_even_when_another_entry_holds_it(tmp_path, caplog):
    docs = [f"doc{i} " + " ".join(f"d{i}x{j}" for j in range(20)) for i in range(40)]
    (tmp_path / "a").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "a" / f"{i:02d}.txt").write_text(doc)
    # the same source twice, the second cut short: the two entries split their documents differently
    specs = [SourceSpec("files", 0.5, eval=True, path=str(tmp_path / "a")),
             SourceSpec("files", 0.5, path=str(tmp_path / "a"), max_documents=20)]
    with caplog.at_level("WARNING"):
        train_docs, eval_docs = mix_documents(specs, eval_fraction=0.25, seed=0)
    assert eval_docs and not set(eval_docs) & set(train_docs)
    assert "held-out documents of an evaluation source" in caplog.text


def test_an_entry_of_weight_zero_is_not_read_unless_it_is_evaluated(tmp_path):
    """A weight-0 entry had to split and pack (a one-document file stopped the run) although it is never drawn."""
    cfg = DataConfig(source="mix", mix=[MixSourceConfig("shakespeare", 1.0, eval=True),
                                        MixSourceConfig("files", 0.0, path=str(tmp_path / "missing.txt")),
                                        MixSourceConfig("news", 0.5)])
    assert [s.name for s in specs_of(cfg)] == ["shakespeare", "news"]
    first_is_evaluated = DataConfig(source="mix", mix=[MixSourceConfig("shakespeare", 0.0),
                                                       MixSourceConfig("news", 0.5)])
    assert [s.name for s in specs_of(first_is_evaluated)] == ["shakespeare", "news"]  # no entry marked: the first
