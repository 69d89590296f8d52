"""Checks that need more than one config value, the launcher's world size, the file system or the
teacher's config: all run before any weight is loaded, each failing with one line naming the full key.

Single-value checks live in the dataclasses of `ascend_edit.config`; these come after them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ascend_edit.config import ConfigError, MLAConfig, RootConfig, StageConfig

log = logging.getLogger(__name__)

CACHE_BYTES_PER_VALUE = 2  # the 16-bit cache of inference, as in the KV tables of `inspect` and the report
TRAINING_TASKS = ("convert", "ablation")
SHAPE_TASKS = ("inspect", "bench_kv", "plan")  # build the edited model from shapes; train nothing


def stages_to_run(cfg: RootConfig) -> list[StageConfig]:
    distill = cfg.distill
    if cfg.task == "ablation":  # runs both stages whatever distill.stage says
        return [distill.layerwise, distill.model_level]
    wanted = {"layerwise": ["layerwise"], "model_level": ["model_level"], "both": ["layerwise", "model_level"],
              "none": []}[distill.stage]
    return [getattr(distill, name) for name in wanted]


def check_batches(stage: StageConfig, world_size: int) -> None:
    """The global batch splits evenly over the processes, and each slice into micro-batches."""
    p = stage.key_prefix
    if stage.batch_size % world_size:
        raise ConfigError(f"{p}.batch_size={stage.batch_size} is not divisible by the world size {world_size}")
    local = stage.batch_size // world_size
    if stage.micro_batch_size and local % stage.micro_batch_size:
        raise ConfigError(f"{p}.micro_batch_size={stage.micro_batch_size} does not divide the per-process batch "
                          f"{local} ({p}.batch_size={stage.batch_size} over {world_size} processes)")


def init_from_directory(init_from: str) -> Path:
    """The converted model `distill.init_from` names: a saved model (manifest.json), or a run directory holding
    one (its stage-layerwise/, else converted/)."""
    path = Path(init_from).expanduser()
    if not path.is_dir():
        raise ConfigError(f"distill.init_from={init_from} is not a directory")
    for candidate in (path, path / "stage-layerwise", path / "converted"):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise ConfigError(f"distill.init_from={init_from} holds no saved model (no manifest.json there, nor in its "
                      "stage-layerwise/ or converted/): give a run directory or its stage-layerwise/")


def check_resume_config(cfg: RootConfig, run_dir: Path, world_size: int) -> None:
    """A run resumed in `run_dir` with keys its newest checkpoints were written without (and that cannot change
    mid-run), or by another number of processes, is refused here, before the teacher loads — the resume itself
    would refuse it only after loading, warm start and evaluation. The checkpoints are not verified here (resume
    does that)."""
    import dataclasses

    from ascend_edit.train.checkpoint_io import CheckpointDir
    from ascend_edit.train.loop import STAGE_ORDER, flatten_config

    if not cfg.engine.resume or cfg.task not in TRAINING_TASKS:
        return
    current = flatten_config(dataclasses.asdict(cfg))
    running = {stage.key_prefix.rsplit(".", 1)[-1] for stage in stages_to_run(cfg) if stage.steps}
    for directory in resume_checkpoint_dirs(cfg.task, run_dir):
        store = CheckpointDir(directory, keep_last=1)
        for stage in (name for name in STAGE_ORDER if name in running):  # the stages this run resumes
            _check_saved_config(store.latest(stage), current, stage, world_size)


def resume_checkpoint_dirs(task: str, run_dir: Path) -> list[Path]:
    """Where a training task's checkpoints live in its run directory: a conversion's in checkpoints/, each
    ablation variant's in its own folder (tasks/ablation.py)."""
    from ascend_edit.run_dir import ABLATION_VARIANT_DIRS

    return [run_dir / name for name in (ABLATION_VARIANT_DIRS if task == "ablation" else ("checkpoints",))]


def _check_saved_config(latest: Path | None, current: dict, stage: str, world_size: int) -> None:
    from ascend_edit.train.checkpoint_io import CheckpointDir
    from ascend_edit.train.loop import ConfigChangedOnResume, check_config_change

    if latest is not None:
        try:
            state = json.loads((latest / CheckpointDir.STATE_FILE).read_text())
            saved, written_by = state.get("config"), state.get("world_size")
        except (OSError, ValueError, AttributeError):
            return  # a damaged state file: resume passes this checkpoint over and says so
        if isinstance(written_by, int) and written_by != world_size:  # the engine's state is per process
            raise ConfigError(f"{latest} was written by {written_by} processes and this job has {world_size}: "
                              "resume with the same number of processes, or set engine.resume=false")
        if saved:
            try:
                check_config_change(saved, current, stage, latest)
            except ConfigChangedOnResume as err:
                raise ConfigError(str(err)) from None


