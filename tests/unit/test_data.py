"""Data pipeline: sources, packing (incl. HF's packed-sequence mask), held-out split, sampler."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ascend_edit.data import (
    IGNORE_INDEX,
    PackedDataset,
    ResumableDistributedSampler,
    build_train_eval,
    load_documents,
    pack_documents,
    pack_token_documents,
    split_documents,
    tokenize_documents,
)

SPECIALS = ["<unk>", "<bos>", "<eos>"]


def make_tokenizer(texts: list[str], add_bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words of ``texts``; built locally, nothing downloaded."""
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>" if eos else None
    )


def distinct_documents(count: int, words_per_doc: int) -> list[str]:
    """Documents whose words are unique to them, so a token id tells which document it came from."""
    return [" ".join(f"d{d}w{w}" for w in range(words_per_doc)) for d in range(count)]


# ----------------------------------------------------------------------------------- sources


def test_text_file_is_one_document_or_split_on_blank_line_runs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("first para\nline two\n\n\n   \nsecond para\n\nthird\n", encoding="utf-8")
    assert load_documents(path) == ["first para\nline two\n\n\n   \nsecond para\n\nthird\n"]
    assert load_documents(path, split_on_blank_lines=True) == ["first para\nline two", "second para", "third"]


def test_directory_of_text_files_reads_sorted_files_recursively_and_drops_empty(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    assert load_documents(tmp_path) == ["ay", "bee", "sea"]
    assert load_documents(tmp_path, max_documents=2) == ["ay", "bee"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_documents(path) == ["one", "two"]
    assert load_documents(path, text_field="body") == ["uno", "dos"]


def test_jsonl_records_end_at_newlines_only(tmp_path):
    # JSON strings may hold these unescaped; str.splitlines() would cut a record at each of them
    texts = ["a\u2028b", "c\x85d", "e\x1cf\x1dg\x1eh", "i\u2029j", "k\x0bl\x0cm"]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert load_documents(path) == texts
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\r\n" for t in texts))  # Windows line ends
    assert load_documents(path) == texts


def test_jsonl_missing_field_and_bad_json_name_the_place(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"other": "x"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: no field 'text'"):
        load_documents(path)
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: invalid JSON"):
        load_documents(path)


def test_parquet_reads_the_column_and_reports_a_missing_one(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "id": [1, 2, 3]}), path)
    assert load_documents(path, text_field="content") == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content', 'id'\]\)"):
        load_documents(path)


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(str(single))
    assert load_documents(single) == ["x y", "z"]

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"t": ["tr"]}), "test": datasets.Dataset.from_dict({"t": ["te"]})}
    ).save_to_disk(str(splits))
    assert load_documents(splits, text_field="t", split="test") == ["te"]
    with pytest.raises(ValueError, match="pass split="):
        load_documents(splits, text_field="t")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_documents(splits, split="train")


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_documents(tmp_path / "does-not-exist.txt")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"extension '\.md'"):
        load_documents(tmp_path / "notes.md")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8"):
        load_documents(tmp_path / "bad.txt")
    (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="several formats"):
        load_documents(tmp_path)
    assert load_documents(tmp_path, format="jsonl") == ["x"]
    with pytest.raises(ValueError, match="unknown data format"):
        load_documents(tmp_path, format="csv")


# ----------------------------------------------------------------------------------- packing


def test_pack_layout_restarts_positions_at_documents_and_masks_cross_document_targets():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36], [41]]
    packed = pack_token_documents(docs, seq_len=4)
    # stream: 11 12 13 21 | 22 31 32 33 | 34 35 36 41  (nothing dropped)
    assert packed.input_ids.tolist() == [[11, 12, 13, 21], [22, 31, 32, 33], [34, 35, 36, 41]]
    # "restart": the carried-over chunks (22 of doc 2, 34.. of doc 3) start again at 0.
    assert packed.position_ids.tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 0]]
    x = IGNORE_INDEX
    assert packed.labels.tolist() == [[x, 12, 13, x], [22, x, 32, 33], [34, 35, 36, x]]
    # loss_mask[t]: logits[t] predicts input_ids[t+1] inside the same document.
    assert packed.loss_mask.tolist() == [
        [True, True, False, False],
        [False, True, True, False],
        [True, True, False, False],
    ]
    assert (packed.num_documents, packed.dropped_tokens, len(packed)) == (4, 0, 3)

    continued = pack_token_documents(docs, seq_len=4, continued_positions="continue")
    assert continued.position_ids.tolist() == [[0, 1, 2, 0], [1, 0, 1, 2], [3, 4, 5, 0]]
    assert torch.equal(continued.labels, packed.labels) and torch.equal(continued.loss_mask, packed.loss_mask)


def test_pack_drops_the_partial_tail_and_counts_only_documents_that_made_it():
    packed = pack_token_documents([[1, 2, 3], [4, 5, 6], [7, 8, 9]], seq_len=4)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (packed.dropped_tokens, packed.num_documents) == (1, 3)
    packed = pack_token_documents([[1, 2, 3, 4], [5]], seq_len=4)
    assert (packed.dropped_tokens, packed.num_documents) == (1, 1)


