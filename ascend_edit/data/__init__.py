"""Data pipeline: read documents, split by document, tokenize + pack, and sample resumably."""

from ascend_edit.data.packing import (
    IGNORE_INDEX,
    ContinuedPositions,
    PackedDataset,
    build_train_eval,
    pack_documents,
    pack_token_documents,
    split_documents,
    tokenize_documents,
)
from ascend_edit.data.sampler import ResumableDistributedSampler
from ascend_edit.data.sources import DocumentSource, SourceFormat, detect_format, load_documents

__all__ = [
    "IGNORE_INDEX",
    "ContinuedPositions",
    "DocumentSource",
    "PackedDataset",
    "ResumableDistributedSampler",
    "SourceFormat",
    "build_train_eval",
    "detect_format",
    "load_documents",
    "pack_documents",
    "pack_token_documents",
    "split_documents",
    "tokenize_documents",
]
