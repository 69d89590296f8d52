"""Tokenize once into a memory-mapped cache of packed sequences; every later run (and rank) maps it.

Layout of one cache (`<cache_root>/<key>/`), Megatron-style raw arrays plus a JSON manifest:

    train.input_ids.bin   int32 [N, seq_len]   token ids
    train.position_ids.bin int32 [N, seq_len]  positions, restarting per document (see packing.py)
    train.doc_start.bin   uint8 [N, seq_len]   1 where a document starts (gives labels and loss_mask)
    eval.*.bin            the same for the held-out documents
    meta.json             shapes, counts and what the key was made of — written last

The key hashes the data's identity (paths, sizes, modification times and a digest of each file's first and
last 64 KiB, format options), the tokenizer (its name and a digest of its vocabulary, special tokens and the whole
tokenization pipeline) and the packing settings, so a change to any of them builds a new cache and nothing
stale is read. Packing streams: documents are tokenized in batches (the Rust
tokenizer encodes a batch in parallel) and full rows are appended to the files as they fill, so a corpus
larger than memory packs with bounded memory. Held-out documents are chosen by a seeded hash of their
text (streaming, no global shuffle; copies of one document all fall on the same side). Only rank 0 builds; other ranks wait and map the same files, and
the sampler hands each rank its own rows, so a rank reads (pages in) only its shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ascend_edit.data.packing import IGNORE_INDEX

log = logging.getLogger(__name__)

FIELDS = {"input_ids": np.int32, "position_ids": np.int32, "doc_start": np.uint8}
MANIFEST = "meta.json"
TOKENIZE_BATCH = 1024


@dataclass(frozen=True)
class PackingKey:
    """Everything the cached arrays depend on."""

    data: dict  # identity of the source: see `source_identity`
    tokenizer: str  # see `tokenizer_identity`
    seq_len: int
    eval_fraction: float
    seed: int
    append_eos: bool = True
    split: str = "text-hash"  # how held-out documents are chosen (`is_held_out`); caches of another rule are not read

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


SAMPLE_BYTES = 64 << 10  # per end of each file: a corpus of many files is not read whole at every start


def _ends_digest(path: Path, size: int) -> str:
    """Digest of a file's first and last 64 KiB: an edit that keeps the size and the modification time (a copy
    with `cp -p`, `rsync -t`, tar) still changes the key unless it falls wholly in the middle of a large file."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def source_identity(path: str | Path, files: Iterable[Path] | None = None, **options) -> dict:
    """Paths, sizes, modification times and end digests of `files` (default: every file under `path`), plus the
    reading options."""
    path = Path(path).expanduser().resolve()
    if files is not None:
        chosen = sorted(Path(p).expanduser().resolve() for p in files)
    else:
        chosen = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(p, p.stat()) for p in chosen]
    return {"files": [[str(p), st.st_size, st.st_mtime_ns, _ends_digest(p, st.st_size)] for p, st in stats],
            **options}


def tokenizer_identity(tokenizer) -> str:
    """Name plus a digest of the vocabulary, the special tokens and (for a fast tokenizer) its whole pipeline —
    normalizer, pre-tokenizer, merges, post-processor — so a tokenizer fixed in place under one name differs."""
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    extra = [getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "add_bos_token",
                                                         "add_eos_token")]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else ""
    digest = hashlib.sha256(json.dumps([vocab, extra, pipeline]).encode()).hexdigest()[:16]
    return f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}:{digest}"