def test_pack_rejects_too_little_data_with_the_numbers():
    with pytest.raises(ValueError, match=r"5 tokens in 2 documents, fewer than one sequence of seq_len=8"):
        pack_token_documents([[1, 2, 3], [4, 5]], seq_len=8)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        pack_token_documents([[1, 2, 3]], seq_len=1)
    with pytest.raises(ValueError, match="continued_positions"):
        pack_token_documents([[1, 2, 3]], seq_len=2, continued_positions="reset")


def test_tokenize_adds_the_tokenizers_bos_and_one_eos_per_document():
    texts = ["a b c", "d e", "   "]
    bos_tokenizer = make_tokenizer(texts)
    a, b, c, d, e = (bos_tokenizer.convert_tokens_to_ids(w) for w in "abcde")
    assert tokenize_documents(texts, bos_tokenizer) == [[1, a, b, c, 2], [1, d, e, 2]]
    assert tokenize_documents(texts, bos_tokenizer, append_eos=False) == [[1, a, b, c], [1, d, e]]
    # A tokenizer that adds no BOS and has no EOS gets neither.
    plain = make_tokenizer(texts, add_bos=False, eos=False)
    assert tokenize_documents(texts, plain) == [[a, b, c], [d, e]]
    # A document that already ends with EOS does not get a second one.
    assert tokenize_documents(["a <eos>"], bos_tokenizer) == [[1, a, 2]]


def test_pack_documents_with_a_tokenizer_and_a_dataloader():
    texts = distinct_documents(count=5, words_per_doc=6)  # 8 tokens each with BOS + EOS
    dataset = pack_documents(texts, make_tokenizer(texts), seq_len=16)
    assert isinstance(dataset, PackedDataset) and len(dataset) == 2 and dataset.dropped_tokens == 8
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 16)
    assert batch["loss_mask"].dtype == torch.bool
    assert batch["position_ids"][0].tolist() == list(range(8)) * 2


def test_split_by_document_is_deterministic_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(20)]
    train, held_out = split_documents(docs, eval_fraction=0.25, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert sorted(train + held_out) == sorted(docs) and not set(train) & set(held_out)
    assert split_documents(docs, 0.25, seed=3) == (train, held_out)
    assert split_documents(docs, 0.25, seed=4)[1] != held_out
    assert train == [d for d in docs if d in train]  # original order kept
    assert split_documents(["a", "b"], 0.01, seed=0)[1] != []  # at least one eval document
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="only 1 document"):
        split_documents(["only"], 0.5)


def test_build_train_eval_leaks_no_document_across_the_split():
    texts = distinct_documents(count=12, words_per_doc=10)
    tokenizer = make_tokenizer(texts)
    train, held_out = build_train_eval(texts, tokenizer, seq_len=8, eval_fraction=0.25, seed=0)
    assert held_out is not None
    special = {0, 1, 2}
    train_tokens = set(train.input_ids.unique().tolist()) - special
    eval_tokens = set(held_out.input_ids.unique().tolist()) - special
    assert train_tokens and eval_tokens and not train_tokens & eval_tokens
    owner = {tokenizer.convert_tokens_to_ids(w): d for d, text in enumerate(texts) for w in text.split()}
    assert len({owner[t] for t in eval_tokens}) == 3  # 25% of 12 documents
    with pytest.raises(ValueError, match=r"eval split \(3 held-out documents\): too little data"):
        build_train_eval(texts, tokenizer, seq_len=64, eval_fraction=0.25)


# ------------------------------------------- transformers builds the packed (block-diagonal) mask


def tiny_llama(vocab_size: int, attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards_per_document(attn_implementation):
    texts = ["a b c d e", "f g", "h i j k l m n"]
    tokenizer = make_tokenizer(texts)
    docs = tokenize_documents(texts, tokenizer)  # lengths 7, 4, 9 = 20 tokens
    packed = pack_token_documents(docs, seq_len=20)
    model = tiny_llama(len(tokenizer), attn_implementation)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        plain_causal = model(input_ids=packed.input_ids, use_cache=False).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
            start += len(doc)
    # Control: without position_ids the mask is plain causal and later documents see earlier ones.
    assert (plain_causal[7:] - logits[7:]).abs().max() > 1e-3


def test_labels_and_loss_mask_describe_the_same_targets():
    texts = ["a b c d e", "f g", "h i j k l m n", "o p q"]
    tokenizer = make_tokenizer(texts)
    packed = pack_documents(texts, tokenizer, seq_len=8)
    model = tiny_llama(len(tokenizer), "sdpa")
    with torch.no_grad():
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, labels=packed.labels, use_cache=False)
    # Cross-entropy of logits[t] against input_ids[t+1], averaged where loss_mask is set.
    targets = torch.roll(packed.input_ids, shifts=-1, dims=1)
    per_token = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(out.loss, per_token[packed.loss_mask].mean(), atol=1e-5, rtol=1e-5)


