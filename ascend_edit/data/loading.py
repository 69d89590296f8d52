"""A run's training and held-out sets from its `data.*` config: synthetic ids, files, Shakespeare, a mix or a
Megatron/MindSpeed indexed corpus."""
from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from ascend_edit.config import DataConfig
from ascend_edit.data.packing import build_train_eval, pack_token_documents
from ascend_edit.data.sources import DocumentSource, SourceFormat


def synthetic_data(cfg: DataConfig, vocab_size: int, seed: int):
    """Uniform random token ids in documents of random length: for throughput and memory runs only
    (there is nothing to learn in them). Sized to give `synthetic_sequences` packed sequences."""
    generator = torch.Generator().manual_seed(seed)
    total = cfg.synthetic_sequences * cfg.seq_len
    docs, produced = [], 0
    while produced < total * 1.25:
        length = int(torch.randint(cfg.seq_len // 4, 2 * cfg.seq_len, (1,), generator=generator))
        docs.append(torch.randint(0, vocab_size, (length,), generator=generator).tolist())
        produced += length
    held_out = max(1, round(len(docs) * cfg.eval_fraction))
    while held_out < len(docs) - 1 and sum(map(len, docs[:held_out])) < cfg.seq_len:
        held_out += 1  # documents are shorter than a sequence at times: hold out at least one sequence's worth
    try:
        return pack_token_documents(docs[held_out:], cfg.seq_len), pack_token_documents(docs[:held_out], cfg.seq_len)
    except ValueError as err:  # the packer's message names no key
        raise ValueError(f"data.synthetic_sequences={cfg.synthetic_sequences} at data.seq_len={cfg.seq_len} is too "
                         f"little data once the held-out documents are taken ({err}); raise it") from err


def text_source(cfg: DataConfig) -> DocumentSource:
    """The documents a `data.source=shakespeare` or `files` config names (mix and indexed have their own)."""
    if cfg.source == "shakespeare":
        from ascend_edit.assets import shakespeare_dir

        return DocumentSource(shakespeare_dir(), format="text", max_documents=cfg.max_documents)
    if cfg.source != "files":
        raise ValueError(f"data.source={cfg.source} is not read from text files")
    cfg.check_path_named()  # (the tasks that read data have checked it; a direct caller may not have)
    assert cfg.path is not None
    return DocumentSource(Path(cfg.path).expanduser(), format=cast(SourceFormat, cfg.format),  # checked by DataConfig
                          text_field=cfg.text_field, split_on_blank_lines=cfg.split_on_blank_lines,
                          max_documents=cfg.max_documents)


def load_data(cfg: DataConfig, tokenizer, seed: int, vocab_size: int):
    """(train set, held-out set) of packed sequences, split by document."""
    if cfg.source == "synthetic":
        return synthetic_data(cfg, vocab_size, seed)
    if cfg.source == "indexed":  # already tokenized (Megatron/MindSpeed .bin/.idx): no tokenizer needed
        from ascend_edit.data.indexed import indexed_train_eval
        from ascend_edit.train.engine import barrier, rank_and_world

        cfg.check_path_named()  # (the tasks that read data have checked it; a direct caller may not have)
        assert cfg.path is not None
        return indexed_train_eval(cfg.path, cfg.seq_len, cfg.eval_fraction, seed, vocab_size,
                                  cache_dir=cfg.cache_dir, rank=rank_and_world()[0], barrier=barrier)
    if tokenizer is None:
        raise ValueError("this teacher has no tokenizer (model.source=config): use a model with one, "
                         "or feed token ids directly through the Python API")
    if cfg.source == "mix":  # weighted sources, each split by document (ascend_edit/data/mix.py)
        from ascend_edit.data.mix import build_mix, specs_of

        return build_mix(specs_of(cfg), tokenizer, cfg.seq_len, cfg.eval_fraction, seed)
    if cfg.source == "files" and cfg.cache_dir:  # tokenize once into a memory-mapped cache (data/cache.py)
        from ascend_edit.data.cache import load_cached

        return load_cached(cfg, tokenizer, seed, vocab_size)
    documents = text_source(cfg).load()
    return build_train_eval(documents, tokenizer, cfg.seq_len, eval_fraction=cfg.eval_fraction, seed=seed)
