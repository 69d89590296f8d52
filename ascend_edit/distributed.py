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
* Slurm srun (srun(1) OUTPUT ENVIRONMENT): SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID,
  SLURM_STEP_NUM_TASKS / SLURM_NTASKS, SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
  (compressed, e.g. "4(x2),2"), SLURM_NTASKS_PER_NODE, SLURM_STEP_NODELIST /
  SLURM_JOB_NODELIST (compressed, e.g. "node[01-04,07]"), SLURM_JOB_ID.
* Open MPI mpirun: OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
  OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI "Environment variables set for MPI applications").
* Intel MPI / MPICH Hydra: PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DistEnv",
    "barrier",
    "destroy",
    "discover",
    "expand_nodelist",
    "expand_tasks_per_node",
    "export_env",
    "init_process_group",
    "is_main_process",
]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Slurm jobs sharing a node must not share a rendezvous port, so derive it from the job id.
# 20000-29999 lies below Linux's ephemeral range (32768+), where outgoing sockets take ports.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

# Launchers that already export the torch.distributed env:// variables themselves.
TORCH_ENV_LAUNCHERS = frozenset({"torchrun", "deepspeed", "env"})


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    launcher: "torchrun", "deepspeed", "env" (RANK/WORLD_SIZE set by hand), "msrun", "slurm",
    "openmpi", "mpich" (Intel MPI / MPICH Hydra) or "none" (a single process).
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
    set by torchrun, DeepSpeed or by hand) > msrun > Open MPI > Intel MPI/MPICH > Slurm >
    single process. MPI comes before Slurm because mpirun inside a Slurm allocation starts its
    daemons through srun, so MPI ranks also carry the (per-node) Slurm step variables.
    Raises ValueError naming the variable when a value is not an integer or contradicts another.
    """
    reader = _EnvReader(os.environ if env is None else env)
    for read in (_from_torch, _from_msrun, _from_openmpi, _from_mpich, _from_slurm):
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
    local_world_size = r.get_int(
        "local_world_size", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world_size
    )
    return _build(
        r,
        launcher,
        rank=rank,
        world_size=world_size,
        local_world_size=local_world_size,
        local_rank=r.get_int("local_rank", "LOCAL_RANK", default=rank % max(local_world_size, 1)),
        node_rank=r.get_int(
            "node_rank", "GROUP_RANK", "CROSS_RANK", default=rank // max(local_world_size, 1)
        ),
        master_addr=_master_addr(r, world_size, "MASTER_ADDR"),
        master_port=r.get_int("master_port", "MASTER_PORT", default=DEFAULT_MASTER_PORT),
    )


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
            raise ValueError(
                "msrun exported neither RANK_ID nor MS_NODE_ID: a multi-node msrun job must be "
                "started with --node_rank so each worker knows its rank before it starts"
            )
        rank = r.get_int("rank", "RANK_ID", "MS_NODE_ID")
        local_rank = r.get_int("local_rank", "DEVICE_ID")
    # A user-exported MASTER_* wins over the scheduler address, e.g. to use a different port.
    return _build(
        r,
        "msrun",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=rank // max(local_world_size, 1),
        master_addr=_master_addr(r, world_size, "MASTER_ADDR", "MS_SCHED_HOST"),
        master_port=r.get_int(
            "master_port", "MASTER_PORT", "MS_SCHED_PORT", default=DEFAULT_MASTER_PORT
        ),
        msrun_scheduler=scheduler,
    )


def _from_mpi(
    r: _EnvReader,
    launcher: str,
    rank_var: str,
    size_var: str,
    local_rank_var: str,
    local_size_var: str,
) -> DistEnv | None:
    if not r.has(rank_var, size_var):
        return None
    rank = r.get_int("rank", rank_var)
    world_size = r.get_int("world_size", size_var)
    local_world_size = r.get_int("local_world_size", local_size_var, default=world_size)
    # mpirun places ranks node by node by default, so the node index is rank // ranks-per-node.
    node_rank = rank // max(local_world_size, 1)
    single_node = local_world_size == world_size
    # mpirun does not export rank 0's host; on one node loopback is right, across nodes the
    # user forwards MASTER_ADDR (`mpirun -x MASTER_ADDR=...`, Intel MPI `-genv MASTER_ADDR ...`).
    master_addr = r.get_str("master_addr", "MASTER_ADDR")
    if master_addr is None:
        if not single_node:
            raise ValueError(
                f"MASTER_ADDR is not set: {launcher} does not export the host of rank 0 for a "
                "multi-node job; forward it to every rank (e.g. mpirun -x MASTER_ADDR=<host>)"
            )
        master_addr = DEFAULT_MASTER_ADDR
    return _build(
        r,
        launcher,
        rank=rank,
        world_size=world_size,
        local_rank=r.get_int("local_rank", local_rank_var, default=rank if single_node else None),
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=r.get_int("master_port", "MASTER_PORT", default=DEFAULT_MASTER_PORT),
    )


def _from_openmpi(r: _EnvReader) -> DistEnv | None:
    return _from_mpi(
        r,
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    )


def _from_mpich(r: _EnvReader) -> DistEnv | None:
    return _from_mpi(r, "mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def _from_slurm(r: _EnvReader) -> DistEnv | None:
    # Only srun exports the SLURM_STEP_* variables. The batch script itself also carries
    # SLURM_PROCID=0 and the job's SLURM_NTASKS; a plain `python` there is one process, not
    # rank 0 of N (which would wait forever for ranks that never start).
    if not r.has("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        return None
    rank = r.get_int("rank", "SLURM_PROCID")
    world_size = r.get_int("world_size", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = r.get_int("node_rank", "SLURM_NODEID")
    local_world_size = _slurm_local_world_size(r, node_rank, world_size)
    nodelist = r.get_str("nodelist", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if r.has("MASTER_ADDR"):
        master_addr = _master_addr(r, world_size, "MASTER_ADDR")
    elif nodelist is not None:
        master_addr = expand_nodelist(nodelist)[0]
        r.source["master_addr"] = r.source["nodelist"]
    elif world_size == 1:
        master_addr = DEFAULT_MASTER_ADDR
    else:
        raise ValueError(
            "neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is set, but "
            f"{r.source['world_size']}={world_size} needs a rendezvous host"
        )
    if r.has("SLURM_JOB_ID"):
        job_id = r.get_int("job_id", "SLURM_JOB_ID")
        default_port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    else:
        default_port = DEFAULT_MASTER_PORT
    return _build(
        r,
        "slurm",
        rank=rank,
        world_size=world_size,
        local_rank=r.get_int("local_rank", "SLURM_LOCALID"),
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=r.get_int("master_port", "MASTER_PORT", default=default_port),
    )


def _slurm_local_world_size(r: _EnvReader, node_rank: int, world_size: int) -> int:
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = r.env.get(name, "").strip()
        if not raw:
            continue
        try:
            per_node = expand_tasks_per_node(raw)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if node_rank >= len(per_node):
            raise ValueError(
                f"SLURM_NODEID={node_rank} but {name}={raw!r} describes {len(per_node)} node(s)"
            )
        r.source["local_world_size"] = name
        return per_node[node_rank]
    return r.get_int("local_world_size", "SLURM_NTASKS_PER_NODE", default=world_size)


def _master_addr(r: _EnvReader, world_size: int, *names: str) -> str:
    addr = r.get_str("master_addr", *names)
    if addr is not None:
        return addr
    if world_size > 1:
        wanted = " or ".join(names) if names else "MASTER_ADDR"
        raise ValueError(f"{wanted} is not set, but WORLD_SIZE={world_size} needs a rendezvous host")
    return DEFAULT_MASTER_ADDR


def _build(r: _EnvReader, launcher: str, **fields) -> DistEnv:
    # Check with the launcher's variable names first: "SLURM_PROCID=4 must be in [0, ...)"
    # says more than DistEnv's own field-name check would.
    values = dict(dataclasses.asdict(DistEnv()), launcher=launcher, **fields)
    _check_consistent(values, r.source)
    return DistEnv(**values)


def _check_consistent(values: Mapping[str, object], source: Mapping[str, str]) -> None:
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


# --- Slurm's compressed lists -------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist, e.g. "node[01-03,07],gpu1" -> node01 node02 node03 node07 gpu1.

    Zero padding follows the range's first bound; several bracket groups in one name
    ("r[1-2]n[1-2]") expand as a product, in Slurm's order.
    """
    hosts: list[str] = []
    for item in _split_outside_brackets(nodelist.strip(), nodelist):
        hosts.extend(_expand_host(item, nodelist))
    if not hosts:
        raise ValueError(f"empty Slurm nodelist {nodelist!r}")
    return hosts


