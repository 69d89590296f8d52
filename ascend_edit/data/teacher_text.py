"""Text sampled from the teacher itself: distillation data that spans what the teacher knows.

Why: a conversion fits its low-rank or windowed attention to the activations of the text it is calibrated and
trained on, and loses most on text of another kind (docs/results.md, "Why the default job lost out of domain":
calibrated on the out-of-domain kind of text, the same warm start flips). A user rarely has a corpus of every
kind of text their model will see; the teacher's own samples are drawn from the teacher's distribution, so
they cover its domains in proportion to what it learnt, and they contain no evaluation text.

How: rows start at the tokenizer's BOS token (EOS where there is none) and are sampled with temperature and
nucleus (top-p) filtering for ``tokens`` steps **without stopping at the end token**: after an end token the
teacher starts a new document, so every row is full and the batch does no wasted steps. Rows are then cut at
end tokens into documents; pieces with fewer than ``min_words`` words are dropped. Sampling draws from one
``torch.Generator`` per batch, seeded from ``(seed, batch index)``: the same spec on the same device and
software gives the same documents.

The documents go to a JSON-lines file (``{"text": ...}`` per line) that ``data.mix`` reads as a ``files``
source, e.g. ``{name: files, path: DIR/teacher_text.jsonl, weight: 0.3}``; ``meta.json`` beside it records the
spec and the teacher.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ascend_edit.config import check_teacher_sampling
from ascend_edit.data.packing import PackedDataset, pack_token_documents

TEXT_FILE = "teacher_text.jsonl"
META_FILE = "meta.json"


@dataclass(frozen=True)
class SamplingSpec:
    """What to sample: ``rows`` rows of ``tokens`` new tokens each, ``batch_size`` rows at a time (each row is
    then cut into documents at end tokens)."""

    rows: int
    tokens: int
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 32
    seed: int = 0
    min_words: int = 8

    def __post_init__(self) -> None:
        check_teacher_sampling(self.rows, self.tokens, self.temperature, self.top_p, self.batch_size, self.min_words)


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (the most likely token is always kept). ``logits``: ``[rows, vocab]``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_rows(model, start_id: int, rows: int, tokens: int, spec: SamplingSpec, generator: torch.Generator
                ) -> torch.Tensor:
    """``[rows, tokens]`` sampled token ids after one ``start_id`` each, through the model's KV cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.full((rows, 1), start_id, dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    out = torch.empty(rows, tokens, dtype=torch.long, device=device)
    for step in range(tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        ids = nucleus_sample(logits, spec.temperature, spec.top_p, generator).unsqueeze(-1)
        out[:, step] = ids[:, 0]
    return out


def split_documents(row: list[int], end_ids: set[int], tokenizer, min_words: int) -> list[str]:
    """The documents of one sampled row: cut at end tokens, decoded without special tokens, short ones dropped."""
    documents: list[str] = []
    piece: list[int] = []
    for token in [*row, None]:  # None: flush the last piece
        if token is None or token in end_ids:
            text = tokenizer.decode(piece, skip_special_tokens=True).strip() if piece else ""
            if text and len(text.split()) >= min_words:
                documents.append(text)
            piece = []
        else:
            piece.append(token)
    return documents


def end_token_ids(tokenizer) -> set[int]:
    """Tokens that end a document: the tokenizer's EOS and, for chat tokenizers, its other special tokens
    (an instruct teacher opens and closes chat turns between documents)."""
    ids = {tokenizer.eos_token_id} | set(getattr(tokenizer, "all_special_ids", []) or [])
    return {int(i) for i in ids if i is not None}


def sample_documents(model, tokenizer, spec: SamplingSpec, progress: Callable[[int, int], None] | None = None
                     ) -> list[str]:
    """Documents sampled from ``model`` (eval mode, on its device) as described in the module docstring."""
    start_id = start_token_id(tokenizer, model.config)
    end_ids = end_token_ids(tokenizer)
    device = next(model.parameters()).device
    documents: list[str] = []
    batches = (spec.rows + spec.batch_size - 1) // spec.batch_size
    for batch in range(batches):
        rows = min(spec.batch_size, spec.rows - batch * spec.batch_size)
        generator = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + batch)
        sampled = sample_rows(model, start_id, rows, spec.tokens, spec, generator).tolist()
        for row in sampled:
            documents.extend(split_documents(row, end_ids, tokenizer, spec.min_words))
        if progress is not None:
            progress(batch + 1, batches)
    return documents


def start_token_id(tokenizer, model_config) -> int:
    """The token every sampled row starts from: BOS, else EOS (of the tokenizer, else of the model's config)."""
    for source in (tokenizer, model_config):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, list):  # some configs list several end tokens
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError("the teacher has neither a BOS nor an EOS token to sample from (target.calibration_source="
                     "teacher / teacher_text need one): calibrate on data instead (target.calibration_source=data)")


def sample_calibration_set(model, tokenizer, sequences: int, seq_len: int, seed: int, temperature: float = 1.0,
                           top_p: float = 0.95) -> PackedDataset:
    """``sequences`` rows of ``seq_len`` tokens sampled from ``model`` (a start token, then ``seq_len - 1`` sampled
    tokens), packed one row per sequence: warm-start calibration text that covers what the teacher knows instead of
    one training domain. All rows are sampled as one batch; each row is one document (it was sampled under full
    causal attention over the row, end tokens included)."""
    start = start_token_id(tokenizer, model.config)
    spec = SamplingSpec(rows=sequences, tokens=seq_len - 1, temperature=temperature, top_p=top_p,
                        batch_size=sequences, seed=seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * 1_000_003)
    sampled = sample_rows(model, start, sequences, seq_len - 1, spec, generator).tolist()
    return pack_token_documents([[start, *row] for row in sampled], seq_len)


def check_output(directory: Path) -> None:
    """Refuse an output that is a file or already holds the files (callers check before sampling, which can take
    hours, and again before writing)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"teacher_text.out: {directory} is a file, not a directory")
    for name in (TEXT_FILE, META_FILE):
        if (directory / name).exists():
            raise ValueError(f"teacher_text.out: {directory / name} already exists; choose another directory")


def write_documents(directory: str | Path, documents: list[str], meta: dict) -> Path:
    """Write ``teacher_text.jsonl`` and ``meta.json`` into ``directory`` (created here) and return the jsonl path.

    Refuses a directory that already holds either file: sampled text is never written over a user's data.
    Each file is written to a temporary name and renamed, so a crash leaves no half-written file.
    """
    directory = Path(directory)
    if not documents:
        raise ValueError("teacher_text: sampling produced no documents (raise teacher_text.tokens or lower "
                         "teacher_text.min_words)")
    check_output(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in documents)
    # meta.json first, the jsonl (what a mix reads) last: a crash in between leaves no text file that looks complete
    for name, text in ((META_FILE, json.dumps({**meta, "documents": len(documents)}, indent=2)), (TEXT_FILE, body)):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, directory / name)
    return directory / TEXT_FILE


def spec_meta(spec: SamplingSpec, teacher: str) -> dict:
    return {"teacher": teacher, "sampling": asdict(spec)}
