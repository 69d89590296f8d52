"""Numerics of the distillation losses: the chunked KD / CE losses against plain autograd, and the
feature and activation losses against their definitions. Tiny sizes, CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ascend_edit.distill import chunked_kd
from ascend_edit.distill.chunked_kd import KD_KINDS, ce_loss, kd_logits_loss, use_fused_kd
from ascend_edit.distill.losses import activation_loss, feature_cosine_loss
from tests.helpers.kd_reference import kd_logits_loss_naive

VOCAB, HIDDEN, TEACHER_HIDDEN = 37, 16, 12
TOKEN_SHAPE = (2, 9)  # 18 tokens: chunk sizes 4 and 5 do not divide it

# Tolerances, relative to the largest magnitude of the compared tensor.
FP32_RTOL = 1e-5
# bf16: logits and gradients are rounded to bf16 (8 mantissa bits) at different points in the two
# implementations (the chunked one rounds the unscaled gradient, the naive one the scaled one); measured
# worst case over these cases is ~8e-3.
BF16_RTOL = 2e-2


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.detach().double().abs().max().clamp(min=1e-12)
    error = (actual.detach().double() - expected.detach().double()).abs().max()
    assert error <= rtol * scale, f"max error {error.item():.3e} > {rtol:.1e} * {scale.item():.3e}"


def _kd_inputs(dtype: torch.dtype, seed: int = 0, separate_teacher_head: bool = False):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    teacher_width = TEACHER_HIDDEN if separate_teacher_head else HIDDEN
    student_hidden = randn(*TOKEN_SHAPE, HIDDEN, scale=2.0)
    teacher_hidden = randn(*TOKEN_SHAPE, teacher_width, scale=2.0)
    weight = randn(VOCAB, HIDDEN)
    teacher_weight = randn(VOCAB, teacher_width) if separate_teacher_head else None
    mask = torch.rand(TOKEN_SHAPE, generator=generator) > 0.3
    return student_hidden, teacher_hidden, weight, teacher_weight, mask


def _loss_and_grads(loss_fn, student_hidden, teacher_hidden, weight, train_head: bool, **kwargs):
    hidden = student_hidden.clone().requires_grad_(True)
    head = weight.clone().requires_grad_(train_head)
    loss = loss_fn(hidden, teacher_hidden, head, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, head.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k", [None, 5], ids=["full", "top5"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_kd_matches_naive_value_and_grads(kind, temperature, top_k, dtype):
    student_hidden, teacher_hidden, weight, _, mask = _kd_inputs(dtype)
    rtol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    options = dict(kind=kind, temperature=temperature, top_k=top_k, mask=mask)
    chunked = _loss_and_grads(kd_logits_loss, student_hidden, teacher_hidden, weight, True, chunk_size=5, **options)
    naive = _loss_and_grads(kd_logits_loss_naive, student_hidden, teacher_hidden, weight, True, **options)
    assert chunked[0].dtype == torch.float32 and chunked[0].ndim == 0
    assert chunked[0] > 0
    for got, want in zip(chunked, naive):
        _assert_close_rel(got, want, rtol)
    # Masked-out tokens get exactly zero gradient.
    assert torch.all(chunked[1][~mask] == 0)


@pytest.fixture
def uncompiled_fused_chunks(monkeypatch):
    """The fused path's chunk math run eagerly: its plumbing and arithmetic without the compile time
    (the compiled graph is checked by the slow and GPU tests below)."""
    calls = []

    def eager(kind):
        def chunk(student_logits, teacher_logits, temperature, grad_dtype):
            calls.append((kind, temperature, grad_dtype))
            return chunked_kd.kd_chunk_from_logits(student_logits, teacher_logits, kind, temperature, grad_dtype)
        return chunk

    monkeypatch.setattr(chunked_kd, "_compiled_kd_chunk", eager)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_chunk_math_matches_naive(kind, temperature, dtype, uncompiled_fused_chunks):
    student_hidden, teacher_hidden, weight, _, mask = _kd_inputs(dtype)
    # fp32: x - logsumexp(x) rounds differently from log_softmax, and JSD's loss is a difference of two
    # near-equal sums (measured worst 6e-5 relative on its loss)
    rtol = 1e-4 if dtype == torch.float32 else BF16_RTOL
    options = dict(kind=kind, temperature=temperature, mask=mask)
    fused = _loss_and_grads(kd_logits_loss, student_hidden, teacher_hidden, weight, True, chunk_size=5,
                            fused=True, **options)
    naive = _loss_and_grads(kd_logits_loss_naive, student_hidden, teacher_hidden, weight, True, **options)
    assert uncompiled_fused_chunks and uncompiled_fused_chunks[0] == (kind, temperature, dtype)
    for got, want in zip(fused, naive):
        _assert_close_rel(got, want, rtol)
    assert torch.all(fused[1][~mask] == 0)


def test_fused_kd_only_where_it_compiles(uncompiled_fused_chunks, monkeypatch):
    """Auto: CUDA with Triton and the full vocabulary; top-k keeps the eager path even when fused is asked for."""
    monkeypatch.setattr(chunked_kd, "_has_triton", lambda: False)
    assert not use_fused_kd(torch.device("cuda"), (torch.bfloat16,), None)
    monkeypatch.setattr(chunked_kd, "_has_triton", lambda: True)
    assert use_fused_kd(torch.device("cuda"), (torch.bfloat16, torch.bfloat16), None)
    assert not use_fused_kd(torch.device("cpu"), (torch.bfloat16,), None)
    assert not use_fused_kd(torch.device("cuda"), (torch.bfloat16,), 5)
    assert not use_fused_kd(torch.device("cuda"), (torch.float32, torch.float64), None)
    student_hidden, teacher_hidden, weight, _, mask = _kd_inputs(torch.float32)
    kd_logits_loss(student_hidden, teacher_hidden, weight, mask=mask)  # CPU auto: eager
    kd_logits_loss(student_hidden, teacher_hidden, weight, mask=mask, top_k=5, fused=True)
    assert uncompiled_fused_chunks == []


def _compiled_against_eager(device: torch.device) -> None:
    student_hidden, teacher_hidden, weight, _, mask = (
        t.to(device) if t is not None else None for t in _kd_inputs(torch.bfloat16))
    for kind in KD_KINDS:
        options = dict(kind=kind, temperature=2.0, mask=mask, chunk_size=5)
        fused = _loss_and_grads(kd_logits_loss, student_hidden, teacher_hidden, weight, True, fused=True, **options)
        eager = _loss_and_grads(kd_logits_loss, student_hidden, teacher_hidden, weight, True, fused=False, **options)
        for got, want in zip(fused, eager):
            _assert_close_rel(got, want, BF16_RTOL)


@pytest.mark.slow  # Inductor compiles three graphs for the CPU: about a minute
def test_compiled_fused_kd_matches_eager_on_cpu():
    _compiled_against_eager(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_fused_kd_matches_eager_on_cuda():
    _compiled_against_eager(torch.device("cuda"))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_kd_frozen_head_separate_teacher_head_no_mask(kind):
    student_hidden, teacher_hidden, weight, teacher_weight, _ = _kd_inputs(torch.float32, separate_teacher_head=True)
    options = dict(kind=kind, temperature=1.5, teacher_lm_head_weight=teacher_weight)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        kd_logits_loss, student_hidden, teacher_hidden, weight, False, chunk_size=4, **options
    )
    want = _loss_and_grads(kd_logits_loss_naive, student_hidden, teacher_hidden, weight, False, **options)
    assert grad_weight is None  # a frozen lm_head gets no gradient
    _assert_close_rel(loss, want[0], FP32_RTOL)
    _assert_close_rel(grad_hidden, want[1], FP32_RTOL)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_kd_gradcheck_fp64(kind, top_k):
    """Finite differences check the closed-form gradients directly (not only against autograd)."""
    generator = torch.Generator().manual_seed(1)
    student_hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    # A separate constant teacher head: finite differences of a shared head would move the teacher too,
    # which the loss deliberately treats as a constant.
    teacher_weight = weight.detach().clone()

    def loss_fn(hidden, head):
        return kd_logits_loss(
            hidden, teacher_hidden, head, kind=kind, temperature=1.7, top_k=top_k, chunk_size=2,
            teacher_lm_head_weight=teacher_weight,
        )

    assert torch.autograd.gradcheck(loss_fn, (student_hidden, weight), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_student_and_teacher_give_zero_loss(kind):
    hidden, _, weight, _, mask = _kd_inputs(torch.float32)
    hidden = hidden.requires_grad_(True)
    loss = kd_logits_loss(hidden, hidden.detach().clone(), weight, kind=kind, temperature=2.0, mask=mask, chunk_size=4)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert hidden.grad.abs().max().item() < 1e-6


def test_grad_output_scales_gradients():
    student_hidden, teacher_hidden, weight, _, _ = _kd_inputs(torch.float32)
    hidden = student_hidden.clone().requires_grad_(True)
    head = weight.clone().requires_grad_(True)
    (3.0 * kd_logits_loss(hidden, teacher_hidden, head, chunk_size=4)).backward()
    _, want_hidden, want_head = _loss_and_grads(kd_logits_loss_naive, student_hidden, teacher_hidden, weight, True)
    _assert_close_rel(hidden.grad, 3.0 * want_hidden, FP32_RTOL)
    _assert_close_rel(head.grad, 3.0 * want_head, FP32_RTOL)


def test_no_grad_and_fully_masked_batches():
    student_hidden, teacher_hidden, weight, _, _ = _kd_inputs(torch.float32)
    with torch.no_grad():
        value = kd_logits_loss(student_hidden.requires_grad_(True), teacher_hidden, weight, chunk_size=4)
    assert not value.requires_grad
    _assert_close_rel(value, kd_logits_loss_naive(student_hidden, teacher_hidden, weight), FP32_RTOL)

    hidden = student_hidden.detach().clone().requires_grad_(True)
    nothing = torch.zeros(TOKEN_SHAPE, dtype=torch.bool)
    loss = kd_logits_loss(hidden, teacher_hidden, weight, mask=nothing)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_temperature_scaling_is_hinton():
    """The T**2 factor: for large T, KL(p||q) ~ Var_v((z_t - z_s) / T) / 2 (second order around the
    uniform distribution), so T**2 * KL tends to half the vocabulary variance of the logit difference,
    averaged over tokens, instead of vanishing."""
    student_hidden, teacher_hidden, weight, _, _ = _kd_inputs(torch.float64)
    temperature = 1e3
    loss = kd_logits_loss(student_hidden, teacher_hidden, weight, temperature=temperature)
    diff = (student_hidden @ weight.T) - (teacher_hidden @ weight.T)
    diff = diff - diff.mean(-1, keepdim=True)
    limit = 0.5 * diff.square().mean(-1).mean()
    assert math.isclose(loss.item(), limit.item(), rel_tol=1e-2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="kl"), "unknown KD kind"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=VOCAB + 1), "top_k"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask shape"),
        (dict(mask=torch.ones(TOKEN_SHAPE)), "bool"),
        (dict(teacher_lm_head_weight=torch.randn(VOCAB + 1, HIDDEN)), "vocabularies differ"),
        (dict(teacher_lm_head_weight=torch.randn(VOCAB, HIDDEN + 1)), "teacher_hidden"),
    ],
)
@pytest.mark.parametrize("loss_fn", [kd_logits_loss, kd_logits_loss_naive], ids=["chunked", "naive"])
def test_kd_rejects_bad_options(loss_fn, change, message):
    student_hidden, teacher_hidden, weight, _, _ = _kd_inputs(torch.float32)
    with pytest.raises(ValueError, match=message):
        loss_fn(student_hidden, teacher_hidden, weight, **change)


def test_kd_rejects_mismatched_shapes_and_dtypes():
    student_hidden, teacher_hidden, weight, _, _ = _kd_inputs(torch.float32)
    with pytest.raises(ValueError, match="student_hidden"):
        kd_logits_loss(student_hidden[..., :-1], teacher_hidden, weight)
    with pytest.raises(ValueError, match="token shapes differ"):
        kd_logits_loss(student_hidden, teacher_hidden[:, :-1], weight)
    with pytest.raises(ValueError, match="share a dtype"):
        kd_logits_loss(student_hidden.double(), teacher_hidden, weight)
    with pytest.raises(ValueError, match="lm_head weights"):
        kd_logits_loss(student_hidden, teacher_hidden, weight[0])


# ----------------------------------------------------------------------------------------------------
# Chunked cross-entropy
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_ce_matches_cross_entropy(dtype):
    student_hidden, _, weight, _, mask = _kd_inputs(dtype)
    labels = torch.randint(0, VOCAB, TOKEN_SHAPE, generator=torch.Generator().manual_seed(2))
    labels[~mask] = -100
    hidden = student_hidden.clone().requires_grad_(True)
    head = weight.clone().requires_grad_(True)
    loss = ce_loss(hidden, head, labels, chunk_size=4)
    loss.backward()

    ref_hidden = student_hidden.clone().requires_grad_(True)
    ref_head = weight.clone().requires_grad_(True)
    logits = (ref_hidden @ ref_head.T).float()
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    rtol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    _assert_close_rel(loss, ref, rtol)
    _assert_close_rel(hidden.grad, ref_hidden.grad, rtol)
    _assert_close_rel(head.grad, ref_head.grad, rtol)


def test_ce_rejects_bad_labels():
    student_hidden, _, weight, _, _ = _kd_inputs(torch.float32)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ce_loss(student_hidden, weight, torch.zeros(TOKEN_SHAPE))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        ce_loss(student_hidden, weight, torch.full(TOKEN_SHAPE, VOCAB))


# ----------------------------------------------------------------------------------------------------
# Feature and activation losses
# ----------------------------------------------------------------------------------------------------


def test_feature_cosine_loss_values():
    generator = torch.Generator().manual_seed(3)
    state = torch.randn(2, 5, 8, generator=generator)
    orthogonal_a = torch.zeros(2, 5, 8)
    orthogonal_a[..., 0] = 1.0
    orthogonal_b = torch.zeros(2, 5, 8)
    orthogonal_b[..., 1] = 2.0
    # layers: identical (0), opposite (2), orthogonal (1) -> mean 1
    loss = feature_cosine_loss([state, -state, orthogonal_a], [state, state, orthogonal_b])
    assert math.isclose(loss.item(), 1.0, abs_tol=1e-6)


def test_feature_cosine_loss_mask_and_gradient():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 5, 8, generator=generator)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    loss = feature_cosine_loss([student], [teacher], mask=mask)
    want = (1 - F.cosine_similarity(student[0, :3], teacher[0, :3], dim=-1)).mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    loss.backward()
    assert torch.all(student.grad[~mask] == 0) and student.grad[mask].abs().sum() > 0


def test_feature_cosine_loss_keeps_no_fp32_copies_for_backward():
    """Over many layers of bf16 states, autograd kept fp32 copies and norms of each until backward (18 GiB at
    Qwen3-8B's shape); now each layer is recomputed in backward from the states themselves, with the same
    value and gradients."""
    from ascend_edit.distill.losses import _cosine_distance

    generator = torch.Generator().manual_seed(5)
    layers = [torch.randn(2, 16, 32, generator=generator, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    teachers = [torch.randn(2, 16, 32, generator=generator, dtype=torch.bfloat16) for _ in range(3)]
    mask = torch.rand(2, 16, generator=generator) > 0.3
    inputs = {t.untyped_storage().data_ptr() for t in [*layers, *teachers]}
    extra: list[int] = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            extra.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = feature_cosine_loss(layers, teachers, mask=mask)
    state_bytes = layers[0].numel() * layers[0].element_size()
    assert sum(b for b in extra if b >= state_bytes) == 0, extra  # nothing state-sized beyond the states
    loss.backward()
    reference = [t.detach().clone().requires_grad_(True) for t in layers]
    want = torch.stack([_cosine_distance(s, t, mask) for s, t in zip(reference, teachers)]).mean()
    want.backward()
    assert loss.item() == want.item()
    for got, expected in zip(layers, reference):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=0)


def test_feature_cosine_loss_rejects_bad_inputs():
    state = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="1 student states but 2 teacher"):
        feature_cosine_loss([state], [state, state])
    with pytest.raises(ValueError, match="at least one layer"):
        feature_cosine_loss([], [])
    with pytest.raises(ValueError, match="layer 0"):
        feature_cosine_loss([state], [state[..., :4]])


def test_activation_loss_kinds():
    generator = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 4, 6, generator=generator)
    target = torch.randn(3, 4, 6, generator=generator)
    mse = activation_loss(pred, target, "mse")
    assert math.isclose(mse.item(), F.mse_loss(pred, target).item(), rel_tol=1e-6)
    nmse = activation_loss(pred, target, "nmse")
    assert math.isclose(nmse.item(), (mse / target.square().mean()).item(), rel_tol=1e-6)
    # NMSE does not depend on the activation scale; MSE does (by the square).
    assert math.isclose(activation_loss(10 * pred, 10 * target, "nmse").item(), nmse.item(), rel_tol=1e-5)
    assert math.isclose(activation_loss(10 * pred, 10 * target, "mse").item(), 100 * mse.item(), rel_tol=1e-5)
    cosine = activation_loss(pred, target, "cosine")
    want = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    assert math.isclose(cosine.item(), want.item(), rel_tol=1e-6)
    assert activation_loss(target, target, "nmse").item() == 0.0


def test_activation_loss_mask_bf16_and_target_is_constant():
    generator = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 5, 8, generator=generator).bfloat16().requires_grad_(True)
    target = torch.randn(2, 5, 8, generator=generator).bfloat16().requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 1:4] = True
    loss = activation_loss(pred, target, "mse", mask=mask)
    assert loss.dtype == torch.float32
    want = (pred[1, 1:4].float() - target[1, 1:4].float()).square().mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
    loss.backward()
    assert target.grad is None
    assert torch.all(pred.grad[~mask] == 0)


def test_activation_loss_rejects_bad_inputs():
    pred = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="unknown activation loss kind"):
        activation_loss(pred, pred, "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        activation_loss(pred, pred[..., :4])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        activation_loss(pred, pred, mask=torch.ones(2, 5))


@pytest.mark.parametrize("compile_kd", [True, False])
def test_stage2_objective_takes_the_fused_kd_unless_compile_is_off(compile_kd, monkeypatch):
    """`engine.compile=off` reaches the KD loss: no compiled chunk math then, even where it would run."""
    from ascend_edit.config import MLAConfig, ModelLevelConfig, TargetConfig
    from ascend_edit.distill.model_level import model_level_objective
    from ascend_edit.models.surgery import build_plan, edit_model, set_trainable
    from tests.conftest import tiny_model

    model = tiny_model("qwen3", seed=0)
    target = TargetConfig(kind="mla", init="random",
                          mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    set_trainable(model, "target")
    monkeypatch.setattr(chunked_kd, "use_fused_kd", lambda device, dtypes, top_k: True)  # as on CUDA
    calls = []
    monkeypatch.setattr(chunked_kd, "_compiled_kd_chunk", lambda kind: (
        calls.append(kind) or (lambda s, t, temperature, grad_dtype: chunked_kd.kd_chunk_from_logits(
            s, t, kind, temperature, grad_dtype))))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, 24),
             "loss_mask": torch.ones(2, 24, dtype=torch.bool)}
    objective = model_level_objective(model, ModelLevelConfig(chunk_size=16), compile_kd=compile_kd)
    loss, _ = objective(model, batch)
    loss.backward()
    assert bool(calls) == compile_kd and math.isfinite(float(loss))
