"""`ascend-edit inspect`: the per-layer plan, parameter counts and KV-cache table, without training."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ascend_edit.config import RootConfig
from ascend_edit.eval.kv import kv_table
from ascend_edit.models.build import edited_shape_model
from ascend_edit.models.surgery import parameter_counts, set_trainable


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return str(n)


def run(cfg: RootConfig) -> dict:
    model = edited_shape_model(cfg.model, cfg.target)
    set_trainable(model, cfg.distill.layerwise.trainable)
    counts = parameter_counts(model)
    bytes_per_value = 4 if cfg.model.dtype == "fp32" else 2
    table = kv_table(model, cfg.eval.context, bytes_per_value)
    console = Console()

    plan = Table(title=f"Layer plan ({model.config.model_type}, {len(model.edit_plan)} layers)")
    for col in ("layer", "target", "teacher KV/token", "converted KV/token", f"held at {cfg.eval.context:,} tokens"):
        plan.add_column(col, justify="right")
    for entry, (t, s) in zip(model.edit_plan, table["layers"]):
        plan.add_row(str(entry.layer_idx), entry.kind, f"{t.values_per_token * bytes_per_value:,} B",
                     f"{s.values_per_token * bytes_per_value:,} B", f"{s.tokens_held(cfg.eval.context):,}")
    console.print(plan)

    params = Table(title="Parameters")
    params.add_column("group")
    params.add_column("count", justify="right")
    for key in ("target", "teacher_attention", "shared", "trainable"):
        params.add_row(key, f"{counts[key]:,}")
    console.print(params)

    kv = Table(title=f"KV cache per sequence ({'fp32' if bytes_per_value == 4 else '16-bit'} values)")
    for col in ("", "bytes/token (all layers)", f"total at {cfg.eval.context:,} tokens"):
        kv.add_column(col, justify="right")
    kv.add_row("teacher", _fmt_bytes(table["teacher_bytes_per_token"]), _fmt_bytes(table["teacher_total_bytes"]))
    kv.add_row("converted", _fmt_bytes(table["converted_bytes_per_token"]), _fmt_bytes(table["converted_total_bytes"]))
    kv.add_row("reduction", f"{table['reduction_pct']:.1f} %", f"{table['reduction_pct']:.1f} %")
    console.print(kv)
    return {"params": counts, "kv": {k: v for k, v in table.items() if k != "layers"}}
