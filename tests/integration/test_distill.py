"""Progressive distillation on a small trained teacher, through the Python API (issue 4).

Stage 1 (layer-wise, teacher-forced) must lower every converted layer's activation loss on
held-out data and touch nothing but the targets; stage 2 (model-level KD) must then lower the
held-out KL to the teacher. Margins come from measurements on this teacher over 5 seeds (data split,
sampler, init; see each constant), with headroom above the worst seed.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from ascend_edit.config import (
    ConfigError,
    EngineConfig,
    GateSWAConfig,
    LayerwiseConfig,
    MLAConfig,
    ModelConfig,
    ModelLevelConfig,
    StageConfig,
    TargetConfig,
)
from ascend_edit.data import PackedDataset, ResumableDistributedSampler, build_train_eval, load_documents
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.distill.model_level import ModelLevelObjective, frozen_teacher
from ascend_edit.eval.metrics import TeacherReference, evaluate, paired_logits
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import (
    LayerPlan,
    build_plan,
    collect_layer_stats,
    edit_model,
    set_mode,
    set_trainable,
)
from ascend_edit.train.engine import Objective, TorchEngine
from ascend_edit.train.loop import StageRun, train_stage

pytestmark = pytest.mark.usefixtures("few_cpu_threads")  # see conftest.py

SEQ_LEN = 64
BATCH_SIZE = 8
EVAL_SEQUENCES = 8
SEED = 0
# Small MLA for head_dim 16: latent 32 + rope 8 per token (teacher: 2 KV heads x 2 x 16 = 64).
# No latent norm, so the warm start is a linear low-rank fit, as in conf/target/mla_small.yaml.
MLA_TINY = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, latent_norm=False)
GATE_SWA_TINY = GateSWAConfig(window=8, sink_tokens=1, full_every=2, gate="headwise")  # layers 1, 3 stay full
EXACT = 1e-6  # nmse of a layer that is still an exact copy of the teacher's attention


@dataclass(frozen=True)
class Variant:
    """One conversion and its stage-1 recipe, with the margin it must meet.

    `max_layer_loss_ratio` bounds (held-out activation loss after stage 1) / (before), per layer.
    Measured ratios (held-out, 4 layers) are in the comments next to each variant below.
    """

    teacher: str  # fixture name of the trained teacher
    target: TargetConfig
    stage1_lr: float
    stage1_steps: int
    max_layer_loss_ratio: float


VARIANTS = {
    # per-layer ratio measured 0.10-0.32 over 5 seeds (data split, sampler, init)
    "mla-warm": Variant("trained_teacher", TargetConfig(kind="mla", init="warm", mla=MLA_TINY), 3e-3, 40, 0.5),
    # measured 0.20-0.33 from a start of ~1.0 (nmse of a near-zero output); needs the larger LR:
    # at lr 1e-3 / 30 steps it only reached 0.8-0.9
    "mla-random": Variant("trained_teacher", TargetConfig(kind="mla", init="random", mla=MLA_TINY), 1e-2, 60, 0.5),
    # sliding layers measured 0.44-0.54 (a window of 8 sees less than the teacher's 64 tokens: the loss has a floor);
    # the full layers start, and must stay, exact copies of the teacher
    "gate_swa": Variant("trained_teacher", TargetConfig(kind="gate_swa", init="warm", gate_swa=GATE_SWA_TINY),
                        3e-3, 40, 0.75),
    # MoE teacher: attention is converted as in the dense model; the experts are shared and untouched.
    # Measured 0.04-0.30.
    "moe-mla-warm": Variant("trained_moe_teacher", TargetConfig(kind="mla", init="warm", mla=MLA_TINY),
                            3e-3, 40, 0.5),
}

# The project's default stage-2 LR; at 1e-3 the already-close GateSWA student overshoots on some seeds.
STAGE2 = ModelLevelConfig(steps=30, lr=3e-4, warmup_steps=3, batch_size=BATCH_SIZE)
# Held-out teacher-KL after / before 30 stage-2 steps: measured 0.21-0.60 over the variants x 5 seeds.
MAX_STAGE2_KL_RATIO = 0.75


# ---------------------------------------------------------------------------------------------
# helpers


@functools.cache
def packed_data(teacher_dir: Path) -> tuple[PackedDataset, list[dict]]:
    """(train set, held-out evaluation batches) of the teacher's own corpus, split by document."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    documents = load_documents(teacher_dir / "corpus.txt", split_on_blank_lines=True)
    train, held_out = build_train_eval(documents, tokenizer, SEQ_LEN, eval_fraction=0.1, seed=SEED)
    return train, as_batches(held_out, EVAL_SEQUENCES, batch_size=4)


def as_batches(dataset: PackedDataset, count: int, batch_size: int) -> list[dict]:
    keys = ("input_ids", "position_ids", "loss_mask")
    return [{k: torch.stack([dataset[i][k] for i in range(start, min(start + batch_size, count))]) for k in keys}
            for start in range(0, count, batch_size)]


