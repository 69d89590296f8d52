"""Op B (absorbed MLA attention): the eager reference, the Triton decode kernel and its custom op."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from ascend_edit.kernels import reference
from ascend_edit.kernels.triton import mla_decode, mla_decode_gluon, split_k
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.helpers.scripts import benchmark_script

FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}


def make_mla_inputs(
    b: int = 2,
    h: int = 4,
    s: int = 1,
    c: int = 16,
    r: int = 8,
    t: int = 24,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    empty_slots: bool = False,
    no_visible_row: bool = False,
    seed: int = 0,
) -> dict:
    """Decode-style inputs: the last ``s`` positions of a ``t``-token context offset by 50."""
    gen = torch.Generator().manual_seed(seed)
    k_pos = (50 + torch.arange(t)).repeat(b, 1)
    q_pos = k_pos[:, -s:].clone()
    if empty_slots:
        k_pos[0, 3:7] = -1  # unused cache slots
    if no_visible_row:
        q_pos[-1, 0] = 10  # earlier than every cached position
    tensors = {
        "q_latent": torch.randn(b, h, s, c, generator=gen),
        "q_rope": torch.randn(b, h, s, r, generator=gen),
        "latent": torch.randn(b, t, c, generator=gen),
        "k_rope": torch.randn(b, t, r, generator=gen),
    }
    inp = {n: x.to(device=device, dtype=dtype) for n, x in tensors.items()}
    inp.update(q_pos=q_pos.to(device), k_pos=k_pos.to(device), scale=1.0 / math.sqrt(c + r))
    return inp


def _call(fn, inp: dict) -> torch.Tensor:
    return fn(
        inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"],
        q_pos=inp["q_pos"], k_pos=inp["k_pos"], scale=inp["scale"],
    )  # fmt: skip


@pytest.mark.parametrize("s", [1, 3])
@pytest.mark.parametrize("empty_slots", [False, True])
def test_mla_reference_equals_attention_over_concatenated_keys(s: int, empty_slots: bool) -> None:
    """Absorbed MLA is MQA with key [latent, k_rope], value latent and query [q_latent, q_rope]."""
    inp = make_mla_inputs(s=s, empty_slots=empty_slots)
    expected = reference.sliding_window_attention(
        torch.cat([inp["q_latent"], inp["q_rope"]], dim=-1),
        torch.cat([inp["latent"], inp["k_rope"]], dim=-1)[:, None],  # one KV head shared by all
        inp["latent"][:, None],
        q_pos=inp["q_pos"],
        k_pos=inp["k_pos"],
        window=0,
        sink_tokens=0,
        scale=inp["scale"],
    )
    torch.testing.assert_close(_call(reference.mla_absorbed_attention, inp), expected, **FP32_TOL)


def test_mla_reference_by_hand_for_one_query() -> None:
    inp = make_mla_inputs(b=1, h=1, s=1, t=5)
    scores = (inp["latent"][0] @ inp["q_latent"][0, 0, 0] + inp["k_rope"][0] @ inp["q_rope"][0, 0, 0]) * inp["scale"]
    expected = torch.softmax(scores, dim=0) @ inp["latent"][0]
    torch.testing.assert_close(_call(reference.mla_absorbed_attention, inp)[0, 0, 0], expected, **FP32_TOL)


def test_mla_reference_row_without_visible_key_is_zero_with_finite_grads() -> None:
    inp = make_mla_inputs(no_visible_row=True)
    for name in ("q_latent", "q_rope", "latent", "k_rope"):
        inp[name].requires_grad_(True)
    out = _call(reference.mla_absorbed_attention, inp)
    assert torch.count_nonzero(out[-1, :, 0]) == 0
    assert torch.count_nonzero(out[0]) > 0
    out.square().sum().backward()
    assert all(torch.isfinite(inp[n].grad).all() for n in ("q_latent", "q_rope", "latent", "k_rope"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latent": torch.randn(2, 4, 24, 16)}, "3-D"),
        ({"k_rope": torch.randn(2, 24, 5)}, "k_rope"),
        ({"q_rope": torch.randn(2, 3, 1, 8)}, "q_rope"),
        ({"k_pos": torch.zeros(2, 23, dtype=torch.long)}, "k_pos"),
    ],
)
def test_mla_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(reference.mla_absorbed_attention, dict(make_mla_inputs(), **change))


def test_triton_backend_refuses_inputs_that_need_grad() -> None:
    """Forward only: the check runs before any kernel, so it holds on CPU too."""
    inp = make_mla_inputs()
    inp["q_latent"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        _call(mla_decode.mla_absorbed_attention, inp)


def test_mla_decode_fake_impl_gives_output_metadata() -> None:
    """The custom op traces without running: the fake impl returns [b, h, s, c] in the input dtype."""
    with FakeTensorMode():
        inp = make_mla_inputs(b=3, h=5, s=2, c=32, r=8, t=40, dtype=torch.bfloat16)
        out = torch.ops.ascend_edit.mla_decode(
            inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"]
        )
        assert out.shape == (3, 5, 2, 32)
        assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# CUDA: the Triton kernel against the reference (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

CUDA_MLA_CASES = [
    # (b, h, s, c, r, t, dtype, empty_slots, no_visible_row)
    (2, 16, 1, 512, 64, 1000, torch.bfloat16, False, False),
    (2, 32, 1, 512, 64, 4099, torch.bfloat16, True, True),
    (1, 4, 3, 512, 64, 300, torch.bfloat16, True, False),
    (3, 8, 2, 128, 32, 77, torch.float16, False, True),
    (2, 16, 1, 512, 64, 257, torch.float32, True, False),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CUDA_MLA_CASES, ids=lambda c: f"b{c[0]}h{c[1]}s{c[2]}c{c[3]}t{c[5]}-{c[6]}")
def test_triton_mla_decode_matches_reference(case: tuple) -> None:
    b, h, s, c, r, t, dtype, empty_slots, no_visible_row = case
    inp = make_mla_inputs(
        b, h, s, c, r, t, dtype=dtype, device="cuda", empty_slots=empty_slots, no_visible_row=no_visible_row
    )
    with torch.no_grad():
        out = _call(mla_decode.mla_absorbed_attention, inp)
    fp32_inp = dict(inp, **{n: inp[n].float() for n in ("q_latent", "q_rope", "latent", "k_rope")})
    expected = _call(reference.mla_absorbed_attention, fp32_inp)
    # fp32 runs the kernel's dots in IEEE fp32; half types round p to 16 bits before p @ latent.
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, **tol)
    if no_visible_row:
        assert torch.count_nonzero(out[-1, :, 0]) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_mla_decode_custom_op_opcheck_and_compile() -> None:
    inp = make_mla_inputs(2, 16, 1, 512, 64, 300, dtype=torch.bfloat16, device="cuda")
    args = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])
    torch.library.opcheck(
        torch.ops.ascend_edit.mla_decode.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    compiled = torch.compile(lambda *a: torch.ops.ascend_edit.mla_decode(*a) * 2.0, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), torch.ops.ascend_edit.mla_decode(*args) * 2.0)


# ---------------------------------------------------------------------------------------------
# Launch configurations of the Triton kernel (DecodeConfig; benchmarks/mla_decode_sweep.py)
# ---------------------------------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DecodeConfig = mla_decode.DecodeConfig

# One of each kind the sweep times, plus tiles that overhang their split (block_t > split_len).
LAUNCH_CONFIGS = [
    mla_decode.DEFAULT_CONFIG,
    DecodeConfig(kernel="rows", block_t=32, block_m=16, num_warps=4, num_stages=4),
    DecodeConfig(kernel="rows", block_t=32, block_m=64, pad_rows=True, num_warps=8, num_stages=3, num_splits=3),
    DecodeConfig(kernel="rows", block_t=128, block_m=32, num_warps=4, num_stages=2, num_splits=3),
    # TMA tensor-descriptor loads, with tiles overhanging into the next split (cache rows, masked by k_pos)
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, tma=True, num_splits=3),
    DecodeConfig(kernel="rows", block_t=128, block_m=32, num_warps=4, num_stages=2, tma=True, num_splits=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=8, num_stages=2, tma=True, maxnreg=128),
    DecodeConfig(kernel="rows", block_t=16, block_m=32, num_warps=4, num_stages=5, tma=True, num_splits=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, lazy_rescale=True, num_splits=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, pdl=True, num_splits=3),
    DecodeConfig(kernel="rows", block_t=64, block_m=32, num_warps=4, num_stages=2, merge_warps=1, num_splits=3),
    DecodeConfig(kernel="rows", block_t=32, block_m=32, num_warps=4, num_stages=3, pipeline_all=True, evict_first=True),
]


GLUON_CASES = [
    # (b, h, s, c, r, t, dtype, splits): 32 and 16 query rows, s > 1, tiles overhanging their split,
    # contexts that are not multiples of the 64-row tile, the last batch element's tail past the cache
    (2, 32, 1, 512, 64, 1000, torch.bfloat16, 3),
    (3, 16, 2, 512, 64, 4099, torch.bfloat16, None),
    (2, 16, 1, 256, 32, 77, torch.float16, 1),
    (4, 32, 1, 512, 64, 8192, torch.bfloat16, 4),
]


def _assert_launch_matches_reference(inp: dict, config: DecodeConfig) -> None:
    """``_launch`` with ``config`` equals the fp32 reference; the last batch element's first query row (made to
    see no key by ``no_visible_row``) is zero."""
    args = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])
    with torch.no_grad():
        out = mla_decode._launch(*args, config=config)
    fp32_inp = dict(inp, **{n: inp[n].float() for n in ("q_latent", "q_rope", "latent", "k_rope")})
    expected = _call(reference.mla_absorbed_attention, fp32_inp)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert torch.count_nonzero(out[-1, :, 0]) == 0  # the row with no visible key


def _gluon_on_this_gpu() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and mla_decode_gluon.gluon_available())  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(not _gluon_on_this_gpu(), reason="needs an sm_90 GPU and Triton's Gluon")
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: f"b{c[0]}h{c[1]}s{c[2]}c{c[3]}r{c[4]}t{c[5]}")
def test_gluon_split_pass_matches_reference(case: tuple) -> None:
    """The Gluon split pass (TMA ring + wgmma) against the fp32 reference, with empty cache slots and a row
    with no visible key; the call is one the Gluon pass takes (no fallback on the shape check)."""
    b, h, s, c, r, t, dtype, splits = case
    inp = make_mla_inputs(b, h, s, c, r, t, dtype=dtype, device="cuda", empty_slots=True, no_visible_row=True)
    config = DecodeConfig(kernel="gluon", block_t=64, block_m=32, num_warps=4, num_stages=2, num_splits=splits)
    assert mla_decode_gluon.supported(inp["q_latent"], inp["latent"], inp["k_rope"]) is None
    _assert_launch_matches_reference(inp, config)


@pytest.mark.cuda
@pytest.mark.skipif(not _gluon_on_this_gpu(), reason="needs an sm_90 GPU and Triton's Gluon")
def test_gluon_direct_launch_serves_every_length_split_and_offset() -> None:
    """After the first call of a specialisation the split pass launches its compiled kernel directly (no JIT
    dispatch): later calls of the same specialisation with other lengths and split counts, from an offset position
    view and from latent / k_rope slices of one fused [b, t, c + r] cache, must still be right, without compiling."""
    config = DecodeConfig(kernel="gluon", block_t=64, block_m=32, num_warps=4, num_stages=2)
    # t, b * t, the strides and the split counts share their "is 1" / "divisible by 16" facts across the three
    # calls, so the second and third reuse the first one's compiled kernel
    compiled_before = None
    for t, splits in ((333, 2), (517, 3), (1013, 5)):
        inp = make_mla_inputs(2, 32, 1, 512, 64, t, dtype=torch.bfloat16, device="cuda", empty_slots=True)
        fused = torch.cat([inp["latent"], inp["k_rope"]], dim=-1)  # one cache buffer, rows of c + r
        inp["latent"], inp["k_rope"] = fused[..., :512], fused[..., 512:]
        padded = torch.cat([torch.zeros_like(inp["k_pos"][:, :1]), inp["k_pos"]], dim=1)
        inp["k_pos"] = padded[:, 1:]  # an offset view: 8 bytes past an aligned base
        assert mla_decode_gluon.supported(inp["q_latent"], inp["latent"], inp["k_rope"]) is None
        args = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])
        with torch.no_grad():
            out = mla_decode._launch(*args, config=dataclasses.replace(config, num_splits=splits))
        fp32_inp = dict(inp, **{n: inp[n].float() for n in ("q_latent", "q_rope", "latent", "k_rope")})
        torch.testing.assert_close(out.float(), _call(reference.mla_absorbed_attention, fp32_inp), atol=2e-2, rtol=2e-2)
        if compiled_before is None:
            compiled_before = len(mla_decode_gluon._COMPILED)
        assert len(mla_decode_gluon._COMPILED) == compiled_before  # served by the direct launch


def test_gluon_config_falls_back_with_a_reason_off_hopper() -> None:
    """Off sm_90 (here: CPU tensors) the Gluon split pass says why it does not apply; the config is validated."""
    inp = make_mla_inputs(1, 32, 1, 64, 16, 10, dtype=torch.bfloat16)
    reason = mla_decode_gluon.supported(inp["q_latent"], inp["latent"], inp["k_rope"])
    assert reason is not None and ("sm_90" in reason or "Gluon" in reason)
    with pytest.raises(ValueError, match="block_t=64"):
        DecodeConfig(kernel="gluon", block_t=32, num_warps=4, num_stages=2)
    # sizes the kernel is not compiled for are refused before any launch (block shapes are powers of two)
    assert mla_decode_gluon.shape_reason(32, 512, 64, torch.bfloat16) is None
    for rows, c, r, dtype in ((32, 192, 64, torch.bfloat16), (32, 320, 64, torch.bfloat16), (64, 512, 64, torch.bfloat16),
                              (9, 512, 64, torch.bfloat16), (32, 512, 16, torch.bfloat16), (32, 512, 64, torch.float32)):
        assert mla_decode_gluon.shape_reason(rows, c, r, dtype) is not None
    assert "sm_90" in mla_decode_gluon.device_reason(torch.device("cpu")) or not mla_decode_gluon.gluon_available()
    # report labels name the kernel that runs: the Triton fallback for 9 heads (or off Hopper)
    assert mla_decode.tuned_config(512, 64, 9).startswith("rows")


@pytest.mark.skipif(
    not (torch.cuda.is_available() or (INTERPRET and mla_decode.triton_available())),
    reason="needs a CUDA GPU, or Triton with TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=lambda c: c.label().replace(" ", "-"))
def test_every_launch_config_matches_reference(config: DecodeConfig) -> None:
    """Every configuration computes the same attention: s=2 query positions, empty cache slots and
    a query row with no visible key, row counts that are not multiples of the block."""
    if torch.cuda.is_available():  # real sizes: 16-byte vector loads, no column masks
        inp = make_mla_inputs(2, 16, 2, 512, 64, 700, dtype=torch.bfloat16, device="cuda",
                              empty_slots=True, no_visible_row=True)  # fmt: skip
    else:  # Triton's interpreter computes through numpy, which has no bf16
        inp = make_mla_inputs(2, 10, 2, 64, 16, 150, dtype=torch.float16, empty_slots=True, no_visible_row=True)
    _assert_launch_matches_reference(inp, config)


@pytest.mark.skipif(
    not (torch.cuda.is_available() or (INTERPRET and mla_decode.triton_available())),
    reason="needs a CUDA GPU, or Triton with TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_lazy_rescale_is_exact_when_the_running_max_keeps_growing(num_splits: int) -> None:
    """Keys whose scores grow along the context raise each row's running max by far more than 2^8 several
    times inside one split: the accumulator must be rescaled then, and the stale max in between must not
    change the result."""
    if torch.cuda.is_available():
        inp = make_mla_inputs(2, 16, 1, 512, 64, 700, dtype=torch.bfloat16, device="cuda", empty_slots=True)
    else:
        inp = make_mla_inputs(2, 10, 1, 64, 16, 300, dtype=torch.float16, empty_slots=True)
    t = inp["latent"].shape[1]
    growth = torch.linspace(0.1, 12.0, t, device=inp["latent"].device)[None, :, None]
    inp["latent"] = (inp["latent"].float() * growth).to(inp["latent"].dtype)
    inp["k_rope"] = (inp["k_rope"].float() * growth).to(inp["k_rope"].dtype)
    fp32_inp = dict(inp, **{n: inp[n].float() for n in ("q_latent", "q_rope", "latent", "k_rope")})
    expected = _call(reference.mla_absorbed_attention, fp32_inp)
    scores = torch.einsum("bhsc,btc->bhst", fp32_inp["q_latent"], fp32_inp["latent"]) * inp["scale"] * 1.4427
    assert float(scores.amax(-1).amax() - scores[..., : t // 4].amax(-1).amin()) > 3 * 8  # several rescales
    args = (inp["q_latent"], inp["q_rope"], inp["latent"], inp["k_rope"], inp["q_pos"], inp["k_pos"], inp["scale"])
    config = DecodeConfig(kernel="rows", block_t=32, block_m=16, num_warps=4, num_stages=2, lazy_rescale=True,
                          num_splits=num_splits)
    with torch.no_grad():
        out = mla_decode._launch(*args, config=config)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


GLUON_SHAPE = {"kernel": "gluon", "block_t": 64, "num_warps": 4, "num_stages": 2}  # a valid Gluon config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kernel": "cols"}, "kernel"),
        ({"kernel": "keys"}, "kernel"),  # the Triton swap-AB kernel was removed (2026-12-04)
        ({**GLUON_SHAPE, "lazy_rescale": True}, "lazy_rescale"),
        ({**GLUON_SHAPE, "pdl": True}, "pdl"),
        ({"merge_warps": 3}, "merge_warps"),
        ({**GLUON_SHAPE, "evict_first": True}, "evict_first"),
        ({"kernel": "gluon", "tma": True}, "tma"),
        ({"maxnreg": 16}, "maxnreg"),
        ({"block_t": 48}, "block_t"),
        ({"block_m": 8}, "block_m"),
        ({"num_warps": 6}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"num_splits": 0}, "num_splits"),
        ({"programs_per_sm": 0}, "programs_per_sm"),
    ],
)
def test_decode_config_rejects_bad_choices(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**fields)


@pytest.mark.parametrize("kv_len", [1, 63, 64, 300, 4099, 8192])
@pytest.mark.parametrize("wanted", [1, 3, 4, 32])
def test_splits_cover_the_context_without_empty_splits(kv_len: int, wanted: int) -> None:
    split_len = split_k.split_len(kv_len, wanted)
    splits = math.ceil(kv_len / split_len)
    assert split_len % split_k.MIN_SPLIT_LEN == 0
    assert splits <= wanted and splits * split_len >= kv_len and (splits - 1) * split_len < kv_len


def test_split_cost_model_fills_every_resident_program_slot() -> None:
    # B=32 programs per split over 8,192 rows of 1,152 bytes on 132 SMs: one program per SM fits 4
    # splits in a wave, two per SM fit 8 (shorter splits in the same single wave).
    assert split_k.num_splits(32, 32, 8192, 1152, 512, 132) == (4, 2048)
    assert split_k.num_splits(32, 32, 8192, 1152, 512, 2 * 132) == (8, 1024)


def test_sweep_best_line_is_a_config_that_can_be_pasted() -> None:
    """The sweep prints ``DEFAULT_CONFIG = DecodeConfig(...)``; that text must build the same config."""
    with benchmark_script("mla_decode_sweep") as sweep:
        extra = DecodeConfig(kernel="rows", tma=True, lazy_rescale=True, num_splits=8, maxnreg=128)
        configs = [config for configs, _ in sweep.CONFIG_SETS.values() for config in configs]
        for config in [*configs, extra]:
            assert eval(sweep.config_call(config), {"DecodeConfig": DecodeConfig}) == config  # noqa: S307 - own text


def test_sweep_child_results_survive_the_json_round_trip() -> None:
    """--isolate passes each configuration to a child process and reads its rows back as JSON."""
    with benchmark_script("mla_decode_sweep") as sweep:
        config = DecodeConfig(kernel="rows", tma=True, pdl=True, maxnreg=128, num_splits=8, programs_per_sm=2)
        assert DecodeConfig(**json.loads(sweep._config_json(config))) == config
        timed = sweep.Result(32, config, "rows M32", ms=0.1, wall_ms=0.2, gbps=3000.0, pct_copy=70.5, max_diff=1e-3, ok=True)
        assert sweep._result_from_json(json.loads(json.dumps(timed.to_json()))) == timed
        failed = sweep.Result(32, config, "rows M32", error="failed: RuntimeError: illegal memory access")
        back = sweep._result_from_json(json.loads(json.dumps(failed.to_json())))
        assert back.error == failed.error and back.config == config and math.isnan(back.ms) and not back.ok
