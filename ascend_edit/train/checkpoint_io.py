"""Checkpoint files: what a checkpoint holds, how it is written durably, and how it is checked on load.

Nothing here loads a pickle. Tensors go to safetensors files and everything else (steps, sampler
position, optimizer hyper-parameters, Python/NumPy RNG state) to JSON, through one small codec
(`save_tree` / `load_tree`). The only pickles a checkpoint can hold are DeepSpeed's own files, which
DeepSpeed writes and reads itself; see `scan_deepspeed_pickles` for what is checked before that.

Integrity: every checkpoint and converted model directory ends with `manifest.json` (each file's
size and sha256), written after the data files are flushed to disk, itself flushed, and only then is
the directory renamed into place. `verify_manifest` re-reads every file; a directory whose manifest
is missing or disagrees with what is on disk is reported by name and not used.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle  # only for its exception type: nothing here unpickles
import pickletools  # reads opcodes; executes nothing
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ascend_edit import jsonio

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HASH_CHUNK = 8 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint or converted directory does not match its manifest (the message names the file)."""


class NonFiniteTensorError(ValueError):
    """A tensor about to be written holds NaN or inf (the message names it); nothing was written."""


# ----------------------------------------------------------------------------------------------------
# Process-group helpers (no-ops in one process)
# ----------------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a small JSON-able object)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------
# Durable writes and manifests
# ----------------------------------------------------------------------------------------------------


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory entry under `directory` to disk (before it is renamed into place)."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            fsync_file(path)
    for sub in {p.parent for p in directory.rglob("*")} | {directory}:
        fsync_dir(sub)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: Path, kind: str | None = None) -> dict:
    """Flush every file under `directory` to disk, then write and flush `manifest.json` (last). `kind` says what
    wrote the directory (an export: what `export.overwrite` may replace)."""
    directory = Path(directory)
    fsync_tree(directory)
    files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
             for path in _data_files(directory)}
    manifest: dict = {"manifest_version": MANIFEST_VERSION, "files": files}
    if kind is not None:
        manifest["kind"] = kind
    target = directory / MANIFEST
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)
    return manifest


def manifested_ancestor(path: str | Path) -> Path | None:
    """The nearest directory above `path` whose manifest lists its files (a converted model, an export, a stage
    checkpoint), or None: a job writing under it would add files the manifest does not list, and every later load
    of it would refuse it as damaged."""
    for parent in Path(path).expanduser().absolute().parents:
        if (parent / MANIFEST).is_file() and read_manifest(parent) is not None:
            return parent
    return None


def read_manifest(directory: Path) -> dict | None:
    """`directory`'s manifest, or None when it has none or it does not parse."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def unlisted_files(directory: Path, listed) -> list[str]:
    """Files under `directory` that its manifest does not list (added after it was written)."""
    return sorted({p.relative_to(directory).as_posix() for p in _data_files(directory)} - set(listed))


def manifest_problem(directory: Path) -> str | None:
    """Why `directory` does not match its manifest (one phrase naming the file), or None when it does."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (incomplete, or written before manifests existed)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    unlisted = unlisted_files(directory, files)
    if unlisted:
        return f"{unlisted[0]} is not in the manifest (a file added after the checkpoint was written)"
    for name, entry in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if sha256_of(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def verify_manifest(directory: Path) -> None:
    problem = manifest_problem(directory)
    if problem:
        raise CheckpointIntegrityError(f"{directory} is damaged: {problem}")


@contextlib.contextmanager
def disk_full_named(final: Path, tmp: Path) -> Iterator[None]:
    """A full disk while checkpoint `final` is written (into `tmp`) becomes one line that names it and says the
    earlier checkpoints are intact; any other error passes through."""
    try:
        yield
    except Exception as err:
        if disk_full(err, tmp):
            raise OSError(errno.ENOSPC, f"no space left on the device writing checkpoint {final} (the earlier "
                          "checkpoints are intact; free space and run the same command again to resume from "
                          f"the newest: {type(err).__name__}: {' '.join(str(err).split())[:200]})") from err
        raise


def publish(tmp: Path, final: Path) -> None:
    """Move a finished (manifest written) `tmp` directory to `final` atomically.

    An existing `final` (the same step written again) is first renamed aside, and removed only once
    the new one is in place: a crash at any point leaves one complete copy under a known name.
    """
    aside = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Finite checks
# ----------------------------------------------------------------------------------------------------


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, else None."""
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() \
                and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteTensorError(f"refusing to write {what}: tensor {bad} holds NaN or inf")


# ----------------------------------------------------------------------------------------------------
# Tensor trees: nested dicts / lists / tuples with tensors, as safetensors + JSON (no pickle)
# ----------------------------------------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint (tensors and JSON values only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_tree(tree: Any, directory: Path, stem: str) -> None:
    """Write `tree` as `<stem>.json` (structure and values) + `<stem>.safetensors` (its tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, stem)
    directory = Path(directory)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(encoded))


