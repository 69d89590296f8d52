"""`ascend-edit plan`: per-rank memory by part, the largest micro-batch that fits, and expected tokens/s.

    ascend-edit plan experiment=qwen3_8b_mla_shape cluster=910b_64g cluster.nodes=2
    ascend-edit plan experiment=qwen3_30b_a3b_mla_shape cluster=h200 plan.stage=model_level

The edited model is built on the meta device (no weights, no memory) to count parameters; the rest is
the arithmetic of ascend_edit/plan/memory.py. Everything printed is a prediction.
"""
from __future__ import annotations

import logging

from ascend_edit.config import ClusterConfig, ConfigError, RootConfig, StageConfig
from ascend_edit.models.build import edited_shape_model
from ascend_edit.models.loading import TORCH_DTYPES
from ascend_edit.models.surgery import decoder_layers, edited_attentions, set_trainable
from ascend_edit.plan.memory import (
    DS_BUCKET_ELEMENTS,
    GIB,
    ModelShape,
    ParamCounts,
    Plan,
    RunSettings,
    TargetShape,
    plan_stage,
)
from ascend_edit.train.activation_checkpointing import checkpointing_config
from ascend_edit.train.compile import compile_mode
from ascend_edit.validation import check_batches, check_engine_world

log = logging.getLogger(__name__)


def target_shape(cfg: RootConfig, model) -> TargetShape:
    plan = getattr(model, "edit_plan", [])
    converted = sum(1 for entry in plan if entry.converted)
    mla, swa = cfg.target.mla, cfg.target.gate_swa
    return TargetShape(kind=cfg.target.kind, converted_layers=converted, kv_lora_rank=mla.kv_lora_rank,
                       qk_rope_head_dim=mla.qk_rope_head_dim, qk_nope_head_dim=mla.qk_nope_head_dim,
                       v_head_dim=mla.v_head_dim, window=swa.window if cfg.target.kind == "gate_swa" else 0,
                       swa_layers=sum(1 for entry in plan if entry.kind == "swa"))


def param_counts(model, trainable: str) -> ParamCounts:
    set_trainable(model, trainable)
    target = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model))
    target_attention = sum(p.numel() for module in edited_attentions(model) for p in module.target.parameters())
    return ParamCounts(frozen=total - target, target=target, largest_layer=largest, target_attention=target_attention)


