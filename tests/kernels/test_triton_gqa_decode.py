"""The GQA decode kernel (``kernels/triton/gqa_decode.py``) against plain PyTorch attention in fp32.

Runs on CUDA, or on CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` is set and Triton is
importable (numerics only). The op's fake impl (tracing) and input checks are tested everywhere.
"""
from __future__ import annotations

import pytest
import torch
from ascend_edit.kernels.triton import gqa_decode

from tests.helpers.triton_kernels import DEVICE, HALF, HAS_CUDA
from tests.helpers.triton_kernels import runs_kernel as kernel_runs_here

runs_kernel = kernel_runs_here(gqa_decode.triton_available())
# Additive masks stay bf16 on CPU too (loads and casts work in the interpreter; only tl.dot misreads bf16).
# fp32 accumulation everywhere; bf16: the probabilities enter p @ v as bf16 and the output is rounded to bf16
# (one ulp at |o| ~ 2 is 0.016).
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 5e-3, "rtol": 5e-3},
       torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def reference(q, k, v, mask, scale):
    """fp32 softmax(q k^T * scale + mask) v per (batch, KV head); rows with nothing visible give zeros."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale  # [b, hk, g, t]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf -> NaN -> 0
    return probs @ v.float()


def make_mask(kind: str, b: int, t: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16):
    """None / bool / additive with a strided batch dim (a [..., :t] view of a 16-aligned buffer) / rows that see
    one key only (and, with b >= 3, a row that sees nothing)."""
    if kind == "none":
        return None
    visible = torch.rand(b, 1, 1, t, generator=gen) < 0.7
    visible[..., 0] = True  # at least one visible key per row unless the case says otherwise
    if kind == "one_key":
        visible = torch.zeros(b, 1, 1, t, dtype=torch.bool)
        visible[0, ..., t - 1] = True  # the last key only
        if b > 1:
            visible[1, ..., t // 2] = True  # a middle key only
        # b >= 3: row 2 sees nothing -> zeros
    if kind == "bool" or kind == "one_key":
        return visible.to(DEVICE)
    padded = -(-t // 16) * 16
    buffer = torch.zeros(b, 1, 1, padded, dtype=dtype, device=DEVICE)[..., :t]  # stride(0) = padded, not t
    return buffer.masked_fill_(~visible.to(DEVICE), float("-inf"))


def make_inputs(b, hk, g, d, t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hk, g, d, generator=gen)
    k = torch.randn(b, hk, t, d, generator=gen)
    v = torch.randn(b, hk, t, d, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v)], gen


# (b, hk, g, d, t, mask kind, dtype): every value of each axis appears; t not a multiple of any block
CASES = [
    (1, 8, 4, 128, 1028, "additive", HALF),  # the GateSWA ring at batch 1
    (3, 8, 4, 128, 1028, "additive", torch.float32),
    (1, 1, 1, 64, 1, "none", torch.float32),
    (3, 1, 8, 64, 1, "bool", HALF),
    (3, 8, 1, 64, 17, "additive", HALF),
    (1, 8, 8, 128, 17, "one_key", torch.float32),
    (3, 1, 4, 128, 17, "none", HALF),
    (1, 1, 8, 64, 1028, "bool", torch.float32),
    (3, 8, 8, 64, 1028, "one_key", HALF),
    (1, 8, 1, 128, 4099, "none", HALF),
    (3, 1, 4, 64, 4099, "one_key", torch.float32),
    (3, 1, 4, 128, 4099, "bool", HALF),
    (1, 1, 16, 128, 4099, "additive", torch.float32),  # the largest group
]


@runs_kernel
@pytest.mark.parametrize("b,hk,g,d,t,mask_kind,dtype", CASES,
                         ids=lambda x: str(x).replace("torch.", "") if not isinstance(x, int) else str(x))
def test_kernel_matches_reference(b, hk, g, d, t, mask_kind, dtype):
    (q, k, v), gen = make_inputs(b, hk, g, d, t, dtype)
    mask = make_mask(mask_kind, b, t, gen)
    if mask_kind == "additive":
        assert mask.dtype == torch.bfloat16 and mask.stride(0) == -(-t // 16) * 16  # a view of an aligned buffer
    with torch.no_grad():
        out = torch.ops.ascend_edit.gqa_decode(q, k, v, mask, d**-0.5)
    assert out.shape == (b, hk, g, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference(q, k, v, mask, d**-0.5), **TOL[dtype])
    if mask_kind == "one_key":  # the single visible value, exactly (up to the dtype's rounding of 1.0 * v)
        torch.testing.assert_close(out[0].float(), v[0, :, t - 1 : t].float().expand(hk, g, d), **TOL[dtype])
        if b >= 3:
            assert torch.count_nonzero(out[2]) == 0  # nothing visible: zeros, not NaN


@runs_kernel
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("block_t", [16, 64])
def test_every_split_count_gives_the_same_attention(num_splits, block_t):
    """Explicit split counts (one split writes the output directly; others go through the combine), tiles
    overhanging their split, a value width unlike the key width, one mask row broadcast over the batch with a
    finite bias and hidden keys."""
    (q, k, _), gen = make_inputs(2, 2, 3, 64, 301, torch.float32, seed=1)
    v = torch.randn(2, 2, 301, 32, generator=gen).to(DEVICE)
    mask = torch.randn(1, 1, 1, 301, generator=gen).to(DEVICE)  # a finite bias (ALiBi-like), not only 0 / -inf
    mask[..., 100:140] = float("-inf")
    config = gqa_decode.GqaDecodeConfig(block_t=block_t, num_splits=num_splits)
    with torch.no_grad():
        out = gqa_decode._launch(q, k, v, mask, 0.125, config)
    assert out.shape == (2, 2, 3, 32)
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.125), **TOL[torch.float32])


@runs_kernel
def test_strided_query_and_cache_views():
    """q with its hk / g strides swapped, K a slice of a longer cache, V with a non-unit last-dim stride (copied)."""
    (q, k, v), _ = make_inputs(2, 4, 2, 64, 90, torch.float32, seed=2)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [b, hk, g, d] with hk, g strides swapped
    k_big = torch.cat([k, k], dim=2)[:, :, 5:95]  # a view of a longer cache
    v_t = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # last-dim stride 90
    assert q_strided.stride(1) < q_strided.stride(2) and k_big.stride(1) == 2 * 90 * 64 and v_t.stride(-1) == 90
    with torch.no_grad():
        out = gqa_decode._launch(q_strided, k_big, v_t, None, 0.1)
    torch.testing.assert_close(out, reference(q, k_big, v, None, 0.1), **TOL[torch.float32])


@runs_kernel
def test_compiled_graph_runs_the_op():
    (q, k, v), gen = make_inputs(1, 2, 4, 64, 40, torch.float32, seed=3)
    mask = make_mask("additive", 1, 40, gen, torch.float32)
    fn = lambda q, k, v, m: torch.ops.ascend_edit.gqa_decode(q, k, v, m, 0.125) * 2.0  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask))


def test_op_traces_under_compile_through_the_fake_impl():
    """No kernel runs: meta tensors go through dynamo and AOT autograd (aot_eager's path), which see the op's
    fake impl only; the graph keeps the op as one node. Works without Triton."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    fn = lambda q, k, v, m: torch.ops.ascend_edit.gqa_decode(q, k, v, m, 0.125) + 1.0  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep))
    q = torch.empty(2, 8, 4, 128, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 8, 1028, 128, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(2, 1, 1, 1040, device="meta", dtype=torch.bfloat16)[..., :1028]
    with torch.no_grad():
        out = compiled(q, kv, kv, mask)
    assert out.shape == (2, 8, 4, 128) and out.dtype == torch.bfloat16
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert "ascend_edit.gqa_decode.default" in targets


def test_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 8, 4, 128, dtype=torch.bfloat16)
        k = torch.empty(3, 8, 50, 128, dtype=torch.bfloat16)
        v = torch.empty(3, 8, 50, 96, dtype=torch.bfloat16)
        out = torch.ops.ascend_edit.gqa_decode(q, k, v, torch.empty(3, 1, 1, 50, dtype=torch.bool), 0.1)
    assert out.shape == (3, 8, 4, 96) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("change,message", [
    ({"q": (2, 8, 17, 64)}, "at most 16"),
    ({"q": (2, 8, 64)}, "4-D"),
    ({"k": (2, 4, 30, 64)}, "do not match"),
    ({"v": (2, 8, 29, 64)}, "do not match"),
    ({"mask": (2, 1, 1, 31)}, r"\[1 or b, 1, 1, t\]"),
    ({"mask": (2, 8, 1, 30)}, r"\[1 or b, 1, 1, t\]"),
])
def test_bad_shapes_are_refused_with_one_line(change, message):
    shapes = {"q": (2, 8, 4, 64), "k": (2, 8, 30, 64), "v": (2, 8, 30, 64), "mask": (2, 1, 1, 30)}
    shapes.update(change)
    t = {name: torch.zeros(shape) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match=message) as err:
        gqa_decode._check_inputs(t["q"], t["k"], t["v"], t["mask"])
    assert "\n" not in str(err.value)


def test_bad_dtypes_are_refused():
    q, k = torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 8, 64)
    with pytest.raises(ValueError, match="one dtype"):
        gqa_decode._check_inputs(q, k.half(), k, None)
    with pytest.raises(ValueError, match="bool"):
        gqa_decode._check_inputs(q, k, k, torch.zeros(1, 1, 1, 8, dtype=torch.int32))


