"""Fixed per-step work of the converted models' attention, counted in aten ops on CPU (no timings).

At batch 1 a decode step is a few hundred tiny kernels: every op a layer adds is a launch (or a CUDA-graph
node) in every step. These tests pin what the fixes keep out of the step and out of the prefill:

* GateSWA: the ring bookkeeping (slots, positions, the mask) is planned once per forward by the group's
  leader; every other ring layer only writes its states (three scatters and the length) and attends.
* GateSWA prefill: every ring layer hands the sliding-window kernel the same position tensors (flex then
  builds one block mask per forward, not one per layer), the empty ring is not concatenated in front of
  the prompt, and nothing of [s, s] size is allocated outside the attention kernel.
* MLA: the rotary part's tables and the key slots are built by the first layer of a forward only.
* No host synchronisation (`.item()`, `nonzero`, `bool(tensor)`) in any decode step.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_edit.attention.cache_layers import StaticSinkWindowLayer
from ascend_edit.attention.gate_swa import GateSWAAttention
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.static_decode import StaticDecoder
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model

WINDOW, SINKS = 8, 2
TARGETS = {
    "mla": TargetConfig(kind="mla", init="random",
                        mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    "gate_swa": TargetConfig(kind="gate_swa", init="random",
                             gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_every=4)),
}
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero"}
VIEWS = {"view", "t", "_unsafe_view", "unsqueeze", "transpose", "slice", "permute", "expand", "select", "squeeze",
         "split_with_sizes", "split", "alias", "as_strided", "detach", "_reshape_alias", "unbind", "lift_fresh"}


class OpLog(TorchDispatchMode):
    """Non-view aten ops run under it (name -> count), and the shapes of the tensors they return."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops[name] += 1
            if isinstance(out, torch.Tensor):
                self.shapes.append((name, tuple(out.shape)))
        return out


def converted(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_model("qwen3", num_hidden_layers=8)
    cfg = TARGETS[kind]
    edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg)
    return model.eval()


def attention_modules(model, kind: type) -> list[torch.nn.Module]:
    return sorted((m for m in model.modules() if isinstance(m, kind)), key=lambda m: m.layer_idx)


def per_layer_ops(model, modules, run) -> tuple[dict[int, Counter], OpLog]:
    """Ops of each attention module's forward during `run()`, and of the whole run."""
    log = OpLog()
    counts: dict[int, Counter] = {}
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(lambda m, a: setattr(m, "_ops_before", Counter(log.ops))))
        handles.append(module.register_forward_hook(
            lambda m, a, o: counts.__setitem__(m.layer_idx, log.ops - m._ops_before)))
    try:
        with log:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counts, log


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def test_gate_swa_decode_step_plans_the_ring_once_per_step():
    model = converted("gate_swa")
    ids = torch.randint(3, 200, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    decoder = StaticDecoder(model, 2, 4 * WINDOW, mode="eager")
    decoder.prefill(ids)
    decoder.step()
    modules = [m for m in attention_modules(model, GateSWAAttention) if m.is_sliding]
    assert len(modules) >= 3
    counts, log = per_layer_ops(model, modules, decoder.step)
    assert not HOST_SYNCS & set(log.ops), log.ops
    leader, *followers = (counts[m.layer_idx] for m in modules)
    for ops in followers:
        # Writing the states: keys, values (index_put_), positions (the plan's, copied) and the length; no
        # planning, no mask.
        assert ops["index_put_"] == 2 and ops["scatter_"] == 0 and ops["copy_"] == 1 and ops["add_"] == 1, ops
        for planning in ("remainder", "gather", "any", "bitwise_or", "lt", "le", "ge", "clamp"):
            assert ops[planning] == 0, (planning, ops)
        assert sum(ops.values()) + 10 <= sum(leader.values())
    rings = [layer for layer in decoder.cache.layers if isinstance(layer, StaticSinkWindowLayer)]
    assert len(rings) == len(modules) and all(ring.leader is rings[0] for ring in rings)
    for ring in rings[1:]:  # the invariant the shared plan rests on: every ring of the group is the same
        assert torch.equal(ring.positions, rings[0].positions)
        assert torch.equal(ring.cumulative_length, rings[0].cumulative_length)


@torch.no_grad()
def test_gate_swa_prefill_shares_positions_and_allocates_nothing_of_prompt_squared_size(monkeypatch):
    import ascend_edit.kernels.sdpa as sdpa_kernels

    model = converted("gate_swa")
    s = 256
    seen = []

    def stand_in(q, k, v, *, q_pos, k_pos, **kwargs):
        # Labelled stand-in for the sliding-window kernel: records its inputs, returns zeros of the right shape.
        seen.append((q_pos, k_pos, k.shape[-2]))
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(sdpa_kernels, "sliding_window_attention", stand_in)
    decoder = StaticDecoder(model, 1, s + 8, mode="eager")
    sliding = [m for m in attention_modules(model, GateSWAAttention) if m.is_sliding]
    ids = torch.randint(3, 200, (1, s), generator=torch.Generator().manual_seed(0))
    counts, log = per_layer_ops(model, sliding, lambda: decoder.prefill(ids))
    assert len(seen) == len(sliding)
    first_q, first_k, _ = seen[0]
    assert first_k is first_q  # an empty ring: the prompt attends over itself, no concatenation
    assert all(q is first_q and k is first_k and t == s for q, k, t in seen)
    # The model's own [1, 1, s, max_len] mask is built once per forward (as for the teacher); the sliding
    # layers add nothing of that size.
    big = [(name, shape) for name, shape in log.shapes if torch.Size(shape).numel() >= s * s]
    assert len(big) <= 2, big
    for ops in counts.values():  # (transformers' own mask building syncs once per prefill, as for the teacher)
        assert not HOST_SYNCS & set(ops), ops


@torch.no_grad()
def test_mla_decode_step_derives_rope_tables_and_key_slots_once_per_forward():
    model = converted("mla")
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    decoder = StaticDecoder(model, 2, 24, mode="eager")
    decoder.prefill(ids)
    decoder.step()
    modules = attention_modules(model, MLAAttention)
    counts, log = per_layer_ops(model, modules, decoder.step)
    assert not HOST_SYNCS & set(log.ops), log.ops
    first, *rest = (counts[m.layer_idx] for m in modules)
    for ops in rest:
        assert ops == rest[0]  # every later layer does the same work
        assert ops["any"] == 0 and first["any"] == 1  # key slots from the mask: once
        assert first["cat"] - ops["cat"] == 2  # the rotary part's cos / sin: once
        assert first["arange"] - ops["arange"] == 2  # query and key slots: once
