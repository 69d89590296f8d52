"""Corpora prepared for Megatron-LM / MindSpeed, read directly: `data.source=indexed data.path=<prefix>`.

`tools/preprocess_data.py` of Megatron-LM and MindSpeed-LLM writes a tokenized corpus as two files, an
*indexed dataset*:

    <prefix>.bin   the token ids of every sequence, back to back, in the index's dtype
    <prefix>.idx   little-endian: magic b"MMIDIDX\\x00\\x00" (9 bytes), version u64 (= 1), dtype code u8
                   (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16),
                   sequence count S u64, document count D u64, then S sequence lengths (int32, tokens),
                   S sequence pointers (int64, byte offsets into .bin) and D document indices (int64:
                   document d is sequences [idx[d], idx[d + 1]); idx[0] = 0, idx[-1] = S, so D counts
                   the documents plus one)

Both files are memory-mapped read-only (`np.memmap`); nothing is unpickled and no token is copied into
memory until a row is read. The index is checked when the corpus is opened (magic, version, dtype, sizes,
document bounds, contiguous pointers), so a wrong or damaged file is one line naming `data.path`.

Packing is the project's own (data/packing.py), computed lazily: a split's documents are concatenated in
corpus order and cut into rows of `seq_len` tokens, positions restart at every document start, the
carried-over head of a split document restarts at 0, labels are masked at document starts and the last,
partial row is dropped — the same rows `pack_token_documents` builds from the same documents. No EOS is
added: the corpus carries whatever `preprocess_data.py --append-eod` put there, and document starts are
known from the index anyway. Held-out documents are chosen by a seeded hash of their index (vectorised,
no shuffle), so every rank makes the same split without communicating, and the sampler hands each rank
its own rows. Held in memory per split: two int64 per document (stream offsets), not the tokens.

The index carries no tokenizer: the corpus must have been tokenized with the teacher's tokenizer. What
can be checked is checked — every token id must be below the model's vocabulary size (a prefix of the
corpus when it is opened, and every row as it is read).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ascend_edit.data.packing import IGNORE_INDEX

log = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# Megatron's dtype codes; the float ones cannot hold token ids and are refused.
TOKEN_DTYPES: dict[int, type[np.integer]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                             8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float32"}
VOCAB_SCAN_TOKENS = 1 << 26  # tokens checked against the vocabulary when the corpus is opened
_HASH_CHUNK = 1 << 22
_CHECK_CHUNK = 1 << 22


class IndexedDataError(ValueError):
    """A Megatron indexed dataset is missing, damaged or does not fit the model; the message names the key."""


def files_of(prefix: str | Path) -> tuple[Path, Path]:
    """(`<prefix>.bin`, `<prefix>.idx`); a path given with either suffix is read as its prefix."""
    path = Path(prefix).expanduser()
    if path.suffix in (".bin", ".idx"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".bin"), path.with_name(path.name + ".idx")


@dataclass
class IndexedCorpus:
    """An opened, checked indexed dataset, all memory-mapped: the tokens and the index's pointer and
    document arrays. Document spans are computed on demand (`document_spans`), never for all at once."""

    prefix: str
    tokens: np.ndarray  # memmap over <prefix>.bin, 1-D, the index's dtype
    pointers: np.ndarray  # memmap int64 [sequences], byte offset of each sequence in .bin
    doc_index: np.ndarray  # memmap int64 [documents + 1], document d = sequences [doc_index[d], doc_index[d + 1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    def _sequence_start(self, sequences: np.ndarray) -> np.ndarray:
        """Token offset where each sequence starts; the sequence count maps to the end of the tokens."""
        out = np.full(len(sequences), len(self.tokens), dtype=np.int64)
        inside = sequences < len(self.pointers)
        out[inside] = np.asarray(self.pointers[sequences[inside]]) // self.tokens.dtype.itemsize
        return out

    def document_spans(self, documents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token offset, token count) of each of `documents` (indices)."""
        starts = self._sequence_start(np.asarray(self.doc_index[documents]))
        return starts, self._sequence_start(np.asarray(self.doc_index[documents + 1])) - starts

    def document(self, index: int) -> np.ndarray:
        (start,), (length,) = self.document_spans(np.array([index]))
        return self.tokens[start:start + length]


