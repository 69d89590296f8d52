"""`ascend-edit teacher_text`: documents sampled from the teacher, for the training mix of a conversion.

    ascend-edit teacher_text model=hf model.path=/models/Qwen3-8B teacher_text.rows=2048 teacher_text.out=/data/tt
    ascend-edit experiment=qwen3_8b_mla model.path=/models/Qwen3-8B \\
        'data.mix=[{name: files, path: /data/tt/teacher_text.jsonl, weight: 0.3}, ...]'

Why and how: ascend_edit/data/teacher_text.py. Sampling runs on one device (`device=`); the teacher must fit
it. The output directory must not already hold the files (never written over).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ascend_edit.config import RootConfig
from ascend_edit.data.teacher_text import SamplingSpec, check_output, sample_documents, spec_meta, write_documents
from ascend_edit.device import resolve_device, seed_everything, set_cpu_threads
from ascend_edit.models.loading import load_teacher

log = logging.getLogger(__name__)


def run(cfg: RootConfig) -> dict:
    tt = cfg.teacher_text
    out = Path(tt.out).expanduser() if tt.out else Path(cfg.output_dir) / "teacher_text"
    spec = SamplingSpec(rows=tt.rows, tokens=tt.tokens, temperature=tt.temperature, top_p=tt.top_p,
                        batch_size=tt.batch_size, seed=cfg.device.seed, min_words=tt.min_words)
    check_output(out)  # before the teacher loads and sampling starts, not after
    if cfg.model.source == "config":  # known from the config: before any weights load
        raise ValueError("teacher_text needs a teacher with a tokenizer (model.source=config has none)")
    device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
    seed_everything(cfg.device.seed)
    set_cpu_threads(cfg.device.threads)
    teacher, tokenizer = load_teacher(cfg.model, device=device.torch_device)
    if tokenizer is None:
        raise ValueError("teacher_text needs a teacher with a tokenizer (model.source=config has none)")
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if positions and tt.tokens > positions:
        log.warning("teacher_text.tokens=%d is longer than the teacher's max_position_embeddings=%d: text sampled "
                    "past the positions it was trained on is poor", tt.tokens, positions)
    started = time.perf_counter()
    documents = sample_documents(teacher, tokenizer, spec,
                                 progress=lambda i, n: log.info("teacher_text: batch %d / %d", i, n))
    seconds = time.perf_counter() - started
    path = write_documents(out, documents, {**spec_meta(spec, cfg.model.path or cfg.model.source),
                                            "seconds": seconds, "device": str(device.torch_device)})
    log.info("teacher_text: %d documents from %d rows x %d tokens in %.0f s -> %s", len(documents), spec.rows,
             spec.tokens, seconds, path)
    print(f"{path}: {len(documents)} documents; add to a mix as {{name: files, path: {path}, weight: W}}")
    return {"path": str(path), "documents": len(documents), "seconds": seconds}
