"""`ascend-edit export`: a Hugging Face checkpoint of a converted model (see models/export.py for formats).

`export.checkpoint` may name:
* a converted directory — `converted/` or `stage-layerwise/` of a run (`ascend_edit.json` inside). The
  convert task writes these after the engine has gathered every weight, so they come from any ZeRO stage;
* a run directory — its `converted/`, else its `stage-layerwise/`;
* a stage checkpoint of the torch engine, `checkpoints/step-<stage>-<n>/` (`trainable.safetensors`): the
  model is rebuilt from the run's saved config (`.hydra/config.yaml`) and teacher, and the trained weights
  that checkpoint holds are loaded on top (train/rebuild.py).
A DeepSpeed stage checkpoint (`deepspeed/` inside, any ZeRO stage) is consolidated to full fp32
weights on the CPU through train/checkpoint_io.py before export. Every source's manifest is verified
before it is read (a damaged source is refused, naming the file).

Under ZeRO-3 (`engine=zero3`, the job launched on every rank) a converted directory is read partitioned — no
rank's device holds more than its partitions and one tensor — and gathered to rank 0's host one tensor at a
time; rank 0 writes and verifies the export on the CPU, as a one-process export does.

The output is written next to `export.output` and renamed into place. A non-empty `export.output` is
refused unless `export.overwrite=true`, and the source itself or a directory holding it is refused always.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from transformers import AutoTokenizer

from ascend_edit.config import RootConfig
from ascend_edit.models.checkpoint import (
    CONVERTED_MARKER,
    RUN_CANDIDATES,
    converted_damage,
    converted_weight_files,
    load_converted,
    run_directory_of,
)
from ascend_edit.models.export import ExportResult, export_converted, output_problem
from ascend_edit.models.loading import TORCH_DTYPES
from ascend_edit.run_dir import saved_run_config
from ascend_edit.train.checkpoint_io import TRAINABLE_FILE, CheckpointIntegrityError, verify_manifest
from ascend_edit.train.rebuild import rebuild_from_engine_checkpoint
from ascend_edit.train.stage import recorded_inputs

log = logging.getLogger(__name__)

ENGINE_WEIGHTS = TRAINABLE_FILE
OLD_PICKLED_ENGINE = "engine.pt"  # written by earlier versions: a pickle, never loaded
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class ExportSource:
    kind: str  # "converted" | "engine_checkpoint"
    path: Path


def resolve_source(path: str | Path | None) -> ExportSource:
    """What `export.checkpoint` points at; a clear error when it is none of the supported layouts."""
    if not path:
        raise ValueError("export.checkpoint is required: a converted dir, a run dir or a stage checkpoint")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"export.checkpoint={path} is not a directory")
    if (path / CONVERTED_MARKER).exists():
        return ExportSource("converted", path)
    for name in RUN_CANDIDATES:
        if (path / name / CONVERTED_MARKER).exists():
            return ExportSource("converted", path / name)
        if (path / name).is_dir():  # there but without its marker: damaged, never a reason to ship the next one
            raise CheckpointIntegrityError(f"export.checkpoint={path}: {converted_damage(path / name)}; not falling "
                                           "back to an earlier stage's model: restore it, or name the one to export")
    if (path / ENGINE_WEIGHTS).exists() or (path / "deepspeed").is_dir():
        return ExportSource("engine_checkpoint", path)
    if (path / OLD_PICKLED_ENGINE).exists():
        raise ValueError(f"{path} holds only {OLD_PICKLED_ENGINE}, a pickle (loading it could run code): it is not "
                         f"loaded; export the run's converted/ directory instead")
    raise FileNotFoundError(f"{path} holds no converted model ({CONVERTED_MARKER}), no run output "
                            f"({' or '.join(RUN_CANDIDATES)}/) and no stage checkpoint "
                            f"({ENGINE_WEIGHTS} or deepspeed/)")


def source_provenance(source: ExportSource) -> dict | None:
    """The data, seed and recorded inputs of the run the source belongs to (read from its saved config and
    RUN_INPUTS), or None outside a run."""
    from omegaconf import OmegaConf

    # a stage checkpoint lies at <run>/checkpoints/step-<stage>-<n>
    run_dir = run_directory_of(source.path if source.kind == "converted" else source.path.parents[1])
    if run_dir is None:
        return None
    raw = saved_run_config(run_dir)  # relative data paths against where the run was started: an export moves
    data, seed = OmegaConf.select(raw, "data"), OmegaConf.select(raw, "device.seed")
    if data is None or seed is None:
        return None
    inputs = recorded_inputs(run_dir)  # its teacher's and data's identities: eval of the export compares them
    return {"run_directory": str(run_dir.resolve()), "data": OmegaConf.to_container(data, resolve=True),
            "seed": int(seed), **({"inputs": inputs} if inputs else {})}


def stored_dtype_of(safetensors_file: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor in a safetensors file (read from its header only)."""
    with safe_open(str(safetensors_file), framework="pt") as f:
        for key in f.keys():
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def load_source(source: ExportSource, dtype: torch.dtype | None):
    """(converted model, tokenizer or None, dtype to export in)."""
    if source.kind == "converted":
        verify_manifest(source.path)  # before reading even a header of it
        dtype = dtype or stored_dtype_of(converted_weight_files(source.path)[0])  # one file or the first shard
        model = load_converted(source.path, dtype=dtype)
        has_tokenizer = any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(source.path) if has_tokenizer else None
        return model, tokenizer, dtype
    model, tokenizer = rebuild_from_engine_checkpoint(source.path, dtype)
    dtype = dtype or next(model.parameters()).dtype
    return model.to(dtype), tokenizer, dtype


