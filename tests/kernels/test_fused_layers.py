"""Fused decoder-layer ops by module swapping (``ascend_edit/models/fused_layers.py``).

"NPU" here is ``NpuStandIn`` -- labelled stand-ins of the documented torch_npu / MindSpeed ops
(``tests/kernels/npu_standin.py``), not Ascend hardware: the tests check which kernels the
default recipes resolve and that swapped models compute what the originals compute.

The teacher's own attention is swapped for ``FusedRotaryAttention`` (its RoPE through the rotary
kernel); with the eager references on CPU that swap must be *exact*: logits are compared with
``torch.equal`` (tolerance 0) in fp32, with and without a KV cache, and gradients likewise.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from ascend_edit.kernels import fused_reference
from ascend_edit.kernels.npu import fused_ops

from ascend_edit.attention import rope
from ascend_edit.config import GateSWAConfig, MLAConfig, TargetConfig, register_configs, to_typed
from ascend_edit.models.fused_attention import FusedRotaryAttention
from ascend_edit.models.fused_layers import FusedOpsConfig, FusedRMSNorm, FusedSwiGLUMLP, install_fused_ops
from ascend_edit.models.surgery import build_plan, decoder_layers, edit_model, set_mode
from tests.conftest import tiny_model

from .npu_standin import NpuStandIn

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def eager_rope_after_each_test():
    yield
    rope.set_rope_kernel(None)  # the rotary choice is process-wide: never leak it into other tests


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> NpuStandIn:
    return NpuStandIn().install(monkeypatch, mindspeed=True)


def _student(kind: str) -> torch.nn.Module:
    teacher = tiny_model("qwen3")
    if kind == "teacher":
        return teacher
    target = TargetConfig(
        kind=kind, init="random",
        gate_swa=GateSWAConfig(window=5, sink_tokens=2, full_every=2),
        mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    )  # fmt: skip
    torch.manual_seed(0)
    return edit_model(teacher, build_plan(teacher.config.num_hidden_layers, target), target).eval()


def _count(model: torch.nn.Module, suffix: str) -> int:
    return sum(type(m).__name__.endswith(suffix) for m in model.modules())


@pytest.mark.parametrize("kind", ["teacher", "gate_swa", "mla"])
def test_default_recipe_on_a_stand_in_npu_swaps_in_the_fused_entries(kind: str, stand_in: NpuStandIn) -> None:
    model = _student(kind)
    original = copy.deepcopy(model)
    norms, mlps = _count(model, "RMSNorm"), _count(model, "MLP")
    keys = set(model.state_dict())

    chosen = install_fused_ops(model, FusedOpsConfig(), device_type="npu")

    assert chosen == {"rms_norm": "npu", "rotary_embedding": "npu", "swiglu": "npu"}
    fused_norms = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused_norms) == norms and all(m.kernel is fused_ops.rms_norm for m in fused_norms)
    assert _count(model, "MLP") == mlps and all(
        m.kernel is fused_ops.swiglu for m in model.modules() if isinstance(m, FusedSwiGLUMLP))
    assert set(model.state_dict()) == keys, "swapping must not rename parameters (checkpoints, export)"

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, **TOL)
    assert {"npu_rms_norm", "npu_swiglu", "npu_rotary_mul"} <= set(stand_in.ops_called())


def _teacher_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [getattr(layer.self_attn, "teacher", layer.self_attn) for layer in decoder_layers(model)]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "qwen3_moe"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_teacher_attention_swap_is_exact_on_cpu(arch: str, attn_implementation: str) -> None:
    """Forced on CPU (eager references): the swapped teacher computes bit for bit what the stock one does."""
    model = tiny_model(arch)
    model.set_attn_implementation(attn_implementation)
    original = copy.deepcopy(model)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}

    install_fused_ops(model, FusedOpsConfig(enabled="on"), device_type="cpu")

    attns = _teacher_attentions(model)
    assert all(isinstance(a, FusedRotaryAttention) and a.rotary is fused_reference.rotary_embedding for a in attns)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys, "same parameters, same names"
    if arch.startswith("qwen3"):
        assert all(isinstance(a.q_norm, FusedRMSNorm) and isinstance(a.k_norm, FusedRMSNorm) for a in attns)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
        # Prefill, then two decode steps through the KV cache.
        got, want = model(input_ids=ids[:, :9], use_cache=True), original(input_ids=ids[:, :9], use_cache=True)
        for step in (ids[:, 9:10], ids[:, 10:12]):
            got = model(input_ids=step, cache=got.past_key_values, use_cache=True)
            want = original(input_ids=step, cache=want.past_key_values, use_cache=True)
            assert torch.equal(got.logits, want.logits)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_teacher_attention_swap_is_exact_in_bf16(arch: str) -> None:
    model = tiny_model(arch).to(torch.bfloat16)
    original = copy.deepcopy(model)
    install_fused_ops(model, FusedOpsConfig(enabled="on"), device_type="cpu")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_teacher_attention_swap_keeps_gradients_exact_on_cpu() -> None:
    model = tiny_model("qwen3").train()
    original = copy.deepcopy(model)
    install_fused_ops(model, FusedOpsConfig(enabled="on"), device_type="cpu")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    original(input_ids=ids, labels=ids).loss.backward()
    want = dict(original.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, want[name].grad), name


def test_teacher_rope_and_qk_norms_run_the_fused_entries_on_a_stand_in_npu(stand_in: NpuStandIn) -> None:
    """Teacher mode of a converted model: every teacher layer rotates q and k and normalises them fused."""
    model = _student("gate_swa")
    original = copy.deepcopy(model)
    install_fused_ops(model, FusedOpsConfig(), device_type="npu")
    set_mode(model, "teacher")
    set_mode(original, "teacher")
    layers = len(decoder_layers(model))
    assert all(isinstance(a, FusedRotaryAttention) and a.rotary is fused_ops.rotary_embedding
               for a in _teacher_attentions(model))  # fmt: skip
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, **TOL)
    rotary = [c for c in stand_in.calls if c["op"] == "npu_rotary_mul"]
    assert len(rotary) == 2 * layers, "q and k of every teacher layer"
    # q / k come as [b, s, h, d] storage: the op gets them as BSND, no copy; cos / sin of the shared
    # positions ([1, s, d] from the rotary module) as 1S1D.
    assert {(c["shape"], c["r_shape"]) for c in rotary} == {((2, 12, 4, 16), (1, 12, 1, 16)),
                                                             ((2, 12, 2, 16), (1, 12, 1, 16))}
    norms = [c for c in stand_in.calls if c["op"] == "npu_rms_norm"]
    head_norms = [c for c in norms if c["shape"][-1] == 16]  # Qwen3's q_norm / k_norm (head dim 16)
    assert len(head_norms) == 2 * layers


def test_hooked_or_unknown_attentions_keep_their_forward(stand_in: NpuStandIn) -> None:
    model = tiny_model("llama")
    hooked = decoder_layers(model)[0].self_attn
    hooked.register_forward_hook(lambda module, args, out: None)
    install_fused_ops(model, FusedOpsConfig(), device_type="npu")
    assert decoder_layers(model)[0].self_attn is hooked
    assert all(isinstance(layer.self_attn, FusedRotaryAttention) for layer in decoder_layers(model)[1:])


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["on-cpu", "on-gpu"])
def test_default_recipe_on_cpu_and_cuda_keeps_the_existing_paths(device_type: str) -> None:
    model = _student("gate_swa")
    before = [type(m) for m in model.modules()]
    assert install_fused_ops(model, FusedOpsConfig(), device_type=device_type) == {}
    assert [type(m) for m in model.modules()] == before
    assert rope._rope_kernel is None


def test_backends_are_overridable_in_config(stand_in: NpuStandIn) -> None:
    model = _student("mla")
    cfg = FusedOpsConfig(rotary_embedding="mindspeed", swiglu="eager")
    chosen = install_fused_ops(model, cfg, device_type="npu")
    assert chosen == {"rms_norm": "npu", "rotary_embedding": "mindspeed", "swiglu": "eager"}
    assert all(m.kernel is fused_reference.swiglu for m in model.modules() if isinstance(m, FusedSwiGLUMLP))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 9)))
    assert "npu_rotary_position_embedding" in stand_in.ops_called()


def test_forced_on_cpu_uses_the_eager_references() -> None:
    model = _student("gate_swa")
    original = copy.deepcopy(model)
    chosen = install_fused_ops(model, FusedOpsConfig(enabled="on"), device_type="cpu")
    assert chosen == {"rms_norm": "eager", "rotary_embedding": "eager", "swiglu": "eager"}
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (FusedOpsConfig(enabled="yes"), "model.fused_ops.enabled must be one of"),
        (FusedOpsConfig(rms_norm="apex"), "model.fused_ops.rms_norm must be one of"),
    ],
)
def test_bad_config_names_the_key(cfg: FusedOpsConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        install_fused_ops(_student("teacher"), cfg, device_type="npu")


# ---------------------------------------------------------------------------------------------
# The shipped recipes: fused entries on a (stand-in) NPU, the existing paths on CPU / CUDA
# ---------------------------------------------------------------------------------------------
RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("qwen3_*.yaml"))
FUSED = {"rms_norm": "npu", "rotary_embedding": "npu", "swiglu": "npu"}


def _recipe(name: str):
    from hydra import compose, initialize_config_module

    register_configs()
    overrides = [f"experiment={name}", "output_dir=.", "model.path=/models/teacher", "data.path=/data/corpus"]
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        if cfg.model.source != "hf":
            overrides.remove("model.path=/models/teacher")
        if cfg.data.source != "files":
            overrides.remove("data.path=/data/corpus")
        return to_typed(compose(config_name="config", overrides=overrides))


def _tiny_recipe_model(name: str):
    """The recipe's teacher family and target kind at tiny shapes, converted as the recipe says."""
    cfg = _recipe(name)
    teacher = tiny_model("qwen3_moe" if "30b_a3b" in name else "qwen3")
    target = dataclasses.replace(
        cfg.target, init="random",
        mla=dataclasses.replace(cfg.target.mla, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                v_head_dim=16, kv_budget=None),
        gate_swa=dataclasses.replace(cfg.target.gate_swa, window=5, sink_tokens=2, full_every=2, full_layers=[],
                                     full_by_sensitivity=0),
    )  # fmt: skip
    torch.manual_seed(0)
    model = edit_model(teacher, build_plan(teacher.config.num_hidden_layers, target), target).eval()
    return cfg, model


