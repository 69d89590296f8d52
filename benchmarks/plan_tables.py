"""The per-rank memory table of docs/scaling.md: `plan` for the mission recipes on 8, 16 and 64 × 910B 64 GB.

Predictions only (arithmetic on shapes, no device): each real-checkpoint recipe (`qwen3_8b_mla`, ...) is
composed with the random-weight model of the same shapes, so no checkpoint is needed, and planned on
`cluster=910b_64g` with 1, 2 and 8 nodes of 8 devices. Prints a Markdown table.

    python benchmarks/plan_tables.py
"""
from __future__ import annotations

from hydra import compose, initialize_config_module

from ascend_edit.config import register_configs, to_typed
from ascend_edit.tasks.plan import plan_run

RECIPES = [("Qwen3-8B", "qwen3_8b", "qwen3_8b_shape"), ("Qwen3-30B-A3B", "qwen3_30b_a3b", "qwen3_30b_a3b_shape")]
TARGETS = ("mla", "gate_swa")
NODES = (1, 2, 8)


def main() -> None:
    register_configs()
    print("| model | target | devices | stage | engine | micro | frozen | targets | activations | other | total |"
          " largest micro | tok/s/device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, prefix, shape_model in RECIPES:
        for target in TARGETS:
            for nodes in NODES:
                overrides = [f"experiment={prefix}_{target}", f"model={shape_model}", "data=synthetic",
                             "cluster=910b_64g", f"cluster.nodes={nodes}", "output_dir=."]
                with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
                    cfg = to_typed(compose(config_name="config", overrides=overrides))
                engine = f"ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "torch"
                for s in plan_run(cfg):
                    p = s["parts_gib"]
                    targets = p["target weights"] + p["fp32 masters"] + p["optimizer states"] + p["gradients"]
                    other = p["KD loss chunk"] + p["feature states"] + p["comm buffers"]
                    print(f"| {label} | {target} | {s['world_size']} | {s['stage']} | {engine} | {s['micro_batch']} |"
                          f" {p['frozen weights'] + p['teacher copy']:.1f} | {targets:.1f} | {p['activations']:.1f} | {other:.1f} |"
                          f" **{s['total_gib']:.1f}** | {s['largest_micro_batch']} |"
                          f" {s['tokens_per_s_per_device']:,.0f} |")


if __name__ == "__main__":
    main()
