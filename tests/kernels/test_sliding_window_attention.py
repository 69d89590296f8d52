"""Numerics of op A (sliding-window attention) for every backend against the eager reference.

The eager reference itself is checked against a loop written straight from the contract. The
NPU adapter runs on CPU against ``NpuStandIn`` (``tests/kernels/npu_standin.py``) -- a test double
of torch_npu's *documented* contracts, not Ascend hardware (see its docstring).
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from ascend_edit.kernels import flex as flex_backend
from ascend_edit.kernels import reference, sdpa
from ascend_edit.kernels.masks import TensorKeyedCache, dense_visibility
from ascend_edit.kernels.npu import fusion_attention as npu_backend

from .npu_standin import NpuStandIn

# fp32 everywhere on CPU: the backends differ only in summation order.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwaCase:
    name: str
    b: int = 2
    h: int = 4
    hk: int = 2
    s: int = 12
    t: int = 12
    d: int = 8
    dv: int = 8
    window: int = 0
    sink_tokens: int = 0
    layout: str = "self"  # self | packed | decode | ring | no_visible


def make_inputs(case: SwaCase, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Tensors for ``case``; positions follow the layouts the attention modules produce."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.b, case.h, case.s, case.d, generator=gen).to(dtype)
    k = torch.randn(case.b, case.hk, case.t, case.d, generator=gen).to(dtype)
    v = torch.randn(case.b, case.hk, case.t, case.dv, generator=gen).to(dtype)
    q_seg = k_seg = None
    if case.layout == "self":  # training / prefill: queries are the keys, positions 0..s-1
        q_pos = torch.arange(case.s).repeat(case.b, 1)
        k_pos = q_pos.clone()
    elif case.layout == "packed":  # two documents per row, positions restart at each document
        cut = [5, 7][: case.b]
        q_pos = torch.stack([torch.cat([torch.arange(c), torch.arange(case.s - c)]) for c in cut])
        q_seg = torch.stack([torch.cat([torch.zeros(c), torch.ones(case.s - c)]).long() for c in cut])
        k_pos, k_seg = q_pos.clone(), q_seg.clone()
    elif case.layout == "decode":  # the last s tokens of a longer context, positions offset by 100
        k_pos = (100 + torch.arange(case.t)).repeat(case.b, 1)
        q_pos = k_pos[:, -case.s :].clone()
    elif case.layout == "ring":  # ring-buffer cache: sink slots first, wrapped window, empty slots
        k_pos = torch.full((case.b, case.t), -1)
        k_pos[:, :2] = torch.arange(2)  # kept sink tokens 0, 1
        recent = torch.arange(30, 30 + case.t - 4)  # 10 recent positions, rotated like a ring buffer
        k_pos[:, 2 : case.t - 2] = recent.roll(3)
        k_pos[1, -2:] = torch.tensor([28, 29])  # row 1 also fills the last two slots
        q_pos = torch.tensor([[recent.max().item() - i for i in reversed(range(case.s))]] * case.b)
    elif case.layout == "no_visible":  # every key of row 1 is an empty slot or in another document
        q_pos = torch.arange(case.s).repeat(case.b, 1)
        k_pos = q_pos.clone()
        k_pos[1] = -1
        q_seg = torch.zeros(case.b, case.s, dtype=torch.long)
        k_seg = q_seg.clone()
        q_seg[0, 3] = 7  # row 0, query 3: its document has no key
    else:
        raise ValueError(case.layout)
    return {
        "q": q,
        "k": k,
        "v": v,
        "q_pos": q_pos,
        "k_pos": k_pos,
        "q_seg": q_seg,
        "k_seg": k_seg,
        "window": case.window,
        "sink_tokens": case.sink_tokens,
        "scale": 1.0 / math.sqrt(case.d),
    }


def _grid() -> list[SwaCase]:
    cases = [
        SwaCase(f"self-w{w}-sinks{sk}", window=w, sink_tokens=sk)
        for w in (0, 1, 3, 12, 40)  # 12 == seq len, 40 > seq len
        for sk in (0, 1, 4)
    ]
    cases += [
        SwaCase("mha-w3", h=3, hk=3, window=3),
        SwaCase("mqa-w5-sinks1-dv6", h=4, hk=1, window=5, sink_tokens=1, dv=6),
        SwaCase("packed-w0", layout="packed", window=0),
        SwaCase("packed-w3", layout="packed", window=3),
        SwaCase("packed-w3-sinks1", layout="packed", window=3, sink_tokens=1),
        SwaCase("decode-s1-w0", layout="decode", s=1, t=20, window=0),
        SwaCase("decode-s1-w4", layout="decode", s=1, t=20, window=4),
        SwaCase("decode-s3-w4-sinks2", layout="decode", s=3, t=20, window=4, sink_tokens=2),
        SwaCase("ring-s1-w6-sinks2", layout="ring", s=1, t=14, window=6, sink_tokens=2),
        SwaCase("ring-s2-w4-sinks1", layout="ring", s=2, t=14, window=4, sink_tokens=1),
        SwaCase("no-visible-key", layout="no_visible", window=3, sink_tokens=1),
    ]
    return cases


CASES = _grid()
CASE_IDS = [c.name for c in CASES]


def _loop_visibility(inp: dict) -> torch.Tensor:
    """Contract A's rule written as plain loops (independent of ``kernels/masks.py``)."""
    q_pos, k_pos, q_seg, k_seg = inp["q_pos"], inp["k_pos"], inp["q_seg"], inp["k_seg"]
    window, sinks = inp["window"], inp["sink_tokens"]
    b, s = q_pos.shape
    t = k_pos.shape[1]
    out = torch.zeros(b, s, t, dtype=torch.bool)
    for bi in range(b):
        for i in range(s):
            for j in range(t):
                qp, kp = int(q_pos[bi, i]), int(k_pos[bi, j])
                ok = kp >= 0 and kp <= qp
                if window != 0:
                    ok = ok and (qp - kp < window or kp < sinks)
                if q_seg is not None:
                    ok = ok and int(q_seg[bi, i]) == int(k_seg[bi, j])
                out[bi, i, j] = ok
    return out