def edited_model(teacher_dir: Path, target: TargetConfig) -> tuple[nn.Module, list[LayerPlan]]:
    model, _ = load_teacher(ModelConfig(source="hf", path=str(teacher_dir)))
    train, _ = packed_data(teacher_dir)
    plan = build_plan(model.config.num_hidden_layers, target)
    stats = collect_layer_stats(model, as_batches(train, 16, batch_size=8)) if target.init == "warm" else None
    torch.manual_seed(SEED)  # random-init targets draw from the global generator
    return edit_model(model, plan, target, stats), plan


def run_stage(model: nn.Module, objective: Objective, stage: StageConfig, train: PackedDataset,
              name: str) -> list[dict]:
    """`stage.steps` optimizer steps through the framework's own loop and engine."""
    params = set_trainable(model, stage.trainable)
    engine = TorchEngine(model, objective, params, stage, EngineConfig(), accumulation=1)
    sampler = ResumableDistributedSampler(len(train), stage.batch_size, seed=SEED)
    run = StageRun(name, stage.steps, 1, sampler, train, torch.device("cpu"), log_every=0)
    history = train_stage(engine, run)
    engine.close()
    return history


@torch.no_grad()
def heldout_layer_losses(model: nn.Module, batches: list[dict]) -> dict[int, float]:
    """Mean stage-1 activation loss of each converted layer on held-out batches."""
    objective = LayerwiseObjective("nmse")
    per_batch = [objective(model, batch)[1] for batch in batches]
    set_mode(model, "student")
    return {int(key.split("/")[1]): sum(m[key] for m in per_batch) / len(per_batch)
            for key in per_batch[0] if key.startswith("layer/")}


def snapshot(model: nn.Module, exclude: str = ".target.") -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if exclude not in name}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    now = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(now[name], value)}


@dataclass
class Stage1Outcome:
    model: nn.Module
    plan: list[LayerPlan]
    variant: Variant
    history: list[dict]
    loss_before: dict[int, float]
    loss_after: dict[int, float]
    frozen_before: dict[str, torch.Tensor]  # every parameter outside the targets, before stage 1
    targets_before: dict[str, torch.Tensor]
    eval_batches: list[dict]
    train: PackedDataset


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def stage1(request: pytest.FixtureRequest) -> Stage1Outcome:
    """Edit the trained teacher and run stage 1 once per variant; tests read the outcome."""
    variant = VARIANTS[request.param]
    teacher_dir = request.getfixturevalue(variant.teacher)
    train, eval_batches = packed_data(teacher_dir)
    model, plan = edited_model(teacher_dir, variant.target)
    frozen_before = snapshot(model)
    targets_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".target." in n}
    loss_before = heldout_layer_losses(model, eval_batches)
    stage = LayerwiseConfig(steps=variant.stage1_steps, lr=variant.stage1_lr, warmup_steps=3,
                            batch_size=BATCH_SIZE, loss="nmse")
    history = run_stage(model, LayerwiseObjective(stage.loss), stage, train, "layerwise")
    loss_after = heldout_layer_losses(model, eval_batches)
    return Stage1Outcome(model, plan, variant, history, loss_before, loss_after, frozen_before, targets_before,
                         eval_batches, train)


# ---------------------------------------------------------------------------------------------
# stage 1


def test_stage1_lowers_every_converted_layers_activation_loss(stage1: Stage1Outcome):
    converted = {e.layer_idx: e.kind for e in stage1.plan if e.converted}
    assert set(stage1.loss_before) == set(converted)
    assert {k for k in stage1.history[-1] if k.startswith("layer/")} == {f"layer/{i}" for i in converted}
    ratio = stage1.variant.max_layer_loss_ratio
    for idx, kind in converted.items():
        before, after = stage1.loss_before[idx], stage1.loss_after[idx]
        if kind == "full" and stage1.variant.target.init == "warm":
            # A GateSWA full layer starts as the teacher's attention (gate at 1/2, o_proj doubled):
            # there is nothing to learn, and training must not pull it away.
            assert before < EXACT and after < EXACT, f"layer {idx} ({kind}): {before:.2e} -> {after:.2e}"
            continue
        assert before > 10 * EXACT, f"layer {idx} ({kind}) starts at the teacher: the test would be vacuous"
        assert after < ratio * before, (f"layer {idx} ({kind}): held-out activation loss {before:.4f} -> "
                                        f"{after:.4f}, wanted < {ratio} x before")


def test_stage1_changes_only_target_weights(stage1: Stage1Outcome):
    # Teacher attentions, embeddings, MLPs / experts, norms, LM head: bit-for-bit unchanged.
    assert changed(stage1.model, stage1.frozen_before) == set()
    now = dict(stage1.model.named_parameters())
    moved = [n for n, v in stage1.targets_before.items() if not torch.equal(now[n], v)]
    assert moved, "stage 1 did not update any target parameter"


