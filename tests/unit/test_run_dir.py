"""Two runs never share a run directory, and Hydra's layout (`.hydra/` inside) is kept."""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ascend_edit.cli import RUN_LOCK, UserError, run_directory_lock, shared_run_dir_override
from ascend_edit.run_dir import make_unique_run_dir, register_run_dir_resolver
from tests.helpers.cli_runner import run_cli, start

FROZEN = datetime(2026, 12, 1, 9, 30, 15, 123456)


def test_same_instant_gives_distinct_directories(tmp_path):
    first = make_unique_run_dir(str(tmp_path), FROZEN)
    second = make_unique_run_dir(str(tmp_path), FROZEN)
    third = make_unique_run_dir(str(tmp_path), FROZEN)
    assert first == str(tmp_path / "2026-12-01" / "09-30-15.123")
    assert [second, third] == [first + "-1", first + "-2"]
    assert all(Path(d).is_dir() for d in (first, second, third))


def test_an_existing_directory_is_never_reused(tmp_path):
    taken = tmp_path / "2026-12-01" / "09-30-15.123"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text("another run's metrics\n")
    made = make_unique_run_dir(str(tmp_path), FROZEN)
    assert made != str(taken) and os.listdir(made) == []
    assert (taken / "metrics.jsonl").read_text() == "another run's metrics\n"


def test_resolver_resolves_once_per_config(tmp_path):
    register_run_dir_resolver()
    cfg = OmegaConf.create({"dir": "${unique_run_dir:" + str(tmp_path) + "}"})
    assert cfg.dir == cfg.dir  # cached: a second read does not make a second directory
    other = OmegaConf.create({"dir": "${unique_run_dir:" + str(tmp_path) + "}"})
    assert other.dir != cfg.dir
    assert len(list(tmp_path.glob("*/*"))) == 2


def test_two_runs_started_together_get_two_directories(tmp_path):
    args = ["inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16", "eval.context=64"]
    jobs = [start(args, cwd=tmp_path) for _ in range(2)]  # forked together: the same second, as a race needs
    for job in jobs:
        done = job.wait(timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 2, runs
    for run in runs:  # Hydra's layout, each with its own config
        assert (run / ".hydra" / "config.yaml").is_file()


def test_launcher_ranks_still_share_one_directory():
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job7"}
    assert shared_run_dir_override([], env) == ["hydra.run.dir=runs/dist-job7"]


def test_one_command_at_a_time_holds_a_run_directory(tmp_path):
    with run_directory_lock(str(tmp_path), held_here=True):
        assert f"pid {os.getpid()}" in (tmp_path / RUN_LOCK).read_text()
        with pytest.raises(UserError, match=rf"output_dir={tmp_path} is in use by another ascend-edit command \(pid"):
            with run_directory_lock(str(tmp_path), held_here=True):
                pass
        with run_directory_lock(str(tmp_path), held_here=False):  # ranks other than 0 take no lock
            pass
    with run_directory_lock(str(tmp_path), held_here=True):  # released at the end of the task
        pass


def test_a_second_command_in_a_busy_run_directory_is_refused_before_it_writes(tmp_path):
    """Two commands in one directory resumed from, wrote and pruned the same checkpoints and interleaved one
    metrics log (both exited 0). The second now stops in one line and leaves the directory as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".ascend-edit-run").touch()
    with run_directory_lock(str(run_dir), held_here=True):
        before = sorted(p.name for p in run_dir.iterdir())
        result = run_cli(["experiment=tiny", "eval.suite=false", f"output_dir={run_dir}", f"hydra.run.dir={run_dir}"],
                         cwd=tmp_path)
        assert sorted(p.name for p in run_dir.iterdir()) == before  # not even Hydra's .hydra/ and log
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ascend-edit:")]
    assert len(errors) == 1 and "is in use by another ascend-edit command" in errors[0], result.stderr[-2000:]


def test_a_busy_run_directory_named_by_output_dir_alone_is_refused_too(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".ascend-edit-run").touch()
    with run_directory_lock(str(run_dir), held_here=True):
        result = run_cli(["experiment=tiny", "eval.suite=false", f"output_dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2 and f"output_dir={run_dir} is in use" in result.stderr, result.stderr[-2000:]


def test_every_process_of_another_job_is_refused_and_the_own_jobs_are_not(tmp_path, monkeypatch):
    """Only rank 0 probed the lock: the other ranks of a refused job went on and rewrote the running job's .hydra/.
    Every process probes now; one of the job that holds the lock (same launch id) passes, msrun's scheduler too."""
    from ascend_edit import cli

    monkeypatch.setattr(cli, "LOCK_PATIENCE_S", 0.2)
    for name in ("TORCHELASTIC_RUN_ID", "MS_SCHED_HOST", "MS_SCHED_PORT", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    with run_directory_lock(str(tmp_path), held_here=True):
        assert "(job job-a)" in (tmp_path / RUN_LOCK).read_text()
        assert cli._busy_problem("hydra.run.dir", str(tmp_path)) is None  # rank 1 of job a
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
        problem = cli._busy_problem("hydra.run.dir", str(tmp_path))  # any rank of job b
        assert problem is not None and "is in use by another ascend-edit command" in problem and "job-a" in problem
        monkeypatch.delenv("TORCHELASTIC_RUN_ID")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setenv("MASTER_ADDR", "10.0.0.2")  # left in a shell: a single process is still no job's
        assert cli._busy_problem("hydra.run.dir", str(tmp_path)) is not None  # a plain second command
    monkeypatch.delenv("MASTER_ADDR")
    with run_directory_lock(str(tmp_path), held_here=True):  # a single process that has MASTER_ADDR set
        monkeypatch.setenv("MASTER_ADDR", "10.0.0.2")
        assert cli._busy_problem("hydra.run.dir", str(tmp_path)) is not None
        monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("MS_SCHED_HOST", "10.0.0.1")
    monkeypatch.setenv("MS_SCHED_PORT", "8118")
    with run_directory_lock(str(tmp_path), held_here=True):  # msrun's worker 0; its scheduler probes too
        assert cli._busy_problem("hydra.run.dir", str(tmp_path)) is None


def test_a_probe_holding_the_lock_for_a_moment_does_not_refuse_rank_zero(tmp_path):
    """Another rank's probe takes the lock for a moment: rank 0 waits it out rather than refuse its own job."""
    import fcntl
    import threading

    path = tmp_path / RUN_LOCK
    path.write_text("")
    probe = open(path)  # noqa: SIM115 - held across the thread below
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.3, lambda: (fcntl.flock(probe, fcntl.LOCK_UN), probe.close())).start()
    with run_directory_lock(str(tmp_path), held_here=True):
        assert f"pid {os.getpid()}" in path.read_text()


@pytest.mark.parametrize("extra_env, args", [
    ({"RANK": "0"}, ["experiment=tiny", "hydra.run.dir=RUN"]),
    ({"RANK": "0"}, ["-m", "experiment=tiny", "device.seed=1,2", "hydra.sweep.dir=RUN"]),
    ({"ASCEND_EDIT_CHECK_ONLY": "1"}, ["experiment=tiny", "hydra.run.dir=RUN"]),  # a launch wrapper's check
])
def test_a_world_size_that_is_not_a_number_is_one_line(tmp_path, extra_env, args):
    """int(WORLD_SIZE) ended in a traceback in the sweep check and the wrappers' check-only start."""
    env = {**os.environ, "WORLD_SIZE": "x", **extra_env}
    result = run_cli([a.replace("RUN", str(tmp_path / "run")) for a in args], cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "WORLD_SIZE='x' is not" in result.stderr
