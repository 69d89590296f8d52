"""launch/ wrappers: the exact command each prints (dry run) and runs (stubbed launcher)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ascend_edit.distributed import DistEnv, discover

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "launch"
OVERRIDES = ["experiment=mla_tiny", "train.lr=1e-4", "data.name=it's a test"]
TIMESTAMPED_RUN_DIR = re.compile(r"hydra\.run\.dir=runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d\.\d{3}")


def run_script(script: str, *args: str, path_prefix: Path | None = None, **env: str):
    """Run launch/<script> with a minimal environment plus `env`; return the finished process."""
    path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}{os.pathsep}{os.environ['PATH']}"
    full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True,
        cwd=REPO_ROOT, timeout=30,
    )


def printed_command(stdout: str) -> tuple[dict[str, str], list[str]]:
    """Split the '+ K=V ... cmd args' line into the environment and the argv."""
    lines = [line for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stdout
    words = shlex.split(lines[0][2:])
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def dry_run(script: str, *args: str, **env: str) -> tuple[dict[str, str], list[str]]:
    done = run_script(script, "--dry-run", *args, **env)
    assert done.returncode == 0, done.stderr
    return printed_command(done.stdout)


# --- torchrun.sh ------------------------------------------------------------------------


def test_torchrun_single_node_npu():
    env, argv = dry_run("torchrun.sh", *OVERRIDES, DEVICE="npu", VISIBLE_DEVICES="0,1,2,3")
    assert env == {
        "HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1836", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3",
    }
    assert argv[:-1] == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "ascend_edit.cli", *OVERRIDES]
    assert TIMESTAMPED_RUN_DIR.fullmatch(argv[-1]), argv[-1]


def test_torchrun_multi_node_cuda_shares_the_given_run_dir():
    env, argv = dry_run(
        "torchrun.sh", *OVERRIDES, DEVICE="cuda", VISIBLE_DEVICES="2,3", NNODES="2", NODE_RANK="1",
        MASTER_ADDR="10.0.0.1", MASTER_PORT="29400", RUN_DIR="/shared/run1",
        TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
    )
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert argv == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400",
        "--nproc_per_node", "2", "-m", "ascend_edit.cli", *OVERRIDES, "hydra.run.dir=/shared/run1",
    ]


def test_user_hydra_run_dir_is_not_duplicated_and_dry_run_env_works():
    done = run_script("torchrun.sh", "x=1", "hydra.run.dir=/tmp/mine", DEVICE="cpu", NPROC="2", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    env, argv = printed_command(done.stdout)
    assert env == {}
    assert argv == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ascend_edit.cli",
                    "x=1", "hydra.run.dir=/tmp/mine"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DEVICE": "cpu", "NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
        # launched once per node: a node rank or run directory left to each node's default would be wrong
        ({"DEVICE": "cpu", "NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NNODES=2 needs NODE_RANK"),
        ({"DEVICE": "cpu", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1"}, "NNODES=2 needs RUN_DIR"),
        ({"DEVICE": "tpu"}, "DEVICE must be npu, cuda or cpu, got 'tpu'"),
        ({"DEVICE": "cpu", "VISIBLE_DEVICES": "0"}, "DEVICE=cpu has no devices"),
        ({"DEVICE": "cpu", "NPROC": "0"}, "NPROC must be a positive integer, got '0'"),
    ],
)
def test_torchrun_rejects_bad_settings(env, message):
    done = run_script("torchrun.sh", "--dry-run", **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""


# --- deepspeed.sh ------------------------------------------------------------------------


def test_deepspeed_single_node_npu_uses_include_and_no_local_rank():
    env, argv = dry_run("deepspeed.sh", *OVERRIDES, DEVICE="npu", VISIBLE_DEVICES="4,5", RUN_DIR="runs/a")
    # DeepSpeed sets the per-rank visibility variable itself from --include.
    assert env == {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1836", "DS_ACCELERATOR": "npu"}
    assert argv == [
        "deepspeed", "--include", "localhost:4,5", "--master_port", "29500", "--no_local_rank",
        "--module", "ascend_edit.cli", *OVERRIDES, "hydra.run.dir=runs/a",
    ]


def test_deepspeed_hostfile_multi_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node01 slots=8\nnode02 slots=8\n")
    env, argv = dry_run(
        "deepspeed.sh", *OVERRIDES, DEVICE="cuda", HOSTFILE=str(hostfile), NNODES="2", NPROC="8",
        MASTER_ADDR="node01", MASTER_PORT="29600", RUN_DIR="/shared/r",
    )
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "DS_ACCELERATOR": "cuda"}
    assert argv == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
        "--master_addr", "node01", "--master_port", "29600", "--no_local_rank", "--module", "ascend_edit.cli",
        *OVERRIDES, "hydra.run.dir=/shared/r",
    ]


def test_deepspeed_hostfile_without_nproc_uses_every_slot(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node01 slots=8\n")
    _, argv = dry_run("deepspeed.sh", "x=1", DEVICE="npu", HOSTFILE=str(hostfile), RUN_DIR="r")
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--master_port", "29500", "--no_local_rank",
                    "--module", "ascend_edit.cli", "x=1", "hydra.run.dir=r"]


def test_the_users_last_run_dir_wins_with_or_without_a_prefix():
    """`++hydra.run.dir=D` got the wrapper's own hydra.run.dir= after it (Hydra took that one: a resume started
    over elsewhere); with two given, msrun's log directory followed the first while Hydra took the last."""
    _, argv = dry_run("torchrun.sh", "x=1", "++hydra.run.dir=/shared/run1", DEVICE="cpu", NPROC="2")
    assert argv[-2:] == ["x=1", "++hydra.run.dir=/shared/run1"]
    _, argv = dry_run("msrun.sh", "hydra.run.dir=/tmp/a", "hydra.run.dir=/tmp/b", DEVICE="cpu")
    assert "--log_dir=/tmp/b/msrun_log" in argv and argv[-2:] == ["hydra.run.dir=/tmp/a", "hydra.run.dir=/tmp/b"]


