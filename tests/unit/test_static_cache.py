"""Static (preallocated) caches for converted models: greedy decode equals the dynamic-cache path.

`generate(..., cache_implementation="static")` and the fixed-shape decode loop (`StaticDecoder`) against
the default dynamic cache, for MLA and GateSWA with sink tokens, a batch of left-padded prompts of
different lengths, decoding well past the window. The compiled loop uses `fullgraph=True`: any graph
break or host synchronisation in the decode step fails it.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from transformers import StaticCache

from ascend_edit.attention.cache_layers import StaticSinkWindowLayer
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.static_decode import StaticDecoder
from tests.helpers.converted import converted_tiny

WINDOW, SINKS = 6, 2
TARGETS = {
    "mla": TargetConfig(kind="mla", init="random",
                        mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    "gate_swa": TargetConfig(kind="gate_swa", init="random",
                             gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=SINKS, full_every=2)),
    "gate_swa_no_sinks": TargetConfig(kind="gate_swa", init="random",
                                      gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=0, gate="elementwise")),
}
NEW_TOKENS = 3 * WINDOW  # decode runs well past the window


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def converted(target: str) -> torch.nn.Module:
    return converted_tiny(TARGETS[target])


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 9, 6 and 1 tokens, left-padded to 9 (the last one writes a sink while decoding)."""
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0
    return ids, mask


def dynamic_generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def static_rings_generating_as_dynamic(model) -> list[StaticSinkWindowLayer]:
    """Greedy `generate` with a static cache equals the dynamic cache's; the static cache's rings."""
    ids, mask = padded_prompts()
    with torch.no_grad():
        want = dynamic_generate(model, ids, mask)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             cache_implementation="static", return_dict_in_generate=True)
    assert want.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(got.sequences, want)
    return [layer for layer in got.past_key_values.layers if isinstance(layer, StaticSinkWindowLayer)]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_static_generate_equals_dynamic_generate(target):
    model = converted(target)
    rings = static_rings_generating_as_dynamic(model)
    assert len(rings) == (0 if target == "mla" else sum(1 for e in model.edit_plan if e.kind == "swa"))
    for ring in rings:
        assert ring.keys.shape[-2] == ring.sink_tokens + WINDOW + 1  # bounded, whatever the context


def test_dynamic_sliding_layers_keep_no_padding_as_sinks():
    """transformers gives left padding position 1: the dynamic sliding layer keeps only each row's real sinks and
    the last window - 1 columns (it kept every padded column, as a 'sink', until generation ended)."""
    from ascend_edit.attention.cache_layers import SinkWindowLayer

    model = converted("gate_swa")
    ids, mask = padded_prompts()  # rows padded by 0, 3 and 8: their sinks sit in columns {0, 1}, {3, 4}, {8, 9}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    layers = [layer for layer in out.past_key_values.layers if isinstance(layer, SinkWindowLayer)]
    assert layers
    for layer in layers:
        assert layer.keys.shape[-2] == 3 * SINKS + WINDOW - 1
        assert sorted(layer.indices.tolist())[:3 * SINKS] == [0, 1, 3, 4, 8, 9]


@pytest.mark.parametrize("target", ["gate_swa", "gate_swa_no_sinks"])
def test_a_cache_shorter_than_the_window_gets_a_ring_no_larger_than_a_full_layer(target):
    """A wide window in a short static cache: the ring holds max_cache_len + 1 slots, not sinks + window + 1
    (it would be larger than the full layer it replaces), and generates exactly what a dynamic cache does."""
    wide = dataclasses.replace(TARGETS[target], gate_swa=dataclasses.replace(TARGETS[target].gate_swa, window=64))
    ids, _ = padded_prompts()
    rings = static_rings_generating_as_dynamic(converted_tiny(wide))
    assert rings
    for ring in rings:  # a full layer of this cache holds max_cache_len slots
        assert ring.keys.shape[-2] == ring.max_cache_len + 1 and ring.max_cache_len <= ids.shape[1] + NEW_TOKENS < 64


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_compiled_static_decode_equals_dynamic_generate(target):
    model = converted(target)
    ids, mask = padded_prompts()
    with torch.no_grad():
        want = dynamic_generate(model, ids, mask)
    # aot_eager traces the whole step as one graph (fullgraph=True) without paying for code generation.
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend="aot_eager")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)


@pytest.mark.parametrize("target", ["mla", "gate_swa"])
def test_one_compiled_decoder_serves_new_prompts_without_recompiling(target):
    """The benchmark reuses one compiled step for every cell of a cache length: a second prompt (the cache
    emptied in place by `prefill`) decodes exactly as the dynamic cache does, and nothing recompiles —
    neither across steps nor across prompts (a recompile raises here)."""
    model = converted(target)
    _, mask = padded_prompts()
    decoder = StaticDecoder(model, batch=3, max_cache_len=mask.shape[1] + NEW_TOKENS, mode="compile",
                            backend="aot_eager")
    buffers = None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            ids = torch.randint(3, 250, mask.shape, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                want = dynamic_generate(model, ids, mask)
            assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)
            now = [layer.keys.data_ptr() for layer in decoder.cache.layers]
            assert buffers is None or now == buffers  # emptied in place, never reallocated
            buffers = now


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode='fastest'"):
        StaticDecoder(converted("mla"), batch=1, max_cache_len=8, mode="compile", compile_mode="fastest")