def test_gate_swa_hands_the_kernel_only_the_shapes_it_covers():
    """attention/gate_swa.py keeps its own copy of the kernel's group bound (importing this module imports Triton)."""
    from ascend_edit.attention import gate_swa

    assert gate_swa.KERNEL_MAX_GROUP == gqa_decode.MAX_GROUP
    assert gate_swa.kernel_covers(4, 128, 128)  # Qwen3-8B: 32 query heads over 8 KV heads of 128
    assert not gate_swa.kernel_covers(gqa_decode.MAX_GROUP + 1, 128, 128)  # e.g. 32 query heads on 1 KV head
    assert not gate_swa.kernel_covers(4, 256, 256)  # wider heads than the kernel has run: SDPA


def test_pipeline_stages_drop_to_fit_the_gpus_shared_memory():
    """Three stages of bf16 64-key K and V tiles at d = 128 need 96 KB of shared memory (+ the query block and a
    margin): an H100/H200 (227 KB per program) keeps them; a GPU with 99 KB per program (sm_86 / sm_89) gets two."""
    config = gqa_decode.DEFAULT_CONFIG
    assert config.num_stages == 3
    assert gqa_decode.stages_that_fit(config, 128, 128, 2, 227 * 1024) is config
    assert gqa_decode.stages_that_fit(config, 128, 128, 2, 99 * 1024).num_stages == 2
    assert gqa_decode.stages_that_fit(config, 128, 128, 2, 1).num_stages == 1  # never below one
    assert gqa_decode.stages_that_fit(config, 128, 128, 2, None) is config  # limit unknown: as configured