def test_every_qwen3_recipe_is_covered() -> None:
    assert len(RECIPES) >= 8 and all(name.startswith("qwen3_") for name in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_recipe_resolves_the_fused_entries_on_a_stand_in_npu(recipe: str, stand_in: NpuStandIn) -> None:
    cfg, model = _tiny_recipe_model(recipe)
    original = copy.deepcopy(model)
    assert install_fused_ops(model, cfg.model.fused_ops, device_type="npu") == FUSED
    assert rope._rope_kernel is fused_ops.rotary_embedding  # the targets' RoPE (GateSWA, MLA's rope part)
    assert not any(type(m).__name__.endswith("RMSNorm") and not isinstance(m, FusedRMSNorm) for m in model.modules())
    assert all(isinstance(a, FusedRotaryAttention) for a in _teacher_attentions(model))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode in ("teacher", "student"):
        set_mode(model, mode)
        set_mode(original, mode)
        stand_in.calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, **TOL)
        called = set(stand_in.ops_called())
        assert {"npu_rms_norm", "npu_rotary_mul"} <= called, (mode, called)
        if "30b_a3b" not in recipe:  # Qwen3-MoE's experts are no gated-MLP modules
            assert "npu_swiglu" in called


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["on-cpu", "on-gpu"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_default_recipe_keeps_the_existing_paths_on_cpu_and_cuda(recipe: str, device_type: str) -> None:
    cfg, model = _tiny_recipe_model(recipe)
    before = [(name, type(m)) for name, m in model.named_modules()]
    assert install_fused_ops(model, cfg.model.fused_ops, device_type=device_type) == {}
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert rope._rope_kernel is None


def test_a_yarn_teacher_rotates_eagerly(stand_in: NpuStandIn, caplog: pytest.LogCaptureFixture) -> None:
    """YaRN multiplies cos / sin by its attention factor (~1.14 at factor 4); the fused rotary ops document inputs in
    [-1, 1] (the stand-in asserts it), so such a teacher keeps eager RoPE, and says so."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}
    model = tiny_model("qwen3", rope_parameters=yarn)
    original = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        chosen = install_fused_ops(model, FusedOpsConfig(), device_type="npu")
    assert chosen == {"rms_norm": "npu", "rotary_embedding": "eager", "swiglu": "npu"}
    assert "outside [-1, 1]" in caplog.text
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert "npu_rotary_mul" not in stand_in.ops_called()


@pytest.mark.parametrize("op, backend", [("rms_norm", "npu"), ("rotary_embedding", "mindspeed")])
def test_a_known_backend_that_cannot_run_here_is_one_line_naming_the_key_before_loading(op, backend):
    """It was a KernelUnavailableError traceback raised after the teacher had loaded (README: one line naming the
    key, before any model loads); prepare runs this check before load_teacher."""
    from ascend_edit.models.fused_layers import check_fused_ops_available

    cfg = FusedOpsConfig(enabled="on", **{op: backend})
    with pytest.raises(ValueError, match=rf"model.fused_ops.{op}={backend}: backend '{backend}' .* cannot run"):
        check_fused_ops_available(cfg, device_type="cpu")
    check_fused_ops_available(FusedOpsConfig(enabled="auto", **{op: backend}), device_type="cpu")  # off on the CPU
