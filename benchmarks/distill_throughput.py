"""Single-device throughput of stage 1 and stage 2 against what a user writes by hand.

Baseline ("plain"): transformers + PyTorch as commonly written — a frozen deep copy of the teacher,
a student whose attention modules are the (same) target and the only trainable parameters, and a
full-vocabulary KL on materialised logits (`F.kl_div` on fp32 log-softmaxes).

ascend_edit: one model with EditedAttention (non-attention weights shared), stage 1 = layer-wise
objective (no LM head), stage 2 = model-level objective with the chunked KD loss.

FLOPs per step (the same formula for every row, so MFU ratios are speed ratios):
  matmul forward of a pass  = 2 · tokens · (non-embedding params + vocab · hidden)
  attention scores forward  = 2 · 2 · layers · heads · head_dim · tokens² / 2 (causal)
  stage 2 = teacher forward + student forward + student backward (2× forward: input and weight grads)
  stage 1 = teacher forward (no LM head) + target forward/backward (3× the target's own matmuls)
MFU = FLOPs / (step time · measured bf16 matmul peak).

Usage: python benchmarks/distill_throughput.py [--model qwen3_1p7b_shape] [--seq 4096] [--small]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import time

import torch
import torch.nn.functional as F

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import ModelLevelObjective
from ascend_edit.models.loading import build_from_config
from ascend_edit.models.surgery import build_plan, edit_model, set_mode, set_trainable
from ascend_edit.train.compile import compile_dense_blocks, compile_whole_layers

SHAPES = {
    "qwen3_1p7b_shape": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                             max_position_embeddings=40960),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024),
}


def targets(small: bool) -> dict[str, TargetConfig]:
    mla = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16) if small else MLAConfig()
    return {
        "mla": TargetConfig(kind="mla", init="random", mla=mla),
        "gate_swa": TargetConfig(kind="gate_swa", init="random",
                                 gate_swa=GateSWAConfig(window=16 if small else 1024, full_every=4)),
    }


def step_flops(shape: dict, tokens: int, stage: str, target_params: int) -> float:
    h, L, V = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    body = 2 * tokens * (L * (3 * h * shape["intermediate_size"]
                              + h * shape["head_dim"] * (2 * shape["num_attention_heads"]
                                                         + 2 * shape["num_key_value_heads"])))
    head = 2 * tokens * V * h
    attn = 2 * L * shape["num_attention_heads"] * shape["head_dim"] * tokens * tokens  # causal QK^T + PV
    forward = body + head + attn
    if stage == "model_level":
        return forward + forward + 2 * forward
    teacher = body + attn
    target = 2 * tokens * target_params + attn
    return teacher + 3 * target


def timed(step, warmup: int, iters: int, device) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize() if device.type == "cuda" else None
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def plain_baseline(teacher, target_cfg, batch, device):
    """The hand-written version: teacher copy + student copy with target attention, full-vocab KL."""
    student = copy.deepcopy(teacher)
    edit_model(student, build_plan(student.config.num_hidden_layers, target_cfg), target_cfg)
    set_mode(student, "student")
    for layer in student.model.layers:  # drop the wrapper's teacher copy: a plain student
        layer.self_attn = layer.self_attn.target
    student.requires_grad_(False)
    params = []
    for layer in student.model.layers:
        layer.self_attn.requires_grad_(True)
        params += list(layer.self_attn.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        s_logits = student(input_ids=batch, use_cache=False).logits
        loss = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                        log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, student


def ours(model, objective, batch):
    params = set_trainable(model, "target")
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = {"input_ids": batch, "position_ids": torch.arange(batch.shape[1], device=batch.device)[None],
            "loss_mask": torch.ones_like(batch, dtype=torch.bool)}

    def step():
        loss, _ = objective(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3_1p7b_shape")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=780.0, help="measured bf16 matmul peak")
    parser.add_argument("--targets", default="mla,gate_swa")
    parser.add_argument("--small", action="store_true", help="tiny CPU smoke run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    small = args.small
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES["small" if small else args.model]
    seq = 64 if small else args.seq
    torch.manual_seed(0)
    teacher = build_from_config("qwen3", shape, dtype).to(device)
    teacher.set_attn_implementation("sdpa")
    teacher.requires_grad_(False)
    batch = torch.randint(0, shape["vocab_size"], (1, seq), device=device)
    rows = []
    for name in args.targets.split(","):
        tcfg = targets(small)[name]
        step, student = plain_baseline(teacher, tcfg, batch, device)
        target_params = sum(p.numel() for l in student.model.layers for p in l.self_attn.parameters())
        sec, peak = timed(step, 2, args.iters, device)
        rows.append(("plain (copy + full-vocab KL)", name, "model_level", sec, peak,
                     step_flops(shape, seq, "model_level", target_params)))
        del student, step
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

        for compiled in ("", "blocks", "layers")[: 3 if name == "mla" else 2]:
            model = edit_model(copy.deepcopy(teacher), build_plan(shape["num_hidden_layers"], tcfg), tcfg)
            if compiled == "blocks":
                compile_dense_blocks(model)
            elif compiled == "layers":
                compile_whole_layers(model)
            label = "ascend_edit" + (f" + compile {compiled}" if compiled else "")
            for stage, objective in (("model_level", ModelLevelObjective(chunk_size=512)),
                                     ("layerwise", LayerwiseObjective("nmse"))):
                step, trainable = ours(model, objective, batch)
                sec, peak = timed(step, 3, args.iters, device)
                rows.append((label, name, stage, sec, peak, step_flops(shape, seq, stage, trainable)))
            del model, step
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    print(f"\n{args.model if not small else 'small'}, seq {seq}, batch 1, {dtype}, {device}"
          f" ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")
    print(f"{'pipeline':30s} {'target':9s} {'stage':12s} {'tok/s':>9s} {'peak GiB':>9s} {'MFU %':>6s}")
    results = []
    for pipeline, target, stage, sec, peak, flops in rows:
        mfu = 100 * flops / sec / (args.peak_tflops * 1e12)
        print(f"{pipeline:30s} {target:9s} {stage:12s} {seq / sec:9,.0f} {peak:9.1f} {mfu:6.1f}")
        results.append(dict(pipeline=pipeline, target=target, stage=stage, tokens_per_s=seq / sec, peak_gib=peak,
                            mfu_pct=mfu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