def read_header(idx: Path, key: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document count) of an index file, checked; `key` names it in errors."""
    size = idx.stat().st_size
    with open(idx, "rb") as handle:
        head = handle.read(HEADER.size)
    magic = head[:len(INDEX_MAGIC)]
    if not INDEX_MAGIC.startswith(magic):  # a short file that starts like an index is only truncated
        raise IndexedDataError(f"{key}: {idx.name} is not a Megatron/MindSpeed indexed dataset (starts with "
                               f"{magic!r}, not {INDEX_MAGIC!r})")
    if len(head) < HEADER.size:
        raise IndexedDataError(f"{key}: {idx.name} is truncated ({size} bytes, shorter than the "
                               f"{HEADER.size}-byte header)")
    _, version, code, sequences, documents = HEADER.unpack(head)
    if version != INDEX_VERSION:
        raise IndexedDataError(f"{key}: {idx.name} has index version {version}; only version {INDEX_VERSION} "
                               "(Megatron-LM / MindSpeed preprocess_data.py) is read")
    if code in FLOAT_CODES:
        raise IndexedDataError(f"{key}: {idx.name} holds {FLOAT_CODES[code]} values, not token ids")
    if code not in TOKEN_DTYPES:
        raise IndexedDataError(f"{key}: {idx.name} has an unknown dtype code {code} (known: "
                               f"{sorted([*TOKEN_DTYPES, *FLOAT_CODES])})")
    needed = HEADER.size + 12 * sequences + 8 * documents  # int32 lengths + int64 pointers, int64 doc indices
    if size < needed:
        raise IndexedDataError(f"{key}: {idx.name} is truncated ({size:,} bytes; its header lists {sequences:,} "
                               f"sequences and {documents:,} document indices, which need {needed:,})")
    return np.dtype(TOKEN_DTYPES[code]), sequences, documents


def open_indexed(prefix: str | Path, key: str = "data.path") -> IndexedCorpus:
    """Map `<prefix>.bin` / `<prefix>.idx` read-only and check that they form one whole indexed dataset."""
    bin_path, idx_path = files_of(prefix)
    where = f"{key}={prefix}"
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise IndexedDataError(f"{where}: {path} does not exist (give the prefix of a Megatron/MindSpeed "
                                   "<prefix>.bin + <prefix>.idx pair)")
    dtype, sequences, documents = read_header(idx_path, where)
    offset = HEADER.size
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=offset, shape=(sequences,)) \
        if sequences else np.zeros(0, np.int32)
    offset += 4 * sequences
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offset, shape=(sequences,)) \
        if sequences else np.zeros(0, np.int64)
    offset += 8 * sequences
    doc_index = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offset, shape=(documents,)) \
        if documents else np.zeros(0, np.int64)
    if documents < 2 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise IndexedDataError(f"{where}: {idx_path.name} has inconsistent document indices (expected "
                               f"0 = idx[0] <= ... <= idx[-1] = {sequences:,} sequences, with >= 1 document)")
    itemsize = dtype.itemsize
    # Chunked, so that checking a corpus of billions of sequences holds no array of that size.
    for begin in range(0, max(sequences, documents), _CHECK_CHUNK):
        doc_chunk = np.asarray(doc_index[begin:begin + _CHECK_CHUNK + 1])
        if np.any(np.diff(doc_chunk) < 0):
            raise IndexedDataError(f"{where}: {idx_path.name} has decreasing document indices")
        length_chunk = np.asarray(lengths[begin:begin + _CHECK_CHUNK]).astype(np.int64)
        pointer_chunk = np.asarray(pointers[begin:begin + _CHECK_CHUNK + 1])
        if np.any(length_chunk < 0):
            raise IndexedDataError(f"{where}: {idx_path.name} lists negative sequence lengths")
        if len(pointer_chunk) and (begin == 0 and pointer_chunk[0] != 0 or np.any(
                np.diff(pointer_chunk) != length_chunk[:len(pointer_chunk) - 1] * itemsize)):
            raise IndexedDataError(f"{where}: {idx_path.name} has sequence pointers that are not the sequences "
                                   "laid back to back (not written by Megatron's IndexedDatasetBuilder)")
    total = (int(pointers[-1]) // itemsize + int(lengths[-1])) if sequences else 0
    bin_size = bin_path.stat().st_size
    if bin_size != total * itemsize:  # Megatron's builder writes exactly the indexed tokens
        problem = "is truncated" if bin_size < total * itemsize else "is longer than its index describes"
        if total and bin_size % total == 0 and bin_size // total in (1, 2, 4, 8):
            problem += (f": its size fits {bin_size // total}-byte tokens, not the index's {dtype.name} (the .bin and "
                        ".idx come from different preprocessing runs?)")
        raise IndexedDataError(f"{where}: {bin_path.name} {problem} ({bin_size:,} bytes; the index needs "
                               f"{total:,} {dtype.name} tokens = {total * itemsize:,} bytes)")
    if total == 0:
        raise IndexedDataError(f"{where}: the indexed dataset holds no tokens")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,))
    return IndexedCorpus(str(prefix), tokens, pointers, doc_index)


def check_vocabulary(corpus: IndexedCorpus, vocab_size: int, key: str = "data.path",
                     max_tokens: int = VOCAB_SCAN_TOKENS) -> None:
    """Token ids must lie in [0, vocab_size): checked on the first `max_tokens` tokens (a dtype that cannot
    hold an out-of-range id needs no scan). Rows are checked again as they are read."""
    info = np.iinfo(corpus.tokens.dtype)
    if corpus.tokens.dtype.itemsize <= 2 and vocab_size >= 65500:
        # preprocess_data.py picks uint16 only for tokenizers of fewer than 65,500 tokens
        log.warning("%s=%s holds %s token ids, which Megatron/MindSpeed write only for tokenizers of < 65,500 "
                    "tokens; the model has %d: was the corpus tokenized with the teacher's tokenizer?", key,
                    corpus.prefix, corpus.tokens.dtype.name, vocab_size)
    if info.min >= 0 and info.max < vocab_size:
        return
    head = corpus.tokens[:max_tokens]
    low, high = int(head.min()), int(head.max())
    if low < 0 or high >= vocab_size:
        raise IndexedDataError(_vocabulary_problem(corpus.prefix, key, low, high, vocab_size))


def _vocabulary_problem(prefix: str, key: str, low: int, high: int, vocab_size: int) -> str:
    return (f"{key}={prefix}: token ids reach {high if high >= vocab_size else low}, outside the model's "
            f"vocabulary of {vocab_size:,}: the corpus must be tokenized with the teacher's own tokenizer "
            "(the .idx does not record which tokenizer made it)")


def held_out_mask(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out: a seeded 64-bit hash (splitmix64) of each index below `fraction`.
    Vectorised in chunks; the same on every rank and every run."""
    mask = np.zeros(num_documents, dtype=bool)
    if fraction <= 0:
        return mask
    mix = np.uint64((seed * 0x9E3779B97F4A7C15 + 0xD1B54A32D192ED03) % 2**64)
    threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    with np.errstate(over="ignore"):  # the hash relies on wrapping 64-bit arithmetic
        for start in range(0, num_documents, _HASH_CHUNK):
            z = np.arange(start, min(start + _HASH_CHUNK, num_documents), dtype=np.uint64) + mix
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            mask[start:start + len(z)] = z < threshold
    return mask