def _run(fn, inp: dict, *, grad: bool, seed: int = 1):
    """Output and (if ``grad``) dq, dk, dv of ``fn`` for a fixed random upstream gradient."""
    q, k, v = (inp[n].detach().clone().requires_grad_(grad) for n in ("q", "k", "v"))
    kwargs = {n: inp[n] for n in ("q_pos", "k_pos", "window", "sink_tokens", "scale", "q_seg", "k_seg")}
    out = fn(q, k, v, **kwargs)
    if not grad:
        return out, None
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    return out, grads


def _assert_matches_reference(fn, inp: dict, *, grad: bool, tol: dict) -> None:
    out, grads = _run(fn, inp, grad=grad)
    ref_out, ref_grads = _run(reference.sliding_window_attention, inp, grad=grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, **tol)
    if grad:
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# The reference (the spec)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mask_rule_matches_contract_loop(case: SwaCase) -> None:
    inp = make_inputs(case)
    got = dense_visibility(
        inp["q_pos"],
        inp["k_pos"],
        window=case.window,
        sink_tokens=case.sink_tokens,
        q_seg=inp["q_seg"],
        k_seg=inp["k_seg"],
    )
    assert torch.equal(got, _loop_visibility(inp))


def test_window_boundary_by_hand() -> None:
    """window=3 at position 5 sees positions 3, 4, 5 (q_pos - k_pos < 3), plus sink 0 when kept."""
    pos = torch.arange(8)[None]
    no_sinks = dense_visibility(pos, pos, window=3, sink_tokens=0)[0, 5]
    with_sink = dense_visibility(pos, pos, window=3, sink_tokens=1)[0, 5]
    assert no_sinks.tolist() == [False, False, False, True, True, True, False, False]
    assert with_sink.tolist() == [True, False, False, True, True, True, False, False]


