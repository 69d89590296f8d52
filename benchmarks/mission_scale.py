"""Mission scale on one GPU: the Qwen3-8B and Qwen3-30B-A3B shape recipes, measured beside `plan`.

For each recipe (random weights of the real shapes, built directly on the device) and stage, runs the
recipe's own engine settings — micro-batch, activation checkpointing, regional compile, MoE experts
implementation, precision (fp32 target masters, bf16 autocast) — through the package's engine, and
records tokens/s, MFU, peak memory and plan's predicted peak. In the same run: the plain transformers +
PyTorch KD baseline at the 8B shape (frozen teacher + a deep copy as student with the MLA targets,
AdamW on the bf16 targets, full-vocabulary KL on materialised logits), and MoE experts grouped_mm vs
eager (one 30B-A3B MoE block, forward + backward).

One optimizer step = the recipe's own gradient accumulation (batch_size / micro_batch_size micro-batches;
`--accumulation N` overrides it): an on-device optimizer step costs a few % per micro-batch, an offloaded
one a host step that only a long accumulation pays for. `--steps` counts optimizer steps; the first
`--warmup` steps (compilation, allocator) are not timed. `--profile` adds one profiled step per case and
writes its kernel table to `$OUT/profile_*.txt`.
MFU = plan's model FLOPs per token (recomputation excluded) x tokens/s / the cluster's nominal peak.

    python benchmarks/mission_scale.py                 # one H200, ~6-8 minutes; writes $OUT (or --out)
    python benchmarks/mission_scale.py --tiny          # tiny shapes on the CPU: a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from ascend_edit import distributed
from ascend_edit.config import register_configs, to_typed
from ascend_edit.device import resolve_device
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import ModelLevelObjective
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, decoder_layers, edit_model, set_mode, set_trainable
from ascend_edit.tasks.plan import plan_run
from ascend_edit.train.activation_checkpointing import checkpointing_config, set_activation_checkpointing
from ascend_edit.train.compile import apply_compile, apply_experts_implementation, compile_mode
from ascend_edit.train.engine import make_engine
from ascend_edit.train.precision import frozen_dtype, resolve_precision

GIB = 2**30
# (recipe, steps per stage); the 30B-A3B GateSWA recipe is planned, not run, to stay inside 8 minutes.
RECIPES = [("qwen3_8b_mla_shape", 20), ("qwen3_8b_gate_swa_shape", 20), ("qwen3_30b_a3b_mla_shape", 10)]
TINY_OVERRIDES = {
    "qwen3_8b": ["model=qwen3_tiny"],
    "qwen3_30b_a3b": ["model=qwen3_moe_tiny"],
}
TINY_COMMON = ["data.seq_len=64", "target.mla.kv_lora_rank=32", "target.mla.qk_rope_head_dim=8",
               "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16", "target.gate_swa.window=16",
               "device=cpu", "engine.compile=off",
               "model.dtype=bf16", "device.dtype=bf16"]  # the GPU's precision path: bf16 weights, fp32 masters


def compose_recipe(recipe: str, tiny: bool, extra: list[str]):
    overrides = [f"experiment={recipe}", "output_dir=."]
    if tiny:
        overrides += TINY_OVERRIDES["qwen3_30b_a3b" if "30b_a3b" in recipe else "qwen3_8b"] + TINY_COMMON
    else:
        overrides += ["device=cuda"]
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=overrides + extra))


def random_batch(micro: int, seq: int, vocab: int, device: torch.device) -> dict:
    ids = torch.randint(0, vocab, (micro, seq), device=device)
    return {"input_ids": ids, "position_ids": torch.arange(seq, device=device).expand(micro, seq),
            "loss_mask": torch.ones(micro, seq, dtype=torch.bool, device=device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
    """Run `steps` steps; returns (seconds per timed step, losses)."""
    losses, started = [], None
    for i in range(steps):
        if i == warmup:
            sync(device)
            started = time.perf_counter()
        losses.append(step())
    sync(device)
    return (time.perf_counter() - started) / max(steps - warmup, 1), losses


def run_stage(cfg, model, name: str, device_info, steps: int, warmup: int, accumulation: int = 0,
              profile_to: Path | None = None, breakdown: bool = False) -> dict:
    """`steps` optimizer steps of one stage with the recipe's engine settings, each over `accumulation`
    micro-batches (an offloaded optimizer's host step is paid once per optimizer step, so its cost per
    token depends on this). `profile_to`: after timing, one more step under torch.profiler, its kernel
    table written there. `breakdown`: after timing, one more step split into its micro-batches and its
    optimizer boundary (see `split_step`)."""
    stage = getattr(cfg.distill, name)
    micro, seq, device = stage.micro_batch_size or stage.batch_size, cfg.data.seq_len, device_info.torch_device
    accumulation = accumulation or max(stage.batch_size // micro, 1)  # 0: the recipe's own batch / micro
    if name == "layerwise":
        objective = LayerwiseObjective(stage.loss, stage.match)
    else:
        objective = ModelLevelObjective(stage.kl, stage.temperature, stage.top_k, stage.chunk_size,
                                        compile_kd=cfg.engine.compile != "off")
    params = set_trainable(model, stage.trainable)
    set_activation_checkpointing(model, checkpointing_config(cfg.engine), active=name == "model_level")
    precision = resolve_precision(cfg.device.dtype, device_info.type, frozen_dtype(model))
    engine = make_engine(model, objective, params, stage, cfg.engine, accumulation=accumulation, micro_batch=micro,
                         world_size=1, device=device_info, precision=precision)
    batch = random_batch(micro, seq, model.config.vocab_size, device)
    model.train()

    def step() -> float:
        for _ in range(accumulation):
            loss, metrics = engine.forward(batch)
            engine.backward(loss)
            engine.micro_step()
        engine.step()
        return metrics["loss"]

    reset_peak(device)
    split = {}
    try:
        seconds, losses = timed_steps(step, steps, warmup, device)
        if breakdown:
            split = split_step(engine, batch, accumulation, device)
        if profile_to is not None:
            profile_step(step, profile_to)
    finally:
        engine.close()
        model.eval()
    planned = plan_run(_with_stage(cfg, name))[0]
    return {"micro_batch": micro, "accumulation": accumulation, "seq_len": seq, "steps": steps,
            "tokens_per_s": micro * seq * accumulation / seconds,
            "peak_gib": peak_gib(device), "plan_gib": planned["total_gib"],
            "flops_per_token": planned["flops_per_token"], "loss_first": losses[0], "loss_last": losses[-1],
            "checkpointing": cfg.engine.activation_checkpointing if name == "model_level" else "none",
            "compile": getattr(model, "_bench_compile", "off"), "precision": str(precision.compute), **split}


def split_step(engine, batch: dict, accumulation: int, device: torch.device) -> dict:
    """One optimizer step timed in two parts: every micro-batch's forward + backward (with the non-boundary
    micro-steps), and the boundary — the last micro_step + step, where the optimizer steps (offloaded: the
    host AdamW and the weights' copy back). DeepSpeed flushes its gradient buckets, and with offload copies
    the gradients to the host, inside the last micro-batch's backward: that time is in the micro-batch part.
    The device is synchronised between the parts, so the sum is slightly above a timed step."""
    sync(device)
    started = time.perf_counter()
    for i in range(accumulation):
        loss, _ = engine.forward(batch)
        engine.backward(loss)
        if i < accumulation - 1:
            engine.micro_step()
    sync(device)
    boundary_started = time.perf_counter()
    engine.micro_step()
    engine.step()
    sync(device)
    ended = time.perf_counter()
    return {"micro_batch_s": (boundary_started - started) / accumulation, "boundary_s": ended - boundary_started}


def profile_step(step, path: Path, rows: int = 30) -> None:
    """One step under torch.profiler, written to `path`: the ops by total device time (children included),
    then the kernels by their own device time, and how busy the device was over the step's wall time (an
    idle device means the host — Python, launches, hooks — bounds the step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) * 1e6
    events = prof.key_averages()
    by_total = events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                            max_name_column_width=70)
    by_self = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=2 * rows,
                           max_name_column_width=90)
    # kernels only (CPU-side ops report their children's device time, which would count it twice)
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) if cuda else 0.0
    busy = f"device busy {busy_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall ({100 * busy_us / wall_us:.1f} %)"
    path.write_text(f"{busy}\n\nby total device time\n{by_total}\n\nby own device time\n{by_self}")
    print(busy, "\n" + "\n".join(by_self.splitlines()[: 3 + 25]), flush=True)


