"""Run `ascend-edit` as a user's shell would, without paying the interpreter's start-up for every run.

`python -m ascend_edit.cli` spends 6-9 s importing torch, transformers and the package before it reads its
first argument; the suite starts the CLI dozens of times. :func:`run_cli` runs ``ascend_edit.cli.main(argv)``
in a fresh child process forked from a server process that imported those modules once (multiprocessing's
forkserver with a preload list). The child is still its own process: its own Hydra state, logging set-up,
working directory, environment, stdout/stderr (file descriptors 1 and 2 point at files) and exit status, which
is what the tests read. An exception that escapes ``main`` prints its traceback and exits 1, as the
interpreter would.

:func:`start_ranks` does the same for a multi-process job: one forked child per rank with the environment a
launcher gives it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT: what `ascend_edit.distributed.discover`
reads when the variables are set by hand), instead of torchrun starting a fresh interpreter per rank. The
torchrun path itself stays covered by tests/unit/test_distributed.py and the slow tier.

What differs from a fresh interpreter, and so stays on `subprocess`: anything that reads the environment at
import time (the server's environment is the test session's as it was when the first run started), the
`ascend-edit` console script itself, and torchrun's own behaviour (signal forwarding, restarts). A few tests
keep running the real interpreter so that the entry point stays covered end to end.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path

# What the CLI imports on its way to a training run (the expensive part of every start-up).
_PRELOAD = ["torch", "transformers", "deepspeed", "ascend_edit.cli", "ascend_edit.models.loading",
            "ascend_edit.tasks.convert", "ascend_edit.tasks.eval", "ascend_edit.tasks.export",
            "ascend_edit.eval.report", "matplotlib.pyplot"]
# How long the other ranks get to finish once one rank has failed (torchrun stops the group likewise).
_FAILED_RANK_GRACE_S = 10.0

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _context = context
    return _context


@dataclass(frozen=True)
class _Program:
    """What a child runs: the CLI's ``main(args)``, or ``python -m module args`` when ``module`` is set."""

    args: tuple[str, ...]
    module: str | None = None

    def run(self) -> int:
        if self.module is None:
            sys.argv = ["ascend-edit"]
            from ascend_edit.cli import main

            return main(list(self.args))
        sys.argv = [self.module, *self.args]
        runpy.run_module(self.module, run_name="__main__", alter_sys=True)
        return 0

    def label(self) -> list[str]:
        return ["ascend-edit", *self.args] if self.module is None else ["python", "-m", self.module, *self.args]


def _child(program: _Program, cwd: str, env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """The body of one run in the forked child; never returns."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    code: int
    try:
        code = program.run()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # SystemExit("message"): the interpreter prints it and exits 1
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedJob:
    """One run or the ranks of one job, started by :func:`start`; Popen-like: poll, send_signal, wait."""

    def __init__(self, program: _Program, envs: list[dict[str, str]], cwd: str):
        self._program = program
        self._scratch = tempfile.TemporaryDirectory(prefix="cli-run-")
        self._outputs = [(os.path.join(self._scratch.name, f"stdout{i}"), os.path.join(self._scratch.name, f"stderr{i}"))
                         for i in range(len(envs))]
        context = _forkserver()
        self._children = [context.Process(target=_child, args=(program, cwd, env, *out))
                          for env, out in zip(envs, self._outputs)]
        for child in self._children:
            child.start()

    def poll(self) -> int | None:
        """None while any process runs, else the job's exit status."""
        if any(child.is_alive() for child in self._children):
            return None
        return self._status()

    def _status(self) -> int:
        codes = [child.exitcode or 0 for child in self._children]
        return next((code for code in codes if code != 0), 0)

    def send_signal(self, signum: int) -> None:
        for child in self._children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for every process; stdout and stderr are the processes' outputs in rank order. Once a rank has
        failed the others get a grace period and are then killed (the job's status is the failed rank's);
        past ``timeout`` every process is killed and ``TimeoutExpired`` raised."""
        deadline = time.monotonic() + timeout
        stop_at, failed_status, timed_out = deadline, None, False
        while alive := [child for child in self._children if child.is_alive()]:
            if stop_at <= time.monotonic():
                self.send_signal(signal.SIGKILL)
                timed_out = failed_status is None
                break
            wait_for_any([child.sentinel for child in alive], timeout=stop_at - time.monotonic())
            failed = [child.exitcode for child in self._children if child.exitcode not in (None, 0)]
            if failed_status is None and failed:
                failed_status = failed[0]
                stop_at = min(deadline, time.monotonic() + _FAILED_RANK_GRACE_S)
        for child in self._children:
            child.join()
        outputs = [[Path(path).read_text(errors="replace") if os.path.exists(path) else "" for path in pair]
                   for pair in self._outputs]
        self._scratch.cleanup()
        if timed_out:
            raise subprocess.TimeoutExpired(self._program.label(), timeout)
        status = self._status() if failed_status is None else failed_status
        return subprocess.CompletedProcess(self._program.label(), status,
                                           "".join(out for out, _ in outputs), "".join(err for _, err in outputs))


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (a rendezvous port for a test's ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: Sequence[str], *, module: str | None = None, world: int | None = None,
          cwd: str | Path | None = None, env: Mapping[str, str] | None = None) -> ForkedJob:
    """Start ``ascend-edit ARGS`` (or ``python -m MODULE ARGS``) in forked, preloaded children: one plain
    process, or ``world`` ranks (1 included) with a launcher's environment. ``env`` replaces the environment
    (default: this process's)."""
    base = dict(os.environ if env is None else env)
    if world is None:
        envs = [base]
    else:
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
                      "LOCAL_WORLD_SIZE": str(world)}
        envs = [{**base, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(world)]
    return ForkedJob(_Program(tuple(args), module), envs, str(cwd or os.getcwd()))


def run_cli(args: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 600, fresh_interpreter: bool = False, world: int | None = None,
            module: str | None = None) -> subprocess.CompletedProcess:
    """``ascend-edit ARGS`` to the end; the result reads like ``subprocess.run``'s with ``capture_output=True,
    text=True``. ``fresh_interpreter=True`` runs ``python -m ascend_edit.cli`` itself instead of a preloaded fork
    (the entry point end to end); ``world`` and ``module`` as for :func:`start`."""
    if fresh_interpreter:
        if world is not None or module is not None:
            raise ValueError("fresh_interpreter runs the CLI in one process")
        return subprocess.run([sys.executable, "-m", "ascend_edit.cli", *args], cwd=cwd or os.getcwd(),
                              env=dict(os.environ if env is None else env), capture_output=True, text=True,
                              timeout=timeout, check=False)
    return start(args, module=module, world=world, cwd=cwd, env=env).wait(timeout)
