"""Held-out quality of the converted model: perplexity, KL to the teacher, top-1 agreement."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ascend_edit.models.surgery import set_mode


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], which: str = "student") -> dict[str, float]:
    """Token-weighted held-out metrics of `which` path; KL and agreement are against the teacher path.

    Logits are materialised one batch at a time (evaluation batches are small).
    """
    nll = kl = agree = 0.0
    tokens = 0
    for batch in batches:
        mask = batch["loss_mask"]
        targets = torch.roll(batch["input_ids"], -1, dims=1)[mask]
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        set_mode(model, "teacher")
        teacher_logp = F.log_softmax(model(**kwargs).logits[mask].float(), dim=-1)
        if which == "teacher":
            logp = teacher_logp
        else:
            set_mode(model, "student")
            logp = F.log_softmax(model(**kwargs).logits[mask].float(), dim=-1)
        nll += float(-logp.gather(-1, targets[:, None]).sum())
        kl += float((teacher_logp.exp() * (teacher_logp - logp)).sum())
        agree += float((teacher_logp.argmax(-1) == logp.argmax(-1)).sum())
        tokens += int(mask.sum())
    set_mode(model, "student")
    if tokens == 0:
        raise ValueError("evaluation batches hold no scored tokens")
    return {"ppl": math.exp(nll / tokens), "teacher_kl": kl / tokens, "top1_agreement": agree / tokens,
            "tokens": tokens}


LogitsFn = Callable[[dict], torch.Tensor]  # batch -> logits [B, L, V]


def paired_logits(model: nn.Module) -> tuple[LogitsFn, LogitsFn]:
    """(teacher, student) logits of one edited model: the same weights through its two attention paths."""

    def run(which: str) -> LogitsFn:
        def logits(batch: dict) -> torch.Tensor:
            set_mode(model, which)
            try:
                return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            finally:
                set_mode(model, "student")
        return logits

    return run("teacher"), run("student")


def model_logits(model: nn.Module) -> LogitsFn:
    """Logits of a plain model (a teacher or an exported converted model)."""
    def logits(batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return logits


@torch.no_grad()
def compare(teacher: LogitsFn, student: LogitsFn, batches: list[dict]) -> dict[str, dict[str, float]]:
    """Token-weighted held-out metrics of teacher and student; KL(teacher || student) and top-1 agreement.

    The teacher's logits are computed once per batch and serve both its own perplexity and the comparison.
    """
    t_nll = s_nll = kl = agree = 0.0
    tokens = 0
    for batch in batches:
        mask = batch["loss_mask"]
        targets = torch.roll(batch["input_ids"], -1, dims=1)[mask][:, None]
        teacher_logp = F.log_softmax(teacher(batch)[mask].float(), dim=-1)
        student_logp = F.log_softmax(student(batch)[mask].float(), dim=-1)
        t_nll += float(-teacher_logp.gather(-1, targets).sum())
        s_nll += float(-student_logp.gather(-1, targets).sum())
        kl += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
        agree += float((teacher_logp.argmax(-1) == student_logp.argmax(-1)).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("evaluation batches hold no scored tokens")
    return {"teacher": {"ppl": math.exp(t_nll / tokens), "tokens": tokens},
            "student": {"ppl": math.exp(s_nll / tokens), "teacher_kl": max(kl / tokens, 0.0),
                        "top1_agreement": agree / tokens, "tokens": tokens}}