def test_reference_equals_explicit_softmax() -> None:
    """One head, no GQA: the reference is softmax(q k^T * scale + mask) v with the loop mask."""
    inp = make_inputs(SwaCase("one-head", b=1, h=1, hk=1, window=4, sink_tokens=1))
    vis = _loop_visibility(inp)[0]
    scores = (inp["q"][0, 0] @ inp["k"][0, 0].T) * inp["scale"]
    expected = torch.softmax(scores.masked_fill(~vis, float("-inf")), dim=-1) @ inp["v"][0, 0]
    out, _ = _run(reference.sliding_window_attention, inp, grad=False)
    torch.testing.assert_close(out[0, 0], expected, **FP32_TOL)


def test_reference_row_without_visible_key_is_zero_with_finite_grads() -> None:
    inp = make_inputs(SwaCase("no-visible", layout="no_visible", window=3))
    out, grads = _run(reference.sliding_window_attention, inp, grad=True)
    assert torch.count_nonzero(out[1]) == 0  # row 1: every key slot empty
    assert torch.count_nonzero(out[0, :, 3]) == 0  # row 0, query 3: no key in its document
    assert torch.count_nonzero(out[0, :, 2]) > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[0][1]) == 0  # no gradient reaches a query that sees nothing


def test_reference_gqa_reads_the_right_kv_head() -> None:
    """GQA with h=4, hk=2 equals MHA with each KV head repeated for its two query heads."""
    inp = make_inputs(SwaCase("gqa", window=3))
    mha = dict(inp, k=inp["k"].repeat_interleave(2, dim=1), v=inp["v"].repeat_interleave(2, dim=1))
    torch.testing.assert_close(
        _run(reference.sliding_window_attention, inp, grad=False)[0],
        _run(reference.sliding_window_attention, mha, grad=False)[0],
        **FP32_TOL,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": -1}, "window"),
        ({"sink_tokens": 1.5}, "sink_tokens"),
        ({"q_pos": torch.zeros(2, 5, dtype=torch.long)}, "q_pos"),
        ({"k_pos": torch.zeros(2, 12)}, "integer"),
        ({"q_seg": torch.zeros(2, 12, dtype=torch.long)}, "both q_seg and k_seg"),
        ({"k": torch.randn(2, 3, 12, 8), "v": torch.randn(2, 3, 12, 8)}, "multiple"),
    ],
)
def test_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    inp = dict(make_inputs(SwaCase("bad")), **change)
    with pytest.raises(ValueError, match=message):
        _run(reference.sliding_window_attention, inp, grad=False)


# ---------------------------------------------------------------------------------------------
# SDPA and flex (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sdpa_matches_reference_fwd_bwd(case: SwaCase) -> None:
    _assert_matches_reference(sdpa.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)


