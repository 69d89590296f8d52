"""`ascend-edit eval` and `ascend-edit export` as separate ZeRO-3 jobs on one converted tiny MoE model, beside the
same jobs loading it whole (rank 0 alone), as torchrun ranks (gloo, CPU). tests/integration/test_zero3_separate_jobs.py
compares what they wrote.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.helpers.zero3_separate_jobs \
        <teacher> <converted> <out>

Writes, under <out>: `load-rank<r>.json` (each parameter's full size, resident values and partition size right
after the partitioned load; the most values gathered at once; whether rank 0's gathered copy equals the whole
load), `eval-partitioned/`, `eval-whole/`, `export-partitioned/`, `export-whole/`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.unit.test_config_cli import compose_typed


def eval_overrides(teacher: Path, converted: Path, out_dir: Path, engine: str) -> list[str]:
    return ["task=eval", "model=hf", f"model.path={teacher}", "model.dtype=fp32", "device=cpu", "device.threads=1",
            f"engine={engine}", f"eval.checkpoint={converted}", "eval.contexts=[64]", "eval.sequences=1",
            "eval.domains=[python_docs]", "eval.passkey_filler=python_docs", "eval.passkey_contexts=[160]",
            "eval.passkey_depths=[0.5]", "eval.passkey_trials=1", "eval.batch_tokens=128", f"output_dir={out_dir}"]


def export_overrides(converted: Path, out_dir: Path, engine: str) -> list[str]:
    return ["task=export", "device=cpu", "device.threads=1", f"engine={engine}", f"export.checkpoint={converted}",
            f"export.output={out_dir}", f"output_dir={out_dir.parent / 'unused'}"]


def check_load(converted: Path, out: Path) -> None:
    """Load partitioned; record what this rank holds; rank 0 compares the gathered copy with the whole load."""
    from ascend_edit.models.checkpoint import gathered_converted, load_converted
    from ascend_edit.models.zero3 import GATHER_METER, partition_sizes, zero3_init_config

    GATHER_METER.reset()
    model = load_converted(converted, torch.float32, zero3=zero3_init_config(torch.float32))
    rank, world = dist.get_rank(), dist.get_world_size()
    record = {"world": world, "params": partition_sizes(model), "largest_gathered": GATHER_METER.largest}
    copy = gathered_converted(model, converted, torch.float32)
    if copy is not None:
        whole = dict(load_converted(converted, torch.float32).named_parameters())
        record["gathered_equals_whole"] = sorted(whole) == sorted(n for n, _ in copy.named_parameters()) and all(
            torch.equal(p, whole[n]) for n, p in copy.named_parameters())
    (out / f"load-rank{rank}.json").write_text(json.dumps(record))


def main(teacher: str, converted: str, out: str) -> None:
    from ascend_edit.tasks import eval as eval_task
    from ascend_edit.tasks import export as export_task

    teacher_dir, converted_dir, out_dir = Path(teacher), Path(converted), Path(out)
    # The partitioned jobs (every rank), then the whole-model reference on rank 0 alone.
    eval_task.run(compose_typed(eval_overrides(teacher_dir, converted_dir, out_dir / "eval-partitioned", "zero3")))
    export_task.run(compose_typed(export_overrides(converted_dir, out_dir / "export-partitioned", "zero3")))
    check_load(converted_dir, out_dir)
    if dist.get_rank() == 0:
        eval_task.run(compose_typed(eval_overrides(teacher_dir, converted_dir, out_dir / "eval-whole", "torch")))
        export_task.run(compose_typed(export_overrides(converted_dir, out_dir / "export-whole", "torch")))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
