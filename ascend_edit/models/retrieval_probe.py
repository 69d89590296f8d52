"""Synthetic pass-key probes for choosing which GateSWA layers keep full attention.

The KL on ordinary calibration text barely sees the layers that fetch a fact from far back: a short window
loses little on text whose next token mostly depends on the last sentence. A probe asks for exactly that
fetch; models/sensitivity.py scores each layer by how much sliding it alone moves the answer's prediction.
One probe of `context` tokens:

    filler[:a] | " The secret number is 314159. Keep it in mind. 314159 is the secret number." | filler[a:] |
    " Which number was secret? The secret number is" | " 314159"

* The filler is **training** text: the calibration batches themselves, never held-out evaluation text.
* Keys have six digits, drawn from a generator stream of their own (`seed` names it, not `eval.seed`), so no
  probe key can be one of the evaluation's five-digit keys (eval/passkey.py); the wording differs from the
  evaluation's too. The evaluation is not what the selection fits.
* The needle starts at depths spread over [0, 0.9) of the filler, so for windows well below the context it
  lies further back than a sliding layer reaches.

Without a tokenizer (a teacher built from a config alone) the same layout is made of token ids: the
template pieces and the key are ids drawn from the filler's own tokens — a copy probe.
Pieces are joined as token ids, so the answer positions are exact whatever the tokenizer does at word edges.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PROBE_NEEDLE = (" The secret number is", ". Keep it in mind.", " is the secret number.")
PROBE_QUESTION = " Which number was secret? The secret number is"
KEY_DIGITS = 6  # the evaluation's keys have five (eval/passkey.py make_grid), so the two never meet
MAX_DEPTH = 0.9


@dataclass(frozen=True)
class RetrievalProbes:
    """Probe sequences of one length, and where their answers are."""

    input_ids: torch.Tensor  # [n, context]
    score_mask: torch.Tensor  # [n, context] bool: True where the next token is an answer token
    keys: list[str]
    depths: list[float]


def filler_stream(batches: list[dict]) -> list[int]:
    """The calibration batches' token ids, one sequence after another (training text only)."""
    return [int(t) for batch in batches for row in batch["input_ids"].cpu() for t in row]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_probes(filler: list[int], context: int, count: int, tokenizer=None, seed: int = 0) -> RetrievalProbes:
    """`count` probes of exactly `context` tokens around `filler` (training token ids, read wrapping)."""
    if count < 1:
        raise ValueError(f"retrieval probes: count={count} must be >= 1")
    if not filler:
        raise ValueError("retrieval probes: the filler (calibration text) is empty")
    rng = random.Random(f"ascend_edit.retrieval_probe:{seed}")  # a stream of its own, not eval.seed's
    if tokenizer is not None:
        intro, remember, outro = (_ids(tokenizer, piece) for piece in PROBE_NEEDLE)
        question = _ids(tokenizer, PROBE_QUESTION)
    else:  # token-level copy probe: fixed template ids drawn from the filler's vocabulary
        vocab = sorted(set(filler))
        intro, remember, outro, question = ([rng.choice(vocab) for _ in range(n)] for n in (4, 4, 4, 6))
    rows, masks, keys, depths = [], [], [], []
    for k in range(count):
        depth = MAX_DEPTH * (k + rng.random()) / count
        if tokenizer is not None:
            key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
            key_ids = _ids(tokenizer, f" {key}")
        else:
            key_ids = [rng.choice(vocab) for _ in range(KEY_DIGITS)]
            key = " ".join(map(str, key_ids))
        offset = rng.randrange(len(filler))
        needle = intro + key_ids + remember + key_ids + outro
        room = context - len(needle) - len(question) - len(key_ids)
        if room < 0:
            raise ValueError(f"retrieval probes: context {context} is shorter than the needle and question "
                             f"({context - room} tokens): raise data.seq_len, or choose layers by text alone "
                             "(target.gate_swa.selection=text)")
        stream = [filler[(offset + i) % len(filler)] for i in range(room)]
        before = round(depth * room)
        ids = stream[:before] + needle + stream[before:] + question + key_ids
        mask = [False] * context
        for pos in range(context - len(key_ids) - 1, context - 1):  # logits at pos predict token pos + 1
            mask[pos] = True
        rows.append(ids)
        masks.append(mask)
        keys.append(key)
        depths.append(depth)
    return RetrievalProbes(torch.tensor(rows), torch.tensor(masks), keys, depths)


def probe_batches(probes: RetrievalProbes, batch_size: int, device: torch.device | str = "cpu") -> list[dict]:
    """Batches of the probes with `score_mask`, which models/sensitivity.py scores the KL on."""
    n, context = probes.input_ids.shape
    positions = torch.arange(context, device=device)[None]
    return [{"input_ids": probes.input_ids[s:s + batch_size].to(device),
             "position_ids": positions.expand(min(batch_size, n - s), -1),
             "score_mask": probes.score_mask[s:s + batch_size].to(device)} for s in range(0, n, batch_size)]


def calibration_probes(batches: list[dict], count: int, tokenizer=None, seed: int = 0) -> list[dict]:
    """Probe batches as long as the calibration sequences, filled with their text, batched alike."""
    first = batches[0]["input_ids"]
    probes = make_probes(filler_stream(batches), first.shape[1], count, tokenizer, seed)
    return probe_batches(probes, first.shape[0], first.device)


@torch.no_grad()
def answers_retrieved(model: torch.nn.Module, batches: list[dict]) -> float:
    """Fraction of probes whose every answer token is the model's top-1 prediction given the ones before (the
    verdict eval/passkey.py gives its samples): whether the probe asks something the teacher can do at all."""
    hits = total = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["score_mask"]
        predicted = model(input_ids=ids, position_ids=batch.get("position_ids"), use_cache=False).logits.argmax(-1)
        right = (predicted[:, :-1] == ids[:, 1:]) | ~mask[:, :-1]
        hits += int(right.all(-1).sum())
        total += ids.shape[0]
    return hits / max(total, 1)