def check_engine_world(kind: str, world_size: int) -> None:
    """engine=torch trains in one process: under a launcher every rank would load the teacher, evaluate, and only
    then fail at the first stage (train/engine.py make_engine)."""
    if kind == "torch" and world_size > 1:
        raise ConfigError(f"engine=torch trains in one process, and this job has {world_size}: use engine=zero0..zero3 "
                          "(DeepSpeed) under a launcher, or launch one process")


def check_run_inputs(cfg: RootConfig, world_size: int) -> None:
    """Batches against the world size, and the data / init paths a training task reads."""
    if any(stage.steps for stage in stages_to_run(cfg)):
        check_engine_world(cfg.engine.kind, world_size)
    for stage in stages_to_run(cfg):
        check_batches(stage, world_size)
    if cfg.task == "ablation" and cfg.distill.init_from:
        raise ConfigError(f"distill.init_from={cfg.distill.init_from}: ablation compares every variant from the warm "
                          "start (or target.init=random) and loads no earlier stage; leave distill.init_from unset")
    if cfg.task == "ablation" and cfg.distill.stage != "both":
        log.warning("distill.stage=%s is ignored by ablation: it trains stage 2 alone and stage 1 + 2 from one start",
                    cfg.distill.stage)
    if cfg.task == "ablation" and cfg.distill.layerwise.batch_size != cfg.distill.model_level.batch_size:
        raise ConfigError("ablation needs distill.layerwise.batch_size == distill.model_level.batch_size "
                          "so that equal steps mean equal tokens")
    if cfg.data.source not in ("synthetic", "indexed") and cfg.model.source == "config":
        raise ConfigError(f"data.source={cfg.data.source} needs a tokenizer, and model.source=config (random "
                          "weights) has none: use data.source=synthetic or a model with a tokenizer")
    swa = cfg.target.gate_swa
    if (cfg.target.kind == "gate_swa" and cfg.task in TRAINING_TASKS and not swa.windows
            and swa.window >= cfg.data.seq_len):
        # every sequence fits the window: no layer ever slides in calibration, training or the run's evaluations,
        # and the report would show the teacher's own numbers beside a KV saving that was never exercised
        raise ConfigError(f"target.gate_swa.window={swa.window} is not shorter than data.seq_len={cfg.data.seq_len}: "
                          "nothing would slide while converting; use a window below data.seq_len (or longer "
                          "training sequences)")
    if cfg.target.kind == "gate_swa" and cfg.task in TRAINING_TASKS and swa.sink_tokens >= cfg.data.seq_len:
        raise ConfigError(f"target.gate_swa.sink_tokens={swa.sink_tokens} is not shorter than data.seq_len="
                          f"{cfg.data.seq_len}: every token would stay visible as a sink and nothing would slide; "
                          "use a few (the default is 4)")
    data_path = cfg.data.path or ""  # (None only for tasks that never read the data: RootConfig checks)
    if cfg.data.source == "files" and data_path and not Path(data_path).expanduser().exists():
        raise ConfigError(f"data.path={cfg.data.path}: data path does not exist")
    if cfg.data.source == "indexed" and data_path:  # the .bin/.idx pair exists and its index header is whole
        from ascend_edit.data.indexed import open_indexed

        open_indexed(data_path)
    if cfg.distill.init_from:
        init_from_directory(cfg.distill.init_from)  # before hours of loading
    check_precision(cfg)
    if cfg.engine.zero_options:  # names DeepSpeed knows, before hours of loading
        from ascend_edit.train.engine import checked_zero_options

        checked_zero_options(cfg.engine.zero_options)


