"""Decode-only linear rewrites (`models/decode_fusion.py`): greedy decode is unchanged, weights are not copied.

Tiny converted MLA and GateSWA models and the stock teacher, decoded through `StaticDecoder` (eager and
compiled with `fullgraph=True`) after fusing the projections that read one input, against the same
model untransformed. With `TRITON_INTERPRET=1` (Triton importable) the GEMV kernel also runs, on CPU
through Triton's interpreter, for the decode steps' few rows.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from ascend_edit.attention.gate_swa import GateSWAAttention, packed_decode_path
from ascend_edit.attention.mla import MLAAttention
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig
from ascend_edit.models.decode_fusion import (
    DecodeLinear,
    FusedInputLinear,
    OutputSlice,
    auto_swa_attention,
    fuse_decode_projections,
    set_swa_decode_attention,
    use_gemv_linears,
)
from ascend_edit.models.static_decode import StaticDecoder
from tests.conftest import tiny_model
from tests.helpers.converted import converted_tiny

WINDOW = 6
TARGETS = {
    "mla": TargetConfig(kind="mla", init="random",
                        mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    "gate_swa": TargetConfig(kind="gate_swa", init="random",
                             gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=2, full_every=2)),
    "gate_swa_elementwise": TargetConfig(kind="gate_swa", init="random",
                                         gate_swa=GateSWAConfig(window=WINDOW, sink_tokens=0, gate="elementwise")),
}
NEW_TOKENS = 2 * WINDOW
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(kind: str) -> nn.Module:
    return tiny_model("qwen3") if kind == "teacher" else converted_tiny(TARGETS[kind])


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def greedy(model, mode: str) -> torch.Tensor:
    ids, mask = prompts()
    torch._dynamo.reset()  # compiled code is cached per function: each decoder here starts from none
    decoder = StaticDecoder(model, batch=2, max_cache_len=ids.shape[1] + NEW_TOKENS, mode=mode,
                            **({"backend": "aot_eager"} if mode == "compile" else {}))
    with torch._dynamo.config.patch(error_on_recompile=True):  # the hooks' state must not change the guards
        return decoder.generate(ids, mask, NEW_TOKENS)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("kind", ["mla", "gate_swa", "gate_swa_elementwise", "teacher"])
def test_fused_projections_decode_as_the_original(kind):
    model = build(kind)
    want = greedy(model, "eager")
    fused = copy.deepcopy(model)
    attentions = sum(isinstance(m, (MLAAttention, GateSWAAttention)) or type(m).__name__.startswith("Qwen3Attention")
                     for m in model.modules())  # converted layers keep the teacher's beside their target
    count = fuse_decode_projections(fused)
    assert count == attentions + model.config.num_hidden_layers  # + the MLP's gate and up per layer
    assert param_bytes(fused) == param_bytes(model)  # the fused modules own the only copy
    for module in fused.modules():
        if isinstance(module, (MLAAttention, GateSWAAttention)) or type(module).__name__.endswith("MLP"):
            assert sum(isinstance(m, FusedInputLinear) for m in module.children()) == 1
            assert not any(isinstance(getattr(module, n, None), nn.Linear)
                           for n in ("q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa", "gate_proj", "up_proj"))
    assert torch.equal(greedy(fused, "eager"), want)
    assert torch.equal(greedy(fused, "compile"), want)


def test_one_fused_gemm_per_group_and_nothing_kept_after_the_forward():
    model = build("mla")
    fuse_decode_projections(model)
    attn = next(m for m in model.modules() if isinstance(m, MLAAttention))
    calls = []
    attn.q_kv_a_proj.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with torch.no_grad():
        model(torch.randint(3, 250, (1, 5)))
    assert len(calls) == 1 and calls[0][-1] == sum(attn.q_kv_a_proj.widths)
    assert attn.q_kv_a_proj._primed is None
    assert isinstance(attn.q_proj, OutputSlice) and attn.q_proj.weight.shape == (attn.q_proj.out_features, 64)
    # a slice called on another input (not the module's own forward) computes its columns itself
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        want = x @ attn.kv_a_proj_with_mqa.weight.T
        if attn.kv_a_proj_with_mqa.bias is not None:
            want = want + attn.kv_a_proj_with_mqa.bias
        torch.testing.assert_close(attn.kv_a_proj_with_mqa(x), want)


def test_gemv_linears_share_the_weights_and_fall_back_off_device():
    model = build("gate_swa")
    before = param_bytes(model)
    lm_head = model.lm_head.weight
    fuse_decode_projections(model)
    switched = use_gemv_linears(model)  # the kernel serves CUDA; on CPU every call falls back to F.linear
    assert switched > 0 and param_bytes(model) == before and model.lm_head.weight is lm_head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert all(m.kernel_devices == ("cuda",) for m in model.modules() if isinstance(m, (DecodeLinear, FusedInputLinear)))
    ids, mask = prompts()
    reference = build("gate_swa")
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits.argmax(-1),
                           reference(ids, attention_mask=mask).logits.argmax(-1))


@pytest.mark.skipif(not INTERPRET, reason="the GEMV kernel on CPU needs TRITON_INTERPRET=1 and Triton")
@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_gemv_kernel_decodes_as_the_original(kind):
    pytest.importorskip("triton")
    model = build(kind)
    want = greedy(model, "eager")
    fuse_decode_projections(model)
    use_gemv_linears(model, kernel_devices=("cpu",))  # the interpreter runs the kernel on CPU tensors
    assert torch.equal(greedy(model, "eager"), want)
    assert torch.equal(greedy(model, "compile"), want)


def test_bench_decode_flags_transform_the_converted_models_and_label_their_rows():
    from ascend_edit.tasks import bench_decode as bd

    args = bd.parse_args(["--model", "qwen3_tiny", "--kinds", "teacher", "mla", "--device", "cpu",
                          "--decode-linears", "gemv", "--fuse-projections",
                          "--target-override", "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8",
                          "target.mla.kv_lora_rank=16", "target.mla.v_head_dim=16"])
    settings = bd.settings_from_args(args)
    assert (settings.decode_linears, settings.fuse_projections) == ("gemv", True)
    assert bd.linears_label(settings, "mla") == "gemv+fused" and bd.linears_label(settings, "teacher") == "cublas"
    mla = bd.build_model(settings, "mla", torch.device("cpu"))
    teacher = bd.build_model(settings, "teacher", torch.device("cpu"))
    assert any(isinstance(m, FusedInputLinear) for m in mla.modules())
    assert not any(type(m) is nn.Linear for m in mla.modules())
    assert not any(isinstance(m, (FusedInputLinear, DecodeLinear)) for m in teacher.modules())  # not in transform_kinds


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_gemv_and_fusion_decode_as_the_original_on_cuda(kind):
    """The kernel inside the compiled step (inductor, CUDA graphs: "reduce-overhead"), fp32 weights."""
    pytest.importorskip("triton")
    model = build(kind).cuda()
    ids, mask = (t.cuda() for t in prompts())
    want = StaticDecoder(model, batch=2, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="eager").generate(
        ids, mask, NEW_TOKENS)
    fuse_decode_projections(model)
    use_gemv_linears(model)
    for mode in ("eager", "compile"):
        torch._dynamo.reset()
        decoder = StaticDecoder(model, batch=2, max_cache_len=ids.shape[1] + NEW_TOKENS, mode=mode)
        assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want), mode


@pytest.mark.parametrize("devices, triton, want", [({"cuda"}, True, "kernel"), ({"cuda"}, False, "sdpa"),
                                                    ({"cpu"}, True, "sdpa"), ({"npu"}, False, "sdpa")])
def test_auto_swa_attention_picks_the_kernel_on_cuda_with_triton(devices, triton, want):
    assert auto_swa_attention(devices, triton) == want


@pytest.mark.parametrize("how, device, compiling, groups, head_dim, keys, want", [
    ("kernel", "cuda", False, 4, 128, 32768, "kernel"),  # eager and compiled, any cache length
    ("kernel", "cuda", True, 16, 64, 1024, "kernel"),
    ("kernel", "cuda", True, 17, 128, 1024, "sdpa"),  # more query heads per KV head than one row block
    ("kernel", "cuda", True, 4, 256, 1024, "sdpa"),  # wider heads than the kernel has run
    ("kernel", "cpu", True, 4, 128, 1024, "sdpa"),
    ("reductions", "cuda", True, 4, 128, 4096, "reductions"),
    ("reductions", "cuda", False, 4, 128, 1024, "sdpa"),  # eager: the reductions would materialise [b, hk, g, t, d]
    ("reductions", "cuda", True, 4, 128, 4097, "sdpa"),  # past REDUCTION_MAX_KEYS
    ("sdpa", "cuda", True, 4, 128, 1024, "sdpa"),
])
def test_packed_decode_path(how, device, compiling, groups, head_dim, keys, want):
    assert packed_decode_path(how, device, compiling, groups, head_dim, head_dim, keys) == want


def test_kernel_decode_attention_is_set_only_where_the_kernel_covers_the_shape():
    model = build("gate_swa")
    layers = [m for m in model.modules() if isinstance(m, GateSWAAttention)]
    assert set_swa_decode_attention(model, "kernel") == len(layers) > 1
    assert {layer.decode_attention for layer in layers} == {"kernel"}
    layers[0].num_key_value_groups = 17  # as a layer with 17 query heads per KV head would be
    assert set_swa_decode_attention(model, "kernel") == len(layers) - 1
    assert [layer.decode_attention for layer in layers] == ["sdpa"] + ["kernel"] * (len(layers) - 1)


@pytest.mark.cuda
@pytest.mark.parametrize("how", ["reductions", "kernel"])
def test_swa_decode_attention_decodes_as_sdpa_on_cuda(how):
    """GateSWA's decode attention off SDPA (models.decode_fusion.set_swa_decode_attention), eager and compiled
    ("reduce-overhead"), fp32 weights: the tokens of the SDPA path, past the window, rows of different lengths."""
    pytest.importorskip("triton")
    model = build("gate_swa").cuda()
    ids, mask = (t.cuda() for t in prompts())
    want = StaticDecoder(model, batch=2, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="eager").generate(
        ids, mask, NEW_TOKENS)
    assert set_swa_decode_attention(model, how) > 0
    for mode in ("eager", "compile"):
        torch.compiler.reset()
        decoder = StaticDecoder(model, batch=2, max_cache_len=ids.shape[1] + NEW_TOKENS, mode=mode)
        assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want), mode
