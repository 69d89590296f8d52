"""Budget-aware vs uniform MLA ranks at the same KV bytes: retained energy and warm-start quality.

For each KV budget (a fraction of the teacher's KV bytes per token) and each allocation (uniform: one
rank everywhere; spectrum: water-filling on each layer's whitened K/V spectrum; sensitivity: the same with
each layer's energy weighted by its measured output KL, models/budget.py), prints
the per-layer ranks, the mean fraction of K/V energy the latents keep and, with `--eval`, held-out
perplexity and teacher-KL of the warm start in domain and out of domain (python_docs). No training.

    python benchmarks/budget_allocation.py experiment=smollm2_mla target=mla_budget [overrides] \
        [--budgets 0.25 0.125] [--allocations uniform spectrum sensitivity] [--eval]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

from hydra import compose, initialize_config_module

from ascend_edit.cli import exit_on_bad_input, hydra_overrides
from ascend_edit.config import register_configs, to_typed
from ascend_edit.data.batches import batches_of
from ascend_edit.data.heldout import python_docs_documents
from ascend_edit.data.loading import load_data
from ascend_edit.data.packing import pack_documents
from ascend_edit.device import resolve_device, seed_everything, set_cpu_threads
from ascend_edit.eval.kv import kv_table
from ascend_edit.eval.metrics import evaluate
from ascend_edit.models.budget import mla_rank_allocation, plan_with_ranks, sensitivity_allocation
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--eval", action="store_true", help="also evaluate each warm start (slower)")
    parser.add_argument("--allocations", nargs="+", default=["uniform", "spectrum", "sensitivity"],
                        choices=["uniform", "spectrum", "sensitivity"])
    parser.add_argument("--ood-sequences", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args, overrides = hydra_overrides(parser)
    register_configs()
    with initialize_config_module("ascend_edit.conf", version_base="1.3"):
        cfg = to_typed(compose("config", overrides=[*overrides, "output_dir=."]))
    device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
    seed_everything(cfg.device.seed)
    set_cpu_threads(cfg.device.threads)
    teacher, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, teacher.config.vocab_size)
    bs, dev = cfg.eval.batch_size, device.torch_device
    calibration = batches_of(train_set, range(min(cfg.target.calibration_batches * bs, len(train_set))), bs, dev)
    stats = collect_layer_stats(teacher, calibration)
    held_out = {}
    if args.eval:
        held_out["in_domain"] = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), bs, dev)
        ood = pack_documents(python_docs_documents(), tokenizer, cfg.data.seq_len)
        held_out["python_docs"] = batches_of(ood, range(min(args.ood_sequences, len(ood))), bs, dev)
        teacher_ppl = {name: evaluate(teacher, batches, "teacher")["ppl"] for name, batches in held_out.items()}
        print("teacher", {k: round(v, 2) for k, v in teacher_ppl.items()}, flush=True)
    results = []
    layers = list(range(teacher.config.num_hidden_layers))
    for budget in args.budgets:
        for allocation in args.allocations:
            mla = dataclasses.replace(cfg.target.mla, kv_budget=budget, allocation=allocation)
            if allocation == "sensitivity":  # measured output error per layer and candidate rank
                chosen = sensitivity_allocation(teacher, layers, stats, dataclasses.replace(cfg.target, mla=mla),
                                                calibration[:1])
            else:
                chosen = mla_rank_allocation(teacher, layers, stats, mla)
            row = {"budget": budget, "allocation": allocation, "ranks": list(chosen.ranks.values()),
                   "kv_fraction": chosen.kv_fraction, "mean_energy_kept": sum(chosen.retained.values()) / len(layers),
                   "min_energy_kept": min(chosen.retained.values())}
            if args.eval:
                model = copy.deepcopy(teacher)
                target = dataclasses.replace(cfg.target, mla=mla)
                edit_model(model, plan_with_ranks(build_plan(len(layers), target), chosen.ranks), target, stats)
                row["bytes_per_token"] = kv_table(model, 2048)["converted_bytes_per_token"]
                for name, batches in held_out.items():
                    metrics = evaluate(model, batches)
                    row[name] = {"ppl": metrics["ppl"], "ratio": metrics["ppl"] / teacher_ppl[name],
                                 "teacher_kl": metrics["teacher_kl"]}
                del model
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'budget':>7} {'alloc':>11} {'KV frac':>8} {'energy':>7} {'min':>6}"
          + ("  ID ×   ID KL  OOD ×  OOD KL" if args.eval else ""))
    for r in results:
        line = (f"{r['budget']:7.3f} {r['allocation']:>11} {r['kv_fraction']:8.4f} {r['mean_energy_kept']:7.3f}"
                f" {r['min_energy_kept']:6.3f}")
        if args.eval:
            line += (f" {r['in_domain']['ratio']:6.3f} {r['in_domain']['teacher_kl']:6.3f}"
                     f" {r['python_docs']['ratio']:6.3f} {r['python_docs']['teacher_kl']:6.3f}")
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    exit_on_bad_input("budget_allocation", main)
