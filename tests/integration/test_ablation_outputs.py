"""`ascend-edit ablation` keeps each trained variant's training log, never writes over a conversion's run, and a
resume it refuses leaves the run's saved config as it was."""
from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_bad_inputs import cli, one_line_error

TINY = ["experiment=tiny", "eval.suite=false"]


def stage_steps(log: Path) -> list[tuple[str, int]]:
    return [(r["stage"], r["step"]) for r in map(json.loads, log.read_text().splitlines())]


def test_each_variant_keeps_its_own_training_log(tmp_path):
    """Both variants train a model_level stage: in one metrics.jsonl the second trimmed every line of the first
    (and purged its TensorBoard steps), so the stage-2-only curve was lost."""
    run = tmp_path / "abl"
    done = cli("ablation", *TINY, f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert stage_steps(run / "ablation-stage2-only" / "metrics.jsonl") == [("model_level", s) for s in range(1, 9)]
    assert stage_steps(run / "ablation-stage1+2" / "metrics.jsonl") == (
        [("layerwise", s) for s in range(1, 5)] + [("model_level", s) for s in range(1, 5)])
    assert not (run / "metrics.jsonl").exists()
    saved = (run / ".hydra" / "config.yaml").read_text()
    # a resume with a key that cannot change mid-run is refused before Hydra rewrites the run's config
    one_line_error(cli("ablation", *TINY, "distill.model_level.lr=1e-3", f"hydra.run.dir={run}", cwd=tmp_path),
                   "distill.model_level.lr")
    assert (run / ".hydra" / "config.yaml").read_text() == saved


def test_a_conversion_run_is_never_an_ablations_output_dir(tmp_path):
    conversion = tmp_path / "conv"
    done = cli(*TINY, f"hydra.run.dir={conversion}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    before = (conversion / "metrics.jsonl").read_text()
    one_line_error(cli("ablation", *TINY, f"output_dir={conversion}", f"hydra.run.dir={tmp_path / 'h'}",
                       cwd=tmp_path), f"output_dir={conversion} holds a task=convert run")
    assert (conversion / "metrics.jsonl").read_text() == before
    assert not any(conversion.glob("ablation*"))
