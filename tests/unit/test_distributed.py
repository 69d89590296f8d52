"""Launcher discovery (one env dict per launcher), errors, process-group set-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ascend_edit.distributed import (
    DistEnv,
    barrier,
    destroy,
    discover,
    init_process_group,
    is_main_process,
)
from tests.helpers.cli_runner import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_no_launcher_is_one_process():
    assert discover({"PATH": "/usr/bin", "HOME": "/root"}) == DistEnv(
        rank=0, local_rank=0, world_size=1, local_world_size=1,
        master_addr="127.0.0.1", master_port=29500, node_rank=0, launcher="none",
    )


def test_torchrun():
    env = {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1", "ROLE_RANK": "5", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "none",
    }
    assert discover(env) == DistEnv(
        rank=5, local_rank=1, world_size=8, local_world_size=4,
        master_addr="10.0.0.1", master_port=29400, node_rank=1, launcher="torchrun",
    )


def test_deepspeed_launcher_with_no_local_rank():
    # What deepspeed/launcher/launch.py exports for rank 3 of 2 nodes x 2 devices; with
    # --no_local_rank only the --local_rank argument goes away, the variable stays.
    env = {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
    }
    assert discover(env) == DistEnv(
        rank=3, local_rank=1, world_size=4, local_world_size=2,
        master_addr="node01", master_port=29500, node_rank=1, launcher="deepspeed",
    )


def test_torch_variables_set_by_hand_assume_one_node():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert discover(env) == DistEnv(
        rank=1, local_rank=1, world_size=2, local_world_size=2,
        master_addr="127.0.0.1", master_port=1234, node_rank=0, launcher="env",
    )


def test_msrun_worker():
    # Worker 2 of node 1 of `msrun --worker_num=8 --local_worker_num=4 --node_rank=1
    # --master_addr=10.0.0.1 --master_port=8118`, run through launch/msrun.sh.
    env = {
        "MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "MS_SCHED_HOST": "10.0.0.1",
        "MS_SCHED_PORT": "8118", "MS_NODE_ID": "6", "RANK_ID": "6", "RANK_SIZE": "8",
        "DEVICE_ID": "2", "LOCAL_WORLD_SIZE": "4", "MS_TOPO_TIMEOUT": "600",
    }
    assert discover(env) == DistEnv(
        rank=6, local_rank=2, world_size=8, local_world_size=4,
        master_addr="10.0.0.1", master_port=8118, node_rank=1, launcher="msrun",
    )


def test_msrun_scheduler_is_flagged_and_refused():
    env = {
        "MS_ROLE": "MS_SCHED", "MS_WORKER_NUM": "4", "MS_SCHED_HOST": "127.0.0.1",
        "MS_SCHED_PORT": "8118", "RANK_ID": "0", "RANK_SIZE": "4",
    }
    found = discover(env)
    assert (found.msrun_scheduler, found.launcher, found.world_size) == (True, "msrun", 4)
    with pytest.raises(RuntimeError, match="MS_SCHED"):
        init_process_group("gloo", found)


def test_msrun_without_rank_names_the_missing_variables():
    env = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "16", "MS_SCHED_HOST": "h", "MS_SCHED_PORT": "8118",
           "RANK_SIZE": "16", "DEVICE_ID": "0"}
    with pytest.raises(ValueError, match="RANK_ID.*MS_NODE_ID.*--node_rank"):
        discover(env)


def test_torch_variables_win_over_every_other_launcher():
    # torchrun inside an srun step inside an mpirun: the variables torch itself reads decide.
    env = {
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
        "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1",
        "MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "1", "RANK_ID": "0",
    }
    found = discover(env)
    assert (found.launcher, found.rank, found.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, r"RANK=4 must be in \[0, WORLD_SIZE=4\)"),
        ({"RANK": "one", "WORLD_SIZE": "4"}, r"RANK='one' is not an integer"),
        ({"RANK": "0"}, r"WORLD_SIZE is missing"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, r"MASTER_ADDR is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
         r"MASTER_PORT=70000 is not a TCP port"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
         r"LOCAL_RANK=2 must be in \[0, LOCAL_WORLD_SIZE=2\)"),
        ({"MS_ROLE": "MS_PSERVER", "MS_WORKER_NUM": "2"}, r"MS_ROLE='MS_PSERVER'"),
        ({"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "0", "RANK_ID": "0", "DEVICE_ID": "0"}, r"MS_WORKER_NUM=0 must be >= 1"),
    ],
)
def test_inconsistent_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        discover(env)


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        DistEnv(rank=2, world_size=2, local_world_size=2)


@pytest.fixture
def clean_dist_env(monkeypatch):
    """Drop the env:// variables for the test; monkeypatch restores the originals afterwards."""
    for name in ENV_VARS:
        monkeypatch.setenv(name, "sentinel")
        monkeypatch.delenv(name)