def check_precision(cfg: RootConfig) -> None:
    """device.dtype against model.dtype, the device and the engine, as the stages will resolve them
    (train/precision.py) — here, before the teacher is loaded and calibrated."""
    from ascend_edit.device import detect_device_type
    from ascend_edit.train.precision import DTYPES, check_deepspeed_dtype, resolve_precision

    device_type = detect_device_type() if cfg.device.type == "auto" else cfg.device.type
    weights = DTYPES[cfg.model.dtype]
    precision = resolve_precision(cfg.device.dtype, device_type, weights)
    if cfg.engine.kind == "deepspeed":
        check_deepspeed_dtype(precision.compute, weights)
    elif cfg.engine.offload_optimizer and precision.loss_scaling:
        raise ConfigError("engine.offload_optimizer=true with engine.kind=torch has no fp16 loss scaling: use "
                          "model.dtype=bf16 device.dtype=bf16, or engine.kind=deepspeed")


def teacher_heads(config) -> tuple[int, int]:
    """(head_dim, KV heads) of the teacher's attention, from its config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def teacher_kv_values(config) -> int:
    """Cached values per token and layer of the teacher's attention: keys + values of its KV heads."""
    head_dim, kv_heads = teacher_heads(config)
    return 2 * kv_heads * head_dim


def check_mla_cache(mla: MLAConfig, config) -> str | None:
    """The MLA cache per token and layer (latent + RoPE key) must not be larger than the teacher's.

    Returns the problem as a line (None when it fits); the caller refuses or warns.
    """
    if mla.kv_budget is not None:  # per-layer ranks from a budget of at most the teacher's bytes
        return None
    teacher = teacher_kv_values(config) * CACHE_BYTES_PER_VALUE
    converted = (mla.kv_lora_rank + mla.qk_rope_head_dim) * CACHE_BYTES_PER_VALUE
    if converted <= teacher or mla.allow_larger_cache:
        return None
    limit = teacher // CACHE_BYTES_PER_VALUE - mla.qk_rope_head_dim
    if limit < 1:  # even a latent of 1 does not fit beside this rope key: the rope key is the problem
        return (f"target.mla.qk_rope_head_dim={mla.qk_rope_head_dim} alone is {mla.qk_rope_head_dim * CACHE_BYTES_PER_VALUE:,} B "
                f"per token and layer, not smaller than the teacher's whole cache ({teacher:,} B): this target is "
                "sized for a larger teacher; use a smaller target.mla.qk_rope_head_dim and kv_lora_rank (or "
                "target.mla.kv_budget), or set target.mla.allow_larger_cache=true")
    return (f"target.mla.kv_lora_rank={mla.kv_lora_rank} gives an MLA cache of {converted:,} B per token and layer "
            f"({mla.kv_lora_rank} latent + {mla.qk_rope_head_dim} rope values, 16-bit), larger than the "
            f"teacher's {teacher:,} B; use target.mla.kv_lora_rank <= {limit} (and/or a smaller "
            f"target.mla.qk_rope_head_dim), or set target.mla.allow_larger_cache=true")


def _layer_range(key: str, values, num_layers: int) -> None:
    bad = [v for v in values or [] if v >= num_layers]
    if bad:
        raise ConfigError(f"{key}={list(values)}: {bad} out of range, the teacher has {num_layers} layers "
                          f"(0..{num_layers - 1})")


def check_attn_implementation(name: str, target_kind: str | None = None) -> None:
    """A registered implementation (or a kernels-hub one, resolved by transformers at load) and, when the
    run builds MLA / GateSWA targets (`target_kind`), one whose contract they fit."""
    if "/" not in name:  # a kernel from the Hugging Face kernels hub: resolved by transformers at load
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if name not in valid:
            raise ConfigError(f"model.attn_implementation={name!r} is not one of {valid}")
    if target_kind in ("mla", "gate_swa"):
        from ascend_edit.attention.interface import target_implementation_problem

        problem = target_implementation_problem(name)
        if problem:
            raise ConfigError(problem)