def _with_stage(cfg, name: str):
    import dataclasses

    return dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, stage=name))


def plain_baseline(teacher, cfg, steps: int, warmup: int, device: torch.device, profile_to: Path | None = None
                   ) -> dict:
    """transformers + PyTorch as commonly written: a deep copy of the teacher as student, its attentions
    replaced by the targets (the only trainable weights, AdamW on them in bf16), full-vocabulary KL."""
    student = copy.deepcopy(teacher)
    edit_model(student, build_plan(student.config.num_hidden_layers, cfg.target), cfg.target)
    set_mode(student, "student")
    for layer in decoder_layers(student):  # a plain student: no teacher attention inside
        layer.self_attn = layer.self_attn.target
    student.requires_grad_(False)
    params = [p for layer in decoder_layers(student) for p in layer.self_attn.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    micro, seq = 1, cfg.data.seq_len
    ids = torch.randint(0, teacher.config.vocab_size, (micro, seq), device=device)
    student.train()

    def step() -> float:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                        log_target=True, reduction="batchmean") / seq
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    reset_peak(device)
    seconds, losses = timed_steps(step, steps, warmup, device)
    if profile_to is not None:
        profile_step(step, profile_to)
    # the student and its optimizer go out of scope here and are freed before the next case
    return {"micro_batch": micro, "seq_len": seq, "steps": steps, "tokens_per_s": micro * seq / seconds,
            "peak_gib": peak_gib(device), "loss_first": losses[0], "loss_last": losses[-1]}


