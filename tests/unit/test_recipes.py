"""Every shipped experiment recipe composes and validates (no model is built), states its micro-batch and
activation-checkpointing policy, and the mission recipes fit their planned hardware per `plan`."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ascend_edit.config import register_configs, to_typed

CONF = Path(__file__).resolve().parents[2] / "conf"
RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MISSION = [f"qwen3_{m}_{t}{v}" for m in ("8b", "30b_a3b") for t in ("mla", "gate_swa") for v in ("", "_shape")]
# Recipes that need a user's paths; placeholders are enough to compose them.
PATHS = ["model.path=/models/teacher", "data.path=/data/corpus"]


def composed(recipe: str, extra=()):
    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={recipe}", "output_dir=.", *extra])
        needs = {"model": cfg.model.source == "hf", "data": cfg.data.source == "files"}
        overrides = [o for o in PATHS if needs[o.split(".")[0]]]
        return to_typed(compose(config_name="config",
                                overrides=[f"experiment={recipe}", "output_dir=.", *overrides, *extra]))


def test_every_mission_recipe_ships():
    assert set(MISSION) <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_with_explicit_micro_batch(recipe):
    cfg = composed(recipe)
    for stage in (cfg.distill.layerwise, cfg.distill.model_level):
        assert stage.micro_batch_size > 0, f"{recipe}: every shipped recipe states its micro-batch"


@pytest.mark.parametrize("recipe", MISSION)
def test_mission_recipe_fits_its_cluster_by_plan(recipe):
    """Each recipe fits its cluster per plan, with its own checkpointing (a recipe without any, such as the
    offloaded 8B MLA one, fits by plan's no-checkpointing activations). ~1 s each: the models are meta."""
    from ascend_edit.tasks.plan import plan_run

    cfg = composed(recipe, ["model=qwen3_8b_shape" if "8b" in recipe else "model=qwen3_30b_a3b_shape"])
    for summary in plan_run(cfg):
        assert summary["fits"], f"{recipe} {summary['stage']}: {summary['total_gib']:.1f} GiB > {summary['usable_gib']:.1f}"


def test_recipe_headers_show_a_command_that_works():
    for path in (CONF / "experiment").glob("*.yaml"):
        assert "+experiment=" not in path.read_text(), f"{path.name}: `+experiment=` fails (the group has a default)"
