"""The skinny-GEMM ("GEMV") decode kernel (``kernels/triton/gemv.py``) against ``F.linear``.

Runs on CUDA, or on CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` is set and Triton is
importable (numerics only: the interpreter computes through numpy, which has no bf16, so CPU runs use
fp16 and fp32). The heuristic and the op's registration are checked everywhere.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ascend_edit.kernels.triton import gemv

from ascend_edit.models import decode_fusion
from tests.helpers.triton_kernels import DEVICE, HALF, HAS_CUDA
from tests.helpers.triton_kernels import runs_kernel as kernel_runs_here

runs_kernel = kernel_runs_here(gemv.triton_available())
# fp32 accumulation in both; the 16-bit output rounding dominates (one ulp of bf16 at |y| ~ 4 is 0.03).
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 5e-3, "rtol": 5e-3},
       torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2}}


def inputs(m, n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@runs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(37, 100), (64, 512), (130, 72)])  # odd sizes: no block divides them
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear_for_every_row_count(m, n, k, bias):
    x, w, b = inputs(m, n, k, HALF, bias)
    with torch.no_grad():
        out = gemv._launch(x, w, b)
    assert out.shape == (m, n) and out.dtype == HALF
    torch.testing.assert_close(out.float(), reference(x, w, b), **TOL[HALF])


# Explicit launches: the split-K second pass (deterministic), K not a multiple of the block, tail row blocks,
# tiles wider than K; one row (elementwise path) and several (tl.dot path).
CONFIGS = [
    (1, gemv.GemvConfig(block_n=4, block_k=32, split_k=3)),
    (1, gemv.GemvConfig(block_n=8, block_k=64, split_k=2)),
    (1, gemv.GemvConfig(block_n=32, block_k=512, split_k=1)),
    (4, gemv.GemvConfig(block_n=16, block_k=32, split_k=4)),
    (8, gemv.GemvConfig(block_n=32, block_k=64, split_k=1)),
]


@runs_kernel
@pytest.mark.parametrize("m,config", CONFIGS, ids=lambda c: c.label().replace(" ", "-") if hasattr(c, "label") else str(c))
@pytest.mark.parametrize("bias", [False, True])
def test_every_launch_config_matches_linear(m, config, bias):
    x, w, b = inputs(m, 75, 200, HALF, bias, seed=1)
    with torch.no_grad():
        out = gemv._launch(x, w, b, config)
        again = gemv._launch(x, w, b, config)
    torch.testing.assert_close(out.float(), reference(x, w, b), **TOL[HALF])
    assert torch.equal(out, again)  # the split-K sum has a fixed order: bitwise reproducible


@runs_kernel
@pytest.mark.parametrize("config", [gemv.GemvConfig(block_n=4, block_k=64, split_k=2, prefetch=True),
                                    gemv.GemvConfig(block_n=8, block_k=32, split_k=3, prefetch=True),
                                    gemv.GemvConfig(block_n=16, block_k=256, split_k=1, prefetch=True)],
                         ids=lambda c: c.label().replace(" ", "-"))
def test_prefetching_configs_match_linear(config):
    """Register prefetch of the next tile (one row, K a multiple of the block); splits of unequal length."""
    x, w, b = inputs(1, 75, 256, HALF, True, seed=5)
    with torch.no_grad():
        out = gemv._launch(x, w, b, config)
    torch.testing.assert_close(out.float(), reference(x, w, b), **TOL[HALF])


@runs_kernel
def test_fp32_and_leading_dims():
    x, w, b = inputs(2, 33, 48, torch.float32, True, seed=2)
    x3 = x.view(2, 1, 48)
    with torch.no_grad():
        out = torch.ops.ascend_edit.gemv(x3, w, b)
    assert out.shape == (2, 1, 33)
    torch.testing.assert_close(out.view(2, 33), reference(x, w, b), **TOL[torch.float32])


@runs_kernel
def test_op_inside_a_fullgraph_compile():
    """The custom op is one node of a compiled graph (its fake gives the shape), as in the decode step."""
    x, w, b = inputs(1, 40, 64, torch.float32, True, seed=3)
    fn = lambda x, w, b: torch.ops.ascend_edit.gemv(x, w, b) * 2.0  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, b), fn(x, w, b))


@runs_kernel
def test_bad_calls_are_refused_with_one_line():
    x, w, _ = inputs(9, 16, 32, torch.float32, False)
    with pytest.raises(ValueError, match="9 rows"):
        gemv._launch(x, w, None)
    with pytest.raises(ValueError, match="do not match"):
        gemv._launch(x[:1, :16], w, None)
    with pytest.raises(RuntimeError, match="forward-only"):
        gemv.gemv_linear(x[:1], w.requires_grad_(True), None)


def test_fake_gives_the_output_shape_without_running_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(3, 1, 64, dtype=torch.bfloat16), torch.empty(96, 64, dtype=torch.bfloat16)
        out = torch.ops.ascend_edit.gemv(x, w, None)
    assert out.shape == (3, 1, 96) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (576, 4096), (4096, 12288), (151936, 4096), (37, 100)])
def test_heuristic_fills_the_sms_and_keeps_tiles_small(m, n, k):
    sms = 132
    c = gemv.choose_config(m, n, k, sms)
    k_blocks = -(-k // c.block_k)
    assert c.block_n * c.block_k <= 8192  # 16 KB of bf16 per loop step
    assert 1 <= c.split_k <= k_blocks and (-(-k_blocks // c.split_k)) * (c.split_k - 1) < k_blocks  # no empty split
    assert m == 1 or c.block_n >= 16  # tl.dot needs 16
    programs = -(-n // c.block_n) * c.split_k
    # near the target (splits are rounded so none is empty), or as many as K allows
    assert programs >= min(4 * sms, -(-n // c.block_n) * k_blocks) // 2
    if -(-n // c.block_n) >= 4 * sms:
        assert c.split_k == 1  # enough row blocks: no second pass


def test_decode_fusion_row_limit_matches_the_kernel():
    assert decode_fusion.MAX_ROWS == gemv.MAX_ROWS


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_tune_times_the_candidates_against_linear_and_its_choice_is_used():
    pytest.importorskip("triton")
    config, kernel_ms, torch_ms = gemv.tune(1, 1000, 512, torch.bfloat16, torch.device("cuda"), calls=4, repeats=2)
    assert 0 < kernel_ms < 1e3 and 0 < torch_ms < 1e3
    assert config is None or kernel_ms < torch_ms
    picked = config or gemv.GemvConfig(block_n=4, block_k=128, split_k=2)
    gemv.set_config(1, 1000, 512, picked)
    try:
        x, w, b = inputs(1, 1000, 512, torch.bfloat16, True, seed=4)
        with torch.no_grad():
            torch.testing.assert_close(gemv._launch(x, w, b).float(), reference(x, w, b), **TOL[torch.bfloat16])
    finally:
        gemv.set_config(1, 1000, 512, None)


def test_tuning_candidates_are_valid_launches():
    for m, n, k in [(1, 4096, 4096), (1, 576, 4096), (1, 151936, 4096), (1, 37, 100), (4, 1024, 4096)]:
        configs = gemv._candidates(m, n, k, 132)
        assert configs[0] == gemv.choose_config(m, n, k, 132) and len(set(configs)) == len(configs)
        for c in configs:
            assert c.block_k <= max(16, 1 << (k - 1).bit_length()) and c.split_k >= 1
            assert m == 1 or c.block_n >= 16


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_custom_op_opcheck():
    pytest.importorskip("triton")
    x, w, b = inputs(1, 96, 128, torch.bfloat16, True, seed=6)
    torch.library.opcheck(torch.ops.ascend_edit.gemv.default, (x.view(1, 1, 128), w, b),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
