"""The held-out evaluation suite: quality per context length and domain, and passkey retrieval.

Run on any pair of logit functions (teacher, student): the two paths of an edited model at the end of
a conversion, or a teacher and a converted / exported model side by side (`ascend-edit eval`).
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from ascend_edit.config import EvalConfig, RootConfig
from ascend_edit.data.heldout import check_disjoint, out_of_domain_documents
from ascend_edit.eval.long_context import token_stream, window_batches, windows
from ascend_edit.eval.metrics import LogitsFn, compare
from ascend_edit.eval.passkey import accuracy_grid, make_grid

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "in_domain": "held-out documents of the training data (never trained on)",
    "python_docs": "Python Language Reference prose from the standard library's pydoc_data (out of domain)",
}


@dataclass
class HeldOut:
    name: str
    description: str
    documents: list[str]


def held_out_sets(cfg: EvalConfig, run_split: tuple[list[str], list[str]] | None) -> dict[str, HeldOut]:
    """The evaluation texts named in `cfg.domains` (and the passkey filler), each checked to share no
    document or passage with the run's training documents `run_split[0]`."""
    train = run_split[0] if run_split else []
    sets = {}
    for name in dict.fromkeys([*cfg.domains, cfg.passkey_filler]):
        if name == "in_domain":
            if run_split is None or not run_split[1]:
                log.warning("eval: no in-domain held-out text for this run's data; skipped")
                continue
            documents = run_split[1]
        else:
            documents = out_of_domain_documents(name)
            check_disjoint(documents, train, name)
        sets[name] = HeldOut(name, DESCRIPTIONS[name], documents)
    return sets


def requested_contexts(cfg: EvalConfig) -> list[int]:
    """Every context the suite is asked to measure: quality windows, and passkey prompts when the test is on."""
    return [*cfg.contexts, *(cfg.passkey_contexts if cfg.passkey_trials else [])]


def check_measurable(cfg: EvalConfig, max_positions: int | None) -> None:
    """Refuse a suite that would measure nothing because every context it asks for is longer than the model's
    positions (an empty table and exit 0 would read as a result)."""
    requested = requested_contexts(cfg)
    if max_positions is not None and requested and all(c > max_positions for c in requested):
        raise ValueError(f"eval.contexts {list(cfg.contexts)}" +
                         (f" and eval.passkey_contexts {list(cfg.passkey_contexts)}" if cfg.passkey_trials else "") +
                         f" are all longer than the model's {max_positions} positions: the held-out suite would "
                         "measure nothing; list a shorter context")


def check_suite_before_training(cfg: RootConfig, max_positions: int | None) -> None:
    """What would stop the end-of-run suite after the whole conversion, checked before training starts: a context
    grid the model cannot hold, and an out-of-domain set that the training data contains."""
    from ascend_edit.data.heldout import run_documents

    check_measurable(cfg.eval, max_positions)
    if cfg.data.cache_dir:
        # a tokenized-cache corpus may be larger than memory, and every rank runs this: its text is read whole only
        # by the end-of-run suite, which checks it there
        return
    out_of_domain = [n for n in dict.fromkeys([*cfg.eval.domains, cfg.eval.passkey_filler]) if n != "in_domain"]
    split = run_documents(cfg.data, cfg.device.seed) if out_of_domain else None
    if split is None:  # no out-of-domain set asked for, or data without text (synthetic ids)
        return
    for name in out_of_domain:
        check_disjoint(out_of_domain_documents(name), split[0], name)


def run_suite(teacher: LogitsFn, student: LogitsFn, tokenizer, cfg: EvalConfig, sets: dict[str, HeldOut],
              max_positions: int | None, device: torch.device | str = "cpu") -> dict:
    """Perplexity, teacher-KL and top-1 agreement per domain and context; passkey accuracy per context x depth."""
    started = time.perf_counter()
    def fits(context: int) -> bool:
        return max_positions is None or context <= max_positions

    check_measurable(cfg, max_positions)
    contexts = sorted({c for c in cfg.contexts if fits(c)})
    skipped = sorted({c for c in requested_contexts(cfg) if not fits(c)})
    if skipped:
        log.info("eval: contexts %s exceed the model's %s positions; skipped", skipped, max_positions)
    # Which texts were scored: python_docs comes from the running interpreter's pydoc_data, whose text differs
    # between Python versions (3.11 and 3.12 part after ~1.9K tokens): numbers from two machines compare only
    # when these digests agree.
    results: dict = {"max_positions": max_positions, "skipped_contexts": skipped, "domains": {}, "quality": {},
                     "python": platform.python_version(),
                     "text_sha256": {name: hashlib.sha256("\n\n".join(held.documents).encode()).hexdigest()[:16]
                                     for name, held in sets.items()}}
    for name, held in sets.items():
        if name not in cfg.domains:
            continue
        results["domains"][name] = held.description
        stream = token_stream(held.documents, tokenizer, max(contexts, default=0) * cfg.sequences)
        per_context = {}
        for context in contexts:
            ids = windows(stream, context, cfg.sequences)
            if len(ids) == 0:
                log.warning("eval: %s has fewer than %d tokens; context skipped", name, context)
                continue
            # per-model metrics, plus this context's counts and ratio
            metrics: dict[str, Any] = compare(teacher, student, window_batches(ids, cfg.batch_tokens, device))
            metrics["sequences"] = len(ids)
            metrics["ppl_ratio"] = metrics["student"]["ppl"] / metrics["teacher"]["ppl"]
            per_context[str(context)] = metrics
        results["quality"][name] = per_context
    passkey_contexts = sorted({c for c in cfg.passkey_contexts if fits(c)})
    if cfg.passkey_trials and passkey_contexts and cfg.passkey_filler in sets:
        filler = token_stream(sets[cfg.passkey_filler].documents, tokenizer, 4 * max(passkey_contexts))
        samples = make_grid(tokenizer, filler, passkey_contexts, list(cfg.passkey_depths), cfg.passkey_trials,
                            seed=cfg.seed)
        grids = accuracy_grid({"teacher": teacher, "student": student}, samples, passkey_contexts,
                              list(cfg.passkey_depths), device)
        results["passkey"] = {"contexts": passkey_contexts, "depths": list(cfg.passkey_depths),
                              "trials": cfg.passkey_trials, "filler": cfg.passkey_filler, "seed": cfg.seed, **grids}
    elif cfg.passkey_trials and passkey_contexts:
        log.warning("passkey test skipped: its filler eval.passkey_filler=%s has no text here", cfg.passkey_filler)
    results["seconds"] = time.perf_counter() - started
    return results
