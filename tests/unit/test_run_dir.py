"""Two runs never share a run directory, and Hydra's layout (`.hydra/` inside) is kept."""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from ascend_edit.cli import shared_run_dir_override
from ascend_edit.run_dir import make_unique_run_dir, register_run_dir_resolver
from tests.helpers.cli_runner import start

FROZEN = datetime(2026, 12, 1, 9, 30, 15, 123456)


def test_same_instant_gives_distinct_directories(tmp_path):
    first = make_unique_run_dir(str(tmp_path), FROZEN)
    second = make_unique_run_dir(str(tmp_path), FROZEN)
    third = make_unique_run_dir(str(tmp_path), FROZEN)
    assert first == str(tmp_path / "2026-12-01" / "09-30-15.123")
    assert [second, third] == [first + "-1", first + "-2"]
    assert all(Path(d).is_dir() for d in (first, second, third))


def test_an_existing_directory_is_never_reused(tmp_path):
    taken = tmp_path / "2026-12-01" / "09-30-15.123"
    taken.mkdir(parents=True)
    (taken / "metrics.jsonl").write_text("another run's metrics\n")
    made = make_unique_run_dir(str(tmp_path), FROZEN)
    assert made != str(taken) and os.listdir(made) == []
    assert (taken / "metrics.jsonl").read_text() == "another run's metrics\n"


def test_resolver_resolves_once_per_config(tmp_path):
    register_run_dir_resolver()
    cfg = OmegaConf.create({"dir": "${unique_run_dir:" + str(tmp_path) + "}"})
    assert cfg.dir == cfg.dir  # cached: a second read does not make a second directory
    other = OmegaConf.create({"dir": "${unique_run_dir:" + str(tmp_path) + "}"})
    assert other.dir != cfg.dir
    assert len(list(tmp_path.glob("*/*"))) == 2


def test_two_runs_started_together_get_two_directories(tmp_path):
    args = ["inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16", "eval.context=64"]
    jobs = [start(args, cwd=tmp_path) for _ in range(2)]  # forked together: the same second, as a race needs
    for job in jobs:
        done = job.wait(timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 2, runs
    for run in runs:  # Hydra's layout, each with its own config
        assert (run / ".hydra" / "config.yaml").is_file()


def test_launcher_ranks_still_share_one_directory():
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job7"}
    assert shared_run_dir_override([], env) == ["hydra.run.dir=runs/dist-job7"]