def load_tree(directory: Path, stem: str) -> Any:
    directory = Path(directory)
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    return _decode(json.loads((directory / f"{stem}.json").read_text()), tensors)


def tree_tensors(tree: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a nested structure (for finite checks)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tree_tensors(v, f"{prefix}[{i}]")


# ----------------------------------------------------------------------------------------------------
# The torch engine's state
# ----------------------------------------------------------------------------------------------------

TRAINABLE_FILE = "trainable.safetensors"  # the trainable weights by parameter name (what export reads)
ENGINE_STATE = "engine_state"  # optimizer + LR schedule: engine_state.safetensors + engine_state.json


def save_torch_engine(directory: Path, named_params: dict[str, torch.Tensor], optimizer, scheduler,
                      scaler=None) -> None:
    directory = Path(directory)
    params = {name: p.detach().to("cpu").clone().contiguous() for name, p in named_params.items()}
    optimizer_state = optimizer.state_dict()
    require_finite(params.items(), f"a checkpoint in {directory}")
    require_finite(tree_tensors(optimizer_state["state"], "optimizer"), f"a checkpoint in {directory}")
    save_file(params, str(directory / TRAINABLE_FILE))
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    save_tree(state, directory, ENGINE_STATE)


def load_trainable_file(directory: Path) -> dict[str, torch.Tensor]:
    """The torch engine's trainable weights by parameter name, as saved (fp32 masters)."""
    if not (Path(directory) / TRAINABLE_FILE).exists():
        raise FileNotFoundError(f"{directory} holds no torch engine state ({TRAINABLE_FILE})")
    return load_file(str(Path(directory) / TRAINABLE_FILE))


def load_torch_engine(directory: Path, own_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                      scaler=None) -> None:
    directory = Path(directory)
    params = load_trainable_file(directory)
    missing = sorted(set(params) - set(own_params))
    if missing:
        raise ValueError(f"{directory}: checkpoint parameters {missing[:5]} do not exist in this model")
    state = load_tree(directory, ENGINE_STATE)
    with torch.no_grad():
        for name, value in params.items():
            own_params[name].copy_(value)
    optimizer_state = state["optimizer"]
    # JSON has no tuples: give hyper-parameters back the type the optimizer built them with (betas).
    for saved, group in zip(optimizer_state["param_groups"], optimizer.param_groups):
        for key, value in group.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])


def read_trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 trainable weights of a stage checkpoint, by the model's parameter names, whatever
    engine and ZeRO stage wrote it (DeepSpeed partitions are consolidated on the CPU, one process).
    The checkpoint's manifest is verified first."""
    checkpoint = Path(checkpoint)
    verify_manifest(checkpoint)
    if (checkpoint / TRAINABLE_FILE).exists():
        return load_file(str(checkpoint / TRAINABLE_FILE))
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        scan_deepspeed_pickles(checkpoint)
        from ascend_edit.train.engine import consolidated_zero_weights  # engine.py owns deepspeed

        return consolidated_zero_weights(checkpoint)
    raise FileNotFoundError(f"{checkpoint} holds no engine weights ({TRAINABLE_FILE} or {DEEPSPEED_DIR}/)")


# ----------------------------------------------------------------------------------------------------
# DeepSpeed's pickles
# ----------------------------------------------------------------------------------------------------

DEEPSPEED_DIR = "deepspeed"  # the tag DeepSpeed writes its files under
# Globals DeepSpeed 0.19's checkpoints hold beyond what `torch.load(weights_only=True)` accepts by itself:
# the ZeRO stage enum and loss scaler (seen in ZeRO-3 fp32 checkpoints of this project) and ZeRO 1/2's
# parameter slice map entries. Anything else in a DeepSpeed file refuses the checkpoint before DeepSpeed
# (which loads with weights_only=False) sees it.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


