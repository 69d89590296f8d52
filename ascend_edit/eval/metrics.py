"""Held-out quality of the converted model: perplexity, KL to the teacher, top-1 agreement."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ascend_edit.models.surgery import set_mode

MAX_EXP_ARGUMENT = math.log(sys.float_info.max)  # ~709.78: exp() of more overflows a float


class TeacherReference:
    """The teacher path's final hidden states on a fixed list of evaluation batches, computed on first use.

    A conversion evaluates the same batches three to five times (teacher, after the warm start, after each
    stage), and the teacher path does not change: its final hidden states are kept and later evaluations
    only re-apply the LM head. That is used only when the head alone reproduces the model's own logits to
    the bit on the first batch (true of Llama / Qwen heads; an architecture that scales or caps its logits
    keeps the full forward). On the 135M default job this removes three of seven evaluation forwards.

    The teacher is the original model, always. A stage 2 that trains shared weights
    (`distill.model_level.trainable=target+norms|all`) moves the edited model's own teacher path (same norms,
    MLPs and head as the student), so from then on the teacher forwards and head must come from the frozen
    copy the stage trained against: `use_teacher(copy)`. Without it, evaluating a model whose head has moved
    since the states were kept is refused rather than compared against a teacher that is not the teacher.
    """

    def __init__(self, batches: list[dict], teacher: nn.Module | None = None):
        self.batches = batches
        self._hidden: dict[tuple[int, int], torch.Tensor] = {}  # (batch index, first row) -> final states
        self.head_reproduces_logits: bool | None = None  # decided on the first batch
        self._head_fingerprint: float | None = None
        self.teacher = teacher

    def use_teacher(self, teacher: nn.Module | None) -> None:
        """Take the teacher path of `teacher` (a frozen copy of the edited model made before its shared
        weights trained) for every later teacher forward and head; None keeps the evaluated model's own."""
        if teacher is not None:
            self.teacher = teacher

    def check_teacher_unmoved(self, model: nn.Module) -> None:
        """Refuse to go on when the evaluated model's LM head has trained since the states were kept and no
        frozen teacher was given: its teacher path would no longer be the teacher."""
        if self.teacher is not None or self._head_fingerprint is None:
            return
        weight = _head(model).weight
        if weight.numel() == 0:
            # ZeRO-3 partitioned the head after the states were kept (a teacher loaded whole for a budget or a
            # sensitivity pass): nothing to compare here, and the kept states are dropped (`logits`)
            return
        if _fingerprint(weight) != self._head_fingerprint:
            raise ValueError("the model's LM head trained since the teacher's states were kept, so its teacher "
                             "path is no longer the teacher: pass the stage's frozen teacher copy "
                             "(TeacherReference.use_teacher)")

    def logits(self, model: nn.Module, index: int, rows: slice) -> torch.Tensor:
        """Teacher logits of rows `rows` of batch `index`, [rows, length, vocab] in the model's dtype."""
        batch = self.batches[index]
        source = self.teacher if self.teacher is not None else model  # whose teacher path is the teacher
        head = _head(source)
        key = (index, rows.start)
        hidden = self._hidden.get(key)
        if hidden is not None and head.weight.numel() == 0:  # partitioned since the states were kept: run forwards
            self._hidden.clear()
            self.head_reproduces_logits, hidden = False, None
        if hidden is not None:
            return head(hidden.to(batch["input_ids"].device))
        captured: list[torch.Tensor] = []
        hook = source.get_submodule("model").register_forward_hook(
            lambda module, args, output: captured.append(output.last_hidden_state))
        set_mode(source, "teacher")
        try:
            logits = source(input_ids=batch["input_ids"][rows], position_ids=batch["position_ids"][rows],
                            use_cache=False).logits
        finally:
            hook.remove()
            set_mode(source, "student")
        if self.head_reproduces_logits is None:
            # a partitioned (ZeRO-3) head has no values here to fingerprint: no reuse
            self.head_reproduces_logits = head.weight.numel() > 0 and bool(torch.equal(head(captured[0]), logits))
        if self.head_reproduces_logits:
            # in host memory while the stages train (16 x 4,096 tokens of Qwen3-8B: 0.5 GiB)
            self._hidden[key] = captured[0].to("cpu")
            if self._head_fingerprint is None:
                self._head_fingerprint = _fingerprint(head.weight)
        return logits


def _head(model: nn.Module) -> nn.Linear:
    """The LM head (a Linear in every architecture the project converts)."""
    return cast(nn.Linear, cast(PreTrainedModel, model).get_output_embeddings())


def _fingerprint(weight: torch.Tensor) -> float:
    """The sum in fp64 (accumulated without an fp64 copy): any optimizer update of the head changes it."""
    return float(torch.sum(weight.detach(), dtype=torch.float64))