def test_sdpa_bf16_matches_reference() -> None:
    inp = make_inputs(SwaCase("bf16", window=3, sink_tokens=1), dtype=torch.bfloat16)
    _assert_matches_reference(sdpa.sliding_window_attention, inp, grad=True, tol={"atol": 3e-2, "rtol": 3e-2})


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_flex_mask_logic_matches_reference_forward_on_cpu(case: SwaCase) -> None:
    """Flex's unfused path (forward only on CPU) checks the mask_mod / BlockMask logic here."""

    def unfused(*args, **kwargs):
        return flex_backend.sliding_window_attention(*args, compiled=False, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile"
        _assert_matches_reference(unfused, make_inputs(case), grad=False, tol=FP32_TOL)


def test_block_mask_is_reused_for_the_same_tensors_and_rebuilt_for_new_ones() -> None:
    pos = torch.arange(12).repeat(2, 1)
    first = flex_backend.sliding_window_block_mask(pos, pos, window=3, sink_tokens=1)
    assert flex_backend.sliding_window_block_mask(pos, pos, window=3, sink_tokens=1) is first
    assert flex_backend.sliding_window_block_mask(pos, pos, window=4, sink_tokens=1) is not first
    pos.add_(1)  # in-place change: the cached mask no longer describes these positions
    assert flex_backend.sliding_window_block_mask(pos, pos, window=3, sink_tokens=1) is not first


def test_tensor_keyed_cache_misses_after_the_tensor_is_freed() -> None:
    cache: TensorKeyedCache[int] = TensorKeyedCache(max_entries=2)
    builds = []
    ids = torch.arange(4)
    assert cache.get_or_build((ids, None), "p", lambda: builds.append(1) or 1) == 1
    assert cache.get_or_build((ids, None), "p", lambda: builds.append(2) or 2) == 1
    del ids
    fresh = torch.arange(4)  # may reuse the freed tensor's id(): must not hit the old entry
    assert cache.get_or_build((fresh, None), "p", lambda: builds.append(3) or 3) == 3
    assert builds == [1, 3]
    with pytest.raises(ValueError, match="max_entries"):
        TensorKeyedCache(max_entries=0)


# ---------------------------------------------------------------------------------------------
# NPU adapter against a stand-in of torch_npu's documented contract
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def npu_stand_in(monkeypatch: pytest.MonkeyPatch) -> NpuStandIn:
    """torch_npu replaced by the labelled stand-in of ``tests/kernels/npu_standin.py`` (not hardware)."""
    return NpuStandIn().install(monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_npu_adapter_with_stand_in_matches_reference_fwd_bwd(
    case: SwaCase, npu_stand_in: NpuStandIn
) -> None:
    _assert_matches_reference(npu_backend.sliding_window_attention, make_inputs(case), grad=True, tol=FP32_TOL)
    assert npu_stand_in.calls, "the adapter must go through torch_npu.npu_fusion_attention"


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_npu_band_uses_pre_tockens_window_minus_one(window: int, npu_stand_in: NpuStandIn) -> None:
    inp = make_inputs(SwaCase("band", window=window))
    _assert_matches_reference(npu_backend.sliding_window_attention, inp, grad=False, tol=FP32_TOL)
    call = npu_stand_in.calls[-1]
    assert (call["layout"], call["sparse_mode"]) == ("BNSD", 4)
    assert (call["pre_tokens"], call["next_tokens"]) == (window - 1, 0)
    assert call["atten_mask"].shape == (2048, 2048)


def test_npu_stand_in_detects_the_off_by_one(npu_stand_in: NpuStandIn) -> None:
    """``pre_tockens = window`` (the classic slip) lets each query see one token too many."""
    window = 3
    inp = make_inputs(SwaCase("slip", window=window, hk=4))
    torch_npu = sys.modules["torch_npu"]
    mask = npu_backend.compressed_causal_mask(torch.device("cpu"))

    def band(pre: int) -> torch.Tensor:
        return torch_npu.npu_fusion_attention(
            inp["q"], inp["k"], inp["v"], 4, "BNSD", atten_mask=mask, scale=inp["scale"],
            pre_tockens=pre, next_tockens=0, sparse_mode=4,
        )[0]  # fmt: skip

    ref = _run(reference.sliding_window_attention, inp, grad=False)[0]
    torch.testing.assert_close(band(window - 1), ref, **FP32_TOL)
    assert (band(window) - ref).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (SwaCase("causal", window=0), ("BNSD", 3, None)),
        (SwaCase("window-covers-all", window=12), ("BNSD", 3, None)),
        (SwaCase("band", window=5), ("BNSD", 4, None)),
        (SwaCase("sinks-inside-window", window=12, sink_tokens=4), ("BNSD", 3, None)),
        (SwaCase("sinks-outside-window", window=5, sink_tokens=4), ("BNSD", 4, None)),
        (SwaCase("packed", layout="packed", window=3), ("TND", 4, (5, 12, 19, 24))),
        (SwaCase("packed-causal", layout="packed"), ("TND", 3, (5, 12, 19, 24))),
        (SwaCase("decode", layout="decode", s=1, t=20, window=4), ("BNSD", 0, None)),
        (SwaCase("ring", layout="ring", s=1, t=14, window=6), ("BNSD", 0, None)),
    ],
    ids=lambda x: x.name if isinstance(x, SwaCase) else "",
)
def test_npu_plan_choice(case: SwaCase, expected: tuple) -> None:
    inp = make_inputs(case)
    plan = npu_backend.plan_fusion_attention(
        inp["q_pos"],
        inp["k_pos"],
        window=case.window,
        sink_tokens=case.sink_tokens,
        q_seg=inp["q_seg"],
        k_seg=inp["k_seg"],
    )
    assert (plan.layout, plan.sparse_mode, plan.actual_seq_len) == expected
    assert (plan.atten_mask is None) == (plan.sparse_mode != 0)
    assert (plan.sink_pass is not None) == (case.name == "sinks-outside-window")


