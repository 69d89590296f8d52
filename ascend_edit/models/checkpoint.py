"""Save and reload a converted model in the framework's own format.

A directory holds the teacher's HF `config.json`, `ascend_edit.json` (target config and per-layer
plan), the weights of the converted model only (teacher attentions are not written), the tokenizer and
`manifest.json` (every file's size and sha256, written last). `load_converted` verifies the manifest,
rebuilds the same modules and loads the weights strictly.

Weights: `model.safetensors` when they fit one shard (`SHARD_BYTES`), else Hugging Face's sharded layout
(`model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json`). A ZeRO-3 partitioned model is
written by every rank together: one parameter at a time is gathered and copied to rank 0's host memory, and
rank 0 writes each shard as it fills (models/zero3.py `gathered_tensors`), so no device ever holds more than
its partitions and one whole tensor.

Read back under ZeRO-3 (`load_converted(zero3=...)`, `load_converted_weights` into a partitioned model), each
stored tensor is written into its partitions one at a time, names and shapes checked on the headers first;
`gathered_converted` makes such a model whole on rank 0's host only (the separate `export` job).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.surgery import LayerPlan, edit_model, plan_entries, plan_from_entries, unwrap_targets
from ascend_edit.train.checkpoint_io import (
    NonFiniteTensorError,
    first_non_finite,
    from_rank0,
    fsync_dir,
    manifest_problem,
    rank_and_world,
    verify_manifest,
    write_manifest,
)

FORMAT_VERSION = 1
CONVERTED_MARKER = "ascend_edit.json"  # names a converted-model directory; holds target config and plan
RUN_CANDIDATES = ("converted", "stage-layerwise")  # converted models inside a run directory, preferred first


def converted_damage(directory: Path) -> str:
    """What is wrong with a converted directory that lacks its marker, as its manifest names it."""
    return f"{directory} is damaged ({manifest_problem(directory) or 'no ' + CONVERTED_MARKER})"


def run_directory_of(path: Path) -> Path | None:
    """The run directory PATH is (its saved `.hydra/config.yaml`), or holds as its `converted/` / `stage-layerwise/`
    model; None otherwise — an export lying in an export job's directory (`<job>/hf`) is no model of that job."""
    path = Path(path)
    candidates = [path]
    if path.name in RUN_CANDIDATES and (path / CONVERTED_MARKER).is_file():
        candidates.append(path.parent)
    return next((c for c in candidates if (c / ".hydra" / "config.yaml").is_file()), None)
WEIGHTS_FILE = "model.safetensors"  # one shard
WEIGHTS_INDEX = "model.safetensors.index.json"  # several: Hugging Face's sharded layout
SHARD_BYTES = 5 << 30  # bytes of tensor data per shard (a shard is written once it holds this much)


