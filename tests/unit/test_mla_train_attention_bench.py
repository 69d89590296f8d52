"""benchmarks/mla_train_attention.py on the CPU: every case that runs there agrees with SDPA's own choice."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_padded_value_attention_equals_sdpa_forward_and_backward(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/mla_train_attention.py", "--device", "cpu", "--tiny",
                          "--batches", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["case"]: r for r in json.loads((tmp_path / "mla_train_attention.json").read_text())["rows"]}
    assert rows["sdpa-auto"]["out_diff"] == 0 and rows["sdpa-auto"]["ms"] > 0
    padded = rows["sdpa-math-padv"]  # v zero-padded to the q/k head dim, output sliced back: same result
    assert padded["out_diff"] < 1e-5 and padded["dq_diff"] < 1e-5
    assert "MLA training attention" in run.stdout
