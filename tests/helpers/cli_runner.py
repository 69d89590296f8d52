"""Run `ascend-edit` as a user's shell would, without paying the interpreter's start-up for every run.

`python -m ascend_edit.cli` spends 6-9 s importing torch, transformers and the package before it reads its
first argument; the suite starts the CLI dozens of times. :func:`run_cli` runs ``ascend_edit.cli.main(argv)``
in a fresh child process forked from a server process that imported those modules once (multiprocessing's
forkserver with a preload list). The child is still its own process: its own Hydra state, logging set-up,
working directory, environment, stdout/stderr (file descriptors 1 and 2 point at files) and exit status, which
is what the tests read. An exception that escapes ``main`` prints its traceback and exits 1, as the
interpreter would.

What differs from a fresh interpreter, and so stays on `subprocess`: anything that reads the environment at
import time (the server's environment is the test session's as it was when the first run started), signals
sent to a running job, the `ascend-edit` console script itself, and launchers that start their own processes
(torchrun). A few tests keep running the real interpreter so that the entry point stays covered end to end.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the CLI imports on its way to a training run (the expensive part of every start-up).
_PRELOAD = ["torch", "transformers", "ascend_edit.cli", "ascend_edit.models.loading", "ascend_edit.tasks.convert",
            "ascend_edit.tasks.eval", "ascend_edit.tasks.export", "ascend_edit.eval.report", "matplotlib.pyplot"]

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _context = context
    return _context


def _child(argv: list[str], cwd: str, env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """The body of one CLI run in the forked child; never returns."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["ascend-edit"]
    code: int
    try:
        from ascend_edit.cli import main

        code = main(argv)
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


def run_cli(args: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 600, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """``ascend-edit ARGS``; the result reads like ``subprocess.run``'s with ``capture_output=True, text=True``.

    ``env`` replaces the environment (default: this process's). ``fresh_interpreter=True`` runs
    ``python -m ascend_edit.cli`` itself instead of a preloaded fork (the entry point end to end).
    """
    env = dict(os.environ if env is None else env)
    cwd = str(cwd or os.getcwd())
    if fresh_interpreter:
        return subprocess.run([sys.executable, "-m", "ascend_edit.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    context = _forkserver()
    with tempfile.TemporaryDirectory(prefix="cli-run-") as scratch:
        out, err = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        child = context.Process(target=_child, args=(list(args), cwd, env, out, err))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["ascend-edit", *args], timeout)
        stdout, stderr = (Path(path).read_text(errors="replace") if os.path.exists(path) else ""
                          for path in (out, err))
    return subprocess.CompletedProcess(["ascend-edit", *args], child.exitcode, stdout, stderr)