def check_against_teacher(cfg: RootConfig, config) -> None:
    """Layer indices, top-k and the MLA cache size against the teacher's config (no weights needed)."""
    from ascend_edit.models.loading import check_teacher_type

    check_teacher_type(config)
    num_layers = config.num_hidden_layers
    target = cfg.target
    converted = set(range(num_layers)) if target.layers is None else set(target.layers)
    _layer_range("target.layers", target.layers, num_layers)
    if target.kind == "gate_swa":
        swa = target.gate_swa
        _layer_range("target.gate_swa.full_layers", swa.full_layers, num_layers)
        for key in ("full_every", "full_by_sensitivity"):
            if getattr(swa, key) > num_layers:
                raise ConfigError(f"target.gate_swa.{key}={getattr(swa, key)} must be <= the teacher's "
                                  f"{num_layers} layers")
        if swa.full_by_sensitivity >= len(converted):
            raise ConfigError(f"target.gate_swa.full_by_sensitivity={swa.full_by_sensitivity} keeps every converted "
                              f"layer ({len(converted)}) at full attention: nothing would slide; choose fewer")
        if swa.full_layers or swa.full_every:
            from ascend_edit.models.surgery import full_layer_choice

            if converted <= full_layer_choice(num_layers, swa):
                key = "full_layers" if swa.full_layers else "full_every"
                raise ConfigError(f"target.gate_swa.{key}={getattr(swa, key)} keeps every converted layer "
                                  f"({len(converted)}) at full attention: nothing would slide and no KV is saved")
    ml = cfg.distill.model_level
    outside = [i for i in ml.feature_layers if i not in converted]
    if outside:
        raise ConfigError(f"distill.model_level.feature_layers={list(ml.feature_layers)}: {outside} are not "
                          f"converted layers (target.layers={target.layers})")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and cfg.task in (*TRAINING_TASKS, "plan") and cfg.data.seq_len > positions:
        log.warning("data.seq_len=%d is longer than the teacher's max_position_embeddings=%d: the teacher was never "
                    "trained at those positions, so the distillation targets there are poor", cfg.data.seq_len,
                    positions)
    if ml.top_k is not None and ml.top_k > config.vocab_size:
        raise ConfigError(f"distill.model_level.top_k={ml.top_k} must be <= the vocabulary size {config.vocab_size}")
    if target.kind == "mla":
        head_dim, kv_heads = teacher_heads(config)
        rope = target.mla.qk_rope_head_dim
        if rope > head_dim and target.mla.rope_selection != "measured":
            raise ConfigError(f"target.mla.qk_rope_head_dim={rope} exceeds the teacher's "
                              f"head_dim={head_dim} (the RoPE key reuses the teacher's rotary frequencies): use "
                              f"target.mla.qk_rope_head_dim <= {head_dim} (target=mla_small is sized for head_dim 64)"
                              + (f", or rope_selection=measured (up to {head_dim * kv_heads})" if kv_heads > 1 else ""))
        if rope > head_dim * kv_heads:  # measured: one (frequency, KV-head direction) per pair, at most all of them
            raise ConfigError(f"target.mla.qk_rope_head_dim={rope} exceeds the {head_dim * kv_heads} rotary dims of "
                              f"the teacher's {kv_heads} KV heads of head_dim {head_dim}; use at most that")
        q_rank = target.mla.q_lora_rank
        query_width = config.num_attention_heads * (target.mla.qk_nope_head_dim + rope)
        if q_rank is not None and q_rank > min(config.hidden_size, query_width):
            raise ConfigError(f"target.mla.q_lora_rank={q_rank} exceeds the query's full rank min(hidden_size "
                              f"{config.hidden_size}, heads x (nope + rope) {query_width}) = "
                              f"{min(config.hidden_size, query_width)}: use at most that, or null for a full-rank query")
        if target.mla.kv_budget is not None:  # what the budget pays for needs only the shapes: before loading
            from ascend_edit.models.budget import budget_latent_dims

            budget_latent_dims(target.mla.kv_budget, [teacher_kv_values(config)] * len(converted),
                               target.mla.qk_rope_head_dim, target.mla.rank_multiple)
        problem = check_mla_cache(target.mla, config)
        if problem and cfg.task in TRAINING_TASKS:
            raise ConfigError(problem)
        if problem:
            log.warning("%s", problem)


def check_before_load(cfg: RootConfig, world_size: int = 1, teacher_configs: dict | None = None) -> None:
    """Everything a task can know to be wrong before it loads the teacher's weights. `teacher_configs`: a cache
    of teacher configs by model config (a sweep checks many points of one teacher)."""
    if cfg.task not in TRAINING_TASKS + SHAPE_TASKS:
        return
    from ascend_edit.models.loading import teacher_config

    check_attn_implementation(cfg.model.attn_implementation, cfg.target.kind)
    if cfg.task in TRAINING_TASKS:
        check_run_inputs(cfg, world_size)
    weights = cfg.task not in SHAPE_TASKS
    cache = {} if teacher_configs is None else teacher_configs
    key = (repr(cfg.model), weights)
    if key not in cache:
        cache[key] = teacher_config(cfg.model, weights=weights)
    check_against_teacher(cfg, cache[key])
