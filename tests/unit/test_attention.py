"""Numerics of the MLA and GateSWA targets on tiny models built from config (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.attention.gate_swa import GateSWAAttention
from ascend_edit.attention.geometry import read_geometry
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.surgery import build_plan, edit_model, edited_attentions, set_mode
from tests.conftest import ARCHS, tiny_model

MLA_SMALL = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
TARGETS = {
    "identity": TargetConfig(kind="identity"),
    "mla": TargetConfig(kind="mla", mla=MLA_SMALL),
    "mla_q_lora": TargetConfig(kind="mla", mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                         v_head_dim=16, q_lora_rank=24)),
    "gate_swa": TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=6, sink_tokens=2, full_every=2)),
    "gate_swa_elementwise": TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=5, sink_tokens=0,
                                                                                   gate="elementwise")),
}
CACHE_TOL = 1e-5  # cached decode vs full forward, fp32 logits


def edited(arch: str, target: str, init: str = "warm"):
    model = tiny_model(arch)
    cfg = TARGETS[target]
    cfg = TargetConfig(**{**cfg.__dict__, "init": init})
    return edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward(arch, target):
    model = edited(arch, target, init="random")
    prompt = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=17,
                                   do_sample=False, pad_token_id=0)
        assert generated.shape == (2, 24)
        full = model(generated).logits
        # Prefill 11 tokens, then decode one at a time through the cache (window 6 < 11: evictions happen).
        out = model(generated[:, :11], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for pos in range(11, 24):
            out = model(generated[:, pos:pos + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=CACHE_TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_plan_reproduces_teacher_and_both_mode_has_zero_loss(arch):
    teacher = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = teacher(ids).logits
    model = edited(arch, "identity")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
        set_mode(model, "both")
        assert torch.equal(model(ids).logits, reference)
    for module in edited_attentions(model):
        student, target = module.pair
        assert torch.equal(student, target)


def _mla(seed=0, **kw) -> MLAAttention:
    torch.manual_seed(seed)
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    mla = MLAAttention(read_geometry(attn, model.config), MLAConfig(**{**MLA_SMALL.__dict__, **kw}), model.config)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mla, model


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_absorbed_equals_naive(q_lora_rank):
    mla, model = _mla(q_lora_rank=q_lora_rank)
    x = torch.randn(2, 9, 64)
    pos = torch.arange(9).expand(2, 9)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        mla.path = "naive"
        naive, _ = mla(x, emb, None)
        mla.path = "absorbed"
        absorbed, _ = mla(x, emb, None)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


def test_mla_cache_holds_only_latent_and_rope_key():
    model = edited("qwen3", "mla")
    with torch.no_grad():
        out = model(torch.randint(0, 256, (3, 10)), use_cache=True)
    for layer in out.past_key_values.layers:
        assert layer.keys.shape == (3, 1, 10, MLA_SMALL.kv_lora_rank)
        assert layer.values.shape == (3, 1, 10, MLA_SMALL.qk_rope_head_dim)


def _dense_reference(q, k, v, scaling, window, sinks, gate):
    """Plain masked softmax attention with an explicit [s, s] mask: the GateSWA spec."""
    s = q.shape[2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2) * gate


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (4, 2), (7, 1)])
def test_gate_swa_equals_dense_mask_reference(window, sinks):
    model = tiny_model("qwen3")
    teacher = model.model.layers[1].self_attn
    swa = GateSWAAttention(read_geometry(teacher, model.config), window=window, sink_tokens=sinks, gate="headwise",
                           config=model.config, q_norm=teacher.q_norm, k_norm=teacher.k_norm)
    torch.manual_seed(1)
    for p in swa.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 64)
    pos = torch.arange(12).expand(2, 12)
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        out, _ = swa(x, (cos, sin), None)
        q = swa.q_norm(swa.q_proj(x).view(2, 12, 4, 16)).transpose(1, 2)
        k = swa.k_norm(swa.k_proj(x).view(2, 12, 2, 16)).transpose(1, 2)
        v = swa.v_proj(x).view(2, 12, 2, 16).transpose(1, 2)
        from ascend_edit.attention.rope import apply_rope

        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gate = torch.sigmoid(swa.gate_proj(x)).view(2, 12, 4, 1)
        expected = swa.o_proj(_dense_reference(q, k, v, swa.scaling, window, sinks, gate).reshape(2, 12, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gate_swa_with_open_gate_and_wide_window_is_full_attention():
    teacher = tiny_model("qwen3")
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        reference = teacher(ids).logits
    for gate in ("none", "headwise", "elementwise"):
        cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=20, sink_tokens=0, gate=gate))
        model = edit_model(tiny_model("qwen3"), build_plan(4, cfg), cfg)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_narrow_window_changes_the_output():
    """A check that the equalities above are not vacuous: window 2 must differ from the teacher."""
    teacher = tiny_model("qwen3")
    ids = torch.randint(0, 256, (1, 20))
    cfg = TargetConfig(kind="gate_swa", gate_swa=GateSWAConfig(window=2, sink_tokens=0))
    model = edit_model(tiny_model("qwen3"), build_plan(4, cfg), cfg)
    with torch.no_grad():
        assert (model(ids).logits - teacher(ids).logits).abs().max() > 1e-2


def test_mla_warm_start_beats_random_init():
    teacher = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = teacher(ids).logits.log_softmax(-1)

    def kl(init):
        model = edited("llama", "mla", init=init)
        with torch.no_grad():
            out = model(ids).logits.log_softmax(-1)
        return torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()

    assert kl("warm") < 0.5 * kl("random")


def test_packed_documents_do_not_see_each_other():
    """Positions restarting at 0 mark documents: a packed row equals the documents run apart."""
    model = edited("qwen3", "gate_swa", init="random")
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        joint = model(packed, position_ids=positions, use_cache=False).logits
        apart = torch.cat([model(a).logits, model(b).logits], dim=1)
    torch.testing.assert_close(joint, apart, rtol=1e-5, atol=1e-5)


# One KV head, every rotary frequency in the shared RoPE key (r = head_dim) and every value dim in the latent: the
# warm start is then the teacher's own attention, up to fp64 -> fp32 rounding.
MQA = {"num_key_value_heads": 1}
MLA_EXACT = MLAConfig(kv_lora_rank=1 + 16, qk_rope_head_dim=16, qk_nope_head_dim=1, v_head_dim=16,
                      latent_norm=False, allow_larger_cache=True)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases: the query's was dropped until 2026-12-05
    ("llama", {"attention_bias": True}),
])
def test_full_rank_mla_warm_start_is_the_teacher(arch, overrides):
    """A warm start that can be exact is exact, with the teacher's query bias (Qwen2; attention_bias=True) kept on
    the query projection."""
    teacher = tiny_model(arch, **MQA, **overrides)
    assert (teacher.model.layers[0].self_attn.q_proj.bias is not None) == (arch == "qwen2" or bool(overrides))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(ids).logits
    cfg = TargetConfig(kind="mla", mla=MLA_EXACT)
    model = edit_model(teacher, build_plan(teacher.config.num_hidden_layers, cfg), cfg)
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_a_low_rank_query_keeps_the_teachers_query_bias():
    """With q_lora_rank the bias goes on q_b_proj (after the norm, where it can be exact)."""
    teacher = tiny_model("qwen2", **MQA)
    for layer in teacher.model.layers:  # a bias that matters
        layer.self_attn.q_proj.bias.data.normal_(std=1.0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(ids).logits
    cfg = TargetConfig(kind="mla", mla=MLAConfig(**{**MLA_EXACT.__dict__, "q_lora_rank": 64}))
    model = edit_model(teacher, build_plan(teacher.config.num_hidden_layers, cfg), cfg)
    with torch.no_grad():
        error = float((model(ids).logits - want).norm() / want.norm())
        for attn in edited_attentions(model):
            assert float(attn.target.q_b_proj.bias.abs().max()) > 0.1
            attn.target.q_b_proj.bias.zero_()
        without = float((model(ids).logits - want).norm() / want.norm())
    assert error < 0.5 * without


def test_yarn_warm_start_keeps_the_rope_attention_factor_on_position_free_dims():
    """YaRN multiplies cos and sin by its attention factor, so every teacher score carries the factor squared; the
    warm start's position-free query carries it too (was: missing)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
    teacher = tiny_model("llama", **MQA, rope_parameters=yarn)
    for layer in teacher.model.layers:  # sharper attention, so that the scores' scale shows in the output
        layer.self_attn.q_proj.weight.data.mul_(4.0)
    factor = teacher.model.rotary_emb.attention_scaling
    assert factor > 1.1
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = teacher(ids).logits
    # the 4 fastest rotary pairs in the shared key; the 4 slowest barely turn over 12 tokens and become
    # position-free: their rotation is (almost) nothing to lose, their scale is what the factor is about
    n = 8
    mla = MLAConfig(kv_lora_rank=n + 16, qk_rope_head_dim=8, qk_nope_head_dim=n, v_head_dim=16,
                    latent_norm=False, allow_larger_cache=True)
    cfg = TargetConfig(kind="mla", mla=mla)
    model = edit_model(teacher, build_plan(teacher.config.num_hidden_layers, cfg), cfg)
    with torch.no_grad():
        error = float((model(ids).logits - want).norm() / want.norm())
        for attn in edited_attentions(model):  # the previous warm start: the factor left off
            attn.target.q_proj.weight.view(4, n + 8, -1)[:, :n].div_(factor**2)
        old = float((model(ids).logits - want).norm() / want.norm())
    assert error < 0.3 * old, (error, old)
