"""Held-out quality of the converted model: perplexity, KL to the teacher, top-1 agreement."""
from __future__ import annotations

import math

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
        kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
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
