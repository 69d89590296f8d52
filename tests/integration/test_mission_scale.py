"""The GPU mission benchmark runs end to end on tiny shapes on the CPU and writes its table and CSV."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a few minutes on a busy 2-core CPU
def test_mission_scale_tiny_writes_rows_beside_plan(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/mission_scale.py", "--tiny", "--out", str(tmp_path),
                             "--only", "qwen3_8b_mla_shape,qwen3_30b_a3b_mla_shape"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(tmp_path / "mission_scale.csv") as f:
        rows = list(csv.DictReader(f))
    stages = {(r["recipe"], r["stage"]) for r in rows}
    assert ("qwen3_30b_a3b_mla_shape", "model_level") in stages and ("qwen3_8b_mla_shape", "layerwise") in stages
    assert any(r["recipe"].startswith("plain baseline") for r in rows)
    for row in rows:
        assert float(row["tokens_per_s"]) > 0
        if not row["recipe"].startswith("plain"):
            assert float(row["plan_gib"]) > 0
    assert "MoE block fwd+bwd grouped_mm" in result.stdout and "8B MLA stage 2 vs plain baseline" in result.stdout
