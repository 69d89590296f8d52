"""Hydra multirun sweeps (issue 16): one directory and report per job, one summary for the sweep.

The sweep is the shipped `experiment=sweep_mla_rank`, shrunk to a random tiny Qwen3 on synthetic ids and
two latent ranks, through the real command line; its summary callback is the one the experiment configures.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ascend_edit import sweep
from tests.helpers.cli_runner import run_cli

RANKS = (8, 16)
ROPE = 8
LAYERS = 4  # conf/model/qwen3_tiny.yaml
TINY_SWEEP = [
    "experiment=sweep_mla_rank", "model=qwen3_tiny", "data=synthetic", "data.seq_len=32",
    "data.synthetic_sequences=16", "device=cpu", "device.threads=1", "target.calibration_batches=1",
    f"target.mla.qk_rope_head_dim={ROPE}", "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16",
    "distill.layerwise.steps=2", "distill.layerwise.warmup_steps=0",
    "distill.model_level.steps=2", "distill.model_level.warmup_steps=0", "eval.suite=false",
    "target.mla.kv_lora_rank=" + ",".join(map(str, RANKS)),  # replaces the experiment's ranks
]


def _has_submitit_launcher() -> bool:
    try:  # find_spec imports the parent package, which is absent too without the extra
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


needs_slurm_extra = pytest.mark.skipif(not _has_submitit_launcher(),
                                       reason="needs the `slurm` extra (pip install -e '.[slurm]')")


def cli(cwd: Path, *args: str, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("ASCEND_EDIT_DEBUG", None)
    return run_cli(args, cwd=cwd, env=env, timeout=600, fresh_interpreter=fresh_interpreter)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    result = cli(root, "-m", *TINY_SWEEP, f"hydra.sweep.dir={root / 'multirun'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "multirun"


def summary_rows(directory: Path) -> list[dict[str, str]]:
    with (directory / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_each_job_has_its_own_directory_and_report(sweep_dir: Path):
    for num, rank in enumerate(RANKS):
        job = sweep_dir / str(num)
        assert f"target.mla.kv_lora_rank={rank}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["target"]["mla"]["kv_lora_rank"] == rank
        assert (job / "converted" / "model.safetensors").is_file()
        report = json.loads((job / "report.json").read_text())
        assert list(report["results"])[-1] == "after_model_level"
        # MLA caches the latent and the shared rope key: (rank + rope) 16-bit values per token and layer.
        assert report["kv"]["converted_bytes_per_token"] == LAYERS * (rank + ROPE) * 2


def test_summary_table_has_one_row_per_job_with_its_numbers(sweep_dir: Path):
    rows = summary_rows(sweep_dir)
    assert [row["job"] for row in rows] == ["0", "1"]
    assert [row["target.mla.kv_lora_rank"] for row in rows] == [str(r) for r in RANKS]
    for row in rows:
        report = json.loads((sweep_dir / row["job"] / "report.json").read_text())
        final = report["results"]["after_model_level"]
        assert row["status"] == "ok" and row["stage"] == "model_level"
        for key in ("ppl", "teacher_kl", "top1_agreement"):
            assert float(row[key]) == pytest.approx(final[key], rel=1e-12), key
        assert float(row["teacher_ppl"]) == pytest.approx(report["results"]["teacher"]["ppl"], rel=1e-12)
        assert float(row["kv_bytes_per_token"]) == report["kv"]["converted_bytes_per_token"]
        assert float(row["kv_reduction_pct"]) == pytest.approx(report["kv"]["reduction_pct"])

    markdown = (sweep_dir / "summary.md").read_text().splitlines()
    table = [line for line in markdown if line.startswith("|")]
    assert table[0].startswith("| job | target.mla.kv_lora_rank | stage | ppl |")
    assert len(table) == 2 + len(RANKS)

    import matplotlib.image

    image = matplotlib.image.imread(sweep_dir / "summary.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_summary_of_an_unfinished_sweep_marks_the_missing_job(sweep_dir: Path, tmp_path: Path, capsys):
    copy = tmp_path / "partial"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("converted", "checkpoints", "stage-*", "summary.*"))
    (copy / "1" / "report.json").unlink()
    assert sweep.main([str(copy)]) == 0
    rows = summary_rows(copy)
    assert rows[0]["status"] == "ok" and float(rows[0]["ppl"]) > 0
    assert rows[1]["status"].startswith("no report.json") and rows[1]["ppl"] == ""
    assert "| 1 | 16 |" in capsys.readouterr().out


def test_summary_of_torn_or_non_finite_jobs_and_a_users_summary(sweep_dir: Path, tmp_path: Path, capsys):
    """A job whose report.json is cut short, or holds a null (non-finite) metric, is a row with its status and
    left out of the plot; a summary.md this module did not write is never replaced."""
    copy = tmp_path / "partial"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("converted", "checkpoints", "stage-*", "summary.*"))
    (copy / "1" / "report.json").write_text('{"results": {"after_')
    report = json.loads((copy / "0" / "report.json").read_text())
    stage = next(k for k in report["results"] if k.startswith("after_"))
    report["results"][stage]["ppl"] = None
    (copy / "0" / "report.json").write_text(json.dumps(report))
    assert sweep.main([str(copy)]) == 0
    rows = summary_rows(copy)
    assert rows[1]["status"].startswith("report.json unreadable")
    assert (copy / "summary.png").stat().st_size > 0
    (copy / "summary.md").write_text("my notes")
    assert sweep.main([str(copy)]) == 2
    assert "is not a sweep summary" in capsys.readouterr().err
    assert (copy / "summary.md").read_text() == "my notes"


def test_summary_of_a_missing_directory_is_a_one_line_error(tmp_path: Path, capsys):
    assert sweep.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and str(tmp_path / "nowhere") in err[0]


def composed_hydra(tmp_path: Path, *overrides: str) -> dict:
    result = cli(tmp_path, *overrides, "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)["hydra"]


def test_sweep_experiments_compose_with_their_grids_and_summary(tmp_path: Path):
    for name, params in (("sweep_mla_rank", {"target.mla.kv_lora_rank"}),
                         ("sweep_gate_swa", {"target.gate_swa.window", "target.gate_swa.full_every"})):
        hydra_cfg = composed_hydra(tmp_path, f"experiment={name}")
        assert set(hydra_cfg["sweeper"]["params"]) == params, name
        assert all(len(str(v).split(",")) >= 3 for v in hydra_cfg["sweeper"]["params"].values()), name
        assert hydra_cfg["callbacks"]["sweep_summary"]["_target_"] == "ascend_edit.sweep.SweepSummary"


@needs_slurm_extra
def test_slurm_launcher_composes(tmp_path: Path):
    hydra_cfg = composed_hydra(tmp_path, "experiment=sweep_mla_rank", "hydra/launcher=slurm",
                               "hydra.launcher.partition=gpu")
    launcher = hydra_cfg["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert hydra_cfg["callbacks"]["sweep_summary"]["_target_"] == "ascend_edit.sweep.SweepSummary"


@pytest.mark.slow  # two jobs in submitit's own processes: about a minute on a busy 2-core machine
@needs_slurm_extra
def test_sweep_through_submitit_writes_the_same_summary(tmp_path: Path):
    """submitit's local executor runs the Slurm launcher's code path (pickled job, results collected
    back in the submitting process, then the summary callback) without a cluster."""
    result = cli(tmp_path, "-m", *TINY_SWEEP, f"hydra.sweep.dir={tmp_path / 'multirun'}",
                 "hydra/launcher=submitit_local", fresh_interpreter=True)  # submitit pickles the job function
    assert result.returncode == 0, result.stderr[-3000:]
    rows = summary_rows(tmp_path / "multirun")
    assert [row["target.mla.kv_lora_rank"] for row in rows] == [str(r) for r in RANKS]
    assert all(row["status"] == "ok" for row in rows)


def test_a_sweep_into_someone_elses_directory_is_refused_before_writing(tmp_path: Path):
    """Single runs refused a non-empty foreign directory; a sweep wrote its jobs, multirun.yaml and summary over
    the user's files."""
    foreign = tmp_path / "notes"
    (foreign / "0").mkdir(parents=True)
    (foreign / "0" / "report.md").write_text("precious")
    (foreign / "summary.csv").write_text("mine")
    result = cli(tmp_path, "-m", *TINY_SWEEP, f"hydra.sweep.dir={foreign}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no ascend-edit sweep" in result.stderr.strip().splitlines()[-1]
    assert (foreign / "0" / "report.md").read_text() == "precious" and (foreign / "summary.csv").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == ["0", "summary.csv"]


def test_naming_hydras_own_job_subdirectory_keeps_the_reused_job_checks(sweep_dir: Path, tmp_path: Path):
    """`hydra.sweep.subdir=${hydra.job.num}` (Hydra's default, written out) once switched the checks off: another
    task's sweep rewrote a conversion's saved config."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    before = (copy / "0" / ".hydra" / "config.yaml").read_text()
    result = cli(tmp_path, "-m", "inspect", *TINY_SWEEP, f"hydra.sweep.dir={copy}", "hydra.sweep.subdir=${hydra.job.num}")
    assert result.returncode == 2 and "holds a task=convert run" in result.stderr
    assert (copy / "0" / ".hydra" / "config.yaml").read_text() == before


@pytest.mark.parametrize("damage", ["overrides", "report_list", "report_null_kv", "report_null_seconds"])
def test_a_job_killed_while_writing_is_listed_with_a_status(sweep_dir: Path, tmp_path: Path, damage: str):
    """A cut overrides.yaml or an incomplete report.json gave a traceback and no summary at all."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    job = copy / "1"
    report = json.loads((job / "report.json").read_text())
    if damage == "overrides":
        (job / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    elif damage == "report_list":
        (job / "report.json").write_text("[1, 2]")
    else:
        report["kv" if damage == "report_null_kv" else "train_seconds"] = (
            None if damage == "report_null_kv" else {"layerwise": None})
        (job / "report.json").write_text(json.dumps(report))
    jobs = {j.name: j for j in sweep.collect(copy)}
    assert jobs["0"].status == "ok"
    if damage == "report_null_kv":  # no KV figures: the row is kept, its KV cells empty
        assert jobs["1"].status == "ok" and jobs["1"].metrics["kv_bytes_per_token"] is None
    else:
        assert jobs["1"].status in (".hydra/overrides.yaml unreadable (cut short)", "report.json incomplete")
    sweep.write_summary(copy)  # the whole table is still written
    assert (copy / "summary.md").read_text().count("\n|") >= 3


def test_summary_counts_no_set_aside_run_and_never_replaces_a_users_csv(sweep_dir: Path, tmp_path: Path, capsys):
    """A restarted job's earlier run (moved into `<job>/replaced-<time>/`, with its .hydra) was listed as a job of
    the sweep; a user's summary.csv / summary.png beside no summary.md was overwritten."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("converted", "checkpoints", "stage-*", "summary.*"))
    jobs = len(sweep.collect(copy))
    shutil.copytree(copy / "0" / ".hydra", copy / "0" / "replaced-20261206T000000" / ".hydra")
    assert len(sweep.collect(copy)) == jobs
    (copy / "summary.csv").write_text("mine")
    assert sweep.main([str(copy)]) == 2
    assert "summary.csv exists and is not part of a sweep summary" in capsys.readouterr().err
    assert (copy / "summary.csv").read_text() == "mine" and not (copy / "summary.md").exists()


def test_a_restarted_jobs_earlier_report_is_not_listed_as_its_result(sweep_dir: Path, tmp_path: Path):
    """A job restarted with other settings in a resumed sweep kept its earlier attempt's report.json until it
    finished: the summary listed those numbers as `ok` while it ran, and after it was stopped."""
    copy = tmp_path / "restarted"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("converted", "checkpoints", "stage-*", "summary.*"))
    assert [job.status for job in sweep.collect(copy)] == ["ok"] * len(sweep.collect(copy))
    report = json.loads((copy / "0" / "report.json").read_text())
    assert report["overrides"]  # each job's report says which settings wrote it
    (copy / "0" / ".hydra" / "overrides.yaml").write_text("- distill.model_level.steps=400\n")  # the restart's
    jobs = {job.name: job for job in sweep.collect(copy)}
    assert jobs["0"].status.startswith("report.json is from an earlier attempt with other settings")
    assert jobs["1"].status == "ok"
