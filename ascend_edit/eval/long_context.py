"""Held-out text as full-length windows, for quality per context length.

Documents are tokenized in order and joined by EOS into one stream, then cut into non-overlapping
windows of exactly `context` tokens with positions 0..context-1: every window is one causal sequence,
so a 2,048-token window really asks the model to use 2,048 tokens of context (packed training
sequences restart positions at each document and would not).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def token_stream(documents: Iterable[str], tokenizer, max_tokens: int) -> list[int]:
    """Token ids of the documents, each tokenized as training packs it (data/packing.py: the tokenizer's special
    tokens, so a BOS where it adds one, and an EOS after), stopping once `max_tokens` are gathered. Without the BOS
    the windows of a BOS-adding teacher (Llama, Mistral) would hold text the conversion never trained on."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        ids = list(tokenizer(doc, add_special_tokens=True, verbose=False)["input_ids"])
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
        if len(stream) >= max_tokens:
            break
    return stream[:max_tokens]


def windows(stream: list[int], context: int, count: int) -> torch.Tensor:
    """Up to `count` consecutive windows [n, context] from the start of the stream."""
    n = min(count, len(stream) // context)
    return torch.tensor(stream[:n * context], dtype=torch.long).view(n, context)


def window_batches(ids: torch.Tensor, batch_tokens: int, device: torch.device | str = "cpu") -> list[dict]:
    """Batches of whole windows, about `batch_tokens` tokens each (at least one window)."""
    if len(ids) == 0:
        return []
    per_batch = max(1, batch_tokens // ids.shape[1])
    positions = torch.arange(ids.shape[1])
    loss_mask = torch.ones(ids.shape[1], dtype=torch.bool)
    loss_mask[-1] = False  # the last position has no target inside the window
    batches = []
    for i in range(0, len(ids), per_batch):
        chunk = ids[i:i + per_batch]
        batches.append({"input_ids": chunk.to(device), "position_ids": positions.expand_as(chunk).to(device),
                        "loss_mask": loss_mask.expand_as(chunk).to(device)})
    return batches