# Tokens per evaluation forward: a batch's rows are run in groups of at most this many tokens (one row when a
# row is longer), so the logits held at once stay small (Qwen3-8B: 4,096 tokens x 151,936 vocab in bf16 is
# 1.2 GiB, where a batch of 4 such rows was 4.6 GiB per path). Rows are independent, so the metrics do not change.
EVAL_FORWARD_TOKENS = 4096
# Scored tokens whose fp32 log-probabilities are formed at once (logp of both paths and the KL's terms): 1,024
# tokens of a 152K vocabulary is 0.6 GiB per fp32 tensor, instead of 9.3 GiB for a whole 4 x 4,096 batch.
METRIC_CHUNK_TOKENS = 1024


def row_groups(batch: dict, max_tokens: int | None = None) -> list[slice]:
    """Consecutive row ranges of `batch` holding at most `max_tokens` tokens each (at least one row). The same
    shapes give the same groups on every rank, so ZeRO-3's gathers stay in step."""
    rows, length = batch["input_ids"].shape
    per_group = max(1, (max_tokens or EVAL_FORWARD_TOKENS) // max(length, 1))
    return [slice(start, min(start + per_group, rows)) for start in range(0, rows, per_group)]


class TokenSums:
    """Sums of per-token metrics over scored tokens, accumulated chunk by chunk (see `add`)."""

    def __init__(self) -> None:
        self.teacher_nll = self.student_nll = self.kl = self.agree = 0.0
        self.kl_copyable = self.excess_copyable = 0.0
        self.tokens = self.copyable = 0

    def add(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
            copyable: torch.Tensor | None = None, chunk: int | None = None) -> None:
        """Add scored tokens: logits [tokens, vocab] in any dtype, targets [tokens]; fp32 log-probabilities are
        formed `chunk` tokens at a time, never for all tokens at once."""
        chunk = chunk or METRIC_CHUNK_TOKENS
        # the teacher scored against itself (evaluate(which="teacher")): its log-probs once, not twice
        same = student_logits is teacher_logits
        for start in range(0, targets.numel(), chunk):
            part = slice(start, start + chunk)
            teacher_logp = F.log_softmax(teacher_logits[part].float(), dim=-1)
            student_logp = teacher_logp if same else F.log_softmax(student_logits[part].float(), dim=-1)
            target = targets[part, None]
            t_nll = -teacher_logp.gather(-1, target).squeeze(-1)
            s_nll = -student_logp.gather(-1, target).squeeze(-1)
            agree = teacher_logp.argmax(-1) == student_logp.argmax(-1)
            token_kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
            self.teacher_nll += float(t_nll.sum())
            self.student_nll += float(s_nll.sum())
            self.kl += float(token_kl.sum())
            self.agree += float(agree.sum())
            self.tokens += int(target.numel())
            if copyable is not None:
                copy = copyable[part]
                self.kl_copyable += float(token_kl[copy].sum())
                self.excess_copyable += float((s_nll - t_nll)[copy].sum())
                self.copyable += int(copy.sum())

    def check(self) -> None:
        if self.tokens == 0:
            raise ValueError("evaluation batches hold no scored tokens")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], which: str = "student",
             reference: TeacherReference | None = None) -> dict[str, float]:
    """Token-weighted held-out metrics of `which` path; KL and agreement are against the teacher path.

    `reference`: the teacher's states on these batches kept between calls (see TeacherReference). Each batch
    runs in row groups of at most EVAL_FORWARD_TOKENS tokens and its metrics are formed in token chunks, so
    an 8B model's 152K-vocabulary logits at 4K tokens are never held as one fp32 batch.
    """
    if reference is None:
        reference = TeacherReference(batches)
    elif reference.batches is not batches:
        raise ValueError("the teacher reference was built on other evaluation batches")
    reference.check_teacher_unmoved(model)
    sums = TokenSums()
    for index, batch in enumerate(batches):
        for rows in row_groups(batch):
            mask = batch["loss_mask"][rows]
            targets = torch.roll(batch["input_ids"][rows], -1, dims=1)[mask]
            teacher_logits = reference.logits(model, index, rows)[mask]
            if which == "teacher":
                student_logits = teacher_logits
            else:
                set_mode(model, "student")
                student_logits = model(input_ids=batch["input_ids"][rows], position_ids=batch["position_ids"][rows],
                                       use_cache=False).logits[mask]
            sums.add(teacher_logits, student_logits, targets)
            del teacher_logits, student_logits
    set_mode(model, "student")
    sums.check()
    return {"ppl": perplexity(sums.student_nll / sums.tokens), "teacher_kl": sums.kl / sums.tokens,
            "top1_agreement": sums.agree / sums.tokens, "tokens": sums.tokens}


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), infinite past float range (a diverged model's mean NLL above ~709 nats/token must be
    reported, as inf — written as null — not stop the evaluation with an OverflowError)."""
    return math.exp(mean_nll) if mean_nll < MAX_EXP_ARGUMENT else math.inf


LogitsFn = Callable[[dict], torch.Tensor]  # batch -> logits [B, L, V]


def paired_logits(model: nn.Module, teacher: nn.Module | None = None) -> tuple[LogitsFn, LogitsFn]:
    """(teacher, student) logits of one edited model: the same weights through its two attention paths.
    `teacher`: the frozen copy whose teacher path is the original model, when stage 2 trained shared weights
    of `model` (its own teacher path moved with them)."""

    def run(owner: nn.Module, which: str) -> LogitsFn:
        def logits(batch: dict) -> torch.Tensor:
            set_mode(owner, which)
            try:
                return owner(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            finally:
                set_mode(owner, "student")
        return logits

    return run(teacher if teacher is not None else model, "teacher"), run(model, "student")


def model_logits(model: nn.Module) -> LogitsFn:
    """Logits of a plain model (a teacher or an exported converted model)."""
    def logits(batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return logits


def copyable_mask(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool, in the logits' alignment: position t's target ``input_ids[t + 1]`` follows ``input_ids[t]``
    somewhere earlier in the same document of the row (an induction / copy mechanism could predict it).
    Documents are the runs of ``position_ids`` between resets to 0, as packed sequences mark them; the
    last position (no target in the row) is False."""
    rows, length = input_ids.shape
    mask = torch.zeros(rows, length, dtype=torch.bool, device=input_ids.device)
    if rows == 0 or length < 2:
        return mask
    ids = input_ids.long()
    # documents numbered across the whole batch (row r's first document is r * length + 1), so one pass
    # over the flattened batch never matches a bigram of another row
    row_offset = torch.arange(rows, device=ids.device)[:, None] * length
    document = ((position_ids == 0).long().cumsum(dim=1) + row_offset)[:, :-1].reshape(-1)
    vocab = int(ids.max()) + 1
    keys = (document * vocab + ids[:, :-1].reshape(-1)) * vocab + ids[:, 1:].reshape(-1)
    _, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=ids.device)  # row-major: earlier in a row = smaller
    first = torch.full((keys.numel(),), keys.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    mask[:, :-1] = (positions > first[inverse]).view(rows, length - 1)
    return mask


@torch.no_grad()
def compare(teacher: LogitsFn, student: LogitsFn, batches: list[dict]) -> dict[str, dict]:
    """Token-weighted held-out metrics of teacher and student; KL(teacher || student) and top-1 agreement.

    The teacher's logits are computed once per batch and serve both its own perplexity and the comparison.
    The student's KL and excess NLL (student minus teacher) are also split by whether a token is *copyable*
    (:func:`copyable_mask`): a conversion that lost retrieval from context loses most there, one whose
    predictions degrade everywhere loses on the novel tokens too (docs/evaluation.md).
    """
    sums = TokenSums()
    for batch in batches:
        mask = batch["loss_mask"]
        targets = torch.roll(batch["input_ids"], -1, dims=1)[mask]
        copy = copyable_mask(batch["input_ids"], batch["position_ids"])[mask]
        sums.add(teacher(batch)[mask], student(batch)[mask], targets, copy)
    sums.check()
    tokens, copyable, kl, kl_copy = sums.tokens, sums.copyable, sums.kl, sums.kl_copyable
    excess_all, excess_copy = sums.student_nll - sums.teacher_nll, sums.excess_copyable
    novel = tokens - copyable
    split = {"copyable_fraction": copyable / tokens,
             "teacher_kl_copyable": kl_copy / copyable if copyable else None,
             "teacher_kl_novel": (kl - kl_copy) / novel if novel else None,
             "excess_nll_copyable": excess_copy / copyable if copyable else None,
             "excess_nll_novel": (excess_all - excess_copy) / novel if novel else None,
             # a share of the student's total excess: defined only when both kinds of token lose (a kind the
             # student does better on would put the other's "share" above 100 % or below 0)
             "excess_share_copyable": (excess_copy / excess_all
                                       if excess_all > 0 and 0 <= excess_copy <= excess_all else None)}
    return {"teacher": {"ppl": perplexity(sums.teacher_nll / tokens), "tokens": tokens},
            "student": {"ppl": perplexity(sums.student_nll / tokens), "teacher_kl": max(kl / tokens, 0.0),
                        "top1_agreement": sums.agree / tokens, "tokens": tokens, "by_copyability": split}}