def test_single_process_exports_env_and_does_not_init(clean_dist_env):
    import torch.distributed as dist

    env = DistEnv(launcher="slurm", master_addr="node7", master_port=23456)
    assert init_process_group("gloo", env) is False
    assert not dist.is_initialized()
    assert {name: os.environ[name] for name in ENV_VARS} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "node7", "MASTER_PORT": "23456",
    }
    # The helpers are no-ops without a process group.
    assert is_main_process() is True
    barrier()
    destroy()


def test_torch_launcher_env_is_left_alone(clean_dist_env):
    init_process_group("gloo", DistEnv(launcher="torchrun"))
    assert not any(name in os.environ for name in ENV_VARS)


def test_bad_backend_and_timeout_are_rejected():
    with pytest.raises(ValueError, match="backend is empty"):
        init_process_group("", DistEnv())
    with pytest.raises(ValueError, match="timeout_s=0"):
        init_process_group("gloo", DistEnv(), timeout_s=0)


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from ascend_edit.distributed import (
        barrier, destroy, discover, init_process_group, is_main_process,
    )

    env = discover()
    assert init_process_group("gloo", env, timeout_s=60) is True
    assert init_process_group("gloo", env) is False  # second call: already initialised
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    barrier()
    # One file per rank: lines printed by two processes into one pipe can interleave.
    Path(sys.argv[1], f"rank{env.rank}.txt").write_text(
        f"rank={env.rank} world={env.world_size} local_world={env.local_world_size} "
        f"launcher={env.launcher} main={is_main_process()} sum={total.item():g}"
    )
    destroy()
    """
)


def _worker_lines(out_dir: Path) -> list[str]:
    return [path.read_text() for path in sorted(out_dir.glob("rank*.txt"))]


def _child_env(**extra: str) -> dict[str, str]:
    launcher_prefixes = ("SLURM_", "OMPI_", "PMI_", "MS_")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and not k.startswith(launcher_prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.mark.distributed
def test_torchrun_two_processes_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)],
        env=_child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _worker_lines(tmp_path) == [
        "rank=0 world=2 local_world=2 launcher=torchrun main=True sum=3",
        "rank=1 world=2 local_world=2 launcher=torchrun main=False sum=3",
    ]


@pytest.mark.distributed
def test_msrun_env_reaches_env_init_through_the_exports(tmp_path):
    """Two processes with only msrun's variables: init works because discover + export fill env://."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env=_child_env(
                OMP_NUM_THREADS="1", MS_ROLE="MS_WORKER", MS_WORKER_NUM="2", RANK_SIZE="2",
                RANK_ID=str(rank), DEVICE_ID=str(rank), LOCAL_WORLD_SIZE="2", MS_SCHED_HOST="127.0.0.1",
                MS_SCHED_PORT=str(port),
            ),
            stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr[-3000:]
    finally:
        for proc in procs:  # a failed rank leaves the other waiting for it
            proc.kill()
    assert _worker_lines(tmp_path) == [
        "rank=0 world=2 local_world=2 launcher=msrun main=True sum=3",
        "rank=1 world=2 local_world=2 launcher=msrun main=False sum=3",
    ]
