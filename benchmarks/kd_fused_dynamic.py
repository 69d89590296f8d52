"""The compiled KD chunk math with dynamic rows against the eager chunks at the Qwen3-8B head (CUDA only).

Forward KL and JSD, 4,096 bf16 tokens, hidden 4,096, vocab 151,936, chunk 512; two warm-up calls and one
4,000-token call (a last chunk of 416 rows, as a loss mask gives) before the median of 5. Prints two lines.

    python benchmarks/kd_fused_dynamic.py
"""
from __future__ import annotations

import statistics

import torch

from ascend_edit.distill.chunked_kd import kd_logits_loss

VOCAB, HIDDEN, TOKENS = 151_936, 4096, 4096


def main() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).cuda().bfloat16()
    student = torch.randn(TOKENS, HIDDEN).cuda().bfloat16()
    teacher = (student.float() + 0.5 * torch.randn(TOKENS, HIDDEN, device="cuda")).bfloat16()

    def run(fused: bool, kind: str, tokens: int = TOKENS) -> None:
        hidden = student[:tokens].clone().requires_grad_(True)
        kd_logits_loss(hidden, teacher[:tokens], weight, kind=kind, fused=fused).backward()

    for kind in ("forward", "jsd"):
        medians = []
        for fused in (False, True):
            for _ in range(2):
                run(fused, kind)
            run(fused, kind, 4000)
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(fused, kind)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            medians.append(statistics.median(times))
        print(f"{kind}: eager {medians[0]:.2f} ms, fused (dynamic rows) {medians[1]:.2f} ms, "
              f"{torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
