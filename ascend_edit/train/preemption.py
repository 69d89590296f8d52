"""Preemption: SIGTERM / SIGINT ask the train loop to checkpoint at the next step boundary and exit.

Schedulers (Slurm, msrun, Kubernetes) send SIGTERM some time before they kill a job. The handler only
sets a flag; the train loop reads it once per optimizer step (every rank's flag is combined with the
step's metric all-reduce, so all ranks stop at the same step), saves a checkpoint and raises
`Preempted`, which exits the process with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"). Rerunning
the same command resumes from that checkpoint; `torchrun --max-restarts` and Slurm requeue do so
automatically. A second SIGINT (Ctrl-C twice) interrupts at once, as usual.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is Python 3.11+

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """The run stopped on a signal after saving a checkpoint; exits with `EXIT_PREEMPTED`.

    A `SystemExit`, so it passes through Hydra and the CLI to the process exit code as it is.
    """

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionFlag:
    """Set by SIGTERM / SIGINT while installed (`with PreemptionFlag() as flag:`); read by the loop."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """What the handler does (also callable directly, e.g. from tests)."""
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signal_name is None:
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting with %d",
                        signal.Signals(signum).name, EXIT_PREEMPTED)
        self.signal_name = signal.Signals(signum).name

    def _handle(self, signum, _frame) -> None:
        self.request(signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def resume_instruction(run_dir: Path) -> str:
    """How to resume a run stopped in `run_dir`: a sweep's job is resumed by its sweep (a multirun ignores
    hydra.run.dir, so that advice started the job over in a new directory); any other run by its directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"run the same sweep again with hydra.sweep.dir={HydraConfig.get().sweep.dir}"
    return f"run the same command with hydra.run.dir={run_dir} (the launch wrappers: RUN_DIR={run_dir})"