def experts_comparison(model, tokens: int, device: torch.device, iters: int) -> list[dict]:
    """One MoE block forward + backward, grouped_mm vs eager, same weights and input."""
    block = decoder_layers(model)[0].mlp
    hidden = model.config.hidden_size
    dtype = next(block.parameters()).dtype
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)

        def step():
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
            x.grad = None
            return 0.0

        reset_peak(device)
        seconds, _ = timed_steps(step, iters + 1, 1, device)
        rows.append({"impl": impl, "tokens": tokens, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
                     "peak_gib": peak_gib(device)})
    model.set_experts_implementation("grouped_mm")
    return rows


def build(cfg, device_info):
    model, _ = load_teacher(cfg.model, device=device_info.torch_device)
    apply_experts_implementation(cfg.engine.experts_implementation, model)
    return model


def edit_and_compile(model, cfg, device_info) -> None:
    torch.manual_seed(cfg.device.seed)
    edit_model(model, build_plan(model.config.num_hidden_layers, cfg.target), cfg.target)
    mode = compile_mode(cfg.engine.compile, device_info.type, model)
    apply_compile(mode, model)
    model._bench_compile = mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--out", default=os.environ.get("OUT", "mission_scale_out"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--baseline-steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--stages", default="layerwise,model_level", help="comma-separated stages to run")
    parser.add_argument("--accumulation", type=int, default=0,
                        help="micro-batches per optimizer step (default 0: the recipe's batch_size / micro_batch_size)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per stage (default: the recipe list's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain baseline")
    parser.add_argument("--profile", action="store_true", help="profile one extra step of each case")
    parser.add_argument("--breakdown", action="store_true",
                        help="time one extra step split into micro-batches and the optimizer boundary")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every recipe, e.g. engine.compile=blocks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    register_configs()
    started = time.perf_counter()
    rows, errors, experts = [], [], []
    recipes = [r for r in RECIPES if not args.only or r[0] in args.only.split(",")]

    def record(row: dict) -> None:
        """Keep and print a result, and rewrite the outputs: a run cut short still leaves its rows."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_outputs(out, rows, experts, errors, time.perf_counter() - started)

    for recipe, steps in recipes:
        if time.perf_counter() - started > args.budget_s:
            errors.append(f"{recipe}: skipped (time budget)")
            continue
        steps = 4 if args.tiny else (args.steps or steps)
        accumulation = args.accumulation or (2 if args.tiny else 0)  # tiny: a smoke run, not the recipe's 32-64
        warmup = 1 if args.tiny else args.warmup
        try:
            cfg = compose_recipe(recipe, args.tiny, args.overrides)
            device_info = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
            device = device_info.torch_device
            free(device)
            # as the CLI does: one process exports the env:// variables DeepSpeed initialises its group from
            distributed.init_process_group(device_info.dist_backend, distributed.discover())
            model = build(cfg, device_info)
            if recipe == "qwen3_8b_mla_shape" and not args.no_baseline:  # the baseline shares this teacher
                result = plain_baseline(model, cfg, 4 if args.tiny else args.baseline_steps, warmup, device,
                                        out / "profile_baseline.txt" if args.profile else None)
                record({"recipe": "plain baseline (8B shape, MLA)", "stage": "model_level", **result})
                free(device)
            if "30b" in recipe:
                experts[:] = experts_comparison(model, 256 if args.tiny else 8192, device, 3 if args.tiny else 5)
                for row in experts:
                    print(json.dumps({"experts": row}), flush=True)
                free(device)
            edit_and_compile(model, cfg, device_info)
            for stage in args.stages.split(","):
                result = run_stage(cfg, model, stage, device_info, steps, warmup, accumulation,
                                   out / f"profile_{recipe}_{stage}.txt" if args.profile else None, args.breakdown)
                record({"recipe": recipe, "stage": stage, **result})
                free(device)
            del model
            free(device)
        except Exception as err:  # noqa: BLE001 — one failing case must not lose the others' measurements
            errors.append(f"{recipe}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            traceback.print_exc()
            free(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    peak_tflops = 989.0  # conf/cluster/h200.yaml nominal dense bf16
    ours = next((r for r in rows if r["recipe"] == "qwen3_8b_mla_shape" and r["stage"] == "model_level"), None)
    baseline = next((r for r in rows if r["recipe"].startswith("plain baseline")), None)
    if ours and baseline:  # the same model FLOPs per token: MFU ratios are speed ratios
        baseline["flops_per_token"] = ours["flops_per_token"]
    for row in rows:
        fpt = row.get("flops_per_token")
        row["mfu_pct"] = 100 * fpt * row["tokens_per_s"] / (peak_tflops * 1e12) if fpt else float("nan")
    write_outputs(out, rows, experts, errors, time.perf_counter() - started)
    print_table(rows, experts, errors, peak_tflops)
    if ours and baseline:
        print(f"8B MLA stage 2 vs plain baseline: {ours['tokens_per_s'] / baseline['tokens_per_s']:.3f}x tokens/s at "
              f"{100 * ours['peak_gib'] / baseline['peak_gib']:.0f} % of its peak memory")
    print(f"total {time.perf_counter() - started:.0f} s; logs and CSV in {out}")
    return 0 if not errors else 1


def write_outputs(out: Path, rows: list[dict], experts: list[dict], errors: list[str], seconds: float) -> None:
    keys = ["recipe", "stage", "micro_batch", "seq_len", "steps", "tokens_per_s", "mfu_pct", "peak_gib", "plan_gib",
            "checkpointing", "compile", "precision", "loss_first", "loss_last", "micro_batch_s", "boundary_s"]
    with open(out / "mission_scale.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / "mission_scale.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "seconds": seconds, "rows": rows, "experts": experts,
         "errors": errors}, indent=2, default=str))


def print_table(rows: list[dict], experts: list[dict], errors: list[str], peak_tflops: float) -> None:
    print(f"\n{'recipe':32s} {'stage':11s} {'mb':>3s} {'tok/s':>8s} {'MFU%':>5s} {'peak GiB':>8s} {'plan GiB':>8s}"
          f" {'err%':>5s}")
    for r in rows:
        plan = r.get("plan_gib", float("nan"))
        measured = r["peak_gib"]
        err = 100 * (plan - measured) / measured if math.isfinite(measured) and math.isfinite(plan) else float("nan")
        print(f"{r['recipe']:32s} {r['stage']:11s} {r['micro_batch']:3d} {r['tokens_per_s']:8,.0f} {r['mfu_pct']:5.1f}"
              f" {r['peak_gib']:8.1f} {plan:8.1f} {err:5.1f}"
              + (f"  micro-batch {r['micro_batch_s'] * 1e3:.0f} ms, boundary {r['boundary_s'] * 1e3:.0f} ms"
                 if "boundary_s" in r else ""))
    for e in experts:
        print(f"MoE block fwd+bwd {e['impl']:10s} {e['tokens']} tokens: {e['ms']:.1f} ms ({e['tokens_per_s']:,.0f} tok/s),"
              f" peak {e['peak_gib']:.1f} GiB")
    print(f"MFU vs {peak_tflops:g} TFLOP/s nominal bf16; plan GiB = predicted per-rank total (err% = plan vs peak)")
    for e in errors:
        print(f"FAILED {e}")


if __name__ == "__main__":
    sys.exit(main())