def is_held_out(text: str, fraction: float, seed: int) -> bool:
    """Seeded, streaming hold-out choice of a document by its text: every copy of a document falls on the
    same side, so held-out text is never trained on."""
    h = hashlib.blake2b(f"{seed}:".encode() + text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def hash_split(documents: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents exactly as a cache built with `fraction` and `seed` splits them."""
    train: list[str] = []
    held_out: list[str] = []
    for text in documents:
        if text.strip():  # `_tokenized` skips blank documents
            (held_out if fraction and is_held_out(text, fraction, seed) else train).append(text)
    return train, held_out


def publish_first_wins(tmp: Path, directory: Path, manifest: str) -> None:
    """Rename a finished temporary build to `directory`. When another run sharing the cache finished the same
    build first, its complete copy is kept and this one is dropped (the key makes the two identical)."""
    try:
        os.replace(tmp, directory)
    except OSError:
        if not (directory / manifest).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary directory this run created
        log.info("data cache %s was finished by another run first: using it", directory)


class _RowWriter:
    """Appends packed rows of one split to its .bin files; keeps only the unfinished row in memory."""

    def __init__(self, directory: Path, split: str, seq_len: int):
        self.seq_len, self.rows, self.dropped = seq_len, 0, 0
        # open for the whole build (rows are appended as they fill); closed by `close`
        self.files = {name: open(directory / f"{split}.{name}.bin", "wb") for name in FIELDS}  # noqa: SIM115
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.start: list[int] = []
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        self.documents += 1
        self.ids += ids
        self.pos += range(len(ids))
        self.start += [1] + [0] * (len(ids) - 1)
        while len(self.ids) >= self.seq_len:
            self._flush_row()

    def _flush_row(self) -> None:
        n = self.seq_len
        ids, pos, start = self.ids[:n], np.asarray(self.pos[:n]), np.asarray(self.start[:n])
        del self.ids[:n], self.pos[:n], self.start[:n]
        if not start[0]:  # a document carried over from the previous row restarts at position 0
            first = int(np.argmax(start)) if start.any() else n
            pos[:first] -= pos[0]
        for name, values in (("input_ids", ids), ("position_ids", pos), ("doc_start", start)):
            self.files[name].write(np.asarray(values, dtype=FIELDS[name]).tobytes())
        self.rows += 1

    def close(self) -> dict:
        self.dropped = len(self.ids)
        for f in self.files.values():
            f.close()
        return {"rows": self.rows, "documents": self.documents, "dropped_tokens": self.dropped}


def _tokenized(documents: Iterable[str], tokenizer, append_eos: bool) -> Iterator[tuple[str, list[int]]]:
    """(text, token ids) of every non-blank document, tokenized in batches."""
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    batch: list[str] = []

    def encode(texts):
        for text, ids in zip(texts, tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]):
            ids = list(ids)
            if ids and eos is not None and ids[-1] != eos:
                ids.append(eos)
            if ids:
                yield text, ids

    for text in documents:
        if text.strip():
            batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def build_cache(directory: Path, documents: Iterable[str], tokenizer, key: PackingKey) -> dict:
    """Tokenize and pack `documents` into `directory` (written to a temporary sibling, then renamed)."""
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        writers = {split: _RowWriter(tmp, split, key.seq_len) for split in ("train", "eval")}
        max_id = -1
        for text, ids in _tokenized(documents, tokenizer, key.append_eos):
            split = "eval" if key.eval_fraction and is_held_out(text, key.eval_fraction, key.seed) else "train"
            writers[split].add(ids)
            max_id = max(max_id, max(ids))
        splits = {s: w.close() for s, w in writers.items()}
        meta: dict[str, Any] = {"key": asdict(key), "seq_len": key.seq_len, "max_token_id": max_id, **splits}
        if meta["train"]["documents"] + meta["eval"]["documents"] == 0:  # said as the in-memory path says it
            files = [str(entry[0]) for entry in key.data.get("files", [])]
            raise ValueError(f"data.path: no non-empty documents found in {', '.join(files[:3]) or 'the source'}")
        if meta["train"]["rows"] == 0:
            raise ValueError(f"too little data to pack one train sequence of seq_len={key.seq_len}")
        if key.eval_fraction and meta["eval"]["rows"] == 0:
            raise ValueError(
                f"data.cache_dir: the held-out split got {meta['eval']['documents']} document(s), which pack into no "
                f"row of data.seq_len={key.seq_len} tokens (a cache picks each document by a hash of its text, so "
                f"data.eval_fraction={key.eval_fraction} of a small corpus can be nothing); raise "
                "data.eval_fraction, or leave data.cache_dir unset for a corpus this small (its split holds out an "
                "exact share)")
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))  # last: a cache without it is incomplete
        publish_first_wins(tmp, directory, MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary directory this call created
        raise
    return meta


class MappedPackedDataset(torch.utils.data.Dataset):
    """Packed sequences read from the memory-mapped cache; items match `PackedDataset`'s."""

    def __init__(self, directory: Path, split: str, rows: int, seq_len: int, num_documents: int = 0):
        for name, dtype in FIELDS.items():  # a file cut short (disk full, a copy interrupted) is named, not mapped
            path = directory / f"{split}.{name}.bin"
            expected = rows * seq_len * np.dtype(dtype).itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                found = "missing" if size is None else f"{size:,} bytes, its manifest says {expected:,}"
                raise ValueError(f"data.cache_dir: {path} is damaged ({found}); delete {directory} and the next run "
                                 "tokenizes the data again")
        self.arrays = {name: np.memmap(directory / f"{split}.{name}.bin", dtype=dtype, mode="r",
                                       shape=(rows, seq_len)) for name, dtype in FIELDS.items()}
        self.num_documents, self._seq_len = num_documents, seq_len

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def __len__(self) -> int:
        return self.arrays["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.arrays["input_ids"][index].astype(np.int64))
        start = torch.from_numpy(self.arrays["doc_start"][index].astype(bool))
        loss_mask = torch.zeros_like(start)
        loss_mask[:-1] = ~start[1:]
        return {"input_ids": ids,
                "position_ids": torch.from_numpy(self.arrays["position_ids"][index].astype(np.int64)),
                "labels": ids.masked_fill(start, IGNORE_INDEX), "loss_mask": loss_mask}


def read_manifest(directory: Path) -> dict:
    """A cache's meta.json, or one line naming it when it is not one this module wrote."""
    path = directory / MANIFEST
    try:
        meta = json.loads(path.read_text())
        for split in ("train", "eval"):
            int(meta[split]["rows"]), int(meta[split]["documents"])
        int(meta["seq_len"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"data.cache_dir: {path} is damaged ({type(error).__name__}: {error}); delete {directory} "
                         "and the next run tokenizes the data again") from None
    return meta


def cached_train_eval(cache_root: str | Path, key: PackingKey, documents: Callable[[], Iterable[str]], tokenizer,
                      rank: int = 0, barrier: Callable[[], None] = lambda: None, vocab_size: int | None = None):
    """(train, eval or None) from the cache for `key`, building it first (rank 0 only) when absent.

    `documents` is called only when the cache is built, so a reused cache reads no text and runs no
    tokenizer. `vocab_size`: the model's; a cache holding a larger token id is refused.
    """
    directory = Path(cache_root).expanduser() / key.digest()
    if rank == 0 and not (directory / MANIFEST).exists():
        log.info("tokenizing into %s", directory)
        build_cache(directory, documents(), tokenizer, key)
    barrier()
    if not (directory / MANIFEST).exists():
        raise FileNotFoundError(f"data.cache_dir: {directory} is incomplete on this node: rank 0 did not finish "
                                "building it, or data.cache_dir is not on a filesystem every node shares (only "
                                "global rank 0 builds the cache)")
    meta = read_manifest(directory)
    max_id = meta.get("max_token_id")
    if vocab_size is not None and isinstance(max_id, int) and max_id >= vocab_size:
        raise ValueError(f"data.cache_dir: {directory} holds token id {max_id}, beyond the model's vocabulary of "
                         f"{vocab_size}: the tokenizer does not match the model (model.path)")
    train = MappedPackedDataset(directory, "train", meta["train"]["rows"], meta["seq_len"], meta["train"]["documents"])
    held_out = None
    if meta["eval"]["rows"]:
        held_out = MappedPackedDataset(directory, "eval", meta["eval"]["rows"], meta["seq_len"],
                                       meta["eval"]["documents"])
    return train, held_out


def load_cached(cfg, tokenizer, seed: int, vocab_size: int | None = None):
    """`data.source=files` with `data.cache_dir`: (train, eval) from the cache, built on first use.
    `cfg` is the DataConfig."""
    from ascend_edit.data.loading import text_source
    from ascend_edit.train.engine import barrier, rank_and_world

    if not Path(cfg.path).expanduser().exists():
        raise FileNotFoundError(f"data.path={cfg.path} does not exist")
    source = text_source(cfg)
    options = {"format": source.format, "text_field": source.text_field,
               "split_on_blank_lines": source.split_on_blank_lines, "max_documents": source.max_documents}
    key = PackingKey(data=source_identity(source.path, source.files_read(), **options), tokenizer=tokenizer_identity(tokenizer),
                     seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction, seed=seed)

    rank, _ = rank_and_world()
    return cached_train_eval(cfg.cache_dir, key, lambda: source, tokenizer, rank=rank, barrier=barrier,
                             vocab_size=vocab_size)