def test_deepspeed_bad_hostfile_line_stops_the_launch(tmp_path):
    """The error was printed inside $( ... ) and the launch went on, checked at world size 1."""
    bin_dir, stub_out, env = stub_launcher(tmp_path, "deepspeed")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\n\nnode-b slots=two\n")
    done = run_script("deepspeed.sh", "experiment=tiny", path_prefix=bin_dir, **env, HOSTFILE=str(hostfile))
    assert done.returncode == 2 and "'node-b two' is not 'host slots=N'" in done.stderr and not stub_out.exists()


def test_deepspeed_missing_hostfile_is_an_error(tmp_path):
    done = run_script("deepspeed.sh", "--dry-run", DEVICE="cpu", HOSTFILE=str(tmp_path / "nope"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr


# --- msrun.sh ------------------------------------------------------------------------------


def test_msrun_multi_node():
    env, argv = dry_run(
        "msrun.sh", *OVERRIDES, VISIBLE_DEVICES="0,1,2,3,4,5,6,7", NNODES="2", NODE_RANK="1",
        MASTER_ADDR="10.0.0.1", RUN_DIR="/shared/run2",
    )
    assert env == {
        "HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1836",
        "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "LOCAL_WORLD_SIZE": "8",
    }
    assert argv == [
        "msrun", "--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
        "--node_rank=1", "--log_dir=/shared/run2/msrun_log", "--join=True", "--cluster_time_out=600",
        "python", "-m", "ascend_edit.cli", *OVERRIDES, "hydra.run.dir=/shared/run2",
    ]
    # What msrun then exports to worker 3 of node 1, plus the wrapper's LOCAL_WORLD_SIZE.
    worker_env = dict(env, MS_ROLE="MS_WORKER", MS_WORKER_NUM="16", MS_SCHED_HOST="10.0.0.1",
                      MS_SCHED_PORT="8118", RANK_SIZE="16", RANK_ID="11", MS_NODE_ID="11", DEVICE_ID="3")
    assert discover(worker_env) == DistEnv(
        rank=11, local_rank=3, world_size=16, local_world_size=8, master_addr="10.0.0.1",
        master_port=8118, node_rank=1, launcher="msrun",
    )


# --- slurm.sbatch --------------------------------------------------------------------------


def write_stub_scontrol(bin_dir: Path) -> None:
    """A fake `scontrol show hostnames LIST` for the two lists these tests use, expanded as Slurm would."""
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "hosts = {'node[03-04]': ['node03', 'node04'], 'a[1-2]': ['a1', 'a2']}\n"
        "assert sys.argv[1:3] == ['show', 'hostnames'], sys.argv\n"
        "print('\\n'.join(hosts[sys.argv[3]]))\n"
    )
    stub.chmod(0o755)


def test_slurm_sbatch_dry_run_then_each_node_runs_torchrun(tmp_path):
    write_stub_scontrol(tmp_path / "bin")
    slurm_env = {"SLURM_JOB_NODELIST": "node[03-04]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_SUBMIT_DIR": str(REPO_ROOT), "DEVICE": "npu", "PYTHONPATH": str(REPO_ROOT)}
    done = run_script("slurm.sbatch", "--dry-run", *OVERRIDES, path_prefix=tmp_path / "bin", **slurm_env)
    assert done.returncode == 0, done.stderr
    env, argv = printed_command(done.stdout)
    assert env == {"MASTER_ADDR": "node03", "MASTER_PORT": "24242", "NNODES": "2", "NPROC": "8",
                   "RUN_DIR": "runs/slurm-4242"}
    assert argv == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", str(LAUNCH / "torchrun.sh"), *OVERRIDES]

    # What srun's task on the second node then runs: same env, its own SLURM_NODEID.
    node_env, node_argv = dry_run("torchrun.sh", *OVERRIDES, **env, DEVICE="npu", SLURM_NODEID="1")
    assert node_env == {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1836"}
    assert node_argv == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node03", "--master_port", "24242",
        "--nproc_per_node", "8", "-m", "ascend_edit.cli", *OVERRIDES, "hydra.run.dir=runs/slurm-4242",
    ]


def test_sbatch_directives_come_before_the_first_command():
    # sbatch stops reading #SBATCH lines at the first command.
    lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert directives and max(directives) < first_command


# --- every wrapper runs exactly what it printed ----------------------------------------------

STUB_LAUNCHER = """#!{python}
import json, os, sys
watched = {watched!r}
with open(os.environ["STUB_OUT"], "w") as out:
    json.dump({{"argv": sys.argv, "env": {{k: os.environ.get(k) for k in watched}}}}, out)
"""


@pytest.mark.parametrize(
    "script, launcher, env",
    [
        ("torchrun.sh", "torchrun", {"DEVICE": "npu", "VISIBLE_DEVICES": "0,1"}),
        ("deepspeed.sh", "deepspeed", {"DEVICE": "cuda", "NPROC": "2"}),
        ("msrun.sh", "msrun", {"VISIBLE_DEVICES": "0,1", "RUN_DIR": "r"}),
        ("slurm.sbatch", "srun", {"SLURM_JOB_NODELIST": "a[1-2]", "SLURM_JOB_ID": "5",
                                  "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}),
    ],
)
def test_wrapper_runs_the_printed_command(tmp_path, script, launcher, env):
    bin_dir = tmp_path / "bin"
    write_stub_scontrol(bin_dir)
    stub_out = tmp_path / "stub.json"
    watched = ["ASCEND_RT_VISIBLE_DEVICES", "HCCL_CONNECT_TIMEOUT", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
               "DS_ACCELERATOR", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "NNODES", "RUN_DIR"]
    stub = bin_dir / launcher
    stub.write_text(STUB_LAUNCHER.format(python=sys.executable, watched=watched))
    stub.chmod(0o755)
    # x=1 is no config key: the one-process config check (tested below) is off here, this is about the command
    common = {"STUB_OUT": str(stub_out), "PYTHONPATH": str(REPO_ROOT), "LAUNCH_PRECHECK": "0", **env}

    dry = run_script(script, "--dry-run", "x=1", path_prefix=bin_dir, **common)
    assert dry.returncode == 0, dry.stderr
    assert not stub_out.exists(), "a dry run must not start the launcher"

    done = run_script(script, "x=1", path_prefix=bin_dir, **common)
    assert done.returncode == 0, done.stderr
    printed_env, printed_argv = printed_command(done.stdout)
    received = json.loads(stub_out.read_text())
    assert [Path(received["argv"][0]).name, *received["argv"][1:]] == printed_argv
    assert printed_env, "each wrapper sets some environment"
    for key, value in printed_env.items():
        if key in watched:
            assert received["env"][key] == value, key


def stub_launcher(tmp_path: Path, name: str) -> tuple[Path, Path, dict[str, str]]:
    """(bin dir holding a stub `name` launcher, the file it would record its call in, the wrapper's environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub_out = tmp_path / "stub.json"
    stub = bin_dir / name
    stub.write_text(STUB_LAUNCHER.format(python=sys.executable, watched=[]))
    stub.chmod(0o755)
    env = {"STUB_OUT": str(stub_out), "PYTHONPATH": str(REPO_ROOT), "DEVICE": "cpu",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    return bin_dir, stub_out, env


def test_bad_input_is_reported_once_before_any_rank_starts(tmp_path):
    """The wrapper checks the configuration in one process at the job's world size: a batch that does not split
    over 2 ranks ends with one line (exit 2) and the launcher never starts; --dry-run may come last."""
    bin_dir, stub_out, env = stub_launcher(tmp_path, "torchrun")
    env["NPROC"] = "2"
    bad = run_script("torchrun.sh", "experiment=tiny", "engine=zero0", "distill.layerwise.batch_size=3",
                     f"hydra.run.dir={tmp_path / 'run'}", path_prefix=bin_dir, **env)
    assert bad.returncode == 2 and not stub_out.exists()
    errors = [line for line in bad.stderr.splitlines() if line.startswith("ascend-edit: error:")]
    assert errors == ["ascend-edit: error: distill.layerwise.batch_size=3 is not divisible by the world size 2"]
    assert "Traceback" not in bad.stderr
    dry = run_script("torchrun.sh", "experiment=tiny", "--dry-run", path_prefix=bin_dir, **env)
    assert dry.returncode == 0 and not stub_out.exists()
    assert "--dry-run" not in printed_command(dry.stdout)[1]


def test_a_hostfile_job_is_checked_at_its_own_world_size(tmp_path):
    """Under the DeepSpeed launcher with a hostfile the world is its first NNODES hosts x NPROC devices (every slot
    without NPROC): the one-process check uses that size (it used 1, so a batch that cannot split passed)."""
    bin_dir, stub_out, env = stub_launcher(tmp_path, "deepspeed")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    env["HOSTFILE"] = str(hostfile)
    for extra, world in (({"NNODES": "2", "NPROC": "2"}, 4), ({}, 16), ({"NNODES": "1"}, 8)):
        bad = run_script("deepspeed.sh", "experiment=tiny", "engine=zero0", "distill.layerwise.batch_size=3",
                         f"hydra.run.dir={tmp_path / 'run'}", path_prefix=bin_dir, **env, **extra)
        assert bad.returncode == 2 and not stub_out.exists(), bad.stderr
        assert f"distill.layerwise.batch_size=3 is not divisible by the world size {world}" in bad.stderr


def test_msrun_on_several_nodes_needs_the_master_node_rank_and_run_dir():
    """msrun.sh took 127.0.0.1 as the master with NNODES=2 (each node's scheduler then waited out its timeout for
    workers that never came), node rank 0 on every node, and a run directory from each node's clock."""
    for env, message in (({}, "needs MASTER_ADDR"), ({"MASTER_ADDR": "10.0.0.1"}, "needs NODE_RANK"),
                         ({"MASTER_ADDR": "10.0.0.1", "SLURM_NODEID": "1"}, "needs RUN_DIR")):
        done = run_script("msrun.sh", "--dry-run", NNODES="2", NPROC="8", **env)
        assert done.returncode == 2 and f"NNODES=2 {message}" in done.stderr and done.stdout == ""