@dataclass
class SplitSpans:
    """The non-empty documents of one split, in corpus order: where each starts in the corpus (`starts`) and
    where it ends in the split's own token stream (`ends`, cumulative). Two int64 per document."""

    starts: np.ndarray
    ends: np.ndarray


def split_spans(corpus: IndexedCorpus, held_out: np.ndarray) -> dict[str, SplitSpans]:
    """{"train": ..., "eval": ...} for the mask `held_out` over the corpus' documents (built in chunks)."""
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "eval": ([], [])}
    for begin in range(0, corpus.num_documents, _CHECK_CHUNK):
        chunk = np.arange(begin, min(begin + _CHECK_CHUNK, corpus.num_documents), dtype=np.int64)
        starts, lengths = corpus.document_spans(chunk)
        chosen = held_out[begin:begin + len(chunk)]
        for name, mask in (("train", ~chosen & (lengths > 0)), ("eval", chosen & (lengths > 0))):
            parts[name][0].append(starts[mask])
            parts[name][1].append(lengths[mask])
    spans = {}
    for name, (starts_list, lengths_list) in parts.items():
        lengths = np.concatenate(lengths_list) if lengths_list else np.zeros(0, np.int64)
        spans[name] = SplitSpans(np.concatenate(starts_list) if starts_list else np.zeros(0, np.int64),
                                 np.cumsum(lengths, dtype=np.int64))
    return spans