def converted_state_dict(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The student's weights under the names of an unwrapped model (teacher attentions dropped).
    `keep_vars`: the parameters themselves (ZeRO-3 ones included) rather than their values."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=keep_vars).items():
        if ".self_attn.teacher." in name:
            continue
        state[name.replace(".self_attn.target.", ".self_attn.")] = tensor
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared storage
    return state


def save_converted(model: nn.Module, target: TargetConfig, directory: Path, tokenizer=None,
                   shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the converted model to `directory` (see the module docstring); returns `directory`.

    Refuses a non-finite weight before writing anything. The files go to a sibling temporary directory
    with its manifest; an existing `directory` must be a converted model (it is replaced: renamed aside,
    the new one renamed in, then the old one removed), anything else there is refused.

    A model holding ZeRO-3 parameters is written collectively: every rank calls this, rank 0 writes (the
    others return once their part of each gather is done; the caller's barrier orders later reads).
    """
    from ascend_edit.models.zero3 import has_zero_params

    directory = Path(directory)
    named = list(converted_state_dict(model, keep_vars=True).items())
    collective = has_zero_params(model)
    writer = rank_and_world()[0] == 0 or not collective
    if collective:
        from ascend_edit.models.zero3 import first_non_finite_anywhere

        bad = first_non_finite_anywhere(named)  # on each rank's partitions, no gather
    else:
        bad = first_non_finite((name, t.detach()) for name, t in named)
    if bad is not None:
        raise NonFiniteTensorError(f"refusing to write the converted model to {directory}: tensor {bad} holds NaN "
                                   "or inf")
    foreign = directory.exists() and any(directory.iterdir()) and not (directory / CONVERTED_MARKER).exists()
    if from_rank0(foreign) if collective else foreign:  # every rank refuses together (no gather left waiting)
        raise FileExistsError(f"{directory} exists and is not a converted model: refusing to replace it")
    if not writer:
        _write_weights(named, None, shard_bytes)  # this rank's part of every gather
        return directory
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        cast(PretrainedConfig, model.config).to_json_file(tmp / "config.json")  # a transformers model's
        meta = {"format_version": FORMAT_VERSION, "target": dataclasses.asdict(target),
                "plan": plan_entries(cast(list[LayerPlan], model.edit_plan))}  # set by edit_model
        (tmp / CONVERTED_MARKER).write_text(json.dumps(meta, indent=2))
        _write_weights(named, tmp, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # this call's own temporary directory
        raise
    return directory


def _write_weights(named: list[tuple[str, torch.Tensor]], directory: Path | None,
                   shard_bytes: int) -> None:
    """`named` as safetensors shards in `directory` (None: a rank that only takes part in the gathers).
    One shard: `model.safetensors`, byte for byte what one `save_file` of the whole state writes."""
    from ascend_edit.models.zero3 import gathered_tensors

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        assert directory is not None
        save_file(current, str(directory / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shards.append(sorted(current))
        current, size = {}, 0

    for name, tensor in gathered_tensors(named, writer=directory is not None):
        if tensor is None:
            continue
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    if directory is None:
        return
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.replace(directory / "shard-00000.safetensors", directory / WEIGHTS_FILE)
        return
    weight_map = {}
    for index, names in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{index:05d}.safetensors", directory / final)
        weight_map.update(dict.fromkeys(names, final))
    (directory / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=2))


def converted_weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a converted model's weights (one, or every shard of the index)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / WEIGHTS_FILE]


def read_converted_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight of a converted model directory, whatever its sharding."""
    state: dict[str, torch.Tensor] = {}
    for path in converted_weight_files(directory):
        state.update(load_file(str(path)))
    return state


def swap_in(new: Path, directory: Path) -> None:
    """Put the finished directory `new` at `directory`; a previous `directory` is renamed aside first and
    removed only once the new one is in place (a crash leaves one of the two complete under a known name).
    The caller has decided that the previous `directory` may be replaced."""
    aside = directory.with_name(f"{directory.name}.old-{uuid.uuid4().hex[:8]}")
    if directory.exists():
        os.replace(directory, aside)
    os.replace(new, directory)
    fsync_dir(directory.parent)
    if aside.exists():
        shutil.rmtree(aside)


def _target_config(raw: dict) -> TargetConfig:
    raw = dict(raw)
    raw["mla"] = MLAConfig(**raw["mla"])
    raw["gate_swa"] = GateSWAConfig(**raw["gate_swa"])
    return TargetConfig(**raw)


def load_converted(directory: Path, dtype: torch.dtype = torch.float32, zero3: dict | None = None) -> nn.Module:
    """Rebuild a converted model from `save_converted` output; returns it with targets in place.

    `zero3`: a `zero.Init` config (models/zero3.py `partitioned_load_config`): the model is built ZeRO-3
    partitioned and each stored tensor is written into its partitions one at a time, so no rank ever holds
    more than its partitions and one tensor (every rank of the job must call this; gradients off)."""
    directory = Path(directory)
    config, target, plan = read_converted_meta(directory)
    if zero3 is not None:
        return _load_converted_partitioned(directory, config, target, plan, dtype, zero3)
    return assemble_converted(directory, config, target, plan, read_converted_weights(directory), dtype)


def read_converted_meta(directory: Path) -> tuple[PretrainedConfig, TargetConfig, list[LayerPlan]]:
    """(HF config, target config with `init=random`, plan) of a converted directory, its manifest verified."""
    meta_file = directory / CONVERTED_MARKER
    if not meta_file.exists():
        raise FileNotFoundError(f"{directory} is not a converted model: no ascend_edit.json")
    verify_manifest(directory)
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(directory)
    target = dataclasses.replace(_target_config(meta["target"]), init="random")
    return config, target, plan_from_entries(meta["plan"])


def assemble_converted(directory: Path, config: PretrainedConfig, target: TargetConfig, plan: list[LayerPlan],
                       state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """An ordinary CPU model of the converted architecture holding exactly `state` (built on meta, assigned)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    edit_model(model, plan, target)
    unwrap_targets(model)
    model.to_empty(device="cpu")
    legacy = legacy_query_biases(model.state_dict().keys(), state, target.kind)
    if legacy:
        state = {**state, **{name: torch.zeros_like(model.get_parameter(name), device="cpu") for name in legacy}}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if "rotary_emb" not in m]  # buffers recomputed below
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the plan (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    cast_parameters(model, dtype)
    fresh_rotary_buffers(model)
    model.edit_plan = plan
    return model.eval()


def _load_converted_partitioned(directory: Path, config: PretrainedConfig, target: TargetConfig,
                                plan: list[LayerPlan], dtype: torch.dtype, zero3: dict) -> nn.Module:
    """`load_converted` under ZeRO-3: the teacher architecture built under `zero.Init` (transformers' ZeRO-3
    integration), the converted attentions built plain (one teacher attention gathered at a time, as in the
    conversion) and partitioned at once, then the stored tensors written into the partitions one by one."""
    from ascend_edit.models.zero3 import gathered, partition_remaining, partitioned_construction

    with partitioned_construction(zero3):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    edit_model(model, plan, target, gather=gathered)
    unwrap_targets(model)  # the teacher attentions' partitions go with them
    partition_remaining(model, zero3)
    model.requires_grad_(False)
    own = {name: t for name, t in converted_state_dict(model, keep_vars=True).items() if "rotary_emb" not in name}
    load_partitioned_weights(own, directory)
    fresh_rotary_buffers(model)
    model.edit_plan = plan
    return model.eval()


def load_partitioned_weights(own: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a converted directory's tensors into `own` (name -> parameter or buffer, ZeRO-3 ones included), one
    tensor at a time in the files' order (the same on every rank). Every name and shape is checked against the
    files' headers first, so a mismatch is refused on every rank alike before any collective."""
    from safetensors import safe_open

    from ascend_edit.models.zero3 import write_whole

    files = converted_weight_files(directory)
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            stored.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    missing = [name for name in own if name not in stored]
    unexpected = [name for name in stored if name not in own]
    wrong = [f"{n} {stored[n]} vs {tuple(getattr(own[n], 'ds_shape', own[n].shape))}" for n in stored
             if n in own and stored[n] != tuple(getattr(own[n], "ds_shape", own[n].shape))]
    if missing or unexpected or wrong:
        raise ValueError(f"{directory}: weights do not match the plan (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {wrong[:3]})")
    writer = rank_and_world()[0] == 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                write_whole(own[name], functools.partial(f.get_tensor, name), writer)


def gathered_converted(model: nn.Module, directory: Path, dtype: torch.dtype) -> nn.Module | None:
    """A ZeRO-3 partitioned converted model made whole on rank 0's host: one parameter at a time is gathered
    and copied to rank 0's CPU memory (models/zero3.py `gathered_tensors`, as `save_converted` writes), then
    assembled as `load_converted` assembles a directory's weights. Every rank calls this; rank 0 gets the
    ordinary CPU model, the others None. `directory`: the converted directory `model` was loaded from."""
    from ascend_edit.models.zero3 import gathered_tensors

    writer = rank_and_world()[0] == 0
    named = [(name, t) for name, t in converted_state_dict(model, keep_vars=True).items()
             if "rotary_emb" not in name]
    state = {name: tensor for name, tensor in gathered_tensors(named, writer) if tensor is not None}
    if not writer:
        return None
    config, target, plan = read_converted_meta(Path(directory))
    return assemble_converted(Path(directory), config, target, plan, state, dtype)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters only. `Module.to(dtype)` would also round the rotary inverse
    frequencies (buffers) to bf16 — a phase error that grows with position — which transformers' own
    loading never does."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def fresh_rotary_buffers(model: nn.Module) -> None:
    """Recompute every rotary embedding's buffers in fp32 from its config (on each module's device)."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "config"):
            for name, buffer in type(module)(config=module.config).named_buffers():
                old = getattr(module, name, None)
                device = old.device if isinstance(old, torch.Tensor) and not old.is_meta else "cpu"
                setattr(module, name, buffer.to(device))



def target_changes(stored: dict, target) -> list[str]:
    """`target.<key>: stored -> now` for every target config key that differs from the one a converted model was
    saved with (what a shape or plan mismatch comes from, said in the user's terms)."""
    from ascend_edit.train.loop import flatten_config

    before, now = flatten_config(stored, "target"), flatten_config(dataclasses.asdict(target), "target")
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)]


def load_converted_weights(model: nn.Module, directory: Path, target=None) -> None:
    """Load `save_converted` weights into an *edited* model (targets under `.self_attn.target.`).

    This is the hand-off between stages run as separate jobs: stage 2 starts from stage 1's result.
    The plan stored with the weights must match the model's; `target` (this run's TargetConfig), when given, lets
    a mismatch name the target keys that changed. A model holding ZeRO-3 parameters (a teacher loaded partitioned)
    takes them one tensor at a time into its partitions (`load_partitioned_weights`): every rank calls this.
    """
    try:
        _load_converted_weights(model, directory)
    except ValueError as err:
        meta_file = Path(directory) / CONVERTED_MARKER
        changes = target_changes(json.loads(meta_file.read_text())["target"], target) if (
            target is not None and meta_file.is_file()) else []
        if not changes:
            raise
        raise ValueError(f"{Path(directory)} was saved with another target config ({'; '.join(changes[:4])}): "
                         f"run stage 2 with the target stage 1 used ({err})") from None


def _load_converted_weights(model: nn.Module, directory: Path) -> None:
    from ascend_edit.models.zero3 import has_zero_params

    directory = Path(directory)
    verify_manifest(directory)
    meta = json.loads((directory / CONVERTED_MARKER).read_text())
    own_plan = plan_entries(cast(list[LayerPlan], model.edit_plan))  # set by edit_model
    if meta["plan"] != own_plan:
        raise ValueError(f"{directory}: its layer plan differs from this run's plan")
    own = model.state_dict(keep_vars=True)
    if has_zero_params(model):
        # (not compared with the teacher's shared weights below: that would gather every partition once more)
        _load_weights_partitioned(own, directory, meta["target"]["kind"])
        return
    renamed = {}
    for name, tensor in read_converted_weights(directory).items():
        target_name = name.replace(".self_attn.", ".self_attn.target.")
        renamed[target_name if target_name in own else name] = tensor
    _check_stage_weights(own, {k: tuple(t.shape) for k, t in renamed.items()}, directory, meta["target"]["kind"])
    # Shared weights are the teacher's own: a model whose stage 2 trained them (trainable=target+norms|all) would
    # move the teacher this run distills from. Compared in the stored dtype (a bf16 save of an fp32 teacher).
    moved = [name for name, tensor in renamed.items() if ".self_attn.target." not in name
             and not torch.equal(own[name].detach().to(tensor.dtype), tensor)]
    if moved:
        raise ValueError(f"{directory}: its shared weights ({', '.join(moved[:2])}, ...) differ from the teacher's: "
                         "it was trained with distill.model_level.trainable=target+norms or all, and starting from "
                         "it would move the teacher this run distills from; start from that run's stage-layerwise/")
    with torch.no_grad():
        for name, tensor in renamed.items():
            own[name].copy_(tensor)
        for name in legacy_query_biases(own, renamed, meta["target"]["kind"]):
            own[name].zero_()


def legacy_query_biases(names, stored, kind: str) -> list[str]:
    """MLA query biases (a teacher with one: Qwen2) that a model saved before 2026-12-05 lacks: the target had
    no query bias then, so these load as zeros and the model computes what it computed when it was saved."""
    if kind != "mla":
        return []
    return [k for k in names if k not in stored and ".self_attn." in k and ".teacher." not in k
            and k.endswith(("q_proj.bias", "q_b_proj.bias"))]


def _check_stage_weights(own: dict[str, torch.Tensor], stored: dict[str, tuple[int, ...]], directory: Path,
                         kind: str) -> None:
    """Every student weight of `own` is stored, and nothing else, in its own (full, unpartitioned) shape."""
    legacy = set(legacy_query_biases(own, stored, kind))
    missing = [k for k in own if k not in stored and ".self_attn.teacher." not in k and k != "lm_head.weight"
               and "rotary_emb" not in k and k not in legacy]
    if missing:
        raise ValueError(f"{directory}: weights missing for {missing[:5]}")
    unknown = [k for k in stored if k not in own]
    wrong_shape = [f"{k} {shape} vs {tuple(getattr(own[k], 'ds_shape', own[k].shape))}" for k, shape in stored.items()
                   if k in own and tuple(getattr(own[k], "ds_shape", own[k].shape)) != shape]
    if unknown or wrong_shape:
        raise ValueError(f"{directory} does not match this run's target config "
                         f"(stored target: {kind}); unknown weights {unknown[:3]}, "
                         f"shape mismatches {wrong_shape[:3]}")


def _load_weights_partitioned(own: dict[str, torch.Tensor], directory: Path, kind: str) -> None:
    """`load_converted_weights` for a model with ZeRO-3 parameters: names and shapes checked on the headers,
    then one tensor at a time in the files' order (the same on every rank), rank 0 reading it."""
    from safetensors import safe_open

    from ascend_edit.models.zero3 import write_whole

    def own_name(name: str) -> str:
        target_name = name.replace(".self_attn.", ".self_attn.target.")
        return target_name if target_name in own else name

    files = converted_weight_files(directory)
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            stored.update({own_name(name): tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    _check_stage_weights(own, stored, directory, kind)
    writer = rank_and_world()[0] == 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                write_whole(own[own_name(name)], functools.partial(f.get_tensor, name), writer)
    for name in legacy_query_biases(own, stored, kind):
        shape = tuple(getattr(own[name], "ds_shape", own[name].shape))
        write_whole(own[name], functools.partial(torch.zeros, shape), writer)
