"""CPU proxy of a compiled decode step's kernel count, per layer kind (MLA, GateSWA sliding, GateSWA full).

At batch 1 on a GPU every kernel of the compiled decode step costs a launch (a CUDA-graph node) whatever its
size, so the number of separate kernels a layer adds is what its non-GEMM ops cost. This script measures that
number on CPU, where inductor generates C++ instead of Triton. It is a proxy: the C++ backend fuses more
(horizontally, across shapes) than Triton does, so (b) is a lower bound on the GPU's kernels and (a) -- the ops
the step asks for -- is the steadier measure of what a change removes.

(a) ops in the FX graph dynamo captures: a `torch.compile(backend=callable)` backend counts the graph's
    `call_function` / `call_method` targets, attributing each to its decoder layer by the node's module stack
    (mean per layer of the 4-layer model; the once-per-step work of a layer group is spread over its layers).
    That backend runs the graph as traced: inductor's compile function is private and a `torch.compile` nested
    in a backend runs uncompiled, so a second decoder compiled with `backend="inductor"` on the same model
    (the same single graph, `fullgraph=True`; its tokens are checked equal) gives (b);
(b) kernels inductor generates for the whole step: the `cpp_fused_*` kernels plus the calls it leaves to
    library / fallback ops (`extern_kernels.*`, `torch.ops.*`: GEMMs, SDPA), read from the step's generated
    wrapper code in a fresh `TORCHINDUCTOR_CACHE_DIR` (inductor's documented cache-directory variable). Per
    layer kind they come from two models of 2 and 4 layers of that kind alone: (kernels(4) - kernels(2)) / 2.

The model is a small Qwen3 shape (hidden 256, 8 query / 2 KV heads of 32, vocab 512) converted at random
(nothing downloaded), run through `StaticDecoder(mode="compile")` with the inductor backend on CPU.

    python benchmarks/decode_graph_ops.py                    # the per-layer table (6 small compiles, ~2-4 min)
    python benchmarks/decode_graph_ops.py --ops              # also the per-layer op histogram of each kind
    python benchmarks/decode_graph_ops.py --json out.json    # everything as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch

from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.loading import build_from_config
from ascend_edit.models.static_decode import StaticDecoder
from ascend_edit.models.surgery import build_plan, edit_model

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             vocab_size=512, max_position_embeddings=1024)
WINDOW, SINKS, PROMPT, MAX_LEN = 16, 4, 40, 64  # the prompt is past the window: the ring has wrapped
KINDS = {
    "gate_swa sliding": lambda layers: TargetConfig(
        kind="gate_swa", init="random", gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS)),
    "gate_swa full": lambda layers: TargetConfig(
        kind="gate_swa", init="random",
        gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_layers=list(range(layers)))),
    "mla": lambda layers: TargetConfig(
        kind="mla", init="random",
        mla=MLAConfig(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)),
}
LAYER = re.compile(r"layers[._](\d+)")
# Ops that move no data (views, shape queries, Python-side getitem of tuples) are listed but not summed.
NO_DATA = {"view", "reshape", "transpose", "unsqueeze", "squeeze", "getitem", "size", "dim", "expand", "permute",
           "t", "unflatten", "flatten", "split", "chunk", "narrow", "select", "dtype"}


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def node_layer(node: torch.fx.Node) -> int | None:
    """The decoder layer a node was traced in (its innermost `layers.N` module), None outside every layer."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        found = LAYER.findall(str(path))
        if found:
            return int(found[-1])
    return None


class CountingBackend:
    """A torch.compile backend that counts the captured graph's ops per layer and runs the graph as traced.

    Inductor is not called from here: its compile function is private, and a `torch.compile` nested in a
    backend's returned callable runs uncompiled (dynamo is off while a compiled graph runs). The kernels are
    counted from a second decoder compiled with `backend="inductor"` on the same model, which captures the same
    graph (one graph per step, `fullgraph=True`).
    """

    def __init__(self):
        self.graphs = 0
        self.per_layer: dict[int | None, Counter[str]] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method"):
                self.per_layer.setdefault(node_layer(node), Counter())[op_name(node)] += 1
        return gm.forward