def micro_batch(stage: StageConfig, world: int) -> int:
    """The stage's per-process micro-batch (`micro_batch_size`, else its whole per-process slice)."""
    return stage.micro_batch_size or max(stage.batch_size // world, 1)


def settings(cfg: RootConfig, stage_name: str, world: int, compiled: str = "off", converted: int = 0) -> RunSettings:
    """`converted`: how many layers the target converts (feature matching's default layers)."""
    stage = getattr(cfg.distill, stage_name)
    ckpt = checkpointing_config(cfg.engine)
    ml = cfg.distill.model_level
    feature_layers = (len(ml.feature_layers) or converted) if ml.feature_weight > 0 else 0
    return RunSettings(stage=stage_name, seq_len=cfg.data.seq_len, micro_batch=micro_batch(stage, world),
                       engine=cfg.engine.kind, zero_stage=cfg.engine.zero_stage,
                       offload_optimizer=cfg.engine.offload_optimizer, offload_params=cfg.engine.offload_params,
                       world_size=world, weight_bytes=TORCH_DTYPES[cfg.model.dtype].itemsize,
                       checkpoint_every=ckpt.every_n_layers if stage_name == "model_level" else 0,
                       kd_chunk=cfg.distill.model_level.chunk_size, compiled=compiled,
                       kd_kind=cfg.distill.model_level.kl,
                       teacher_copy=stage_name == "model_level" and cfg.distill.model_level.trainable != "target",
                       feature_layers=feature_layers,
                       experts="grouped_mm" if cfg.engine.experts_implementation == "auto" else cfg.engine.experts_implementation,
                       reduce_bucket=int(cfg.engine.zero_options.get("reduce_bucket_size", DS_BUCKET_ELEMENTS)),
                       allgather_bucket=int(cfg.engine.zero_options.get("allgather_bucket_size", DS_BUCKET_ELEMENTS)),
                       # as model_level_objective + chunked_kd.use_fused_kd decide it on the cluster's device
                       kd_fused=(cfg.engine.compile != "off" and cfg.cluster.device == "cuda"
                                 and cfg.distill.model_level.top_k is None))


def usable_bytes(cluster: ClusterConfig) -> float:
    return (cluster.device_memory_gib - cluster.reserved_gib) * GIB


def batch_problem(stage: StageConfig, world: int, engine: str = "deepspeed") -> str | None:
    """Why a run of this stage on `world` ranks would be refused at launch (the run's own check), with the fix."""
    try:
        check_engine_world(engine, world)
    except ConfigError as err:
        return f"{err}: a run would be refused at launch"
    try:
        check_batches(stage, world)
    except ConfigError as err:
        micro = stage.micro_batch_size or 1
        return (f"{err}: a run would be refused at launch; set {stage.key_prefix}.batch_size to a multiple of "
                f"{world * micro} (world size x micro-batch)")
    return None


def summarise(plan: Plan, run: RunSettings, cluster: ClusterConfig) -> dict:
    """The numbers `plan` prints, in GiB and tokens/s (also what tests and the benchmark read)."""
    usable = usable_bytes(cluster)
    per_device = plan.tokens_per_s(cluster.peak_tflops * 1e12, cluster.efficiency)
    return {"stage": run.stage, "micro_batch": run.micro_batch, "world_size": run.world_size,
            "parts_gib": {k: v / GIB for k, v in plan.parts.items()}, "total_gib": plan.total / GIB,
            "activations_no_ckpt_gib": plan.activations_without_ckpt / GIB,
            "activations_ckpt_all_gib": plan.activations_with_ckpt / GIB,
            "usable_gib": usable / GIB, "fits": plan.total <= usable,
            "largest_micro_batch": plan.largest_micro_batch(usable, run.micro_batch),
            "flops_per_token": plan.flops_per_token,
            "tokens_per_s_per_device": per_device, "tokens_per_s_cluster": per_device * run.world_size,
            "notes": plan.notes}


def plan_run(cfg: RootConfig) -> list[dict]:
    """Plan every requested stage of `cfg` on `cfg.cluster`; returns one summary per stage."""
    model = edited_shape_model(cfg.model, cfg.target)
    shape, tshape = ModelShape.from_hf_config(model.config), target_shape(cfg, model)
    world = cfg.cluster.nodes * cfg.cluster.devices_per_node
    stages = ("layerwise", "model_level") if cfg.plan.stage == "both" else (cfg.plan.stage,)
    # what engine.compile resolves to on the cluster's device (the training run resolves it the same way)
    compiled = compile_mode(cfg.engine.compile, cfg.cluster.device, model)
    summaries = []
    for name in stages:
        counts = param_counts(model, getattr(cfg.distill, name).trainable)
        run = settings(cfg, name, world, compiled, tshape.converted_layers)
        summary = summarise(plan_stage(shape, tshape, counts, run), run, cfg.cluster)
        summary["batch_problem"] = batch_problem(getattr(cfg.distill, name), world, cfg.engine.kind)
        summary["batch_per_rank"] = getattr(cfg.distill, name).batch_size // world
        summaries.append(summary)
    return summaries


def print_plan(console, cfg: RootConfig, summaries: list[dict]) -> None:
    from rich.table import Table  # imported here: the benchmark reuses `plan_run` without rich

    c = cfg.cluster
    world = c.nodes * c.devices_per_node
    console.print(f"[bold]plan[/bold] {cfg.model.arch or cfg.model.path} -> {cfg.target.kind}, seq {cfg.data.seq_len}, "
                  f"engine {cfg.engine.kind} ZeRO-{cfg.engine.zero_stage}, {world} x {c.name} "
                  f"({c.device_memory_gib:g} GiB, {c.peak_tflops:g} TFLOP/s x {c.efficiency:g}) — predictions")
    console.print(f"  figures: {c.source}")
    table = Table(title="Per-rank memory (GiB)")
    table.add_column("part")
    for s in summaries:
        table.add_column(f"{s['stage']} (micro {s['micro_batch']})", justify="right")
    for part in summaries[0]["parts_gib"]:
        table.add_row(part, *(f"{s['parts_gib'][part]:.2f}" for s in summaries))
    table.add_row("[bold]total[/bold]", *(f"[bold]{s['total_gib']:.2f}[/bold]" for s in summaries))
    table.add_row("activations, no checkpointing", *(f"{s['activations_no_ckpt_gib']:.2f}" for s in summaries))
    table.add_row("activations, every layer ckpt", *(f"{s['activations_ckpt_all_gib']:.2f}" for s in summaries))
    table.add_row("usable per device", *(f"{s['usable_gib']:.1f}" for s in summaries))
    table.add_row("fits", *("yes" if s["fits"] else "[red]NO[/red]" for s in summaries))
    table.add_row("launch check (engine, batch split)", *("yes" if s["batch_problem"] is None else "[red]NO[/red]"
                                                   for s in summaries))
    table.add_row("largest micro-batch memory allows", *(_largest_micro_cell(s) for s in summaries))
    table.add_row("tokens/s per device", *(f"{s['tokens_per_s_per_device']:,.0f}" for s in summaries))
    table.add_row(f"tokens/s, {world} devices", *(f"{s['tokens_per_s_cluster']:,.0f}" for s in summaries))
    console.print(table)
    for s in summaries:
        for note in [*s["notes"], *([s["batch_problem"]] if s["batch_problem"] else [])]:
            console.print(f"  {s['stage']}: {note}")
    console.print("  tokens/s = peak x efficiency / model FLOPs per token (recomputation counted as extra work)")


def _largest_micro_cell(summary: dict) -> str:
    """The memory bound, with the stage's own bound beside it when that is lower (a micro-batch never holds
    more than one rank's share of the batch)."""
    largest, per_rank = summary["largest_micro_batch"], summary["batch_per_rank"]
    return f"{largest:,} (batch per rank {per_rank})" if largest > per_rank else f"{largest:,}"


def run(cfg: RootConfig) -> dict:
    from rich.console import Console

    from ascend_edit.distributed import is_main_process

    summaries = plan_run(cfg)
    if is_main_process():  # a plan started under a launcher (with the job it plans for) prints once, not per rank
        print_plan(Console(), cfg, summaries)
    return {"plan": summaries}
