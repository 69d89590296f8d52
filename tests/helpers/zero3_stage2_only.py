"""A stage-2-only ZeRO-3 conversion (`distill.stage=model_level distill.init_from=<stage-1 result>`) run twice in
one process group (gloo, CPU): with the teacher loaded whole before the engine (the path before partitioned
stage-2 starts; `partitioned_teacher_config` answers None) and loaded partitioned, the saved stage-1 weights
written into the partitions one tensor at a time. tests/integration/test_zero3_separate_jobs.py compares them.

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.helpers.zero3_stage2_only \
        <teacher> <stage-1 dir> <out>
"""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

from ascend_edit.tasks.convert import run
from tests.helpers.zero3_handoff import overrides
from tests.unit.test_config_cli import compose_typed

MODES = ("whole_teacher", "partitioned")


def stage2_overrides(teacher: Path, start: Path, out_dir: Path) -> list[str]:
    return [*overrides(teacher, out_dir), "distill.stage=model_level", f"distill.init_from={start}",
            "eval.suite=false"]


def main(teacher: str, start: str, out: str) -> None:
    for mode in MODES:
        cfg = compose_typed(stage2_overrides(Path(teacher), Path(start), Path(out) / mode))
        if mode == "whole_teacher":
            with mock.patch("ascend_edit.train.prepare.partitioned_teacher_config", return_value=None):
                run(cfg, partitioned_handoff=False)
        else:
            run(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:4])
