"""`ascend-edit ablation`: what each distillation stage buys, at an equal token budget.

From one warm (or random) start, three students are compared on held-out data:
* init only            — no training;
* stage 2 only         — model-level KD for (stage-1 steps + stage-2 steps);
* stage 1 + stage 2    — the configured layer-wise then model-level steps.
Both trained variants see the same number of training tokens; wall time is reported too.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from ascend_edit import distributed, jsonio
from ascend_edit.config import RootConfig
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import model_level_objective
from ascend_edit.eval.metrics import TeacherReference, evaluate
from ascend_edit.run_dir import ABLATION_VARIANT_DIRS
from ascend_edit.train.prepare import prepare
from ascend_edit.train.stage import run_stage, stage_settings


def run(cfg: RootConfig) -> dict:
    prepared = prepare(cfg)
    if prepared is None:
        return {}
    lw, ml = cfg.distill.layerwise, cfg.distill.model_level
    if lw.batch_size != ml.batch_size:
        raise ValueError("ablation needs distill.layerwise.batch_size == distill.model_level.batch_size "
                         "so that equal steps mean equal tokens")
    p = prepared
    start = copy.deepcopy(p.model)
    model_level = model_level_objective(p.model, ml, cfg.engine.compile != "off")
    settings = stage_settings(cfg)
    # the teacher's forwards once, for every row below; from the frozen copy when stage 2 trains shared weights
    reference = TeacherReference(p.eval_batches, teacher=model_level.teacher)
    rows = {"teacher": (evaluate(p.model, p.eval_batches, "teacher", reference), 0.0),
            "init only": (evaluate(p.model, p.eval_batches, reference=reference), 0.0)}

    stage2_dir, both_dir = (p.out_dir / name for name in ABLATION_VARIANT_DIRS)
    stage2_only = copy.deepcopy(start)
    long_ml = dataclasses.replace(ml, steps=lw.steps + ml.steps)
    _, seconds = run_stage("model_level", stage2_only, model_level, long_ml,
                           dataclasses.replace(settings, metrics_log=stage2_dir / "metrics.jsonl"), p.train_set,
                           p.device, p.env, stage2_dir)
    rows["stage 2 only"] = (evaluate(stage2_only, p.eval_batches, reference=reference), seconds)
    del stage2_only

    both = start
    stage1 = LayerwiseObjective(lw.loss, lw.match)
    both_settings = dataclasses.replace(settings, metrics_log=both_dir / "metrics.jsonl")
    _, s1 = run_stage("layerwise", both, stage1, lw, both_settings, p.train_set, p.device, p.env, both_dir)
    after_stage1 = evaluate(both, p.eval_batches, reference=reference)
    _, s2 = run_stage("model_level", both, model_level, ml, both_settings, p.train_set, p.device, p.env, both_dir)
    rows["stage 1 only (midpoint)"] = (after_stage1, s1)
    rows["stage 1 + stage 2"] = (evaluate(both, p.eval_batches, reference=reference), s1 + s2)

    tokens = (lw.steps + ml.steps) * ml.batch_size * cfg.data.seq_len
    report: dict[str, Any] = {name: {**metrics, "train_seconds": sec} for name, (metrics, sec) in rows.items()}
    report["train_tokens_per_variant"] = tokens
    if p.env.is_main:
        table = Table(title=f"Ablation at {tokens:,} training tokens per trained variant")
        for col in ("variant", "perplexity", "teacher-KL", "top-1 agreement", "train s"):
            table.add_column(col, justify="right")
        for name, (metrics, sec) in rows.items():
            table.add_row(name, f"{metrics['ppl']:.2f}", f"{metrics['teacher_kl']:.4f}",
                          f"{100 * metrics['top1_agreement']:.1f} %", f"{sec:.0f}")
        Console().print(table)
        (p.out_dir / "ablation.json").write_text(jsonio.dumps(report, indent=2))
    distributed.barrier()
    return report
