"""Read raw text documents from local files: plain text, JSON lines, Parquet, or a saved HF dataset.

Everything here returns plain ``str`` documents; tokenization and packing live in ``packing.py``.
A *document* is the unit that the held-out split and the packer keep whole, so it decides what
"no leakage between train and eval" means: one file, one JSON record, one row, or (for text
files, on request) one blank-line-separated passage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

SourceFormat = Literal["auto", "text", "jsonl", "parquet", "hf_dataset"]

# File extensions per format; a directory is read as the one format whose files it holds.
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text"),
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet",),
}
_FORMATS = ("auto", "text", "jsonl", "parquet", "hf_dataset")

# A blank-line run: a newline, any whitespace-only lines, another newline.
_BLANK_LINE_RUN = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclass(frozen=True)
class DocumentSource:
    """One local source of documents: where they are and how a file is cut into them.

    The one description that the readers (:meth:`load`, iteration) and the tokenized cache's key share.

    Attributes:
        path: a file, a directory of files of one format, or a ``save_to_disk`` dataset directory.
        format: ``"auto"`` detects it from the file extension or the directory contents;
            otherwise one of ``"text"``, ``"jsonl"``, ``"parquet"``, ``"hf_dataset"``.
        text_field: the field / column holding the text (jsonl, parquet, hf_dataset).
        split_on_blank_lines: for text files, make each blank-line-separated passage a
            document; by default each file is one document.
        split: for a saved ``DatasetDict``, which split to read (needed when it has several).
        max_documents: stop after this many (non-empty) documents.

    Documents are the non-empty ones, files taken in sorted path order. Whitespace-only documents
    are dropped; the text of the others is kept as it is.

    Raises (when read):
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown or undetectable format, a missing field, unreadable content,
            or (:meth:`load`) no documents at all.
    """

    path: Path
    format: SourceFormat = "auto"
    text_field: str = "text"
    split_on_blank_lines: bool = False
    split: str | None = None
    max_documents: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 or None, got {self.max_documents}")

    def __iter__(self) -> Iterator[str]:
        """Lazily yield the documents (a corpus larger than memory streams)."""
        return islice(self._all_documents(), self.max_documents)

    def files_read(self) -> list[Path]:
        """The files the documents come from (a saved HF dataset: every file of it). What identifies the corpus:
        anything else under `path` (a README, a tokenized cache kept there) is not the data."""
        if not self.path.exists():
            raise FileNotFoundError(f"data path does not exist: {self.path}")
        resolved = detect_format(self.path) if self.format == "auto" else self.format
        if resolved == "hf_dataset":
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return _files_of_format(self.path, resolved)

    def load(self) -> list[str]:
        """All the documents in memory; a source with none is an error."""
        documents = list(self)
        if not documents:
            raise ValueError(f"no non-empty documents found in {self.path} (format={self.format!r})")
        return documents

    def _all_documents(self) -> Iterator[str]:
        if not self.path.exists():
            raise FileNotFoundError(f"data path does not exist: {self.path}")
        if self.format not in _FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; expected one of {_FORMATS}")
        resolved = detect_format(self.path) if self.format == "auto" else self.format

        if resolved == "hf_dataset":
            yield from _iter_hf_dataset(self.path, self.text_field, self.split)
            return
        for file in _files_of_format(self.path, resolved):
            if resolved == "text":
                yield from _iter_text_file(file, self.split_on_blank_lines)
            elif resolved == "jsonl":
                yield from _iter_jsonl_file(file, self.text_field)
            else:
                yield from _iter_parquet_file(file, self.text_field)


def load_documents(path: str | Path, **options: Any) -> list[str]:
    """The documents under ``path``; ``options`` are the other fields of :class:`DocumentSource`."""
    return DocumentSource(Path(path), **options).load()


def detect_format(path: Path) -> str:
    """The format of ``path``: by extension for a file, by contents for a directory."""
    if path.is_file():
        for name, extensions in _EXTENSIONS.items():
            if path.suffix.lower() in extensions:
                return name
        raise ValueError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; pass format= one of {_FORMATS[1:]}"
        )
    if _is_saved_hf_dataset(path):
        return "hf_dataset"
    present = [name for name in _EXTENSIONS if _files_with_extensions(path, _EXTENSIONS[name])]
    if not present:
        known = sorted(ext for exts in _EXTENSIONS.values() for ext in exts)
        raise ValueError(f"directory {path} holds no data files (looked for {known}) and no saved HF dataset")
    if len(present) > 1:
        raise ValueError(f"directory {path} holds files of several formats {present}; pass format= to pick one")
    return present[0]


def _is_saved_hf_dataset(path: Path) -> bool:
    # `Dataset.save_to_disk` writes state.json + dataset_info.json; `DatasetDict` writes dataset_dict.json.
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _files_with_extensions(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def _files_of_format(path: Path, format: str) -> list[Path]:
    if format not in _EXTENSIONS:
        raise ValueError(f"format {format!r} reads files; expected one of {tuple(_EXTENSIONS)}")
    if path.is_file():
        return [path]
    files = _files_with_extensions(path, _EXTENSIONS[format])
    if not files:
        raise ValueError(f"directory {path} holds no {format} files (extensions {_EXTENSIONS[format]})")
    return files


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not valid UTF-8 text: {error}") from error
    except OSError as error:
        raise OSError(f"cannot read {file}: {error}") from error


def _iter_text_file(file: Path, split_on_blank_lines: bool) -> Iterator[str]:
    text = _read_text(file)
    passages = _BLANK_LINE_RUN.split(text) if split_on_blank_lines else [text]
    for passage in passages:
        if passage.strip():
            yield passage.strip() if split_on_blank_lines else passage


def _iter_jsonl_file(file: Path, text_field: str) -> Iterator[str]:
    # JSON Lines ends records at "\n" (or "\r\n") only. str.splitlines() would also cut at characters JSON
    # strings may hold unescaped (U+2028, U+0085, ...): text sampled from a model holds them.
    for line_number, line in enumerate(_read_text(file).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{line_number}: invalid JSON: {error}") from error
        if not isinstance(record, dict) or text_field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{file}:{line_number}: no field {text_field!r} (record has {fields})")
        yield from _checked_text(record[text_field], f"{file}:{line_number} field {text_field!r}")


def _iter_parquet_file(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # heavy; only needed for parquet input

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError family
        raise ValueError(f"cannot read {file} as parquet: {error}") from error
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{file}: no column {text_field!r} (columns: {columns})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield from _checked_text(value, f"{file} row {row} column {text_field!r}")


def _iter_hf_dataset(path: Path, text_field: str, split: str | None) -> Iterator[str]:
    import datasets  # heavy and optional; only needed for saved HF datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise ValueError(f"{path} is a DatasetDict with splits {list(loaded)}; pass split= to pick one")
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {loaded.column_names})")
    for row, value in enumerate(loaded[text_field], start=1):
        yield from _checked_text(value, f"{path} row {row} column {text_field!r}")


def _checked_text(value: object, where: str) -> Iterator[str]:
    """Yield ``value`` if it is a non-empty string; skip empty/null ones; reject other types."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    if value.strip():
        yield value