def count_generated(paths: set[Path]) -> dict[str, int]:
    """Kernels in the generated wrapper modules among `paths`: fused C++ kernels and extern / fallback calls.

    Only the wrappers that `call` compiled kernels count (one per compiled graph); the kernels are counted by the
    calls the wrapper makes, i.e. per decode step.
    """
    fused = extern = 0
    for path in paths:
        text = path.read_text(errors="replace")
        if "def call(" not in text:
            continue
        body = text[text.index("def call("):]
        fused += len(re.findall(r"^\s+cpp_fused_\w+\(", body, flags=re.M))
        extern += len(re.findall(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", body, flags=re.M))
    return {"fused": fused, "extern": extern, "kernels": fused + extern}


def build(kind: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_from_config("qwen3", {**SHAPE, "num_hidden_layers": layers})
    model.set_attn_implementation("sdpa")
    cfg = KINDS[kind](layers)
    edit_model(model, build_plan(layers, cfg), cfg)
    return model.eval()


@torch.no_grad()
def measure(kind: str, layers: int, batch: int) -> dict:
    """Compile one decode step of a `layers`-layer model of `kind`; its graph ops and generated kernels."""
    model = build(kind, layers)
    backend = CountingBackend()
    cache_dir = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    before = set(cache_dir.rglob("*.py"))
    lengths = [PROMPT - 3 * row for row in range(batch)]  # rows of different lengths, left-padded
    ids = torch.randint(3, SHAPE["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0] * (PROMPT - n) + [1] * n for n in lengths])
    tokens = []
    for compiler in (backend, "inductor"):
        decoder = StaticDecoder(model, batch, MAX_LEN, mode="compile", compile_mode="default", backend=compiler)
        tokens.append([decoder.prefill(ids, mask), *(decoder.step() for _ in range(2))])
        torch.compiler.reset()
    assert all(torch.equal(a, b) for a, b in zip(*tokens)), "the inductor step disagrees with the traced graph"
    generated = count_generated(set(cache_dir.rglob("*.py")) - before)
    torch.compiler.reset()
    ops = {str(k): dict(v) for k, v in backend.per_layer.items()}
    return {"kind": kind, "layers": layers, "graphs": backend.graphs, "generated": generated, "ops": ops}


def data_ops(counter: dict[str, int]) -> int:
    return sum(n for name, n in counter.items() if name not in NO_DATA)


def per_layer_summary(small: dict, large: dict) -> dict:
    """Per layer of the kind: the difference between the 4- and the 2-layer model, halved."""
    extra = large["layers"] - small["layers"]
    kernels = {k: (large["generated"][k] - small["generated"][k]) / extra for k in ("fused", "extern", "kernels")}
    layer_ops = [Counter(large["ops"][str(i)]) for i in range(large["layers"]) if str(i) in large["ops"]]
    mean = Counter()
    for counter in layer_ops:
        mean.update(counter)
    ops = {name: n / max(len(layer_ops), 1) for name, n in sorted(mean.items(), key=lambda kv: -kv[1])}
    return {"kernels": kernels, "ops": ops, "graph_ops": sum(ops.values()), "data_ops": data_ops(ops),
            "step_kernels": large["generated"]["kernels"], "graphs": large["graphs"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--ops", action="store_true", help="print each kind's per-layer op histogram")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="decode_graph_ops_") as tmp:
        # Inductor reads its cache directory once per process: a fresh one, so every kernel is generated
        # (none read from an earlier run's cache) and each compile's new wrapper files are told apart.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        for kind in args.kinds:
            small, large = measure(kind, 2, args.batch), measure(kind, 4, args.batch)
            summary[kind] = per_layer_summary(small, large)
    print(f"\ncompiled decode step on CPU (inductor), batch {args.batch}, window {WINDOW} + {SINKS} sinks, "
          f"prompt {PROMPT} (past the window), max_cache_len {MAX_LEN}")
    print("| layer kind | FX ops / layer | data-moving ops / layer | kernels / layer (fused + extern) "
          "| step kernels, 4 layers | graphs / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, row in summary.items():
        k = row["kernels"]
        print(f"| {kind} | {row['graph_ops']:.0f} | {row['data_ops']:.0f} | {k['kernels']:.1f} "
              f"({k['fused']:.1f} + {k['extern']:.1f}) | {row['step_kernels']} | {row['graphs']} |")
    if args.ops:
        for kind, row in summary.items():
            print(f"\n{kind}: ops per layer: " + ", ".join(f"{name} {n:g}" for name, n in row["ops"].items()))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