def test_npu_plan_is_cached_per_position_tensors() -> None:
    pos = torch.arange(12).repeat(2, 1)
    plan = npu_backend.plan_fusion_attention(pos, pos, window=3, sink_tokens=0)
    assert npu_backend.plan_fusion_attention(pos, pos, window=3, sink_tokens=0) is plan
    assert npu_backend.plan_fusion_attention(pos.clone(), pos.clone(), window=3, sink_tokens=0) is not plan


def test_npu_custom_op_passes_opcheck(npu_stand_in: NpuStandIn) -> None:
    """Schema, fake impl, autograd registration and AOT dispatch of ``ascend_edit::npu_swa``."""
    inp = make_inputs(SwaCase("opcheck", window=3))
    q, k, v = (inp[n].requires_grad_(True) for n in ("q", "k", "v"))
    band_args = (q, k, v, None, inp["scale"], "BNSD", 4, 2, 0, None)
    torch.library.opcheck(torch.ops.ascend_edit.npu_swa.default, band_args)
    explicit_mask = ~dense_visibility(inp["q_pos"], inp["k_pos"], window=3, sink_tokens=1)[:, None]
    explicit_args = (q, k, v, explicit_mask, inp["scale"], "BNSD", 0, 2147483647, 2147483647, None)
    torch.library.opcheck(torch.ops.ascend_edit.npu_swa.default, explicit_args)


def test_npu_adapter_without_torch_npu_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    inp = make_inputs(SwaCase("missing", window=3))
    with pytest.raises(RuntimeError, match="torch_npu"):
        _run(npu_backend.sliding_window_attention, inp, grad=False)


# ---------------------------------------------------------------------------------------------
# CUDA: flex, compiled (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

CUDA_CASES = [
    SwaCase("cuda-gqa-w3-sinks1", s=256, t=256, d=64, dv=64, window=3, sink_tokens=1),
    SwaCase("cuda-w1", s=256, t=256, d=64, dv=64, window=1),
    SwaCase("cuda-w64-sinks4", s=256, t=256, d=64, dv=64, window=64, sink_tokens=4),
    SwaCase("cuda-causal-w0", s=256, t=256, d=64, dv=64, window=0),
    SwaCase("cuda-packed-w3", layout="packed", window=3, s=16, t=16, d=64, dv=64),
    SwaCase("cuda-ring-decode", layout="ring", s=1, t=14, window=6, sink_tokens=2, d=64, dv=64),
    SwaCase("cuda-no-visible", layout="no_visible", window=3, sink_tokens=1, d=64, dv=64),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.name for c in CUDA_CASES])
def test_flex_cuda_matches_reference_fwd_bwd(case: SwaCase) -> None:
    inp = make_inputs(case, dtype=torch.bfloat16)
    inp = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    out, grads = _run(flex_backend.sliding_window_attention, inp, grad=True)
    # The reference runs in fp32 on the same bf16 inputs; bf16 rounding of out / grads dominates.
    ref_inp = dict(inp, q=inp["q"].float(), k=inp["k"].float(), v=inp["v"].float())
    ref_out, ref_grads = _run(reference.sliding_window_attention, ref_inp, grad=True)
    tol = {"atol": 2e-2, "rtol": 2e-2}
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sdpa_cuda_matches_reference() -> None:
    inp = make_inputs(SwaCase("cuda-sdpa", s=128, t=128, d=64, dv=64, window=16, sink_tokens=1), dtype=torch.bfloat16)
    inp = {n: (x.cuda() if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    ref_inp = dict(inp, q=inp["q"].float(), k=inp["k"].float(), v=inp["v"].float())
    out, _ = _run(sdpa.sliding_window_attention, inp, grad=False)
    ref_out, _ = _run(reference.sliding_window_attention, ref_inp, grad=False)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