def check_output(output: Path, protected: list[Path], overwrite: bool, own_dir: Path | None = None) -> None:
    """Refuse an output that is, holds or lies inside a source directory (even with overwrite), that is or holds
    this job's own directory (`own_dir`: its log and config), a non-empty one without overwrite, and with
    overwrite anything but an earlier export (models/export.py `output_problem`): overwrite replaces an export,
    never a directory of other files. Checked before anything is loaded."""
    out = output.expanduser().resolve()
    if own_dir is not None and own_dir.expanduser().resolve().is_relative_to(out):
        raise ValueError(f"export.output={output} is or holds this export job's own directory ({own_dir}): choose "
                         "a directory of its own")
    for path in protected:
        src = path.expanduser().resolve()
        if out == src or src.is_relative_to(out):
            raise ValueError(f"export.output={output} is the source checkpoint or holds it ({path}): refusing to "
                             "replace it, even with export.overwrite=true; choose another directory")
        if out.is_relative_to(src):
            raise ValueError(f"export.output={output} lies inside the source checkpoint {path}: choose a directory "
                             "outside it")
    problem = output_problem(out, overwrite, shown=output)  # as export_converted checks it, before any loading
    if problem:
        raise ValueError(problem)


def load_source_partitioned(source: ExportSource, dtype: torch.dtype | None,
                            zero3_for: Callable[[torch.dtype], dict | None]):
    """`load_source` for a converted directory under ZeRO-3, on every rank of the job: the model is loaded
    partitioned (tensor by tensor into the partitions), then one parameter at a time is gathered and copied to
    rank 0's host memory (as `save_converted` writes a partitioned model). (model, tokenizer, dtype) on rank 0,
    (None, None, dtype) on the others."""
    from ascend_edit.models.checkpoint import gathered_converted

    verify_manifest(source.path)
    dtype = dtype or stored_dtype_of(converted_weight_files(source.path)[0])
    partitioned = load_converted(source.path, dtype=dtype, zero3=zero3_for(dtype))
    model = gathered_converted(partitioned, source.path, dtype)
    del partitioned
    if model is None:
        return None, None, dtype
    has_tokenizer = any((source.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(source.path) if has_tokenizer else None, dtype


def run(cfg: RootConfig) -> dict:
    """Under ZeRO-3 (`engine=zero3`, launched on every rank) a converted directory is loaded partitioned and
    gathered to rank 0 one tensor at a time (`load_source_partitioned`); rank 0 alone writes and verifies the
    export, on the CPU as always. A stage checkpoint is rebuilt in one process (rank 0)."""
    import functools

    from ascend_edit import distributed
    from ascend_edit.device import resolve_device
    from ascend_edit.models.zero3 import partitioned_load_config

    source = resolve_source(cfg.export.checkpoint)
    assert cfg.export.checkpoint is not None  # resolve_source refuses a missing one
    output = (Path(cfg.export.output) if cfg.export.output else Path(cfg.output_dir) / "hf").expanduser().resolve()
    check_output(output, [Path(cfg.export.checkpoint), source.path], cfg.export.overwrite, Path(cfg.output_dir))
    requested = None if cfg.export.dtype == "auto" else TORCH_DTYPES[cfg.export.dtype]
    env = distributed.discover()
    partitioned = partitioned_load_config(cfg.engine, torch.float32) is not None
    if partitioned:
        distributed.init_process_group(resolve_device(cfg.device.type, local_rank=env.local_rank).dist_backend, env)
    if partitioned and source.kind == "converted":
        model, tokenizer, dtype = load_source_partitioned(
            source, requested, functools.partial(partitioned_load_config, cfg.engine))
    elif env.is_main:
        model, tokenizer, dtype = load_source(source, requested)
    else:
        model = None
    if model is None:  # a rank that only took part in the gathers: rank 0 writes
        return {"source": str(source.path), "directory": str(output), "rank": env.rank}
    result = export_converted(model, output, tokenizer=tokenizer, native=cfg.export.native, dtype=dtype,
                              verify=cfg.export.verify, overwrite=cfg.export.overwrite,
                              provenance=source_provenance(source))
    print_result(Console(), source, result, dtype)
    return {"source": str(source.path), "directory": str(result.directory), "format": result.format,
            "blockers": result.blockers, "max_rel_logit_diff": result.max_rel_logit_diff,
            "cache_bytes_per_token": result.cache_bytes_per_token, "serving_notes": result.serving_notes}


def print_result(console: Console, source: ExportSource, result: ExportResult,
                 dtype: torch.dtype | None = None) -> None:
    table = Table(title=f"Exported {source.path} -> {result.directory}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("format", result.format)
    for fmt, reasons in result.blockers.items():
        if reasons:
            table.add_row(f"not {fmt}", "\n".join(reasons))
    if result.max_rel_logit_diff is not None and result.cache_bytes_per_token is not None:
        table.add_row("reloaded vs model", f"max relative logit difference {result.max_rel_logit_diff:.1e}")
        # the probe runs in fp32; the exported model caches in its own dtype (half of that in bf16 / fp16)
        size = torch.empty(0, dtype=dtype).element_size() if dtype is not None and dtype.is_floating_point else 4
        as_exported = (f"; {result.cache_bytes_per_token * size / 4:,.0f} bytes/token in the export's "
                       f"{str(dtype).removeprefix('torch.')}" if size != 4 else "")
        table.add_row("cache (reloaded)", f"{result.cache_bytes_per_token:,.0f} bytes/token held after a "
                      f"{result.probe_tokens}-token fp32 probe{as_exported} (sliding layers save more at longer "
                      "contexts: ascend-edit inspect / bench_kv)")
    for note in result.serving_notes:
        table.add_row("serving", note)
    remote = ", trust_remote_code=True" if result.format == "auto_map" else ""
    console.print(table)
    # outside the table, whole: a narrow terminal or a pipe would cut the path a user copies
    console.print(f'load: AutoModelForCausalLM.from_pretrained("{result.directory}"{remote})', soft_wrap=True)
