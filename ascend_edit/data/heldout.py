"""Held-out evaluation text: the run's own held-out documents (in domain) and text of another kind.

Out-of-domain set — ``python_docs``: the English prose of the Python Language Reference and library
reference topics that every CPython ships as plain text in ``pydoc_data.topics`` (what ``help()``
shows; PSF documentation licence). It is technical exposition — a different register, vocabulary and
era from the Shakespeare the default job trains on — and needs no download anywhere (CI, the GPU
machine). Code and grammar blocks (the indented lines) are dropped so the set is prose; one topic is
one document. No training source of the project contains it, and :func:`check_disjoint` proves that for
a run's own training documents before any number is reported (a user's ``data=files`` corpus included).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

OUT_OF_DOMAIN_SOURCES = ("python_docs",)

_BLANK_LINES = re.compile(r"\n\s*\n")


def python_docs_documents() -> list[str]:
    """The prose of every ``pydoc_data`` topic, one document per topic, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split the docs out of the standard library
        raise FileNotFoundError("eval domain python_docs needs the standard library's pydoc_data "
                                "(Debian: the libpython3-stdlib package)") from err
    documents = []
    for name in sorted(topics):
        paragraphs = []
        for block in _BLANK_LINES.split(topics[name]):
            # Indented blocks are code, grammar or tables; underlines are reST heading decorations.
            lines = [line for line in block.splitlines() if line.strip() and not set(line.strip()) <= set("*=-")]
            if not lines or lines[0].startswith(" "):
                continue
            paragraphs.append(" ".join(line.strip() for line in lines))
        text = "\n\n".join(p for p in paragraphs if len(p.split()) >= 4)
        if text:
            documents.append(text)
    return documents


def out_of_domain_documents(name: str) -> list[str]:
    if name == "python_docs":
        return python_docs_documents()
    raise ValueError(f"unknown out-of-domain eval set {name!r}; choose from {list(OUT_OF_DOMAIN_SOURCES)}")


def document_hash(text: str) -> str:
    """Hash of a document's words: immune to whitespace and line-wrapping differences."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def paragraph_hashes(documents: Iterable[str], min_words: int = 8) -> set[str]:
    """Hashes of every blank-line-separated passage of at least `min_words` words (shorter ones, such
    as a lone stage direction, are too generic to mean a shared document)."""
    hashes = set()
    for doc in documents:
        for passage in _BLANK_LINES.split(doc):
            if len(passage.split()) >= min_words:
                hashes.add(document_hash(passage))
    return hashes


def check_disjoint(eval_documents: Sequence[str], train_documents: Sequence[str], name: str) -> None:
    """Raise if the evaluation set shares a document, or a passage of one, with the training documents."""
    train_docs = {document_hash(d) for d in train_documents}
    shared = sum(document_hash(d) in train_docs for d in eval_documents)
    shared_passages = len(paragraph_hashes(eval_documents) & paragraph_hashes(train_documents))
    if shared or shared_passages:
        raise ValueError(f"eval set {name!r} is not held out: {shared} document(s) and {shared_passages} passage(s) "
                         "also occur in the training data; drop it from eval.domains or from the training data")


def run_documents(cfg, seed: int) -> tuple[list[str], list[str]] | None:
    """(training documents, held-out documents) of a run's text data, split exactly as the conversion
    split them (same documents, fraction and seed); None for data without text (synthetic ids).

    `cfg` is the run's `DataConfig`.
    """
    from ascend_edit.data.loading import text_source
    from ascend_edit.data.packing import split_held_out

    if cfg.source == "mix":  # every source split on its own (ascend_edit/data/mix.py)
        from ascend_edit.data.mix import mix_documents, specs_of

        return mix_documents(specs_of(cfg), cfg.eval_fraction, seed)
    if cfg.source not in ("shakespeare", "files"):
        return None
    documents = text_source(cfg).load()
    if cfg.source == "files" and cfg.cache_dir:  # the tokenized cache splits by a hash of each text (data/cache.py)
        from ascend_edit.data.cache import hash_split

        return hash_split(documents, cfg.eval_fraction, seed)
    return split_held_out(documents, cfg.eval_fraction, seed)
