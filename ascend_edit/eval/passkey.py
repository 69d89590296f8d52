"""Passkey (needle) retrieval, generated on the fly: can the model fetch a number from far back?

One sample of `context` tokens::

    filler[:a] | needle: " The pass key is 48213. Remember it. 48213 is the pass key." | filler[a:b] |
    question: " What is the pass key? The pass key is" | answer: " 48213"

The needle starts at `depth` (0 = the very start, 1 = right before the question) of the room the filler
leaves; the filler is held-out text. A sample counts as retrieved when the model's top-1 prediction
is right at every answer token given the ones before — the same verdict as greedy decoding of the
answer, in one forward. Keys and filler offsets come from a seeded generator: the grid is the same on
every run and for every model compared.

Pieces are tokenized separately and concatenated (token-level), so the positions the generator reports
are exact whatever the tokenizer does at word boundaries.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ascend_edit.eval.metrics import LogitsFn

NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    input_ids: list[int]
    key: str
    depth: float  # requested depth, 0..1
    needle_start: int  # index of the needle's first token
    key_span: tuple[int, int]  # [start, end) of the key's first occurrence in the needle
    answer_span: tuple[int, int]  # [start, end) of the answer tokens (the sequence's last tokens)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def needle_tokens(tokenizer, digits: int = 5, keys: int = 8) -> int:
    """Tokens a sample spends on the needle, the question and the answer with this tokenizer (the most over
    a few keys of `digits` digits: tokenizers split numbers differently)."""
    intro, remember, outro = (len(_ids(tokenizer, part)) for part in NEEDLE)
    rng = random.Random(0)
    key = max(len(_ids(tokenizer, f" {rng.randrange(10 ** (digits - 1), 10 ** digits)}")) for _ in range(keys))
    return intro + remember + outro + len(_ids(tokenizer, QUESTION)) + 3 * key


def check_passkey_contexts(tokenizer, contexts: list[int], digits: int = 5) -> None:
    """Every passkey context leaves room for filler around the needle: checked once the tokenizer is known,
    before any training (the suite would otherwise stop a finished conversion)."""
    needed = needle_tokens(tokenizer, digits)
    short = [c for c in contexts if c <= needed]
    if short:
        raise ValueError(f"eval.passkey_contexts: {short[0]} is shorter than the needle, question and answer "
                         f"({needed} tokens with this tokenizer); use contexts above {needed}, or "
                         "eval.passkey_trials=0")


def make_sample(tokenizer, filler: list[int], context: int, depth: float, key: str, offset: int = 0) -> PasskeySample:
    """One sample of exactly `context` tokens; `filler` is a token stream read from `offset` (wrapping)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth} must be in [0, 1]")
    key_ids = _ids(tokenizer, f" {key}")
    intro, remember, outro = (_ids(tokenizer, part) for part in NEEDLE)
    needle = intro + key_ids + remember + key_ids + outro
    question, answer = _ids(tokenizer, QUESTION), key_ids
    room = context - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"passkey context {context} is shorter than the needle and question "
                         f"({context - room} tokens)")
    if not filler:
        raise ValueError("passkey filler text is empty")
    stream = [filler[(offset + i) % len(filler)] for i in range(room)]
    before = round(depth * room)
    ids = stream[:before] + needle + stream[before:] + question + answer
    key_start = before + len(intro)
    return PasskeySample(ids, key, depth, before, (key_start, key_start + len(key_ids)),
                         (context - len(answer), context))


def make_grid(tokenizer, filler: list[int], contexts: list[int], depths: list[float], trials: int,
              seed: int = 0, digits: int = 5) -> list[PasskeySample]:
    """`trials` samples per (context, depth), each with its own random key and filler offset."""
    rng = random.Random(seed)
    samples = []
    for context in contexts:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
                samples.append(make_sample(tokenizer, filler, context, depth, key, rng.randrange(len(filler))))
    return samples


@torch.no_grad()
def retrieved(logits_fn: LogitsFn, sample: PasskeySample, device: torch.device | str = "cpu") -> bool:
    ids = torch.tensor([sample.input_ids], device=device)
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1], device=device)[None]}
    start, end = sample.answer_span
    predicted = logits_fn(batch)[0, start - 1:end - 1].argmax(-1)
    return bool((predicted == ids[0, start:end]).all())


def accuracy_grid(logits_fns: dict[str, LogitsFn], samples: list[PasskeySample], contexts: list[int],
                  depths: list[float], device: torch.device | str = "cpu") -> dict[str, list[list[float]]]:
    """Per model: accuracy[context index][depth index] over the trials."""
    grids = {}
    for name, fn in logits_fns.items():
        hits: dict[tuple[int, float], list[bool]] = {}
        for sample in samples:
            hits.setdefault((len(sample.input_ids), sample.depth), []).append(retrieved(fn, sample, device))
        grids[name] = [[sum(hits[(c, d)]) / len(hits[(c, d)]) for d in depths] for c in contexts]
    return grids
