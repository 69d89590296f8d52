"""The decode benchmark end to end on a tiny config (CPU): a fresh process per model, CSVs, table last."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from tests.helpers.cli_runner import run_cli

TINY_TARGETS = ["target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8", "target.mla.kv_lora_rank=16",
                "target.mla.v_head_dim=16", "target.gate_swa.window=16", "target.gate_swa.sink_tokens=2"]


def read(path):
    return list(csv.DictReader(path.open()))


@pytest.mark.slow  # ~50 s on 2 CPU cores: the benchmark's every option; the subcommand test below stays in CI
def test_bench_decode_measures_every_model_in_its_own_process(tmp_path):
    out = tmp_path / "bench"
    args = [sys.executable, "-m", "ascend_edit.tasks.bench_decode", "--model", "qwen3_tiny", "--device", "cpu",
            "--contexts", "16", "48", "--batches", "1", "2", "--steps", "2", "--repeats", "2", "--warmup", "1",
            "--path", "eager", "--compile-cells", "--prefill-contexts", "48", "--prefill-repeats", "2",
            "--profile-cells", "1x16", "--profile-steps", "2", "--memory-budget-gib", "0.01",
            "--out", str(out), "--target-override", *TINY_TARGETS]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode step" in proc.stdout and "largest batch" in proc.stdout
    for kind in ("teacher", "mla", "gate_swa"):
        assert (out / "logs" / f"{kind}-0.log").exists()
    decode = read(out / "decode.csv")
    assert len(decode) == 3 * 2 * 2  # three models, two batches, two contexts
    for row in decode:
        assert row["status"] == "ok", row
        assert float(row["tok_s_total"]) > 0 and float(row["floor_ms"]) > 0
        assert float(row["ms_min"]) <= float(row["ms"]) <= float(row["ms_max"])
    cache = {(r["kind"], int(r["batch"]), int(r["context"])): float(r["cache_gib"]) for r in decode}
    for kind in ("mla", "gate_swa"):  # smaller caches than the teacher's at the longest context
        assert cache[(kind, 2, 48)] < cache[("teacher", 2, 48)]
    largest = {(r["kind"], int(r["context"])): int(r["max_batch"]) for r in read(out / "max_batch.csv")}
    for kind in ("mla", "gate_swa"):
        assert largest[(kind, 48)] > largest[("teacher", 48)]
    prefill = read(out / "prefill.csv")
    assert {r["kind"] for r in prefill} == {"teacher", "mla", "gate_swa"}
    for row in prefill:  # median of the timed repeats, with their spread
        assert row["status"] == "ok"
        assert 0 < float(row["seconds_min"]) <= float(row["seconds"]) <= float(row["seconds_max"])
    profile = read(out / "profile.csv")
    assert {r["kind"] for r in profile} == {"teacher", "mla", "gate_swa"}
    for row in profile:  # the eager step's ops by class, and the top list written per model
        assert row["status"] == "ok" and float(row["kernels_per_step"]) > 0
        assert float(row["gemm_ms"]) + float(row["attention_ms"]) + float(row["other_ms"]) > 0
        assert (out / row["file"]).read_text().count("\n") > 3
    table = proc.stdout[proc.stdout.rindex("decode step"):]  # the table is printed last
    assert "eager step profiled" in table and table.rstrip().splitlines()[-1].lstrip().startswith("ctx")


def test_bench_decode_subcommand_compares_the_teacher_with_the_configured_target(tmp_path):
    args = ["bench_decode", "model=qwen3_tiny", "target=gate_swa", *TINY_TARGETS, "device=cpu",
            "bench_kv.contexts=[24]", "bench_kv.batch_sizes=[1]", "bench_kv.decode_tokens=2",
            "bench_kv.warmup_tokens=1", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read(tmp_path / "bench_decode" / "decode.csv")
    assert {r["kind"] for r in rows} == {"teacher", "gate_swa"}
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.slow  # ~45 s of compiling; tests/unit/test_static_cache.py covers the reuse of one compiled step
def test_compiled_cells_share_one_compile_per_cache_length_and_profile_the_compiled_step(tmp_path):
    """Compiled cells of one batch share one decoder (`--compile-cache largest`): the second context compiles
    nothing; `KIND:BxT` runs a cell for that model alone (the teacher's anchor); the compiled step is profiled
    with the same decoder. aot_eager stands in for inductor (the same graph capture, no code generation)."""
    out = tmp_path / "bench"
    args = [sys.executable, "-m", "ascend_edit.tasks.bench_decode", "--model", "qwen3_tiny", "--device", "cpu",
            "--contexts", "16", "48", "--batches", "1", "--steps", "2", "--repeats", "2", "--warmup", "3",
            "--path", "eager", "--compile-cells", "1x16", "1x48", "teacher:1x16", "--compile-kinds", "mla",
            "gate_swa", "--compile-cache", "largest", "--compile-backend", "aot_eager", "--profile-cells", "1x48",
            "--profile-path", "compile", "--profile-steps", "2", "--prefill-contexts", "--no-max-batch",
            "--out", str(out), "--target-override", *TINY_TARGETS]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = {(r["kind"], int(r["context"])): r for r in read(out / "decode.csv") if r["path"] == "compile"}
    assert sorted(compiled) == [("gate_swa", 16), ("gate_swa", 48), ("mla", 16), ("mla", 48), ("teacher", 16)]
    for (kind, context), row in compiled.items():
        assert row["status"] == "ok", row
        assert int(row["cache_len"]) == int(compiled[(kind, 16)]["cache_len"]) > 48  # one length per batch
        # compiled once, then reused (warm-up and timed steps of a reused step run under "fail_on_recompile")
        assert row["reused_compiled_step"] == ("False" if context == 16 else "True")
    profile = read(out / "profile.csv")
    assert {r["kind"] for r in profile} == {"teacher", "mla", "gate_swa"}
    for row in profile:
        assert row["path"] == "compile" and row["status"] == "ok" and float(row["kernels_per_step"]) > 0
    assert "compile step profiled" in proc.stdout[proc.stdout.rindex("decode step"):]


def test_compile_cells_take_an_optional_model():
    from ascend_edit.tasks.bench_decode import _cells

    assert _cells("compile-cells", ["1x16", "teacher:2X32"], with_kind=True) == [[1, 16], [2, 32, "teacher"]]
    for bad, with_kind in (("student:1x16", True), ("teacher:1x16", False), ("1x", True)):
        with pytest.raises(SystemExit, match="compile-cells"):
            _cells("compile-cells", [bad], with_kind=with_kind)


def test_grid_defaults_follow_the_contexts_and_targets_are_checked_before_any_process(capsys):
    """Without --compile-cells / --prefill-contexts the compiled cell and the prefill lengths come from --contexts
    (a tiny grid does not compile an 8K cache or prefill 32K); a target that does not fit the teacher is one line
    before a process starts, and a target=NAME override goes to the model it is prefixed with only."""
    from ascend_edit.tasks.bench_decode import main, parse_args, settings_from_args

    tiny = ["--model", "qwen3_tiny", "--device", "cpu", "--contexts", "64", "128", "--batches", "2", "4"]
    settings = settings_from_args(parse_args([*tiny, "--target-override", *TINY_TARGETS]))
    assert settings.compile_cells == [[2, 128]] and settings.prefill_contexts == [128]
    default = parse_args([])
    assert settings_from_args(default).compile_cells == [[1, 8192]]  # the documented default grid keeps its cells
    assert settings_from_args(default).prefill_contexts == [8192, 32768]
    assert settings_from_args(parse_args([*tiny, "--path", "compile", "--target-override", *TINY_TARGETS])
                              ).compile_cells == []  # every cell is compiled already
    with pytest.raises(SystemExit) as refused:
        main([*tiny, "--out", "unused"])  # the default MLA target has DeepSeek shapes (rope 64 > head_dim 16)
    assert str(refused.value).startswith("bench_decode: error: target.mla.qk_rope_head_dim=64 exceeds")
    with pytest.raises(SystemExit, match="sets the gate_swa model's target.kind to mla"):
        main([*tiny, "--out", "unused", "--target-override", *TINY_TARGETS, "target=mla_small"])
    picked = settings_from_args(parse_args([*tiny, "--target-override", *TINY_TARGETS, "mla:target=mla_small",
                                            "gate_swa:target.gate_swa.window=8"]))
    assert picked.targets["mla"]["mla"]["latent_norm"] is False  # mla_small's, not mla's
    assert picked.targets["gate_swa"]["gate_swa"]["window"] == 8


def test_floors_are_restated_against_the_higher_bandwidth():
    from ascend_edit.tasks.bench_decode import restate_floors

    result = {"bandwidth_gb_s": 3000.0, "decode": [{"ms": 6.0, "floor_ms": 4.0, "x_floor": 1.5},
                                                   {"ms": None, "floor_ms": None, "status": "oom"}]}
    restate_floors(result, 4000e9)  # a faster second measurement: a shorter floor, a larger ratio
    assert result["decode"][0]["floor_ms"] == pytest.approx(3.0)
    assert result["decode"][0]["x_floor"] == pytest.approx(2.0)
    assert result["floor_bandwidth_gb_s"] == pytest.approx(4000.0)
    restate_floors(result, 1000e9)  # a slower one never loosens the floor
    assert result["decode"][0]["floor_ms"] == pytest.approx(3.0)


def test_profile_classes_count_the_split_k_decode_kernels_as_attention():
    """Kernel names from the H200 profiles of the compiled decode step (docs/benchmarks.md)."""
    from ascend_edit.tasks.bench_decode import kernel_class

    for name in ("_gqa_decode_split_kernel", "merge_splits_kernel", "_mla_decode_rows_kernel"):
        assert kernel_class(name) == "attention", name
    assert kernel_class("_gemv_kernel") == "gemm"
    assert kernel_class("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "gemm"
    assert kernel_class("triton_poi_fused_add_copy__0") == "other"