def test_ring_storage_never_moves_after_the_first_step():
    model = converted("gate_swa")
    ids, mask = padded_prompts()
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="eager")
    decoder.prefill(ids, mask)
    rings = [layer for layer in decoder.cache.layers if isinstance(layer, StaticSinkWindowLayer)]
    assert rings
    pointers = [(r.keys.data_ptr(), r.values.data_ptr(), r.positions.data_ptr()) for r in rings]
    for _ in range(NEW_TOKENS - 1):
        decoder.step()
    assert [(r.keys.data_ptr(), r.values.data_ptr(), r.positions.data_ptr()) for r in rings] == pointers
    for ring in rings:  # every row keeps its sinks (positions 0..SINKS-1) and the last WINDOW positions
        held = ring.positions
        assert (held[:, :SINKS] == torch.arange(SINKS)).all()
        last = decoder.position - 1  # position of the last token fed, per row
        window = torch.sort(held[:, SINKS:SINKS + WINDOW], dim=-1).values
        assert torch.equal(window, last - torch.arange(WINDOW - 1, -1, -1))


def test_ring_keeps_each_rows_sinks_under_left_padding():
    """Unit level: sinks sit at slot = position for each row, padding never becomes a visible key."""
    layer = StaticSinkWindowLayer(max_cache_len=64, window=4, sink_tokens=2)
    b, hk, d = 2, 1, 3
    positions = torch.tensor([[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]])  # row 1: two padding tokens (position 1)
    real = torch.tensor([[True] * 5, [False, False, True, True, True]])
    keys = torch.arange(b * 5, dtype=torch.float).view(b, 1, 5, 1).expand(b, hk, 5, d).contiguous()
    layer.write(keys, keys.clone(), positions, real)
    assert layer.positions[0, :2].tolist() == [0, 1] and layer.positions[1, :2].tolist() == [0, 1]
    assert layer.keys[1, 0, 0, 0] == 7 and layer.keys[1, 0, 1, 0] == 8  # row 1's real tokens 0 and 1
    visible = layer.positions[layer.positions >= 0]
    # 2 sink + 4 window + 1 scratch slots; every real token held once, the window's sinks marked -1
    assert sorted(layer.positions[0].tolist()) == [-1, -1, 0, 1, 2, 3, 4]
    assert sorted(layer.positions[1].tolist()) == [-1, -1, -1, -1, 0, 1, 2]
    assert visible.numel() == 8


@pytest.mark.parametrize("length", [3, 9, 40])
def test_assume_filled_describes_the_ring_that_writing_the_prompt_leaves(length):
    """The benchmark fills rings without a prefill: the positions must be those a real prefill leaves."""
    written, assumed = (StaticSinkWindowLayer(max_cache_len=64, window=8, sink_tokens=3) for _ in range(2))
    states = torch.randn(2, 1, length, 4)
    positions = torch.arange(length).expand(2, length)
    written.write(states, states, positions, torch.ones(2, length, dtype=torch.bool))
    assumed.lazy_initialization(states, states)
    assumed.assume_filled(length)
    assert torch.equal(assumed.positions, written.positions)
    assert int(assumed.cumulative_length) == int(written.cumulative_length) == length


def test_static_cache_keeps_the_mla_latent_only():
    model = converted("mla")
    ids, mask = padded_prompts()
    decoder = StaticDecoder(model, batch=3, max_cache_len=32, mode="eager")
    decoder.prefill(ids, mask)
    assert isinstance(decoder.cache, StaticCache)
    for layer in decoder.cache.layers:
        assert tuple(layer.keys.shape) == (3, 1, 32, 32) and tuple(layer.values.shape) == (3, 1, 32, 8)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mla", "gate_swa"])
def test_inductor_compiled_static_decode_equals_dynamic_generate(target):
    """The same with inductor's generated code (mode "default" on CPU; "reduce-overhead" on CUDA)."""
    model = converted(target)
    ids, mask = padded_prompts()
    with torch.no_grad():
        want = dynamic_generate(model, ids, mask)
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
@pytest.mark.parametrize("target", ["mla", "gate_swa"])
def test_graph_replayed_decode_on_cuda_equals_dynamic_generate(target, mode):
    """CUDA: the step as a captured CUDA graph / reduce-overhead compile; MLA decodes through the Triton
    kernel (the registry's `ascend_edit::mla_decode` custom op) inside the graph."""
    model = converted(target).cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    with torch.no_grad():
        want = dynamic_generate(model, ids, mask)
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode=mode)
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)
    if target == "mla":
        kernels = {fn.__module__ for layer in model.model.layers for fn in layer.self_attn.target._kernels.values()}
        assert any("triton" in name for name in kernels), kernels


