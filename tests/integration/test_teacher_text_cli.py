"""`ascend-edit teacher_text` end to end on the tiny trained teacher: documents written once, never over."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ascend_edit.data.sources import load_documents
from tests.integration.test_convert_cli import checked, run_cli

pytestmark = pytest.mark.usefixtures("few_cpu_threads")


def test_teacher_text_writes_documents_once(trained_teacher: Path, tmp_path: Path):
    out = tmp_path / "tt"
    args = ["teacher-text", "model=hf", f"model.path={trained_teacher}", "model.dtype=fp32", "device=cpu",
            "teacher_text.rows=3", "teacher_text.tokens=48", "teacher_text.batch_size=2", "teacher_text.min_words=1",
            f"teacher_text.out={out}"]
    checked(run_cli(tmp_path / "run1", args))
    docs = load_documents(out / "teacher_text.jsonl", format="jsonl")
    meta = json.loads((out / "meta.json").read_text())
    assert docs and meta["documents"] == len(docs)
    assert meta["sampling"]["rows"] == 3 and meta["sampling"]["tokens"] == 48
    # the tiny teacher was trained on a small grammar (character tokens, which decode space-separated): its
    # samples spell that grammar's words
    spelled = "".join("".join(doc.split()) for doc in docs)
    grammar_words = {w.strip(".") for w in (trained_teacher / "corpus.txt").read_text().split() if len(w) >= 5}
    assert sum(word in spelled for word in grammar_words) >= 3
    before = (out / "teacher_text.jsonl").read_bytes()
    again = run_cli(tmp_path / "run2", args)
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already exists" in lines[0] and "teacher_text.out" in lines[0]
    assert (out / "teacher_text.jsonl").read_bytes() == before