# Python < 3.11.4 pickles an Enum member as `getattr(EnumClass, "member")`, so `builtins.getattr` shows
# up beside `ZeroStageEnum` there. It is accepted only in exactly that shape (see `_only_member_lookups`).
GETATTR = "builtins.getattr"
_GETATTR_GLOBALS = frozenset({GETATTR, "__builtin__.getattr"})  # protocol 2 writes the Python 2 name
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"})


def _only_member_lookups(pickle_bytes: bytes, allowed_classes: frozenset[str]) -> bool:
    """True if every use of `builtins.getattr` in a protocol-2 pickle (what `torch.save` writes) is
    `getattr(<allowed class>, "<public identifier>")` called at once: GLOBAL getattr, the class (GLOBAL
    or a memo reference to it), one string, TUPLE2, REDUCE, with memo stores in between ignored."""
    memo: dict[Any, tuple[str, Any]] = {}  # memo index -> the op whose result is stored there
    significant: list[tuple[str, Any]] = []  # ops other than memo stores; memo loads resolved
    for op, arg, _ in pickletools.genops(pickle_bytes):
        name = op.name
        if name in ("MEMOIZE", "STACK_GLOBAL"):
            return False  # protocol 4+: not what torch.save writes; refuse rather than half-parse
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            if significant:
                memo[arg] = significant[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            significant.append(memo.get(arg, (name, arg)))
        elif name == "GLOBAL":
            significant.append((name, str(arg).replace(" ", ".")))
        else:
            significant.append((name, arg))
    for i, (name, arg) in enumerate(significant):
        if name != "GLOBAL" or arg not in _GETATTR_GLOBALS:
            continue
        shape = significant[i + 1:i + 5]
        if len(shape) < 4:
            return False
        (cls_op, cls), (str_op, member), (tuple_op, _), (reduce_op, _) = shape
        if not (cls_op == "GLOBAL" and cls in allowed_classes and str_op in _STRING_OPS
                and tuple_op == "TUPLE2" and reduce_op == "REDUCE"):
            return False
        if not (isinstance(member, str) and member.isidentifier() and not member.startswith("_")):
            return False
    return True


def _archive_pickles(path: Path) -> list[bytes]:
    with zipfile.ZipFile(path) as archive:
        return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]


def deepspeed_pickle_problem(checkpoint: Path) -> str | None:
    """Why DeepSpeed must not unpickle this checkpoint's files (one phrase naming the file), or None.

    A static scan (torch's own `get_unsafe_globals_in_checkpoint`): nothing is unpickled here. Every
    global a file names must be in `DEEPSPEED_GLOBALS` or what `torch.load(weights_only=True)` accepts.
    """
    checkpoint = Path(checkpoint)
    for path in sorted((checkpoint / DEEPSPEED_DIR).rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(checkpoint).as_posix()
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):  # not a torch zip archive
            return f"{name} is not a torch checkpoint archive"
        unknown = sorted(unsafe - DEEPSPEED_GLOBALS)
        if GETATTR in unknown and all(_only_member_lookups(data, DEEPSPEED_GLOBALS) for data in _archive_pickles(path)):
            unknown.remove(GETATTR)
        if unknown:
            return f"{name} names code outside DeepSpeed's checkpoint types ({', '.join(unknown[:3])})"
    return None


def scan_deepspeed_pickles(checkpoint: Path) -> None:
    problem = deepspeed_pickle_problem(checkpoint)
    if problem:
        raise CheckpointIntegrityError(f"{checkpoint}: {problem}: refusing to hand it to DeepSpeed")


# ----------------------------------------------------------------------------------------------------
# Checkpoint directories
# ----------------------------------------------------------------------------------------------------


DISK_FULL_MARGIN = 64 << 20  # bytes: below this much free space a failed write is taken for a full disk


