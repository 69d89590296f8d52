"""TensorBoard event files while training, next to metrics.jsonl (`tensorboard --logdir RUN_DIR/tensorboard`).

Optional: with the `tensorboard` extra missing (`pip install ascend_edit[tensorboard]`) every call is a
no-op, and metrics.jsonl / report.md carry the same curves.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class TrainingBoard:
    """Scalars of every optimizer step under `<stage>/<metric>` (per-layer losses as `<stage>/layer/<idx>`)."""

    def __init__(self, log_dir: Path | None, purge_step: int | None = None):
        """`purge_step`: events of this step and later already in `log_dir` are hidden (a resumed stage writes
        them again from its checkpoint's step)."""
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch imports tensorboard lazily and raises this when it is not installed
            log.debug("tensorboard is not installed: no event files (pip install 'ascend_edit[tensorboard]')")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10, purge_step=purge_step)

    def log(self, stage: str, step: int, metrics: dict) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def training_board(metrics_log: Path | None, stage: str, start_step: int = 0) -> TrainingBoard:
    """A board for one stage writing beside `metrics_log`, in `tensorboard/<stage>/` (None: a no-op, e.g. on
    ranks other than the main one). Per stage, so that a stage resumed at `start_step` purges only its own later
    events: TensorBoard then shows each step once after a resume."""
    if metrics_log is None:
        return TrainingBoard(None)
    return TrainingBoard(Path(metrics_log).parent / "tensorboard" / stage, purge_step=start_step + 1)