def cached_split_spans(corpus: IndexedCorpus, eval_fraction: float, seed: int, cache_root: str | Path,
                       rank: int = 0, barrier: Callable[[], None] = lambda: None) -> dict[str, SplitSpans]:
    """`split_spans` written once (rank 0) under `cache_root` as plain .npy arrays and memory-mapped by every
    rank, so no rank holds per-document arrays in memory. Keyed by the two files' paths, sizes and
    modification times, the held-out fraction and the seed; the .npy files are read without pickle."""
    from ascend_edit.data.cache import publish_first_wins, source_identity

    bin_path, idx_path = files_of(corpus.prefix)
    identity = {"bin": source_identity(bin_path), "idx": source_identity(idx_path), "eval_fraction": eval_fraction,
                "seed": seed, "layout": 1}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_root).expanduser() / f"indexed-{digest}"
    manifest = directory / "meta.json"
    if rank == 0 and not manifest.exists():
        tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        try:
            for name, spans in split_spans(corpus, held_out_mask(corpus.num_documents, eval_fraction, seed)).items():
                np.save(tmp / f"{name}.starts.npy", spans.starts)
                np.save(tmp / f"{name}.ends.npy", spans.ends)
            (tmp / "meta.json").write_text(json.dumps(identity, indent=1))  # last: without it, incomplete
            publish_first_wins(tmp, directory, "meta.json")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # only the temporary directory this call created
            raise
    barrier()
    if not manifest.exists():
        raise FileNotFoundError(f"data.cache_dir: {directory} is incomplete on this node: rank 0 did not finish "
                                "building it, or data.cache_dir is not on a filesystem every node shares")
    return {name: SplitSpans(np.load(directory / f"{name}.starts.npy", mmap_mode="r", allow_pickle=False),
                             np.load(directory / f"{name}.ends.npy", mmap_mode="r", allow_pickle=False))
            for name in ("train", "eval")}


