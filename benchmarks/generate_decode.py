"""Decode time per token through transformers' own `generate(cache_implementation="static")`, the path a user
calls, with or without `prepare_for_decode` (models/decode_fusion.py). One model and one variant per process
(run it twice for plain vs prepared: each measured fresh).

The model is an exported checkpoint (`--checkpoint DIR`, remote code only with `--trust-remote-code`) or the
in-repo converted model of a `bench_decode` shape with random weights (`--model qwen3_8b_shape --kind mla`).
On CUDA transformers compiles the decode forward itself (static cache: `torch.compile`, reduce-overhead);
prefill stays eager. Per-token time = (time of `--long` new tokens - time of `--short`) / (long - short), so
prefill cancels. `--short 1` (default) is prefill alone: no decode step, so only the `--long` cache length
is ever compiled (the static cache is sized per call; a second length would recompile, possibly with
dynamic shapes). Each length is generated once first (compile) and not timed; median and [min-max] over
`--repeats`. Prints one table row.

    python benchmarks/generate_decode.py --model qwen3_8b_shape --kind mla --device cuda --variant plain
    python benchmarks/generate_decode.py --model qwen3_8b_shape --kind mla --device cuda --variant prepared
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def load_model(args: argparse.Namespace, device: torch.device):
    if args.checkpoint:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype),
                                                     trust_remote_code=args.trust_remote_code).to(device)
        return model.eval().requires_grad_(False)
    from ascend_edit.tasks import bench_decode as bd

    argv = ["--model", args.model, "--kinds", args.kind, "--device", device.type]
    if args.target_override:
        argv += ["--target-override", *args.target_override]
    settings = bd.settings_from_args(bd.parse_args(argv))
    return bd.build_model(settings, args.kind, device)  # eval, no grad, no decode transforms


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             cache_implementation="static")
    synchronize(ids.device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an exported checkpoint directory")
    source.add_argument("--model", help="a bench_decode model shape (conf/model), built with random weights")
    p.add_argument("--kind", default="mla", choices=("teacher", "mla", "gate_swa"), help="with --model")
    p.add_argument("--target-override", nargs="*", default=[], help="with --model: as bench_decode's "
                   "(target.mla.kv_lora_rank=16 ...), for tiny shapes")
    p.add_argument("--trust-remote-code", action="store_true", help="auto_map checkpoints")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="with --checkpoint")
    p.add_argument("--variant", default="prepared", choices=("plain", "prepared"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens")
    p.add_argument("--short", type=int, default=1)
    p.add_argument("--long", type=int, default=72)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not 0 < args.short < args.long or min(args.batch, args.context, args.repeats) < 1:
        p.error("need 0 < --short < --long and positive --batch, --context, --repeats")

    device = torch.device(args.device)
    model = load_model(args, device)
    summary = "-"
    if args.variant == "prepared":
        from ascend_edit.models.decode_fusion import prepare_for_decode

        summary = prepare_for_decode(model, tune_rows=(args.batch,)).summary()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    for n in (args.short, args.long):  # compiles (and the kernel's autotuning) happen here, untimed
        timed_generate(model, ids, n)
    per_token = []
    for _ in range(args.repeats):
        short = timed_generate(model, ids, args.short)
        long = timed_generate(model, ids, args.long)
        per_token.append((long - short) / (args.long - args.short) * 1e3)
    name = args.checkpoint or f"{args.model} {args.kind}"
    print("| model | variant | batch | context | ms / decode step, median [min-max] | tokens/s per sequence |")
    print("|---|---|---:|---:|---:|---:|")
    median = statistics.median(per_token)
    print(f"| {name} | {args.variant} | {args.batch} | {args.context} | {median:.2f} "
          f"[{min(per_token):.2f}-{max(per_token):.2f}] | {1e3 / median:.0f} |")
    print(f"{summary}; device {device}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
