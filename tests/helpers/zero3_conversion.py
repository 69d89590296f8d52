"""One process (gloo, world size 1): convert a tiny MoE teacher loaded whole and the same teacher loaded ZeRO-3
partitioned (models/zero3.py), then print what tests/unit/test_zero3_loading.py compares, as JSON.

    python -m tests.helpers.zero3_conversion <checkpoint dir> <free port>
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from ascend_edit.config import MLAConfig, ModelConfig, TargetConfig
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model, edited_attentions
from ascend_edit.models.zero3 import full_numel, gathered, install_gathered_forward, is_partitioned, zero3_init_config

TARGET = TargetConfig(kind="mla", calibration_batches=1,
                      mla=MLAConfig(kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))


def batches(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 32), generator=generator)
    return [{"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32)}]


def convert(model, data, gather=None):
    stats = collect_layer_stats(model, data)
    torch.manual_seed(0)  # a random part of an initialisation draws the same numbers in both runs
    edit_model(model, build_plan(model.config.num_hidden_layers, TARGET), TARGET, stats, gather=gather)
    with torch.no_grad():
        logits = model(input_ids=data[0]["input_ids"], position_ids=data[0]["position_ids"]).logits
    targets = {f"{i}.{name}": p.detach().clone() for i, edited in enumerate(edited_attentions(model))
               for name, p in edited.target.named_parameters()}
    return stats, targets, logits


def engine_step(model, data) -> dict:
    """One stage-2 step of the partitioned, converted model in a ZeRO-3 engine (which removes the gather hooks
    and partitions the new targets), then `close` (every parameter whole again)."""
    from ascend_edit.config import EngineConfig, ModelLevelConfig
    from ascend_edit.device import resolve_device
    from ascend_edit.distill.model_level import model_level_objective
    from ascend_edit.models.surgery import set_trainable
    from ascend_edit.train.engine import make_engine

    stage = ModelLevelConfig(steps=2, warmup_steps=0, batch_size=2)
    params = set_trainable(model, "target")
    engine = make_engine(model, model_level_objective(model, stage), params, stage,
                         EngineConfig(kind="deepspeed", zero_stage=3), accumulation=1, micro_batch=2, world_size=1,
                         device=resolve_device("cpu", dtype="fp32"))
    batch = {**data[0], "labels": data[0]["input_ids"], "loss_mask": torch.ones_like(data[0]["input_ids"]).bool()}
    loss, _ = engine.forward(batch)
    engine.backward(loss)
    engine.micro_step()
    norm = engine.step()
    # the plain targets became ZeRO-3 parameters (small ones stay resident: DeepSpeed's persistence threshold)
    targets_zero = all(hasattr(p, "ds_numel") for p in params)
    engine.close()
    return {"engine_loss": float(loss.detach()), "engine_grad_norm": norm, "engine_targets_zero_params": targets_zero,
            "whole_after_close": not any(is_partitioned(p) for p in model.parameters())}


def main(checkpoint: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = ModelConfig(source="hf", path=checkpoint, dtype="fp32")

    whole, _ = load_teacher(cfg)
    whole_values = sum(p.numel() for p in whole.parameters())
    data = batches(whole.config.vocab_size)
    stats_w, targets_w, logits_w = convert(whole, data)

    part, _ = load_teacher(cfg, zero3=zero3_init_config(torch.float32))
    params = list(part.parameters())
    loaded = {"parameters": len(params), "partitioned": sum(is_partitioned(p) for p in params),
              "resident_values": sum(p.numel() for p in params), "full_values": sum(full_numel(p) for p in params),
              "whole_values": whole_values}
    install_gathered_forward(part)
    stats_p, targets_p, logits_p = convert(part, data, gather=gathered)
    teacher_params = [p for name, p in part.named_parameters() if ".target." not in name]
    teacher_still_partitioned = all(is_partitioned(p) for p in teacher_params)
    engine = engine_step(part, data)
    result = {
        "loaded": loaded,
        "teacher_still_partitioned": teacher_still_partitioned,
        **engine,
        "teacher_after_close_max_abs_diff": max(
            (dict(whole.named_parameters())[name] - p).abs().max().item()
            for name, p in part.named_parameters() if ".target." not in name),
        "target_names_equal": sorted(targets_w) == sorted(targets_p),
        "targets": len(targets_w),
        "target_max_abs_diff": max((targets_w[k] - targets_p[k]).abs().max().item() for k in targets_w),
        "stats_max_abs_diff": max((stats_w[i].input_cov - stats_p[i].input_cov).abs().max().item() for i in stats_w),
        "logits_max_abs_diff": (logits_w - logits_p).abs().max().item(),
        "logits_scale": logits_w.abs().max().item(),
    }
    print("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
