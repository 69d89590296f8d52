"""Tokenize documents and pack them into fixed-length sequences that keep documents apart.

Layout of one packed sequence of ``seq_len`` tokens (documents A, B, C; ``|`` = document start)::

    input_ids     |a a a a E|b b b E|c c c
    position_ids   0 1 2 3 4 0 1 2 3 0 1 2
    labels         - a a a E - b b E - c c      (HF convention, unshifted; - = IGNORE_INDEX)
    loss_mask      1 1 1 1 0 1 1 1 0 1 1 0      (aligned with logits: logits[t] predicts input_ids[t+1])

Why these choices:

* ``position_ids`` restart at 0 at every document start. Hugging Face models (transformers
  5.x ``masking_utils.find_packed_sequence_indices``) read a reset of ``position_ids`` as the
  start of a new sequence and build a block-diagonal causal mask, as long as no 2D
  ``attention_mask`` and no cache are passed. A packed forward then equals separate forwards
  per document (tested in ``tests/unit/test_data.py``).
* ``labels`` are ``IGNORE_INDEX`` at each document start, so ``model(..., labels=labels)``
  never trains the last token of one document to predict the first token of the next.
  ``loss_mask`` says the same thing in the logits' alignment, for losses (KD) that read logits
  directly: ``loss_mask[t]`` is true when ``input_ids[t + 1]`` is a target inside the same
  document; the last position of a sequence has no target and is always false.
* A document longer than the space left is split; its rest opens the next sequence. By default
  (``continued_positions="restart"``) that continued chunk's positions restart at 0: for RoPE
  models attention depends only on position *differences*, so the chunk's outputs are the same
  either way, while restarting keeps positions below ``max_position_embeddings`` for models
  with absolute position embeddings or length-dependent RoPE scaling. ``"continue"`` keeps the
  chunk's true in-document positions instead.
* The tail that does not fill a whole sequence is dropped (counted in ``dropped_tokens``):
  padding would need a 2D attention mask, which would switch off the packed-sequence mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value Hugging Face's cross-entropy skips

ContinuedPositions = Literal["restart", "continue"]

# Anything with the HF tokenizer call signature: tokenizer(texts, add_special_tokens=..., ...).
Tokenizer = Callable[..., Any]


@dataclass(eq=False, repr=False)  # identity equality (the fields are tensors); __repr__ below
class PackedDataset(Dataset):
    """Packed sequences as a map-style torch ``Dataset`` of dicts of ``[seq_len]`` tensors.

    Attributes:
        input_ids, position_ids, labels: ``[N, L]`` int64.
        loss_mask: ``[N, L]`` bool, aligned with logits (see the module docstring).
        num_documents: documents that went into the sequences (whole or in part).
        dropped_tokens: tokens of the final, partial sequence that were left out.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    num_documents: int
    dropped_tokens: int = 0

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [N, L], got shape {shape}")
        others = {"position_ids": self.position_ids, "labels": self.labels, "loss_mask": self.loss_mask}
        for name, tensor in others.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} shape {tuple(tensor.shape)} != input_ids shape {shape}")

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "position_ids": self.position_ids[index],
            "labels": self.labels[index],
            "loss_mask": self.loss_mask[index],
        }

    def __repr__(self) -> str:
        return (
            f"PackedDataset(sequences={len(self)}, seq_len={self.seq_len}, "
            f"documents={self.num_documents}, dropped_tokens={self.dropped_tokens})"
        )


def tokenize_documents(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    append_eos: bool = True,
    batch_size: int = 256,
) -> list[list[int]]:
    """Token ids of each document, with the tokenizer's own special tokens (e.g. a BOS).

    ``append_eos`` adds ``tokenizer.eos_token_id`` at the end of each document unless the
    tokenizer already put it there, so packed documents are separated by an EOS and the model
    learns where a document ends. Empty and whitespace-only documents are skipped (they would
    add nothing but special tokens).
    """
    eos_id = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    token_documents: list[list[int]] = []
    for start in range(0, len(documents), batch_size):
        batch = [text for text in documents[start : start + batch_size] if text.strip()]
        if not batch:
            continue
        # verbose=False: whole documents are longer than model_max_length by design (they get packed).
        encoded = tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            ids = list(ids)
            if eos_id is not None and ids[-1] != eos_id:
                ids.append(eos_id)
            token_documents.append(ids)
    return token_documents


