"""The Triton sliding-window + sinks kernel (``kernels/triton/sliding_window.py``) against the reference.

On a CUDA GPU: bf16, forward and backward. Without one, the same cases run in fp32 under Triton's
CPU interpreter when ``TRITON_INTERPRET=1`` is set and triton is importable (numerics only);
otherwise the tests skip.
"""
from __future__ import annotations

import os

import pytest
import torch
from ascend_edit.kernels import reference

from .test_sliding_window_attention import SwaCase, _run, make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs a CUDA GPU or TRITON_INTERPRET=1")

CASES = [
    SwaCase("w64-sinks4", b=1, h=4, hk=4, s=300, t=300, d=32, dv=32, window=64, sink_tokens=4),
    SwaCase("gqa-w17-sinks1", b=2, h=4, hk=2, s=200, t=200, d=16, dv=16, window=17, sink_tokens=1),
    SwaCase("w1-sinks4", b=1, h=2, hk=2, s=130, t=130, d=16, dv=16, window=1, sink_tokens=4),
    SwaCase("w-covers-seq", b=1, h=2, hk=1, s=100, t=100, d=16, dv=16, window=500, sink_tokens=4),
    SwaCase("causal", b=1, h=2, hk=2, s=129, t=129, d=16, dv=16, window=0),
    SwaCase("many-sinks", b=1, h=2, hk=2, s=300, t=300, d=16, dv=16, window=70, sink_tokens=100),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_triton_kernel_matches_reference_fwd_bwd(case: SwaCase) -> None:
    triton_backend = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    inp = make_inputs(case, dtype=dtype)
    inp = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}
    assert triton_backend.fits_triton_kernel(inp["q"], inp["k"], inp["v"], inp["q_pos"], inp["k_pos"],
                                             case.sink_tokens, None) is None
    out, grads = _run(triton_backend.sliding_window_attention, inp, grad=True)
    ref_inp = dict(inp, q=inp["q"].float(), k=inp["k"].float(), v=inp["v"].float())
    ref_out, ref_grads = _run(reference.sliding_window_attention, ref_inp, grad=True)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_other_layouts_are_refused_with_a_reason() -> None:
    triton_backend = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    inp = make_inputs(SwaCase("packed", layout="packed", window=3, d=16, dv=16))
    assert triton_backend.fits_triton_kernel(inp["q"], inp["k"], inp["v"], inp["q_pos"], inp["k_pos"], 0,
                                             inp["q_seg"]) == "packed documents"
    inp = make_inputs(SwaCase("decode", layout="decode", s=1, t=20, window=4, d=16, dv=16))
    assert "cache" in triton_backend.fits_triton_kernel(inp["q"], inp["k"], inp["v"], inp["q_pos"], inp["k_pos"],
                                                        0, None)
    inp = make_inputs(SwaCase("odd-d", s=12, t=12, d=24, dv=24, window=3))
    assert "head dims" in triton_backend.fits_triton_kernel(inp["q"], inp["k"], inp["v"], inp["q_pos"],
                                                            inp["k_pos"], 0, None)


def _variant_cases():
    """Tile configs that walk each loop of the kernels differently: key tiles wider and narrower than
    query tiles, TMA descriptor loads (taken only when s is a multiple of both tiles), ragged tails,
    dQ accumulated by the dK/dV kernel, edges and interior in one loop."""
    sw = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    cfg = sw.KernelConfig
    variants = {
        "small-tiles": sw.Variant(fwd=cfg(16, 32, 4, 2), dq=cfg(32, 16, 4, 2), dkdv=cfg(16, 32, 4, 2)),
        "wide-keys": sw.Variant(fwd=cfg(32, 64, 4, 2), dq=cfg(64, 32, 4, 2), dkdv=cfg(32, 64, 4, 2)),
        "tma": sw.Variant(fwd=cfg(64, 32, 4, 2, tma=True), dq=cfg(64, 32, 4, 2, tma=True),
                          dkdv=cfg(32, 64, 4, 2, tma=True)),
        "atomic-dq": sw.Variant(fwd=cfg(32, 32, 4, 2), dq=cfg(32, 32, 4, 2),
                                dkdv=cfg(16, 32, 4, 2, tma=True, atomic_dq=True)),
        "one-loop": sw.Variant(fwd=cfg(32, 16, 4, 2, one_loop=True), dq=cfg(16, 32, 4, 2, tma=True, one_loop=True),
                               dkdv=cfg(32, 16, 4, 2, one_loop=True)),
    }
    cases = [
        SwaCase("even-w40-sinks4", b=1, h=2, hk=2, s=256, t=256, d=16, dv=16, window=40, sink_tokens=4),
        SwaCase("ragged-gqa-w33-sinks3", b=1, h=4, hk=2, s=150, t=150, d=16, dv=16, window=33, sink_tokens=3),
        SwaCase("even-sinks-past-tile", b=1, h=2, hk=2, s=128, t=128, d=16, dv=16, window=20, sink_tokens=40),
    ]
    return [pytest.param(v, c, id=f"{n}-{c.name}") for n, v in variants.items() for c in cases]


@pytest.mark.parametrize("variant, case", _variant_cases())
def test_every_tile_variant_matches_reference(variant, case: SwaCase) -> None:
    """The configs the benchmark sweep may pick as the default compute the same function."""
    sw = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    inp = make_inputs(case, dtype=dtype)
    inp = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in inp.items()}

    def kernel(q, k, v, *, window, sink_tokens, scale, **_):
        return sw.attention(q, k, v, window=window, sink_tokens=sink_tokens, scale=scale, variant=variant)

    out, grads = _run(kernel, inp, grad=True)
    ref_inp = dict(inp, q=inp["q"].float(), k=inp["k"].float(), v=inp["v"].float())
    ref_out, ref_grads = _run(reference.sliding_window_attention, ref_inp, grad=True)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_sink_tile_width() -> None:
    """Few sinks get a narrow tile of their own; more sinks than a key block use whole key blocks."""
    sw = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    assert sw._sink_block(4, 64) == 16
    assert sw._sink_block(0, 64) == 16
    assert sw._sink_block(20, 64) == 32
    assert sw._sink_block(100, 64) == 64


def test_tma_only_where_its_constraints_hold() -> None:
    """TMA configs fall back to pointer loads for ragged lengths and unaligned base addresses."""
    sw = pytest.importorskip("ascend_edit.kernels.triton.sliding_window")
    if sw.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    cfg = sw.KernelConfig(64, 32, 4, 2, tma=True)
    x = torch.zeros(1, 2, 128, 16)
    assert sw._operands(cfg, 128, [(x, 64)])[1] is True
    assert sw._operands(cfg, 100, [(x[:, :, :100], 64)])[1] is False  # a tile would cross a sequence end
    shifted = torch.zeros(1 + 2 * 128 * 16)[1:].view(1, 2, 128, 16)  # 4-byte offset: not 16-byte aligned
    assert sw._operands(cfg, 128, [(shifted, 64)])[1] is False
    assert sw._operands(sw.KernelConfig(64, 32, 4, 2), 128, [(x, 64)]) == ([x], False)