def disk_full(err: BaseException, path: Path) -> bool:
    """Whether a failed checkpoint write ran out of disk: ENOSPC itself, safetensors' "os error 28", or (torch's
    serializer under DeepSpeed reports a short write as "unexpected pos") a device with almost no space left."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if "No space left" in str(err) or "os error 28" in str(err):
        return True
    if not isinstance(err, (OSError, RuntimeError)):  # a write that failed, not a check (e.g. non-finite values)
        return False
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < DISK_FULL_MARGIN
    except OSError:
        return False


class CheckpointDir:
    """Atomic, verified, rotating checkpoints under `root`, one directory per (stage, step):
    `step-<stage>-<step>/`.

    A checkpoint is written into `step-<stage>-<step>.tmp/` by every rank; once all ranks are done,
    rank 0 flushes every file, writes `manifest.json` last and renames the directory, so a directory
    without `.tmp` is complete; a leftover `.tmp` (a run killed mid-save) is ignored and overwritten.
    Only the newest `keep_last` checkpoints of a stage are kept. Multi-node runs need `root` on a
    filesystem all nodes share.

    Contents: `trainer_state.json` (rank 0: step, sampler, history, run config, what wrote it),
    `rank-<r>.json` + `rank-<r>.safetensors` (each rank's RNG state), the engine's own files
    (`trainable.safetensors` + `engine_state.*`, or DeepSpeed's `deepspeed/`) and `manifest.json`.
    """

    STATE_FILE = "trainer_state.json"

    def __init__(self, root: Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"engine.keep_last={keep_last} must be >= 1 (the newest checkpoint is what resume reads)")
        self.root, self.keep_last = Path(root), keep_last

    @staticmethod
    def _parse(path: Path) -> tuple[str, int] | None:
        parts = path.name.split("-")
        if len(parts) != 3 or parts[0] != "step" or not parts[2].isdigit() or not path.is_dir():
            return None  # includes `*.tmp` and `*.old`: their step part is not a number
        return parts[1], int(parts[2])

    def complete(self, stage: str) -> list[Path]:
        """This stage's finished checkpoints, oldest first (not verified: see `newest_intact`)."""
        if not self.root.exists():
            return []
        found = [(parsed[1], p) for p in self.root.iterdir() if (parsed := self._parse(p)) and parsed[0] == stage]
        return [p for _, p in sorted(found)]

    def latest(self, stage: str) -> Path | None:
        done = self.complete(stage)
        return done[-1] if done else None

    def newest_intact(self, stage: str) -> Path | None:
        """The newest checkpoint of `stage` that matches its manifest; each damaged newer one is logged
        by name (one line) and skipped. Rank 0 checks, every rank gets its answer."""
        rank, _ = rank_and_world()
        chosen = None
        if rank == 0:
            for path in reversed(self.complete(stage)):
                problem = manifest_problem(path) or deepspeed_pickle_problem(path)
                if problem is None:
                    chosen = path.name
                    break
                log.warning("checkpoint %s is damaged (%s): using an older one", path, problem)
        chosen = from_rank0(chosen)
        return self.root / chosen if chosen else None

    def save(self, engine, stage: str, step: int, state: dict, rank_state: dict) -> Path:
        """Write a checkpoint (every rank calls this); returns its final path."""
        if "-" in stage or not stage:
            raise ValueError(f"stage name {stage!r} must be non-empty and contain no '-'")
        rank, _ = rank_and_world()
        final, tmp = self.root / f"step-{stage}-{step}", self.root / f"step-{stage}-{step}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this run's own earlier, killed save
            tmp.mkdir(parents=True)
        barrier()
        require_finite(tree_tensors(rank_state, f"rank {rank}"), f"checkpoint {final}")
        with disk_full_named(final, tmp):
            engine.save(tmp)
            save_tree(rank_state, tmp, f"rank-{rank}")
            if rank == 0:
                meta = {"stage": stage, "step": step, **engine.describe(), **state}
                (tmp / self.STATE_FILE).write_text(jsonio.dumps(meta, indent=1))
        barrier()
        if rank == 0:
            with disk_full_named(final, tmp):
                write_manifest(tmp)
            publish(tmp, final)
            for old in self.complete(stage)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Restore `engine` from checkpoint `path`; returns (rank 0's state, this rank's state).

        The caller picks `path` with `newest_intact`; the manifest was verified there.
        """
        path = Path(path)
        state_file = path / self.STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: no {self.STATE_FILE}")
        state = json.loads(state_file.read_text())
        wanted = engine.describe()
        written = {key: state.get(key) for key in wanted}
        if written != wanted:
            raise ValueError(f"{path} was written by {written} and cannot be resumed by {wanted}: resume with the "
                             "same engine, ZeRO stage and number of processes, or set engine.resume=false")
        rank, _ = rank_and_world()
        if not (path / f"rank-{rank}.json").exists():
            raise FileNotFoundError(f"{path} has no state for rank {rank} (rank-{rank}.json)")
        engine.load(path)
        return state, load_tree(path, f"rank-{rank}")
