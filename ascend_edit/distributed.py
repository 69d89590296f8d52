"""Who am I in the job? Rank/world discovery from launcher environment variables.

`discover()` turns the variables a launcher exports into one `DistEnv`; `init_process_group()`
makes `torch.distributed` (and so DeepSpeed) usable from it, whatever launched the process.
The communication backend is the caller's choice (the device layer picks hccl/nccl/gloo), so
this module never imports torch_npu.

Where the variable names come from (checked against each launcher's code or manual):

* torchrun (torch.distributed.run / elastic agent): RANK, LOCAL_RANK, WORLD_SIZE,
  LOCAL_WORLD_SIZE, GROUP_RANK (node index), MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID.
* DeepSpeed launcher (deepspeed/launcher/launch.py, 0.19.8 installed here): RANK, LOCAL_RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT, plus CROSS_RANK (node index), CROSS_SIZE (nodes) and
  LOCAL_SIZE (processes on this node). `--no_local_rank` only drops the `--local_rank=N`
  argument; LOCAL_RANK is exported either way.
* MindSpore msrun (mindspore/parallel/cluster/process_entity/_api.py): every process gets
  MS_WORKER_NUM, MS_SCHED_HOST, MS_SCHED_PORT and RANK_SIZE; workers get MS_ROLE=MS_WORKER,
  DEVICE_ID=<index on this node> and, when the rank is known at launch (one node, or
  `--node_rank` given), MS_NODE_ID and RANK_ID = node_rank * local_worker_num + index.
  msrun also starts a *scheduler* process running the same command with MS_ROLE=MS_SCHED
  (RANK_ID=0); in a PyTorch job it has no work to do. msrun exports no per-node worker
  count: launch/msrun.sh exports LOCAL_WORLD_SIZE for that.
* Slurm and MPI are not read here: launch/slurm.sbatch runs launch/torchrun.sh on every node
  (so ranks see torchrun's variables), and DeepSpeed does its own MPI discovery when asked.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = [
    "DistEnv",
    "barrier",
    "destroy",
    "discover",
    "export_env",
    "init_process_group",
    "is_main_process",
    "rank_and_world",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

# Launchers that already export the torch.distributed env:// variables themselves.
TORCH_ENV_LAUNCHERS = frozenset({"torchrun", "deepspeed", "env"})


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    launcher: "torchrun", "deepspeed", "env" (RANK/WORLD_SIZE set by hand), "msrun" or "none"
    (a single process).
    msrun_scheduler: True only in the extra scheduler process msrun starts next to its workers;
    a PyTorch job should exit there at once (it must not train or join the process group).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    node_rank: int = 0
    launcher: str = "none"
    msrun_scheduler: bool = False

    def __post_init__(self) -> None:
        # Field names here; discover() reports the launcher's variable names before this runs.
        _check_consistent(dataclasses.asdict(self), {})

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _EnvReader:
    """Reads launcher variables and remembers which variable supplied each DistEnv field."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.source: dict[str, str] = {}

    def has(self, *names: str) -> bool:
        return all(self.env.get(name, "").strip() != "" for name in names)

    def get_int(self, field: str, *names: str, default: int | None = None) -> int:
        """First of `names` that is set, parsed as an int; `default` if none is set."""
        for name in names:
            raw = self.env.get(name, "").strip()
            if raw == "":
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            self.source[field] = name
            return value
        if default is None:
            raise ValueError(f"none of {', '.join(names)} is set")
        return default

    def get_str(self, field: str, *names: str) -> str | None:
        """First of `names` that is set, or None."""
        for name in names:
            raw = self.env.get(name, "").strip()
            if raw:
                self.source[field] = name
                return raw
        return None


