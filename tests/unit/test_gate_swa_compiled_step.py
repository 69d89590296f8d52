"""GateSWA's compiled decode step: one ring plan per step, the ring written by select, no per-head cache copies.

The decode step is captured as one graph (`StaticDecoder(mode="compile")`, `fullgraph=True`) by a counting
backend that runs the captured graph as traced, so these tests read the very graph inductor would compile:

* the ring bookkeeping (slot, positions after the write, the mask) is traced once per step, by the group's
  leader, and every other ring takes the traced plan;
* a ring's positions are written as the plan's elementwise select (one copy), its states by one indexed write
  each (`index_put_`, which inductor keeps in place);
* no tensor of the query heads' size over the cache is made (transformers' `repeat_kv` under compile): the
  decode query is packed per KV group instead;
* with a batch of prompts of different lengths, decoding past the window, the tokens equal the dynamic-cache
  path's and the ring storage never moves.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from ascend_edit.attention.cache_layers import StaticSinkWindowLayer
from ascend_edit.attention.gate_swa import reduction_decode_attention
from ascend_edit.config import GateSWAConfig, TargetConfig
from ascend_edit.models.decode_fusion import set_swa_decode_attention
from ascend_edit.models.static_decode import StaticDecoder
from ascend_edit.models.surgery import build_plan, edit_model
from tests.conftest import tiny_model

WINDOW, SINKS, LAYERS = 6, 2, 6
NEW_TOKENS = 3 * WINDOW  # well past the window
TARGET = TargetConfig(kind="gate_swa", init="random",
                      gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_layers=[2]))


class GraphRecorder:
    """A torch.compile backend that keeps every captured graph and runs it as traced."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> Counter[str]:
        names = Counter()
        for gm in self.graphs:
            for node in gm.graph.nodes:
                if node.op in ("call_function", "call_method"):
                    names[node.target if isinstance(node.target, str) else node.target.__name__] += 1
        return names

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(node.meta["example_value"].shape) for gm in self.graphs for node in gm.graph.nodes
                if isinstance(node.meta.get("example_value"), torch.Tensor)]


@pytest.fixture(autouse=True)
def one_thread_fresh_compiler():
    """One thread; and dynamo's caches emptied, so the step is traced here with static shapes (a decode step of
    other shapes compiled by an earlier test would make dynamo trace this one with symbolic sizes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    torch.set_num_threads(previous)


def converted() -> torch.nn.Module:
    model = tiny_model("qwen3", num_hidden_layers=LAYERS)
    edit_model(model, build_plan(LAYERS, TARGET), TARGET)
    return model.eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 10, 7, 4 and 1 tokens, left-padded (the last one writes its second sink while decoding)."""
    ids = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6, 9)):
        mask[row, :pad] = 0
    return ids, mask


@torch.no_grad()
def test_compiled_step_plans_the_ring_once_and_never_copies_the_cache_per_query_head():
    model = converted()
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    recorder = GraphRecorder()
    decoder = StaticDecoder(model, batch=4, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend=recorder)
    decoder.prefill(ids, mask)
    rings = [layer for layer in decoder.cache.layers if isinstance(layer, StaticSinkWindowLayer)]
    assert len(rings) == LAYERS - 1
    storage = [(r.keys.data_ptr(), r.values.data_ptr(), r.positions.data_ptr(), r.cumulative_length.data_ptr())
               for r in rings]
    tokens = [decoder.token.clone()] + [decoder.step() for _ in range(NEW_TOKENS - 1)]

    assert torch.equal(torch.cat([ids, *tokens], dim=1), want)  # past the window, rows of different lengths
    assert len(recorder.graphs) == 1  # one graph, traced once
    assert [(r.keys.data_ptr(), r.values.data_ptr(), r.positions.data_ptr(), r.cumulative_length.data_ptr())
            for r in rings] == storage  # the ring storage never moved
    for ring in rings[1:]:  # the invariant the shared plan rests on
        assert torch.equal(ring.positions, rings[0].positions)
        assert torch.equal(ring.cumulative_length, rings[0].cumulative_length)

    ops = recorder.ops()
    # The slot arithmetic (`stream % window`) and the mask's empty-row check: once per step, not once per ring.
    assert ops["mod"] == 1 and ops["any"] == 1, ops
    # Each ring: two indexed state writes (index_put_, which inductor keeps in place; a scatter_ into a graph
    # input became a whole-ring copy in and out) and one positions copy; no scatter at all.
    assert ops["setitem"] == 2 * len(rings) and ops["scatter_"] == 0 and ops["scatter"] == 0, ops
    assert ops["scaled_dot_product_attention"] == LAYERS, ops
    cfg = model.config
    per_head_caches = {(4, cfg.num_attention_heads, rings[0].num_slots, cfg.head_dim),
                       (4, cfg.num_attention_heads, ids.shape[1] + NEW_TOKENS, cfg.head_dim)}
    assert not per_head_caches & set(recorder.shapes())  # no repeat_kv copy of a ring or of the full cache


