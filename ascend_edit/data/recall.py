"""Recall rows: training sequences in which a span of text comes back later in the same row.

Why: a conversion compresses the keys (MLA's low-rank latent) or hides most of them (a sliding window), and
retrieval — finding where a phrase occurred earlier and copying what followed — depends on precise keys.
Ordinary prose rarely repeats a passage inside one training sequence, so distillation sees few tokens that
need it. A recall row makes them common without any evaluation text: natural text ``A B`` followed by ``A``
again, where the teacher's next-token distribution on the second ``A`` is the copy it makes from context,
which the student has to learn. Measured (docs/results.md, "Recall rows"): on SmolLM2-135M at 25 % KV it
lifts passkey retrieval at 2K from 20 % to 65 % but not out-of-domain perplexity, whose excess sits mostly on
tokens the context does not hold (the held-out suite's copyable / novel split).

Layout of one row of ``seq_len`` tokens, cut from a source's own token stream (documents joined by their
end tokens)::

    [ A (a tokens) | B (seq_len - 2a tokens) | A again ]

``a`` is drawn for each row in turn from ``[seq_len // 16, seq_len // 3]`` by one generator seeded with ``seed``,
so the copy distance ``seq_len - a`` runs from about two thirds to 15/16 of the row. Every row is exactly
``seq_len`` tokens, so packing places one row per sequence and nothing is cut. A row is one stretch of the
source's stream: where it crosses a document's end token, attention runs on across it (positions do not restart
inside a row), as it would in unpacked text.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ascend_edit.data.packing import PackedDataset, Tokenizer, pack_token_documents, tokenize_documents


def recall_rows(stream: Sequence[int], seq_len: int, seed: int) -> list[list[int]]:
    """Rows ``A B A`` cut in order from ``stream`` (see the module docstring); the tail that does not
    make a whole row is dropped."""
    if seq_len < 6:
        raise ValueError(f"recall rows need seq_len >= 6 (a span, a gap, the span again), got {seq_len}")
    low, high = max(1, seq_len // 16), max(1, seq_len // 3)
    generator = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    start = 0
    while True:
        span = int(torch.randint(low, high + 1, (1,), generator=generator))
        fresh = seq_len - span  # tokens of A and B taken from the stream; A's copy closes the row
        if start + fresh > len(stream):
            return rows
        text = list(stream[start:start + fresh])
        rows.append(text + text[:span])
        start += fresh


def pack_recall(documents: Sequence[str], tokenizer: Tokenizer, seq_len: int, seed: int) -> PackedDataset:
    """The recall rows of ``documents`` as a packed dataset (one row per sequence)."""
    stream = [token for doc in tokenize_documents(documents, tokenizer, append_eos=True) for token in doc]
    rows = recall_rows(stream, seq_len, seed)
    if not rows:
        raise ValueError(f"too little text for one recall row of seq_len={seq_len} ({len(stream)} tokens)")
    return pack_token_documents(rows, seq_len)