def discover(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous address from the launcher's environment.

    `env` defaults to `os.environ`. Precedence: explicit torch variables (RANK + WORLD_SIZE,
    set by torchrun, DeepSpeed or by hand) > msrun > single process.
    Raises ValueError naming the variable when a value is not an integer or contradicts another.
    """
    reader = _EnvReader(os.environ if env is None else env)
    for read in (_from_torch, _from_msrun):
        found = read(reader)
        if found is not None:
            return found
    return DistEnv()


def _from_torch(r: _EnvReader) -> DistEnv | None:
    if not (r.has("RANK") or r.has("WORLD_SIZE")):
        return None
    if not r.has("RANK", "WORLD_SIZE"):
        missing = "WORLD_SIZE" if r.has("RANK") else "RANK"
        raise ValueError(f"RANK and WORLD_SIZE must be set together; {missing} is missing")
    if r.has("TORCHELASTIC_RUN_ID") or r.has("GROUP_RANK"):
        launcher = "torchrun"
    elif r.has("CROSS_RANK") or r.has("LOCAL_SIZE"):
        launcher = "deepspeed"
    else:
        launcher = "env"
    rank = r.get_int("rank", "RANK")
    world_size = r.get_int("world_size", "WORLD_SIZE")
    # Set by hand without a per-node count: assume one node.
    local_world_size = r.get_int("local_world_size", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world_size)
    per_node = max(local_world_size, 1)
    return _build(r, launcher, rank=rank, world_size=world_size, local_world_size=local_world_size,
                  local_rank=r.get_int("local_rank", "LOCAL_RANK", default=rank % per_node),
                  node_rank=r.get_int("node_rank", "GROUP_RANK", "CROSS_RANK", default=rank // per_node),
                  master_addr=_master_addr(r, world_size, "MASTER_ADDR"),
                  master_port=r.get_int("master_port", "MASTER_PORT", default=DEFAULT_MASTER_PORT))


def _from_msrun(r: _EnvReader) -> DistEnv | None:
    if not r.has("MS_ROLE"):
        return None
    role = r.env["MS_ROLE"].strip()
    if role not in ("MS_WORKER", "MS_SCHED"):
        raise ValueError(f"MS_ROLE={role!r}: only MS_WORKER and MS_SCHED are msrun roles")
    world_size = r.get_int("world_size", "RANK_SIZE", "MS_WORKER_NUM")
    local_world_size = r.get_int("local_world_size", "LOCAL_WORLD_SIZE", default=world_size)
    scheduler = role == "MS_SCHED"
    if scheduler:
        rank, local_rank = 0, 0
    else:
        if not (r.has("RANK_ID") or r.has("MS_NODE_ID")):
            raise ValueError("msrun exported neither RANK_ID nor MS_NODE_ID: a multi-node msrun job must be "
                             "started with --node_rank so each worker knows its rank before it starts")
        rank = r.get_int("rank", "RANK_ID", "MS_NODE_ID")
        local_rank = r.get_int("local_rank", "DEVICE_ID")
    # A user-exported MASTER_* wins over the scheduler address, e.g. to use a different port.
    return _build(r, "msrun", rank=rank, world_size=world_size, local_rank=local_rank,
                  local_world_size=local_world_size, node_rank=rank // max(local_world_size, 1),
                  master_addr=_master_addr(r, world_size, "MASTER_ADDR", "MS_SCHED_HOST"),
                  master_port=r.get_int("master_port", "MASTER_PORT", "MS_SCHED_PORT", default=DEFAULT_MASTER_PORT),
                  msrun_scheduler=scheduler)


def _master_addr(r: _EnvReader, world_size: int, *names: str) -> str:
    addr = r.get_str("master_addr", *names)
    if addr is not None:
        return addr
    if world_size > 1:
        wanted = " or ".join(names) if names else "MASTER_ADDR"
        raise ValueError(f"{wanted} is not set, but WORLD_SIZE={world_size} needs a rendezvous host")
    return DEFAULT_MASTER_ADDR


def _build(r: _EnvReader, launcher: str, **fields) -> DistEnv:
    # Check with the launcher's variable names first: "RANK_ID=4 must be in [0, ...)"
    # says more than DistEnv's own field-name check would.
    values = dict(dataclasses.asdict(DistEnv()), launcher=launcher, **fields)
    _check_consistent(values, r.source)
    return DistEnv(**values)


def _check_consistent(values: Mapping[str, Any], source: Mapping[str, str]) -> None:
    def show(field: str) -> str:
        return f"{source.get(field, field)}={values[field]}"

    if values["world_size"] < 1:
        raise ValueError(f"{show('world_size')} must be >= 1")
    if values["local_world_size"] < 1:
        raise ValueError(f"{show('local_world_size')} must be >= 1")
    if not 0 <= values["rank"] < values["world_size"]:
        raise ValueError(f"{show('rank')} must be in [0, {show('world_size')})")
    if not 0 <= values["local_rank"] < values["local_world_size"]:
        raise ValueError(f"{show('local_rank')} must be in [0, {show('local_world_size')})")
    if values["local_world_size"] > values["world_size"]:
        raise ValueError(f"{show('local_world_size')} exceeds {show('world_size')}")
    if values["node_rank"] < 0:
        raise ValueError(f"{show('node_rank')} must be >= 0")
    if not 0 < values["master_port"] < 65536:
        raise ValueError(f"{show('master_port')} is not a TCP port")
    if not values["master_addr"]:
        raise ValueError(f"{source.get('master_addr', 'master_addr')} is empty")


# --- torch.distributed ------------------------------------------------------------------


def export_env(env: DistEnv) -> None:
    """Write the env:// variables (RANK, WORLD_SIZE, MASTER_*, LOCAL_*) into os.environ.

    torch.distributed's env:// init and DeepSpeed read these; without them a bare process
    makes DeepSpeed fall back to MPI discovery (which needs mpi4py).
    """
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))


def init_process_group(backend: str, env: DistEnv, timeout_s: float = 1800) -> bool:
    """Join the default process group; return True if this call created it.

    Exports the env:// variables when a non-torch launcher (msrun, none) started
    the process, then initialises torch.distributed only for world_size > 1 and only once.
    """
    if not backend:
        raise ValueError("backend is empty; pass the device layer's choice (hccl, nccl or gloo)")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if env.msrun_scheduler:
        raise RuntimeError("this is msrun's scheduler process (MS_ROLE=MS_SCHED); a PyTorch job must exit "
                           "here instead of joining the process group")
    if env.launcher not in TORCH_ENV_LAUNCHERS:
        export_env(env)
    if env.world_size == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"a process group is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, but the launcher says rank {env.rank} of {env.world_size}")
        return False
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launcher's environment before init."""
    if _initialized():
        return dist.get_rank() == 0
    return discover().rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for all ranks; a no-op in a single process."""
    if _initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if one exists; a no-op otherwise."""
    if _initialized():
        dist.destroy_process_group()