def _split_outside_brackets(text: str, whole: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm nodelist {whole!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {whole!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {whole!r}")
    items.append(text[start:])
    for item in items:
        if not item.strip():
            raise ValueError(f"empty host name in Slurm nodelist {whole!r}")
    return [item.strip() for item in items]


def _expand_host(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, body, rest = item[: match.start()], match.group(1), item[match.end() :]
    suffixes = _expand_host(rest, whole)
    hosts = []
    for piece in body.split(","):
        for number in _expand_range(piece.strip(), whole):
            hosts.extend(prefix + number + suffix for suffix in suffixes)
    return hosts


def _expand_range(piece: str, whole: str) -> list[str]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
    if match is None:
        raise ValueError(f"bad range {piece!r} in Slurm nodelist {whole!r}")
    low, high = match.group(1), match.group(2) or match.group(1)
    if int(high) < int(low):
        raise ValueError(f"descending range {piece!r} in Slurm nodelist {whole!r}")
    width = len(low)
    return [str(n).zfill(width) for n in range(int(low), int(high) + 1)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node list, e.g. "4(x2),2" -> [4, 4, 2]."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# --- torch.distributed ------------------------------------------------------------------


def export_env(env: DistEnv) -> None:
    """Write the env:// variables (RANK, WORLD_SIZE, MASTER_*, LOCAL_*) into os.environ.

    torch.distributed's env:// init and DeepSpeed read these; without them a bare process
    makes DeepSpeed fall back to MPI discovery (which needs mpi4py).
    """
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def init_process_group(backend: str, env: DistEnv, timeout_s: float = 1800) -> bool:
    """Join the default process group; return True if this call created it.

    Exports the env:// variables when a non-torch launcher (msrun, Slurm, MPI, none) started
    the process, then initialises torch.distributed only for world_size > 1 and only once.
    """
    if not backend:
        raise ValueError("backend is empty; pass the device layer's choice (hccl, nccl or gloo)")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if env.msrun_scheduler:
        raise RuntimeError(
            "this is msrun's scheduler process (MS_ROLE=MS_SCHED); a PyTorch job must exit "
            "here instead of joining the process group"
        )
    if env.launcher not in TORCH_ENV_LAUNCHERS:
        export_env(env)
    if env.world_size == 1:
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(
                f"a process group is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the launcher says rank {env.rank} of {env.world_size}"
            )
        return False
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return True


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or of the launcher's environment before init."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank() == 0
    return discover().rank == 0


def barrier() -> None:
    """Wait for all ranks; a no-op in a single process."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if one exists; a no-op otherwise."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