def test_continued_chunk_positions_do_not_change_rope_attention():
    # Why "restart" is a safe default: RoPE attention depends on position differences only.
    docs = [list(range(3, 23)), [5, 6, 7, 8]]  # the 20-token document spans rows 0-2 of 8 tokens
    restart = pack_token_documents(docs, seq_len=8, continued_positions="restart")
    carried = pack_token_documents(docs, seq_len=8, continued_positions="continue")
    assert not torch.equal(restart.position_ids, carried.position_ids)
    model = tiny_llama(32, "sdpa")
    with torch.no_grad():
        a = model(input_ids=restart.input_ids, position_ids=restart.position_ids, use_cache=False).logits
        b = model(input_ids=carried.input_ids, position_ids=carried.position_ids, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- sampler


def run_steps(sampler: ResumableDistributedSampler, steps: int) -> list[list[int]]:
    """``steps`` batches, crossing epoch boundaries like a step-based training loop does."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        for batch in sampler:
            batches.append(batch)
            if len(batches) == steps:
                break
    return batches


def test_ranks_split_each_global_batch_without_overlap():
    world, global_batch, length = 4, 8, 37  # 4 steps per epoch, 5 samples dropped
    samplers = [
        ResumableDistributedSampler(length, global_batch, rank=r, world_size=world, seed=1) for r in range(world)
    ]
    assert all(s.steps_per_epoch == 4 and len(s) == 4 and s.local_batch_size == 2 for s in samplers)
    per_rank = [run_steps(s, 4) for s in samplers]
    seen: set[int] = set()
    for step in range(4):
        union = [i for rank_batches in per_rank for i in rank_batches[step]]
        assert len(union) == global_batch and len(set(union)) == global_batch
        assert not seen & set(union)  # no sample twice in one epoch
        seen |= set(union)
    assert len(seen) == 32 and all(0 <= i < length for i in seen)


def test_resume_from_state_continues_the_uninterrupted_sequence():
    uninterrupted = run_steps(ResumableDistributedSampler(20, 4, rank=1, world_size=2, seed=7), 13)

    first = ResumableDistributedSampler(20, 4, rank=1, world_size=2, seed=7)
    head = run_steps(first, 7)  # stops mid-epoch 1 (5 steps per epoch)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)

    resumed = ResumableDistributedSampler(20, 4, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    assert head + run_steps(resumed, 6) == uninterrupted

    from_step = ResumableDistributedSampler(20, 4, rank=1, world_size=2, seed=7)
    from_step.load_state_dict(from_step.state_at_step(7))
    assert run_steps(from_step, 6) == uninterrupted[7:]


def test_resume_on_another_world_size_keeps_the_global_batches():
    two_ranks = [ResumableDistributedSampler(24, 8, rank=r, world_size=2, seed=0) for r in range(2)]
    one_rank = ResumableDistributedSampler(24, 8, rank=0, world_size=1, seed=0)
    one_rank.load_state_dict(two_ranks[0].state_at_step(1))
    expected = two_ranks[0].indices(0, 1) + two_ranks[1].indices(0, 1)
    assert next(iter(one_rank)) == expected


def test_seeds_and_epochs_reshuffle_deterministically():
    def first_epoch(seed: int, shuffle: bool = True) -> list[list[int]]:
        return run_steps(ResumableDistributedSampler(64, 8, seed=seed, shuffle=shuffle), 8)

    assert first_epoch(0) == first_epoch(0)
    assert first_epoch(0) != first_epoch(1)
    sampler = ResumableDistributedSampler(64, 8, seed=0)
    assert sampler.indices(0, 0) != sampler.indices(1, 0)
    assert [i for batch in first_epoch(0, shuffle=False) for i in batch] == list(range(64))


def test_sampler_rejects_bad_settings_and_foreign_state():
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableDistributedSampler(100, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(100, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableDistributedSampler(7, 8)
    state = ResumableDistributedSampler(100, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        ResumableDistributedSampler(100, 8, seed=2).load_state_dict(state)


def test_sampler_drives_a_dataloader():
    dataset = pack_token_documents([list(range(64))], seq_len=4)  # 16 sequences
    sampler = ResumableDistributedSampler(len(dataset), 4, rank=0, world_size=2, seed=0)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 4 and all(b["input_ids"].shape == (2, 4) for b in batches)
    assert (sampler.epoch, sampler.position) == (1, 0)


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_synthetic_data_holds_out_at_least_one_sequence_whatever_the_seed(seed):
    """At seeds whose first document is shorter than a sequence, 16 synthetic sequences failed to pack the held-out
    set ("too little data to pack", naming no key); too few sequences now name data.synthetic_sequences."""
    from ascend_edit.config import DataConfig
    from ascend_edit.data.loading import synthetic_data

    train, held_out = synthetic_data(DataConfig(source="synthetic", synthetic_sequences=16, seq_len=32), 100, seed)
    assert len(train) >= 16 and len(held_out) >= 1
    with pytest.raises(ValueError, match=r"data.synthetic_sequences=1 at data.seq_len=32 is too little data"):
        synthetic_data(DataConfig(source="synthetic", synthetic_sequences=1, seq_len=32), 100, seed)
