"""Where does a conversion lose out of domain? Held-out quality in- and out-of-domain after each step.

Runs the same pipeline as `ascend-edit` (teacher, data, warm start, stage 1, stage 2, with the same
config and overrides) and evaluates the student in domain (the run's held-out set) and out of domain
(`python_docs`, ascend_edit/data/heldout.py) after the warm start, after stage 1 and after stage 2.
`--calibration DATA` calibrates the warm start on another data config than the one trained on, to
separate the two.

    python benchmarks/ood_ablation.py experiment=smollm2_mla [overrides ...] [--calibration mix]

Prints one table; writes `ood_ablation.json` into `output_dir`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from ascend_edit.config import register_configs, to_typed
from ascend_edit.data.batches import batches_of
from ascend_edit.data.heldout import python_docs_documents
from ascend_edit.data.loading import load_data
from ascend_edit.data.packing import pack_documents
from ascend_edit.device import resolve_device, seed_everything
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import model_level_objective
from ascend_edit.eval.metrics import evaluate
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model
from ascend_edit.train.stage import run_stage, stage_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=None, help="data config to calibrate the warm start on, "
                        "e.g. mix or files:/path/to/texts (default: the training data)")
    parser.add_argument("--ood-sequences", type=int, default=16)
    args, overrides = parser.parse_known_args()
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
    if cfg.device.threads:
        torch.set_num_threads(cfg.device.threads)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    train_set, eval_set = load_data(cfg.data, tokenizer, cfg.device.seed, model.config.vocab_size)
    calib_set = train_set if args.calibration is None else load_data(calib_cfg, tokenizer, cfg.device.seed,
                                                                     model.config.vocab_size)[0]
    bs, dev = cfg.eval.batch_size, device.torch_device
    in_domain = batches_of(eval_set, range(min(cfg.data.eval_sequences, len(eval_set))), bs, dev)
    ood_set = pack_documents(python_docs_documents(), tokenizer, cfg.data.seq_len)
    out_of_domain = batches_of(ood_set, range(min(args.ood_sequences, len(ood_set))), bs, dev)
    calibration = batches_of(calib_set, range(min(cfg.target.calibration_batches * bs, len(calib_set))), bs, dev)
    plan = build_plan(model.config.num_hidden_layers, cfg.target)
    stats = collect_layer_stats(model, calibration) if cfg.target.init == "warm" else None
    edit_model(model, plan, cfg.target, stats)

    rows = {}

    def measure(name: str, which: str = "student") -> None:
        rows[name] = {"in_domain": evaluate(model, in_domain, which), "python_docs": evaluate(model, out_of_domain, which)}
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
        _, seconds["model_level"] = run_stage("model_level", model, model_level_objective(model, ml), ml, settings,
                                              train_set, device, Env, ckpt)
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


if __name__ == "__main__":
    main()