def test_decoder_stops_at_the_end_token_like_transformers_generate():
    """`eos_token_id`: ended rows continue with the padding token and decoding stops when every row has ended;
    the tokens (and the length) equal transformers' `generate`, whatever `check_every`."""
    model = converted("gate_swa")
    ids, mask = padded_prompts()
    with torch.no_grad():
        eos = int(dynamic_generate(model, ids, mask)[0, ids.shape[1] + 4])  # row 0 produces it mid-way
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=eos)
    assert (want[0, ids.shape[1]:] == 0).any()  # the case is real: row 0 ended and was padded
    for check_every, mode in ((1, "eager"), (5, "eager"), (64, "eager"), (5, "compile")):
        decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode=mode,
                                backend="aot_eager")  # compile: the padded token is fed through the graph's input
        got = decoder.generate(ids, mask, NEW_TOKENS, eos_token_id=eos, pad_token_id=0, check_every=check_every)
        assert torch.equal(got, want), (check_every, mode)


def test_decoder_stops_early_when_every_row_has_ended():
    model = converted("mla")
    ids, mask = padded_prompts()
    ids, mask = ids[:1], mask[:1]  # one row: it ends at its first end token, and decoding stops there
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]
        eos = int(free[0, 3])
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=eos)
    assert want.shape[1] < ids.shape[1] + NEW_TOKENS  # transformers stopped early
    decoder = StaticDecoder(model, batch=1, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="eager")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS, eos_token_id=eos, pad_token_id=0, check_every=4), want)
    with pytest.raises(ValueError, match="pad_token_id"):
        decoder.generate(ids, mask, NEW_TOKENS, eos_token_id=eos)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gate_swa", "mla"])
def test_inductor_writes_the_caches_in_place(target, tmp_path, monkeypatch):
    """The compiled decode step writes one slot of each cache layer in place: inductor's generated code allocates
    no buffer of a cache layer's shape (GateSWA's rings and full layers, MLA's latent caches). Written as a scatter_
    into the ring, a graph input, the step copied every ring out, scattered and copied it back: twice the ring's
    bytes per step for one slot of new data."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a fresh cache: this compile's code only
    model = converted(target)
    ids, mask = padded_prompts()
    with torch.no_grad():
        want = dynamic_generate(model, ids, mask)
    torch.compiler.reset()
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)
    shapes = {tuple(t.shape) for layer in decoder.cache.layers for t in (layer.keys, layer.values)}
    if target == "gate_swa":
        assert any(isinstance(layer, StaticSinkWindowLayer) for layer in decoder.cache.layers)
    wrappers = [p.read_text() for p in tmp_path.rglob("*.py") if "def call(" in p.read_text()]
    # every buffer the generated code allocates: `empty_strided_<device>((sizes), (strides), dtype)`
    allocated = {tuple(int(n) for n in sizes.split(",") if n.strip())
                 for text in wrappers for sizes in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", text)}
    assert len(allocated) > 3  # the wrappers were read and parsed: a step allocates its small temporaries
    assert not shapes & allocated, shapes & allocated


def _fed(layer, tokens: int, start: int = 0):
    """Feed `tokens` tokens one position each (batch 1, one head, dim 1; the value is the stream index)."""
    from ascend_edit.attention.cache_layers import SinkWindowLayer

    assert isinstance(layer, SinkWindowLayer)
    for index in range(start, start + tokens):
        state = torch.full((1, 1, 1, 1), float(index))
        layer.update_window(state, state, torch.tensor([[index]]))
    return layer


def test_a_recording_window_layer_crops_back_to_what_a_shorter_stream_holds():
    """transformers' rollback protocol (assisted decoding): while recording nothing is evicted; crop(-n) then leaves
    exactly the layer a stream n tokens shorter has. Without recording, a crop that needs evicted tokens is refused."""
    from ascend_edit.attention.cache_layers import SinkWindowLayer

    window, sinks = 4, 2
    reference = _fed(SinkWindowLayer(window, sinks), 17)
    recorded = _fed(SinkWindowLayer(window, sinks), 12)
    recorded.activate_past_recording()
    _fed(recorded, 8, start=12)
    assert recorded.keys.shape[-2] > reference.keys.shape[-2]  # nothing evicted while recording
    recorded.crop(-3)
    assert recorded.get_seq_length() == 17 and recorded.record_past  # recording goes on until transformers ends it
    assert torch.equal(recorded.indices, reference.indices) and torch.equal(recorded.keys, reference.keys)
    assert torch.equal(recorded.positions, reference.positions)

    bounded = _fed(SinkWindowLayer(window, sinks), 20)
    with pytest.raises(RuntimeError, match="cannot be cropped back to 17 tokens: tokens that window needs were evicted"):
        bounded.crop(-3)
    short = _fed(SinkWindowLayer(window, sinks), 3)  # nothing evicted yet: a crop works without recording
    short.crop(-1)
    assert short.indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="negative number"):
        short.crop(2)
