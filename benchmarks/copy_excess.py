"""Where does a converted model's excess loss sit: on tokens the context already holds, or on new ones?

For a converted run (or converted / exported model) and its teacher, every predicted token of the held-out
windows is put in one of two classes:

* **copyable**: the bigram (previous token, this token) already occurred earlier in the same window, so an
  induction / copy mechanism could predict it from the context;
* **novel**: everything else.

Per domain and context it prints the share of copyable tokens, the mean teacher-KL (nats/token) and the
student-minus-teacher NLL on each class, and the share of the total excess NLL that the copyable tokens carry.
If a conversion loses out of domain mainly on copyable tokens, the compressed keys have lost precise
retrieval, and training text rich in in-context repetition is the lever; if the excess sits on novel tokens,
it is not.

    python benchmarks/copy_excess.py RUN_DIR [--contexts 256 1024] [--sequences 16]

Writes nothing; the table is the result.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from ascend_edit.config import register_configs, to_typed
from ascend_edit.data.heldout import run_documents
from ascend_edit.eval.long_context import token_stream, windows
from ascend_edit.eval.suite import held_out_sets
from ascend_edit.models.loading import load_teacher
from ascend_edit.tasks.eval import load_student, run_config


def copyable_mask(ids: torch.Tensor) -> torch.Tensor:
    """[n, t-1] bool: target token ids[:, i+1] follows ids[:, i] somewhere earlier in the same window."""
    n, t = ids.shape
    mask = torch.zeros(n, t - 1, dtype=torch.bool)
    for row in range(n):
        seen: set[tuple[int, int]] = set()
        values = ids[row].tolist()
        for i in range(t - 1):
            pair = (values[i], values[i + 1])
            mask[row, i] = pair in seen
            seen.add(pair)
    return mask


@torch.no_grad()
def token_losses(teacher, student, ids: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """(teacher NLL, student NLL, teacher-KL), each [n, t-1], per predicted token."""
    t_nll, s_nll, kl = [], [], []
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        t_logp = F.log_softmax(teacher(input_ids=chunk).logits[:, :-1].float(), dim=-1)
        s_logp = F.log_softmax(student(input_ids=chunk).logits[:, :-1].float(), dim=-1)
        target = chunk[:, 1:].unsqueeze(-1)
        t_nll.append(-t_logp.gather(-1, target).squeeze(-1))
        s_nll.append(-s_logp.gather(-1, target).squeeze(-1))
        kl.append((t_logp.exp() * (t_logp - s_logp)).sum(-1))
    return torch.cat(t_nll), torch.cat(s_nll), torch.cat(kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory of `ascend-edit`")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--sequences", type=int, default=16)
    args = parser.parse_args()

    register_configs()
    with initialize_config_module("ascend_edit.conf", version_base="1.3"):
        cfg = to_typed(compose(config_name="config", overrides=["task=eval", f"eval.checkpoint={args.checkpoint}",
                                                           "output_dir=/tmp/copy_excess"]))
    cfg = run_config(args.checkpoint, cfg)
    student, _ = load_student(args.checkpoint)
    teacher, tokenizer = load_teacher(cfg.model, device="cpu")
    student.eval()
    teacher = teacher.float().eval()
    sets = held_out_sets(cfg.eval, run_documents(cfg.data, cfg.device.seed))
    header = (f"{'domain':12s} {'ctx':>5s} {'copyable':>8s} {'KL copy':>8s} {'KL novel':>8s} "
              f"{'dNLL copy':>9s} {'dNLL novel':>10s} {'excess on copy':>14s} {'ppl ratio':>9s}")
    print(header)
    for name in ("in_domain", "python_docs"):
        if name not in sets:
            continue
        stream = token_stream(sets[name].documents, tokenizer, max(args.contexts) * args.sequences)
        for context in args.contexts:
            ids = windows(stream, context, args.sequences)
            mask = copyable_mask(ids)
            t_nll, s_nll, kl = token_losses(teacher, student, ids)
            excess = s_nll - t_nll
            share = excess[mask].sum() / excess.sum()
            ratio = torch.exp(s_nll.mean() - t_nll.mean())
            print(f"{name:12s} {context:5d} {mask.float().mean():8.1%} {kl[mask].mean():8.3f} {kl[~mask].mean():8.3f} "
                  f"{excess[mask].mean():9.3f} {excess[~mask].mean():10.3f} {share:14.1%} {ratio:9.3f}")


if __name__ == "__main__":
    main()