def test_stage2_lowers_heldout_teacher_kl(stage1: Stage1Outcome):
    model = copy.deepcopy(stage1.model)  # the fixture's model stays as stage 1 left it
    before = evaluate(model, stage1.eval_batches)
    teacher_before = evaluate(model, stage1.eval_batches, "teacher")
    frozen = snapshot(model)
    objective = ModelLevelObjective(STAGE2.kl, STAGE2.temperature, chunk_size=STAGE2.chunk_size)
    run_stage(model, objective, STAGE2, stage1.train, "model_level")
    after = evaluate(model, stage1.eval_batches)
    assert after["teacher_kl"] < MAX_STAGE2_KL_RATIO * before["teacher_kl"], (
        f"held-out teacher-KL {before['teacher_kl']:.4f} -> {after['teacher_kl']:.4f}")
    assert after["ppl"] < before["ppl"]
    # trainable=target: the teacher path (and so the distillation target) is unchanged.
    assert changed(model, frozen) == set()
    assert evaluate(model, stage1.eval_batches, "teacher")["ppl"] == pytest.approx(teacher_before["ppl"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# trainable policies


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Normalisation weights of the shared network (decoder-layer and final norms)."""
    return {f"{module_name}.{p_name}" if module_name else p_name
            for module_name, module in model.named_modules()
            if "norm" in type(module).__name__.lower() and ".teacher" not in module_name
            and ".target" not in module_name
            for p_name, _ in module.named_parameters(recurse=False)}


@pytest.fixture(scope="module")
def mla_warm_model(trained_teacher: Path) -> tuple[nn.Module, PackedDataset]:
    model, _ = edited_model(trained_teacher, VARIANTS["mla-warm"].target)
    return model, packed_data(trained_teacher)[0]


def test_target_and_norms_policy_trains_norms_never_teacher_attention(mla_warm_model):
    model, train = mla_warm_model
    model = copy.deepcopy(model)
    norms = norm_parameter_names(model)
    assert norms, "the teacher has no norm layers to train"
    teacher_attention = {n for n, _ in model.named_parameters() if ".self_attn.teacher." in n}
    assert any(".teacher.q_norm." in n for n in teacher_attention)  # Qwen3's per-head norms belong to it
    before = snapshot(model, exclude="\0")  # every parameter

    stage = ModelLevelConfig(steps=5, lr=1e-3, warmup_steps=0, batch_size=BATCH_SIZE, trainable="target+norms")
    run_stage(model, ModelLevelObjective(), stage, train, "model_level")

    moved = changed(model, before)
    assert norms <= moved, f"norms left untrained: {sorted(norms - moved)}"
    assert not moved & teacher_attention, f"teacher attention changed: {sorted(moved & teacher_attention)}"
    targets = {n for n in before if ".self_attn.target." in n}
    # Everything that moved is a target or a shared norm: embeddings, MLPs and the LM head stay put.
    assert moved - targets == norms


def test_stage1_refuses_policies_that_would_train_nothing_more():
    """Stage 1 feeds each target the teacher's (detached) hidden state, so no gradient reaches shared
    weights: `trainable=target+norms` there would silently train only the targets. It is refused."""
    with pytest.raises(ConfigError, match="stage 1 trains the targets only"):
        LayerwiseConfig(steps=3, batch_size=BATCH_SIZE, trainable="target+norms")


@pytest.mark.parametrize("policy", ["target", "target+norms", "all"])
def test_stage2_distils_against_the_original_teacher(policy: str, mla_warm_model, trained_teacher: Path):
    """After some stage-2 training, the KD loss is still KL(original teacher || student), whatever trains."""
    model, train = mla_warm_model
    model = copy.deepcopy(model)
    original, _ = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    stage = ModelLevelConfig(steps=10, lr=3e-3, warmup_steps=0, batch_size=BATCH_SIZE, trainable=policy)
    # With shared weights training, the pipeline keeps a separate frozen teacher (distill.model_level).
    objective = ModelLevelObjective("forward", temperature=1.0, teacher=frozen_teacher(model, stage))
    run_stage(model, objective, stage, train, "model_level")

    batch = packed_data(trained_teacher)[1][0]
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    mask = batch["loss_mask"]
    with torch.no_grad():
        _, metrics = objective(model, batch)
        set_mode(model, "student")
        log_q = torch.log_softmax(model(**kwargs).logits[mask], dim=-1)
        log_p = torch.log_softmax(original(**kwargs).logits[mask], dim=-1)
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    # Without the frozen copy, target+norms drifted by 6e-3 (relative) after 10 steps.
    assert metrics["kd"] == pytest.approx(expected, rel=1e-5)
    # ... and the evaluations after it measure against the same original teacher (convert hands them the copy)
    held_out = [batch]
    reference = TeacherReference(held_out, teacher=objective.teacher)
    assert evaluate(model, held_out, reference=reference)["teacher_kl"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        teacher_logits, _ = paired_logits(model, objective.teacher)
        torch.testing.assert_close(teacher_logits(batch), original(**kwargs).logits, rtol=1e-5, atol=1e-5)
