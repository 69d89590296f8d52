"""`ascend-edit bench_kv` end to end on a tiny config (CPU): table, CSV and plot, measured == accounted."""
from __future__ import annotations

import csv

import pytest

from ascend_edit.tasks.bench_kv import CSV_FILE, PLOT_FILE
from tests.helpers.cli_runner import run_cli


@pytest.mark.parametrize("target", ["mla_small", "gate_swa"])
def test_bench_kv_writes_table_csv_and_plot(tmp_path, target):
    args = ["bench_kv", "model=qwen3_tiny", f"target={target}",
            "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8", "target.mla.kv_lora_rank=16",
            "target.mla.v_head_dim=16", "target.gate_swa.window=32", "device=cpu", "bench_kv.contexts=[64,256]",
            "bench_kv.batch_sizes=[1]", "bench_kv.decode_tokens=4", "bench_kv.warmup_tokens=1",
            f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    assert "static" in proc.stdout  # the table's title names the cache: preallocated, as bench_decode's
    rows = list(csv.DictReader((tmp_path / CSV_FILE).open()))
    assert len(rows) == 4  # teacher and converted at two contexts
    assert {r["bytes_per_value"] for r in rows} == {"4"}  # qwen3_tiny is fp32: the table says so
    assert "KV bytes: fp32 cache (the model's dtype); a 16-bit server holds half" in proc.stdout
    by = {(r["model"], int(r["context"])): r for r in rows}
    for context in (64, 256):
        teacher, converted = by[("teacher", context)], by[("converted", context)]
        assert converted["status"] == teacher["status"] == "ok"
        assert float(converted["kv_bytes_per_token"]) < float(teacher["kv_bytes_per_token"])
        for row in (teacher, converted):
            assert float(row["kv_bytes_per_token"]) == pytest.approx(
                float(row["kv_bytes_per_token_accounted"]), rel=0.05)
            assert float(row["decode_tokens_per_s"]) > 0
