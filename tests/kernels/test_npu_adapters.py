"""NPU adapters on CPU against ``NpuStandIn`` -- labelled stand-ins of torch_npu's documented
contracts (``tests/kernels/npu_standin.py``), NOT Ascend hardware. Adapter + stand-in must equal
the eager references of ``kernels/reference.py`` / ``kernels/fused_reference.py``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from ascend_edit.kernels import fused_reference, reference
from ascend_edit.kernels.npu import _torch_npu, fused_ops, infer_attention
from ascend_edit.kernels.npu import fusion_attention as npu_backend

from .npu_standin import COMPRESSED, NpuStandIn
from .test_sliding_window_attention import FP32_TOL, SwaCase, _assert_matches_reference, _run, make_inputs

BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> NpuStandIn:
    return NpuStandIn().install(monkeypatch, mindspeed=True)


def _fa_calls(stand_in: NpuStandIn, op: str = "npu_fusion_attention") -> list[dict]:
    return [c for c in stand_in.calls if c["op"] == op]


# ---------------------------------------------------------------------------------------------
# GateSWA with sinks: band + sink passes, never a dense mask
# ---------------------------------------------------------------------------------------------


def test_default_gate_swa_config_never_builds_a_dense_mask(stand_in: NpuStandIn, monkeypatch) -> None:
    """The shipped GateSWA target (window 1024, 4 sinks) on a stand-in NPU, forward and backward."""
    cfg = yaml.safe_load((REPO / "conf/target/gate_swa.yaml").read_text())["gate_swa"]
    window, sinks = cfg["window"], cfg["sink_tokens"]
    assert 0 < window and sinks > 0, "the default must exercise the sink case"
    s = window + 77  # a length past the window, not a multiple of any block size

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense [s, t] visibility mask was built")

    monkeypatch.setattr(npu_backend, "dense_visibility", no_dense_mask)
    inp = make_inputs(SwaCase("default", b=1, h=2, hk=1, s=s, t=s, d=8, dv=8, window=window, sink_tokens=sinks))
    _assert_matches_reference(npu_backend.sliding_window_attention, inp, grad=True, tol=FP32_TOL)

    for op in ("npu_fusion_attention", "npu_fusion_attention_grad"):
        calls = _fa_calls(stand_in, op)
        assert [c["sparse_mode"] for c in calls] == [4, 2], op  # band pass, then sink pass
        for call in calls:
            assert call["mask_shape"] == (COMPRESSED, COMPRESSED), f"{op} got a mask of shape {call['mask_shape']}"
        band, sink = calls
        assert (band["pre_tokens"], band["next_tokens"]) == (window - 1, 0)
        assert sink["q_shape"][2] == s - window and sink["k_shape"][2] == sinks  # only rows past the window


def _grid() -> list[SwaCase]:
    cases = []
    for dtype_case in ("fp32",):
        for w, s in [(1, 13), (5, 13), (7, 30), (13, 13), (40, 13), (8, 37)]:  # edges, >= seq, non-multiples
            for sinks in (0, 1, 4):
                cases.append(SwaCase(f"{dtype_case}-s{s}-w{w}-sinks{sinks}", s=s, t=s, window=w, sink_tokens=sinks))
    cases += [
        SwaCase("gqa-8to1-w3-sinks4", h=8, hk=1, s=17, t=17, window=3, sink_tokens=4),
        SwaCase("gqa-4to4-w3-sinks1", h=4, hk=4, s=17, t=17, window=3, sink_tokens=1),
        SwaCase("gqa-6to2-w4-sinks4", h=6, hk=2, s=19, t=19, window=4, sink_tokens=4),
        SwaCase("packed-w3-sinks4", layout="packed", window=3, sink_tokens=4),
        SwaCase("packed-w6-sinks4", layout="packed", window=6, sink_tokens=4),  # doc of length 5 <= window
        SwaCase("packed-w1-sinks1", layout="packed", window=1, sink_tokens=1),
        SwaCase("packed-w7-sinks4", layout="packed", window=7, sink_tokens=4),  # no doc longer than window
        SwaCase("dv-differs-w3-sinks4", s=15, t=15, d=12, dv=8, window=3, sink_tokens=4),
    ]
    return cases


GRID = _grid()


@pytest.mark.parametrize("case", GRID, ids=[c.name for c in GRID])
def test_fusion_attention_adapter_equals_reference_fp32(case: SwaCase, stand_in: NpuStandIn) -> None:
    _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)
    modes = {c["sparse_mode"] for c in _fa_calls(stand_in)}
    assert 0 not in modes, "every case of this grid has a mask-free plan"


BF16_CASES = [
    SwaCase("bf16-w5-sinks4", s=29, t=29, window=5, sink_tokens=4, d=16, dv=16),
    SwaCase("bf16-packed-w3-sinks1", layout="packed", window=3, sink_tokens=1, d=16, dv=16),
    SwaCase("bf16-gqa-w1-sinks4", h=8, hk=2, s=21, t=21, window=1, sink_tokens=4, d=16, dv=16),
]


@pytest.mark.parametrize("case", BF16_CASES, ids=[c.name for c in BF16_CASES])
def test_fusion_attention_adapter_bf16(case: SwaCase, stand_in: NpuStandIn) -> None:
    inp = make_inputs(case, dtype=torch.bfloat16)
    out, grads = _run(npu_backend.sliding_window_attention, inp, grad=True)
    ref_inp = dict(inp, q=inp["q"].float(), k=inp["k"].float(), v=inp["v"].float())
    ref_out, ref_grads = _run(reference.sliding_window_attention, ref_inp, grad=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, **BF16_TOL)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=6e-2, rtol=6e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_explicit_fallback_is_logged(stand_in: NpuStandIn, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(_torch_npu, "_logged", set())
    npu_backend._PLANS.clear()
    inp = make_inputs(SwaCase("ring", layout="ring", s=2, t=14, window=4, sink_tokens=1))
    with caplog.at_level(logging.WARNING, logger="ascend_edit.kernels.npu"):
        _assert_matches_reference(npu_backend.sliding_window_attention, inp, grad=True, tol=FP32_TOL)
    assert _fa_calls(stand_in)[-1]["sparse_mode"] == 0
    assert any("dense [b, 1, s, t] mask" in r.getMessage() for r in caplog.records)


def test_sinks_custom_op_passes_opcheck(stand_in: NpuStandIn) -> None:
    inp = make_inputs(SwaCase("opcheck", s=11, t=11, window=3, sink_tokens=2))
    q, k, v = (inp[n].requires_grad_(True) for n in ("q", "k", "v"))
    args = (q, k, v, inp["scale"], "BNSD", 3, None, 2, None, None, None, None)
    torch.library.opcheck(torch.ops.ascend_edit.npu_swa_sinks.default, args)


# ---------------------------------------------------------------------------------------------
# Decode through the fused inference op
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    (SwaCase("decode-s1-w4-sinks2", layout="decode", s=1, t=20, window=4, sink_tokens=2), "compact"),
    (SwaCase("decode-s1-w0", layout="decode", s=1, t=20, window=0), "compact"),
    (SwaCase("decode-s1-w40", layout="decode", s=1, t=20, window=40, sink_tokens=4), "compact"),
    (SwaCase("decode-s3-w4-sinks2", layout="decode", s=3, t=20, window=4, sink_tokens=2), "mask"),
    (SwaCase("ring-s1-w6-sinks2", layout="ring", s=1, t=14, window=6, sink_tokens=2), "mask"),
    (SwaCase("ring-s2-w4-sinks1", layout="ring", s=2, t=14, window=4, sink_tokens=1), "mask"),
]


@pytest.mark.parametrize(("case", "kind"), DECODE_CASES, ids=[c.name for c, _ in DECODE_CASES])
@pytest.mark.parametrize("sinks_from_zero", [True, False])
def test_sliding_window_decode_uses_the_inference_op(case, kind, sinks_from_zero, stand_in: NpuStandIn) -> None:
    inp = make_inputs(case, dtype=torch.bfloat16)  # the inference op takes fp16 / bf16 only
    if case.layout == "decode" and sinks_from_zero:  # a cache that starts at position 0 holds the sinks
        inp["k_pos"] = inp["k_pos"] - 100
        inp["q_pos"] = inp["q_pos"] - 100
    with torch.no_grad():
        _assert_matches_reference(npu_backend.sliding_window_attention, inp, grad=False, tol=BF16_TOL)
    call = stand_in.calls[-1]
    assert stand_in.ops_called() == ["npu_fused_infer_attention_score"]
    assert (call["mask_shape"] is None) == (kind == "compact")
    if kind == "compact" and case.window and case.window < case.t:
        present = case.sink_tokens if (sinks_from_zero and case.layout == "decode") else 0
        assert call["k_shape"][2] == case.window + present  # only the window and the sinks go in


def test_more_packed_documents_than_tnd_takes_use_the_dense_mask(stand_in, monkeypatch) -> None:
    """TND takes at most 1,024 sequences per call (the op's varlen limit): more documents in one micro-batch go
    through the explicit-mask plan rather than a call the op would reject (limit lowered here to 2 documents)."""
    monkeypatch.setattr(npu_backend, "TND_MAX_SEQUENCES", 2)
    monkeypatch.setattr(_torch_npu, "_logged", set())
    case = SwaCase("packed-w3-sinks1", layout="packed", window=3, sink_tokens=1)
    _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)
    layouts = {c["layout"] for c in stand_in.calls}
    assert layouts == {"BNSD"} and {c["sparse_mode"] for c in stand_in.calls} == {0}


def test_fp32_decode_goes_through_fusion_attention(stand_in: NpuStandIn) -> None:
    """npu_fused_infer_attention_score documents fp16 / bf16 only: an fp32 model decodes through
    npu_fusion_attention, which takes fp32 (was: sent to the inference op, which would reject it on hardware)."""
    case, _ = DECODE_CASES[0]
    with torch.no_grad():
        _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=False, tol=FP32_TOL)
    assert stand_in.ops_called() == ["npu_fusion_attention"]


def test_tnd_statistics_are_asked_for_token_major(stand_in: NpuStandIn) -> None:
    """The band + sink merge indexes the TND softmax statistics by token: every TND call asks for
    softmax_layout="TND" (the documented default is head-major per sequence; the stand-in models that default,
    under which the packed sink cases above fail without the argument)."""
    case = SwaCase("packed-w3-sinks4", layout="packed", window=3, sink_tokens=4)
    _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)
    calls = [c for c in stand_in.calls if c["op"].startswith("npu_fusion_attention")]
    assert calls and all(c["softmax_layout"] == "TND" for c in calls)


# ---------------------------------------------------------------------------------------------
# MLA: training through npu_fusion_attention (padded head dims), decode through FIA's MLA mode
# ---------------------------------------------------------------------------------------------


def test_mla_training_shapes_go_through_fusion_attention_padded(stand_in: NpuStandIn) -> None:
    """Decompressed MLA attention: q/k head dim 24 (nope 16 + rope 8), v head dim 16; causal."""
    case = SwaCase("mla-train", h=4, hk=4, s=14, t=14, d=24, dv=16, window=0)
    _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)
    for call in stand_in.calls:
        assert call["q_shape"][-1] == call["v_shape"][-1] == 24  # value zero-padded to the q/k head dim
        assert call["sparse_mode"] == 3


def _mla_inputs(b=2, h=32, s=1, t=24, c=512, r=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.5).to(dtype)
    k_pos = torch.arange(t).expand(b, t)
    return {
        "q_latent": rand(b, h, s, c), "q_rope": rand(b, h, s, r), "latent": rand(b, t, c), "k_rope": rand(b, t, r),
        "q_pos": k_pos[:, t - s:], "k_pos": k_pos, "scale": 1.0 / math.sqrt(192),
    }  # fmt: skip


def _mla_reference_fp32(inp):
    ref = {n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in inp.items()}
    return reference.mla_absorbed_attention(**{n: ref[n] for n in ("q_latent", "q_rope", "latent", "k_rope")},
                                            q_pos=ref["q_pos"], k_pos=ref["k_pos"], scale=ref["scale"])


@pytest.mark.parametrize("s", [1, 4])
def test_mla_decode_goes_through_fused_infer_attention(s: int, stand_in: NpuStandIn) -> None:
    inp = _mla_inputs(s=s)
    out = infer_attention.mla_absorbed_attention(**inp)
    torch.testing.assert_close(out.float(), _mla_reference_fp32(inp), **BF16_TOL)
    (call,) = stand_in.calls
    assert call["op"] == "npu_fused_infer_attention_score"
    assert call["query_rope"] == (2, 32, s, 64) and call["key_rope"] == (2, 1, 24, 64)
    assert call["k_shape"] == (2, 1, 24, 512) and call["sparse_mode"] == (0 if s == 1 else 3)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"c": 256}, "latent/rope dims"),
        ({"r": 32}, "latent/rope dims"),
        ({"h": 16}, "query heads"),
        ({"dtype": torch.float32}, "dtype"),
        ({"s": 17, "t": 40}, "queries"),
    ],
)
def test_mla_decode_falls_back_with_a_logged_reason(change, reason, stand_in, caplog, monkeypatch) -> None:
    monkeypatch.setattr(_torch_npu, "_logged", set())
    inp = _mla_inputs(**change)
    with caplog.at_level(logging.WARNING, logger="ascend_edit.kernels.npu"):
        out = infer_attention.mla_absorbed_attention(**inp)
    assert stand_in.calls == []
    torch.testing.assert_close(out.float(), _mla_reference_fp32(inp), **BF16_TOL)
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()], "the fallback must be logged"


def test_mla_decode_from_a_static_cache_passes_the_valid_lengths(stand_in: NpuStandIn) -> None:
    """A static cache: the first L slots hold positions 0..L-1, the rest are empty (k_pos = -1)."""
    inp = _mla_inputs()
    lengths = [10, 17]
    inp["k_pos"] = torch.stack([torch.where(torch.arange(24) < n, torch.arange(24), -1) for n in lengths])
    inp["q_pos"] = torch.tensor([[n - 1] for n in lengths])
    out = infer_attention.mla_absorbed_attention(**inp)
    torch.testing.assert_close(out.float(), _mla_reference_fp32(inp), **BF16_TOL)
    (call,) = stand_in.calls
    assert call["actual_seq_kvlen"] == lengths and call["mask_shape"] is None


def test_mla_decode_with_non_plain_positions_falls_back(stand_in: NpuStandIn) -> None:
    inp = _mla_inputs()
    inp["k_pos"] = inp["k_pos"].clone()
    inp["k_pos"][:, 3] = -1  # an empty slot in the middle (left padding, a ring): not a prefix
    out = infer_attention.mla_absorbed_attention(**inp)
    assert stand_in.calls == []
    torch.testing.assert_close(out.float(), _mla_reference_fp32(inp), **BF16_TOL)


# ---------------------------------------------------------------------------------------------
# Fused decoder-layer ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
def test_rms_norm_adapter(dtype, weight_dtype, stand_in: NpuStandIn) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=gen).to(dtype).requires_grad_(True)  # Qwen3 q_norm shape [b, s, h, d]
    w = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype if weight_dtype == "same" else torch.float32)
    w.requires_grad_(True)
    out = fused_ops.rms_norm(x, w, 1e-6)
    ref = fused_reference.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and stand_in.ops_called() == ["npu_rms_norm"]
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.float().sum(), (x, w))
    torch.testing.assert_close(gx.float(), rx.float(), **tol)
    torch.testing.assert_close(gw.float(), rw.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "x", [torch.randn(*[1] * 8, 16), torch.randn(2, 16, dtype=torch.float64)], ids=["9-dims", "fp64"]
)
def test_rms_norm_outside_the_contract_falls_back_to_eager(x, stand_in: NpuStandIn) -> None:
    w = 1 + 0.1 * torch.randn(16, dtype=x.dtype)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), fused_reference.rms_norm(x, w, 1e-6))
    assert stand_in.calls == []


def test_rms_norm_stand_in_refuses_a_gamma_of_another_dtype(stand_in: NpuStandIn) -> None:
    """Why the adapter casts the weight: the documented op takes gamma in x's dtype."""
    import torch_npu  # the stand-in

    with pytest.raises(AssertionError, match="gamma dtype"):
        torch_npu.npu_rms_norm(torch.randn(2, 16, dtype=torch.bfloat16), torch.ones(16), 1e-6)


def _rope_inputs(b=2, h=4, s=6, d=16, dtype=torch.float32, storage="bnsd"):
    """x [b, h, s, d] stored as BNSD, or (storage="bsnd") the projection layout ``[b, s, h, d].transpose(1, 2)``."""
    gen = torch.Generator().manual_seed(0)
    if storage == "bnsd":
        x = torch.randn(b, h, s, d, generator=gen).to(dtype).requires_grad_(True)
    else:
        x = torch.randn(b, s, h, d, generator=gen).to(dtype).requires_grad_(True).transpose(1, 2)
    freqs = torch.arange(s)[:, None] * (10000 ** (-torch.arange(d // 2) / (d // 2)))[None]
    emb = torch.cat([freqs, freqs], dim=-1).expand(b, s, d)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


# (shape, storage) -> (x shape the op gets, cos / sin shape): the documented layout for each input.
ROPE_CASES = {
    "heads-bnsd": ((2, 4, 6, 16), "bnsd", (2, 4, 6, 16), (2, 1, 6, 16)),  # BNSD, B1SD
    "heads-bsnd-view": ((2, 4, 6, 16), "bsnd", (2, 6, 4, 16), (2, 6, 1, 16)),  # BSND, BS1D: no copy
    "mla-k-rope": ((2, 1, 6, 8), "bnsd", (2, 6, 1, 8), (2, 6, 1, 8)),  # one head: BNSD storage is BSND too
    "wide": ((1, 32, 6, 64), "bsnd", (1, 6, 32, 64), (1, 6, 1, 64)),
    "decode-many-heads": ((4, 8, 1, 16), "bsnd", (4, 1, 8, 16), (4, 1, 1, 16)),  # BNSD would need B*N <= 8*S
}


@pytest.mark.parametrize("backend", ["npu", "mindspeed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_adapters(backend, dtype, case, stand_in: NpuStandIn) -> None:
    fused = fused_ops.rotary_embedding if backend == "npu" else fused_ops.rotary_embedding_mindspeed
    shape, storage, sent, r_shape = ROPE_CASES[case]
    x, cos, sin = _rope_inputs(*shape, dtype=dtype, storage=storage)
    out = fused(x, cos, sin)
    ref = fused_reference.rotary_embedding(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0], **tol)
    expected = "npu_rotary_mul" if backend == "npu" else "npu_rotary_position_embedding"
    assert stand_in.ops_called() == [expected]
    assert (stand_in.calls[0]["shape"], stand_in.calls[0]["r_shape"]) == (sent, r_shape)


@pytest.mark.parametrize(
    ("shape", "storage", "grad_cos", "reason"),
    [
        ((1, 2, 4, 896), "bnsd", False, "head dim 896"),
        ((1, 2, 4, 14 * 64 + 2), "bnsd", False, "head dim"),
        ((4, 8, 2, 16), "bnsd", False, "B*N = 32 > 8*S = 16 in layout BNSD"),
        ((2, 600, 2, 16), "bsnd", True, "B*N = 1200 > 1024 with a gradient for cos / sin"),
        ((1, 1000, 2, 16), "bsnd", False, "heads 1000"),
    ],
    ids=["d-896", "d-too-wide", "bnsd-many-heads", "cos-grad-many-heads", "n-1000"],
)
def test_rotary_constraints_fall_back_to_eager(shape, storage, grad_cos, reason, stand_in: NpuStandIn) -> None:
    x, cos, sin = _rope_inputs(*shape, storage=storage)
    cos.requires_grad_(grad_cos)
    assert reason in fused_ops.rotary_unfit_reason(x, cos)
    out = fused_ops.rotary_embedding(x, cos, sin)
    torch.testing.assert_close(out, fused_reference.rotary_embedding(x, cos, sin))
    assert stand_in.calls == []


def test_rotary_stand_in_refuses_what_the_docs_forbid(stand_in: NpuStandIn) -> None:
    """The adapter's constraint checks exist because the documented op refuses these inputs."""
    import torch_npu  # the stand-in

    def call(x, r):
        return torch_npu.npu_rotary_mul(x, r, r)

    x = torch.randn(1, 2, 4, 16)
    with pytest.raises(AssertionError, match="< 896"):
        call(torch.randn(1, 2, 4, 896), torch.ones(1, 1, 4, 896))
    with pytest.raises(AssertionError, match="no documented broadcast"):
        call(torch.randn(2, 2, 4, 16), torch.ones(1, 1, 1, 16))
    with pytest.raises(AssertionError, match=r"\[-1, 1\]"):
        call(x, torch.full((1, 1, 4, 16), 2.0))
    with pytest.raises(AssertionError, match="contiguous"):
        call(torch.randn(1, 4, 2, 16).transpose(1, 2), torch.ones(1, 1, 4, 16))
    with pytest.raises(AssertionError, match="B\\*N > 8\\*S"):
        call(torch.randn(4, 8, 2, 16), torch.ones(4, 1, 2, 16))
    with pytest.raises(AssertionError, match="dtype"):
        call(x, torch.ones(1, 1, 4, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_adapter(dtype, stand_in: NpuStandIn) -> None:
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 5, 24, generator=gen).to(dtype).requires_grad_(True)
    up = torch.randn(2, 5, 24, generator=gen).to(dtype).requires_grad_(True)
    out = fused_ops.swiglu(gate, up)
    ref = fused_reference.swiglu(gate, up)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(torch.autograd.grad(out.float().sum(), (gate, up)),
                         torch.autograd.grad(ref.float().sum(), (gate, up))):  # fmt: skip
        torch.testing.assert_close(got, want, **tol)
    assert stand_in.calls == [{"op": "npu_swiglu", "shape": (2, 5, 48), "dim": -1}]


def test_swiglu_mismatched_halves_fall_back(stand_in: NpuStandIn) -> None:
    gate, up = torch.randn(2, 3, 8), torch.randn(2, 3, 1)
    torch.testing.assert_close(fused_ops.swiglu(gate, up), fused_reference.swiglu(gate, up))
    assert stand_in.calls == []