@torch.no_grad()
def test_decode_write_leaves_the_positions_a_scatter_would():
    """Unit level: the plan's select equals scattering the slot's position, for sink and window slots alike."""
    layer = StaticSinkWindowLayer(max_cache_len=64, window=4, sink_tokens=2)
    states = torch.randn(2, 1, 5, 3)
    layer.write(states, states, torch.tensor([[0, 1, 2, 3, 4], [1, 1, 1, 0, 1]]),
                torch.tensor([[True] * 5, [False, False, False, True, True]]))
    for position, real in (([[5], [2]], [[True], [True]]), ([[6], [3]], [[True], [False]])):
        positions, real = torch.tensor(position), torch.tensor(real)
        plan = layer.plan_write(positions, real)
        expected = layer.positions.scatter(1, plan.slots, plan.slot_positions)
        assert torch.equal(plan.positions_after, expected)
        before = layer.positions.data_ptr()
        step = torch.randn(2, 1, 1, 3)
        layer.apply_write(step, step, plan)
        assert torch.equal(layer.positions, expected) and layer.positions.data_ptr() == before
        assert torch.equal(layer.keys.gather(2, plan.slots[:, None, :, None].expand(2, 1, 1, 3)), step)


@torch.no_grad()
def test_reduction_decode_attention_keeps_the_tokens_and_takes_sdpa_out_of_the_step():
    """`set_swa_decode_attention(model, "reductions")` (compiled CUDA decode): same tokens as the dynamic-cache path, and the
    decode step's attention is the traced reductions, not one SDPA call per layer."""
    model = converted()
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert set_swa_decode_attention(model, "reductions") == LAYERS
    recorder = GraphRecorder()
    decoder = StaticDecoder(model, batch=4, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend=recorder)
    decoder.prefill(ids, mask)
    tokens = [decoder.token.clone()] + [decoder.step() for _ in range(NEW_TOKENS - 1)]
    assert torch.equal(torch.cat([ids, *tokens], dim=1), want)
    assert len(recorder.graphs) == 1
    assert recorder.ops()["scaled_dot_product_attention"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_reduction_decode_attention_matches_sdpa(dtype, mask_kind):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 16, generator=g).to(dtype)  # 2 rows, 3 KV heads, 4 query heads per group
    k, v = (torch.randn(2, 3, 37, 16, generator=g).to(dtype) for _ in range(2))
    visible = torch.rand(2, 1, 1, 37, generator=g) > 0.4
    visible[..., 0] = True  # every row sees a key
    mask = {"none": None, "bool": visible,
            "additive": torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))}[mask_kind]
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask
                                                            if mask is None or mask.dtype == torch.bool
                                                            else mask.float(), scale=0.25)
    got = reduction_decode_attention(q, k, v, mask, 0.25)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@torch.no_grad()
def test_reduction_decode_attention_keeps_sdpa_for_caches_longer_than_its_limit(monkeypatch):
    """Rings at or under `REDUCTION_MAX_KEYS` slots take the reductions; the longer full-layer cache keeps SDPA."""
    from ascend_edit.attention import gate_swa

    model = converted()
    ids, mask = prompts()
    set_swa_decode_attention(model, "reductions")
    recorder = GraphRecorder()
    decoder = StaticDecoder(model, batch=4, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend=recorder)
    decoder.prefill(ids, mask)
    ring_slots = next(layer.num_slots for layer in decoder.cache.layers if isinstance(layer, StaticSinkWindowLayer))
    assert ring_slots < ids.shape[1] + NEW_TOKENS
    monkeypatch.setattr(gate_swa, "REDUCTION_MAX_KEYS", ring_slots)
    decoder.step()
    assert recorder.ops()["scaled_dot_product_attention"] == 1  # the one full layer, layer 2
