"""Where does a conversion lose out of domain? Held-out quality in- and out-of-domain after each step.

Runs the same pipeline as `ascend-edit` (teacher, data, warm start, stage 1, stage 2, with the same
config and overrides) and evaluates the student in domain (the run's held-out set) and out of domain
(`python_docs`, ascend_edit/data/heldout.py) after the warm start, after stage 1 and after stage 2.
`--calibration DATA` calibrates the warm start on another data config than the one trained on, to
separate the two.

    python benchmarks/ood_ablation.py experiment=smollm2_mla [overrides ...] [--calibration mix]

Prints one table; writes `ood_ablation.json` into `output_dir`.

`--init-sweep` measures warm starts only (no training): one row per latent rank (`--ranks`), whitening
shrinkage (`--shrinkage`, target.mla.whitening_shrinkage) and calibration size (`--calibration-batches`),
all from one teacher load, in domain and on python_docs at the run's sequence length and, with
`--long-context N`, on windows of N tokens (as the held-out suite cuts them). Writes `ood_init_sweep.json`.

    python benchmarks/ood_ablation.py experiment=smollm2_mla --init-sweep --ranks 128 64 \
        --shrinkage 0 0.01 0.05 0.2 1 --long-context 1024
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from ascend_edit.cli import exit_on_bad_input, hydra_overrides
from ascend_edit.config import register_configs, to_typed
from ascend_edit.data.batches import batches_of
from ascend_edit.data.heldout import python_docs_documents
from ascend_edit.data.loading import load_data
from ascend_edit.data.packing import pack_documents
from ascend_edit.data.teacher_text import sample_calibration_set
from ascend_edit.device import resolve_device, seed_everything, set_cpu_threads
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import model_level_objective
from ascend_edit.eval.long_context import token_stream, window_batches, windows
from ascend_edit.eval.metrics import TeacherReference, compare, evaluate, model_logits
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model
from ascend_edit.train.stage import run_stage, stage_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=None, help="data config to calibrate the warm start on, "
                        "e.g. mix or files:/path/to/texts (default: the training data)")
    parser.add_argument("--ood-sequences", type=int, default=16)
    parser.add_argument("--init-sweep", action="store_true", help="warm starts only, one row per setting")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="--init-sweep: latent ranks "
                        "(default: target.mla.kv_lora_rank)")
    parser.add_argument("--shrinkage", type=float, nargs="+", default=None, help="--init-sweep: whitening "
                        "shrinkage values (default: target.mla.whitening_shrinkage)")
    parser.add_argument("--shrink-toward", default=None, choices=("identity", "diagonal"), help="--init-sweep: "
                        "target.mla.whitening_shrinkage_toward (default: the config's)")
    parser.add_argument("--calibration-batches", type=int, nargs="+", default=None, help="--init-sweep: "
                        "calibration batch counts (default: target.calibration_batches)")
    parser.add_argument("--long-context", type=int, default=0, help="--init-sweep: also score windows of "
                        "this many tokens (0: off)")
    parser.add_argument("--long-sequences", type=int, default=2, help="--init-sweep: windows per domain")
    args, overrides = hydra_overrides(parser)
    register_configs()
    with initialize_config_module("ascend_edit.conf", version_base="1.3"):
        cfg = to_typed(compose("config", overrides=overrides))
        calib_cfg = cfg.data
        if args.calibration:  # a data group, or files:PATH for local text
            group, _, path = args.calibration.partition(":")
            extra = [f"data={group}"] + ([f"data.path={path}"] if path else [])
            calib_cfg = to_typed(compose("config", overrides=[*overrides, *extra])).data
    started = time.perf_counter()
    device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
    seed_everything(cfg.device.seed)
    set_cpu_threads(cfg.device.threads)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, model.config.vocab_size)
    calib_set = train_set if args.calibration is None else load_data(calib_cfg, tokenizer, cfg.device.seed,
                                                                     model.config.vocab_size)[0]
    bs, dev = cfg.eval.batch_size, device.torch_device
    in_domain = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), bs, dev)
    ood_set = pack_documents(python_docs_documents(), tokenizer, cfg.data.seq_len)
    out_of_domain = batches_of(ood_set, range(min(args.ood_sequences, len(ood_set))), bs, dev)
    if cfg.target.calibration_source == "teacher":  # sampled from the teacher, as the pipeline does
        calib_set = sample_calibration_set(model, tokenizer, cfg.target.calibration_batches * bs, cfg.data.seq_len,
                                           cfg.device.seed)
    calibration = batches_of(calib_set, range(min(cfg.target.calibration_batches * bs, len(calib_set))), bs, dev)
    if args.init_sweep:
        long_sets = {}
        if args.long_context:
            long_sets = _long_windows(cfg, tokenizer, args.long_context, args.long_sequences, dev)
        init_sweep(args, cfg, model, calib_set, {"in_domain": in_domain, "python_docs": out_of_domain}, long_sets,
                   started)
        return
    plan = build_plan(model.config.num_hidden_layers, cfg.target)
    stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
    edit_model(model, plan, cfg.target, stats)

    rows = {}
    # the teacher's states kept per domain; after a stage 2 that trains shared weights, from its frozen copy
    references = {"in_domain": TeacherReference(in_domain), "python_docs": TeacherReference(out_of_domain)}

    def measure(name: str, which: str = "student") -> None:
        rows[name] = {"in_domain": evaluate(model, in_domain, which, references["in_domain"]),
                      "python_docs": evaluate(model, out_of_domain, which, references["python_docs"])}
        print(name, {k: round(v["ppl"], 2) for k, v in rows[name].items()}, flush=True)

    measure("teacher", "teacher")
    measure("after_init")
    seconds = {}

    class Env:  # one process
        rank, world_size, is_main = 0, 1, True

    ckpt = Path(cfg.output_dir) / "checkpoints"
    settings = stage_settings(cfg)
    if cfg.distill.stage in ("layerwise", "both") and cfg.distill.layerwise.steps:
        lw = cfg.distill.layerwise
        _, seconds["layerwise"] = run_stage("layerwise", model, LayerwiseObjective(lw.loss, lw.match), lw, settings,
                                            train_set, device, Env, ckpt)
        measure("after_layerwise")
    if cfg.distill.stage in ("model_level", "both") and cfg.distill.model_level.steps:
        ml = cfg.distill.model_level
        objective = model_level_objective(model, ml, cfg.engine.compile != "off")
        _, seconds["model_level"] = run_stage("model_level", model, objective, ml, settings, train_set, device, Env,
                                              ckpt)
        for reference in references.values():
            reference.use_teacher(objective.teacher)
        measure("after_model_level")

    teacher = rows["teacher"]
    print(f"\n{'model':<18} {'ID ppl':>8} {'ID ×':>7} {'ID KL':>7} {'OOD ppl':>8} {'OOD ×':>7} {'OOD KL':>7}")
    for name, row in rows.items():
        idr, ood = row["in_domain"], row["python_docs"]
        print(f"{name:<18} {idr['ppl']:8.2f} {idr['ppl'] / teacher['in_domain']['ppl']:7.3f} {idr['teacher_kl']:7.3f}"
              f" {ood['ppl']:8.2f} {ood['ppl'] / teacher['python_docs']['ppl']:7.3f} {ood['teacher_kl']:7.3f}")
    report = {"rows": rows, "train_seconds": seconds, "wall_seconds": time.perf_counter() - started,
              "cpu_seconds": time.process_time(), "overrides": overrides, "calibration": args.calibration,
              "train_data": repr(train_set)}
    (Path(cfg.output_dir) / "ood_ablation.json").write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_seconds']:.0f} s, process CPU {report['cpu_seconds']:.0f} s; train {seconds}")


def _long_windows(cfg, tokenizer, context: int, count: int, device) -> dict[str, list[dict]]:
    """Windows of `context` tokens of the run's held-out documents and of python_docs (the suite's cut)."""
    from ascend_edit.data.heldout import run_documents

    split = run_documents(cfg.data, cfg.device.seed)
    texts = {"in_domain": split[1] if split else [], "python_docs": python_docs_documents()}
    return {name: window_batches(windows(token_stream(docs, tokenizer, context * count), context, count),
                                 cfg.eval.batch_tokens, device)
            for name, docs in texts.items() if docs}


def init_sweep(args, cfg, teacher, calib_set, short_sets: dict, long_sets: dict, started: float) -> None:
    """Warm start only, per (calibration batches, rank, shrinkage): held-out metrics in and out of domain."""
    bs, dev = cfg.eval.batch_size, next(teacher.parameters()).device
    ranks = args.ranks or [cfg.target.mla.kv_lora_rank]
    alphas = args.shrinkage if args.shrinkage is not None else [cfg.target.mla.whitening_shrinkage]
    counts = args.calibration_batches or [cfg.target.calibration_batches]
    sets = {**short_sets, **{f"{name}@{args.long_context}": b for name, b in long_sets.items()}}
    plan = build_plan(teacher.config.num_hidden_layers, cfg.target)
    # the teacher's logits once per batch (fp32, ~0.4 GB per 2K tokens), reused by every row
    with torch.no_grad():
        cached = {id(b): model_logits(teacher)(b) for batches in sets.values() for b in batches}

    def cached_teacher(batch: dict) -> torch.Tensor:
        return cached[id(batch)]

    reference = {}
    rows = []
    for count in counts:
        calibration = batches_of(calib_set, range(min(count * bs, len(calib_set))), bs, dev)
        stats = collect_layer_stats(teacher, calibration)
        for rank in ranks:
            for alpha in alphas:
                target = dataclasses.replace(cfg.target, calibration_batches=count, mla=dataclasses.replace(
                    cfg.target.mla, kv_lora_rank=rank, whitening_shrinkage=alpha,
                    whitening_shrinkage_toward=args.shrink_toward or cfg.target.mla.whitening_shrinkage_toward))
                student = edit_model(copy.deepcopy(teacher), plan, target, stats)
                row = {"calibration_sequences": count * bs, "kv_lora_rank": rank, "whitening_shrinkage": alpha,
                       "toward": target.mla.whitening_shrinkage_toward}
                for name, batches in sets.items():
                    m = compare(cached_teacher, model_logits(student), batches)
                    reference[name] = m["teacher"]
                    row[name] = {**m["student"], "ppl_ratio": m["student"]["ppl"] / m["teacher"]["ppl"]}
                rows.append(row)
                print(_format_row(row, sets), flush=True)
                del student
    print("\nteacher ppl: " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in reference.items()))
    print(f"{'calib seqs':>10} {'rank':>5} {'alpha':>6} " + " ".join(f"{k + ' ×':>16} {'KL':>6}" for k in sets))
    for row in rows:
        print(_format_row(row, sets))
    report = {"teacher": reference, "rows": rows, "overrides": sys.argv[1:],
              "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time()}
    (Path(cfg.output_dir) / "ood_init_sweep.json").write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_seconds']:.0f} s, process CPU {report['cpu_seconds']:.0f} s")


def _format_row(row: dict, sets: dict) -> str:
    cells = " ".join(f"{row[k]['ppl_ratio']:16.3f} {row[k]['teacher_kl']:6.3f}" for k in sets)
    return (f"{row['calibration_sequences']:>10} {row['kv_lora_rank']:>5} {row['whitening_shrinkage']:>6g} "
            + cells)


if __name__ == "__main__":
    exit_on_bad_input("ood_ablation", main)