def pack_token_documents(
    token_documents: Sequence[Sequence[int]],
    seq_len: int,
    continued_positions: ContinuedPositions = "restart",
) -> PackedDataset:
    """Concatenate tokenized documents and cut the stream into ``[N, seq_len]`` sequences.

    See the module docstring for the layout of ``position_ids``, ``labels`` and ``loss_mask``.

    Raises:
        ValueError: ``seq_len < 2``, an unknown ``continued_positions``, or fewer tokens than
            one sequence.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a sequence needs an input and a target), got {seq_len}")
    if continued_positions not in ("restart", "continue"):
        raise ValueError(f"continued_positions must be 'restart' or 'continue', got {continued_positions!r}")
    documents = [doc for doc in token_documents if len(doc) > 0]
    lengths = torch.tensor([len(doc) for doc in documents], dtype=torch.long)
    total_tokens = int(lengths.sum())
    num_sequences = total_tokens // seq_len
    if num_sequences == 0:
        raise ValueError(
            f"too little data to pack: {total_tokens} tokens in {len(documents)} documents, "
            f"fewer than one sequence of seq_len={seq_len}"
        )
    kept = num_sequences * seq_len

    stream = torch.tensor(list(chain.from_iterable(documents)), dtype=torch.long)
    doc_offsets = torch.cumsum(lengths, 0) - lengths  # stream index of each document's first token
    # Position inside its own document, for every token of the stream.
    in_doc_position = torch.arange(total_tokens) - torch.repeat_interleave(doc_offsets, lengths)
    is_doc_start = in_doc_position == 0

    input_ids = stream[:kept].view(num_sequences, seq_len)
    position_ids = in_doc_position[:kept].view(num_sequences, seq_len).clone()
    doc_start = is_doc_start[:kept].view(num_sequences, seq_len)

    if continued_positions == "restart":
        # Tokens before the first document start of a row belong to a document carried over
        # from the previous row; shift them so the row begins at position 0.
        segment = doc_start.long().cumsum(dim=1)
        carried_over = segment == segment[:, :1]
        position_ids = torch.where(carried_over, position_ids - position_ids[:, :1], position_ids)

    labels = input_ids.masked_fill(doc_start, IGNORE_INDEX)
    loss_mask = torch.zeros_like(doc_start)
    loss_mask[:, :-1] = ~doc_start[:, 1:]

    return PackedDataset(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        loss_mask=loss_mask,
        num_documents=int((doc_offsets < kept).sum()),
        dropped_tokens=total_tokens - kept,
    )


def pack_documents(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    append_eos: bool = True,
    continued_positions: ContinuedPositions = "restart",
) -> PackedDataset:
    """Tokenize ``documents`` with ``tokenizer`` and pack them (see :func:`pack_token_documents`)."""
    token_documents = tokenize_documents(documents, tokenizer, append_eos=append_eos)
    return pack_token_documents(token_documents, seq_len, continued_positions)


def split_documents(documents: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, eval), deterministically for a given ``seed``.

    Splitting happens before tokenization and packing, so no document has tokens on both
    sides. With ``eval_fraction > 0`` at least one document goes to eval and at least one stays
    in train. Each side keeps the documents' original order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(documents), []
    if len(documents) < 2:
        raise ValueError(
            f"cannot hold out documents for eval: only {len(documents)} document(s); "
            "split the text into more documents (data.split_on_blank_lines=true, or give several files): a "
            "conversion holds whole documents out for evaluation"
        )
    num_eval = min(max(1, round(eval_fraction * len(documents))), len(documents) - 1)
    generator = torch.Generator().manual_seed(seed)
    eval_indices = set(torch.randperm(len(documents), generator=generator)[:num_eval].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in eval_indices]
    held_out = [doc for i, doc in enumerate(documents) if i in eval_indices]
    return train, held_out


def split_held_out(documents: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """`split_documents`, then training copies of held-out documents dropped (scraped corpora repeat documents):
    a held-out number is never measured on text the conversion trained on."""
    train, held_out = split_documents(documents, eval_fraction, seed)
    held = set(held_out)
    kept = [doc for doc in train if doc not in held]
    if len(kept) < len(train):
        log.warning("%d training documents are copies of held-out documents; left out of training",
                    len(train) - len(kept))
    return kept, held_out


def build_train_eval(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    eval_fraction: float = 0.0,
    seed: int = 0,
    append_eos: bool = True,
    continued_positions: ContinuedPositions = "restart",
) -> tuple[PackedDataset, PackedDataset | None]:
    """Split documents into train/eval by document, then tokenize and pack each side.

    Returns ``(train, eval)``; ``eval`` is ``None`` when ``eval_fraction == 0``.
    """
    train_docs, eval_docs = split_held_out(documents, eval_fraction, seed)
    try:
        train = pack_documents(train_docs, tokenizer, seq_len, append_eos, continued_positions)
    except ValueError as error:
        raise ValueError(f"train split: {error}") from error
    if not eval_docs:
        return train, None
    try:
        held_out = pack_documents(eval_docs, tokenizer, seq_len, append_eos, continued_positions)
    except ValueError as error:
        raise ValueError(f"eval split ({len(eval_docs)} held-out documents): {error}") from error
    return train, held_out
