"""The test helper that runs jobs in forks of a preloaded interpreter (tests/helpers/cli_runner.py) reports
what a real process would: exit codes, tracebacks, each rank's output and environment, a failed rank's status."""
from __future__ import annotations

import os
import time

import pytest

from tests.helpers import cli_runner

PROBE = "tests.helpers.rank_probe"


def test_exit_code_and_output_of_one_process():
    # An in-process DeepSpeed test may have left RANK / WORLD_SIZE in this process's environment.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = cli_runner.run_cli(["exit", "3"], module=PROBE, env=env, timeout=120)
    assert done.returncode == 3 and done.stdout == "rank - of -\n"  # no launcher environment added


def test_an_escaping_exception_prints_its_traceback_and_exits_1():
    done = cli_runner.run_cli(["raise"], module=PROBE, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: the probe failed on purpose" in done.stderr


def test_ranks_get_a_launchers_environment_and_outputs_come_in_rank_order():
    done = cli_runner.run_cli(["exit", "0"], module=PROBE, world=2, timeout=120)
    assert done.returncode == 0 and done.stdout == "rank 0 of 2\nrank 1 of 2\n"


def test_a_failed_rank_stops_the_others_and_gives_its_status(monkeypatch):
    monkeypatch.setattr(cli_runner, "_FAILED_RANK_GRACE_S", 0.5)
    started = time.monotonic()
    done = cli_runner.run_cli(["fail-on-rank", "1", "7"], module=PROBE, world=2, timeout=300)
    assert done.returncode == 7 and time.monotonic() - started < 60  # rank 0 was killed, not waited for


def test_a_job_past_its_timeout_is_killed():
    with pytest.raises(cli_runner.subprocess.TimeoutExpired):
        cli_runner.run_cli(["fail-on-rank", "none", "1"], module=PROBE, timeout=1)


def test_cli_exit_status_and_one_line_error():
    done = cli_runner.run_cli(["experiment=tiny", "engine.grad_clip=-1"], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("ascend-edit: error:")] == [
        "ascend-edit: error: engine.grad_clip=-1.0 must be a finite number >= 0"]