class IndexedPackedDataset(torch.utils.data.Dataset):
    """Packed rows of some documents of an indexed corpus, built lazily from the memory map; items match
    `PackedDataset`'s (input_ids, position_ids, labels, loss_mask)."""

    def __init__(self, corpus: IndexedCorpus, spans: SplitSpans, seq_len: int, vocab_size: int | None = None,
                 key: str = "data.path"):
        self.tokens, self.key, self.prefix = corpus.tokens, key, corpus.prefix
        self.starts, self.ends = spans.starts, spans.ends
        self.num_documents = len(self.starts)
        self._seq_len, self.vocab_size = seq_len, vocab_size
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.rows, self.dropped_tokens = divmod(total, seq_len)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def num_tokens(self) -> int:
        return self.rows * self._seq_len

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} outside the {self.rows} rows")
        n = self._seq_len
        begin = index * n
        k = int(np.searchsorted(self.ends, begin, side="right"))  # the document holding token `begin`
        ids = np.empty(n, dtype=np.int64)
        pos = np.empty(n, dtype=np.int64)
        start = np.zeros(n, dtype=bool)
        filled = 0
        while filled < n:
            doc_begin = int(self.ends[k - 1]) if k else 0
            offset = begin + filled - doc_begin  # position inside document k where this piece starts
            take = min(n - filled, int(self.ends[k]) - doc_begin - offset)
            source = int(self.starts[k]) + offset
            ids[filled:filled + take] = self.tokens[source:source + take]
            # a piece carried over from the previous row restarts at position 0 (packing.py, "restart")
            first = offset if filled else 0
            pos[filled:filled + take] = np.arange(first, first + take)
            start[filled] = offset == 0
            filled += take
            k += 1
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise IndexedDataError(_vocabulary_problem(self.prefix, self.key, int(ids.min()), int(ids.max()),
                                                       self.vocab_size))
        input_ids, doc_start = torch.from_numpy(ids), torch.from_numpy(start)
        loss_mask = torch.zeros_like(doc_start)
        loss_mask[:-1] = ~doc_start[1:]
        return {"input_ids": input_ids, "position_ids": torch.from_numpy(pos),
                "labels": input_ids.masked_fill(doc_start, IGNORE_INDEX), "loss_mask": loss_mask}

    def __repr__(self) -> str:
        return (f"IndexedPackedDataset(sequences={self.rows}, seq_len={self._seq_len}, "
                f"documents={self.num_documents}, dropped_tokens={self.dropped_tokens})")


def indexed_train_eval(prefix: str | Path, seq_len: int, eval_fraction: float, seed: int,
                       vocab_size: int | None = None, key: str = "data.path", cache_dir: str | Path | None = None,
                       rank: int = 0, barrier: Callable[[], None] = lambda: None
                       ) -> tuple[IndexedPackedDataset, IndexedPackedDataset]:
    """(train, held-out) packed rows of an indexed corpus, split by document. With `cache_dir`, the split's
    per-document offsets are built once and memory-mapped (`cached_split_spans`); without, each rank builds
    them in memory (16 bytes per document)."""
    corpus = open_indexed(prefix, key)
    if vocab_size is not None:
        check_vocabulary(corpus, vocab_size, key)
    if cache_dir:
        spans = cached_split_spans(corpus, eval_fraction, seed, cache_dir, rank, barrier)
    else:
        spans = split_spans(corpus, held_out_mask(corpus.num_documents, eval_fraction, seed))
    train = IndexedPackedDataset(corpus, spans["train"], seq_len, vocab_size, key)
    evaluation = IndexedPackedDataset(corpus, spans["eval"], seq_len, vocab_size, key)
    where = f"{key}={prefix}"
    if len(train) == 0:
        raise IndexedDataError(f"{where}: the training documents hold {train.dropped_tokens:,} tokens, fewer "
                               f"than one sequence of data.seq_len={seq_len}")
    if len(evaluation) == 0:
        raise IndexedDataError(f"{where}: the {evaluation.num_documents} held-out documents "
                               f"(data.eval_fraction={eval_fraction}) hold {evaluation.dropped_tokens:,} tokens, "
                               f"fewer than one sequence of data.seq_len={seq_len}")
    log.info("indexed corpus %s: %d documents, %s tokens; train %r, held out %r", prefix, corpus.num_documents,
             f"{len(corpus.tokens):,}", train, evaluation)
    return train, evaluation
