"""`ascend-edit eval eval.checkpoint=PATH`: the held-out suite on a converted or exported model, teacher beside it.

PATH is a run directory (its `converted/` model; the teacher and data come from the run's own
`.hydra/config.yaml`), a converted directory (`ascend_edit.json`) or an exported HF checkpoint (the
teacher is then `model=...` of this command). Writes `eval.json` and `report.md` into this command's
output directory and prints the table. The same suite runs at the end of every conversion
(`suite_after_conversion`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ascend_edit.config import RootConfig, to_typed
from ascend_edit.data.heldout import run_documents
from ascend_edit.device import resolve_device
from ascend_edit.eval.metrics import model_logits, paired_logits
from ascend_edit.eval.suite import held_out_sets, run_suite

log = logging.getLogger(__name__)


def suite_after_conversion(model: torch.nn.Module, tokenizer, cfg: RootConfig, out_dir: Path, device) -> dict:
    """The suite on both paths of the freshly converted model; writes eval.json (the report reads it)."""
    if tokenizer is None:
        log.warning("eval: this teacher has no tokenizer; the held-out suite is skipped")
        return {}
    sets = held_out_sets(cfg.eval, run_documents(cfg.data, cfg.device.seed))
    teacher, student = paired_logits(model)
    results = run_suite(teacher, student, tokenizer, cfg.eval, sets, _max_positions(model), device)
    write_results(results, out_dir)
    return results


def write_results(results: dict, out_dir: Path) -> None:
    (Path(out_dir) / "eval.json").write_text(json.dumps(results, indent=2))
    print_suite(Console(width=max(Console().width, 110)), results)


def _max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def run_config(path: Path, cfg: RootConfig) -> RootConfig:
    """The run's own config (teacher, data, seed) with this command's eval settings, if PATH is a run dir."""
    saved = path / ".hydra" / "config.yaml"
    if not saved.is_file():
        return cfg
    raw = OmegaConf.load(saved)
    assert isinstance(raw, DictConfig)  # Hydra saves the composed config as a mapping
    raw.pop("output_dir", None)
    raw.pop("eval", None)
    merged = OmegaConf.merge(OmegaConf.structured(RootConfig), raw,
                             {"eval": OmegaConf.structured(cfg.eval), "output_dir": cfg.output_dir, "task": "eval"})
    assert isinstance(merged, DictConfig)  # merged onto RootConfig's schema
    return to_typed(merged)


def load_student(path: Path):
    """(model, kind) from a run dir, a converted dir or an exported HF checkpoint."""
    from ascend_edit.models.checkpoint import load_converted
    from ascend_edit.models.export import load_exported

    if (path / "converted" / "ascend_edit.json").is_file():
        return load_converted(path / "converted"), "run"
    if (path / "ascend_edit.json").is_file():
        return load_converted(path), "converted"
    if (path / "config.json").is_file():
        return load_exported(path), "exported"
    raise FileNotFoundError(f"eval.checkpoint={path} is not a run directory (no converted/), a converted model "
                            "(no ascend_edit.json) nor an exported checkpoint (no config.json)")


def run(cfg: RootConfig) -> dict:
    from ascend_edit.models.loading import load_teacher
    from ascend_edit.tasks.report import write_report

    if not cfg.eval.checkpoint:
        raise ValueError("eval.checkpoint is required: a run directory, a converted model or an exported checkpoint")
    path = Path(cfg.eval.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"eval.checkpoint={path} does not exist")
    cfg = run_config(path, cfg)
    device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
    student, kind = load_student(path)
    teacher, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    if tokenizer is None:
        raise ValueError("eval needs a tokenizer: the teacher (model=...) has none")
    student.to(device.torch_device)
    split = run_documents(cfg.data, cfg.device.seed) if kind == "run" else None
    sets = held_out_sets(cfg.eval, split)
    results = run_suite(model_logits(teacher.eval()), model_logits(student), tokenizer, cfg.eval, sets,
                        _max_positions(student), device.torch_device)
    results["checkpoint"] = str(path)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(results, out_dir)
    write_report(out_dir)
    return results


def print_suite(console: Console, results: dict) -> None:
    table = Table(title="Held-out suite: student vs teacher per domain and context (KL in nats/token)")
    for col in ("domain", "context", "seqs", "teacher ppl", "student ppl", "ratio", "teacher-KL", "top-1"):
        table.add_column(col, justify="right")
    for domain, per_context in results.get("quality", {}).items():
        for context, m in per_context.items():
            table.add_row(domain, context, str(m["sequences"]), f"{m['teacher']['ppl']:.2f}",
                          f"{m['student']['ppl']:.2f}", f"{m['ppl_ratio']:.3f}x",
                          f"{m['student']['teacher_kl']:.4f}", f"{100 * m['student']['top1_agreement']:.1f} %")
    console.print(table)
    passkey = results.get("passkey")
    if passkey:
        for name in ("teacher", "student"):
            mean = sum(map(sum, passkey[name])) / (len(passkey["contexts"]) * len(passkey["depths"]))
            console.print(f"passkey {name}: {100 * mean:.0f} % over contexts {passkey['contexts']} x depths "
                          f"{passkey['depths']} ({passkey['trials']} trials each)")
    console.print(f"suite: {results.get('seconds', 0):.1f} s")
