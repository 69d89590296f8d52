"""Engines, checkpoints and resume in one process (the torch engine); DeepSpeed config rendering.

The multi-process DeepSpeed runs (ZeRO 1-3 under torchrun) are in tests/integration/test_zero.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ascend_edit.config import ConfigError, EngineConfig, StageConfig
from ascend_edit.data import ResumableDistributedSampler
from ascend_edit.device import seed_everything
from ascend_edit.train.engine import CheckpointDir, TorchEngine, deepspeed_config, make_engine
from ascend_edit.train.loop import StageRun, resume, save_checkpoint, train_stage
from ascend_edit.train.schedule import warmup_cosine
from ascend_edit.train.stage import stage_geometry

VOCAB, DIM, SEQ = 16, 8, 6
STAGE = StageConfig(steps=8, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, batch_size=4)


class ToyLM(nn.Module):
    """Next-token model with dropout (so resume must restore the RNG) and a frozen layer."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.frozen = nn.Linear(DIM, DIM)  # stands in for the teacher: never in the optimizer
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(DIM, VOCAB)
        self.frozen.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.frozen(self.embed(ids)))))


def next_token_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    ids = batch["input_ids"]
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return loss, {"loss": float(loss.detach())}


class Crash(Exception):
    pass


class CrashAfter:
    """The objective, raising on call number `calls + 1`: a process that dies mid-stage."""

    def __init__(self, calls: int):
        self.left = calls

    def __call__(self, model, batch):
        if self.left == 0:
            raise Crash
        self.left -= 1
        return next_token_loss(model, batch)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 20):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


def fresh_run(root: Path, objective=next_token_loss, accumulation: int = 2, dropout: float = 0.2,
              checkpoint_every: int = 3, keep_last: int = 2) -> tuple[TorchEngine, StageRun]:
    """What a new process builds: seeded model, engine and sampler, checkpoints and metrics under `root`."""
    seed_everything(0)
    model = ToyLM(dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = TorchEngine(model, objective, params, STAGE, EngineConfig(grad_clip=1.0), accumulation)
    dataset = TokenDataset()  # 20 sequences, 5 global batches of 4: 8 steps cross an epoch boundary
    sampler = ResumableDistributedSampler(len(dataset), STAGE.batch_size, seed=0)
    run = StageRun("toy", STAGE.steps, accumulation, sampler, dataset, torch.device("cpu"), log_every=0,
                   checkpoint_every=checkpoint_every, checkpoints=CheckpointDir(root / "checkpoints", keep_last),
                   metrics_log=root / "metrics.jsonl")
    return engine, run


def weights(engine: TorchEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


# ---------------------------------------------------------------------------------------------- engine


def test_only_trainable_parameters_reach_the_optimizer():
    engine, _ = fresh_run(Path("unused"))
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(engine.model.embed.weight), id(engine.model.head.weight), id(engine.model.head.bias)}
    frozen_before = engine.model.frozen.weight.detach().clone()
    train_stage(engine, StageRun("toy", 2, 2, ResumableDistributedSampler(20, 4), TokenDataset(), torch.device("cpu"),
                                 log_every=0))
    assert torch.equal(engine.model.frozen.weight, frozen_before)


def test_no_trainable_parameters_is_a_clear_error():
    model = ToyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_engine(model, next_token_loss, [], STAGE, EngineConfig(), accumulation=1, micro_batch=4, world_size=1,
                    device=None)


def test_torch_engine_refuses_several_processes():
    model = ToyLM()
    with pytest.raises(ValueError, match="engine=torch runs in one process"):
        make_engine(model, next_token_loss, list(model.head.parameters()), STAGE, EngineConfig(), accumulation=1,
                    micro_batch=2, world_size=2, device=None)


def test_accumulation_matches_one_big_micro_batch():
    """2 micro-batches of 2 = 1 micro-batch of 4 (same global batch; equal-size means, fp32, rel 1e-6)."""
    histories = {}
    for accumulation in (1, 2):
        engine, run = fresh_run(Path("unused"), accumulation=accumulation, dropout=0.0, checkpoint_every=0)
        run.checkpoints = run.metrics_log = None
        histories[accumulation] = train_stage(engine, run)
    for one, two in zip(histories[1], histories[2], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        assert two["lr"] == one["lr"]


def test_nan_loss_stops_the_stage():
    def nan_loss(model, batch):
        loss = next_token_loss(model, batch)[0] * float("nan")
        return loss, {"loss": float(loss.detach())}

    engine, run = fresh_run(Path("unused"), objective=nan_loss, checkpoint_every=0)
    run.checkpoints = run.metrics_log = None
    with pytest.raises(FloatingPointError, match="toy step 1: loss is nan"):
        train_stage(engine, run)


def test_batch_that_cannot_be_cut_into_micro_batches_is_refused():
    with pytest.raises(ValueError, match="cannot be cut into 3 equal micro-batches"):
        StageRun("toy", 1, 3, ResumableDistributedSampler(20, 4), TokenDataset(), torch.device("cpu"))


@pytest.mark.parametrize(("batch", "world", "micro", "expected"), [
    (8, 1, 0, (8, 1)), (8, 2, 0, (4, 1)), (8, 1, 2, (2, 4)), (8, 2, 2, (2, 2)), (16, 4, 1, (1, 4)),
])
def test_stage_geometry(batch, world, micro, expected):
    assert stage_geometry(StageConfig(batch_size=batch, micro_batch_size=micro), world) == expected


@pytest.mark.parametrize(("batch", "world", "micro", "message"), [
    (6, 4, 0, "not divisible by the world size 4"), (8, 2, 3, "does not divide the per-process batch 4"),
])
def test_stage_geometry_errors(batch, world, micro, message):
    with pytest.raises(ValueError, match=message):
        stage_geometry(StageConfig(batch_size=batch, micro_batch_size=micro), world)


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_shape():
    f = dict(total_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    assert warmup_cosine(0, **f) == pytest.approx(0.5)  # the first step already trains
    assert warmup_cosine(1, **f) == pytest.approx(1.0)
    assert warmup_cosine(2, **f) == pytest.approx(1.0)  # cosine starts at its top
    assert warmup_cosine(7, **f) == pytest.approx(0.55)  # half-way through the decay: (1 + 0.1) / 2
    assert warmup_cosine(12, **f) == pytest.approx(0.1)
    assert warmup_cosine(50, **f) == pytest.approx(0.1)  # held at the floor
    decay = [warmup_cosine(s, **f) for s in range(2, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("bad", [dict(total_steps=-1), dict(warmup_steps=-1), dict(min_lr_ratio=1.5)])
def test_warmup_cosine_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        warmup_cosine(0, **{**dict(total_steps=10, warmup_steps=2, min_lr_ratio=0.1), **bad})


def test_logged_lr_is_the_schedule():
    engine, run = fresh_run(Path("unused"), checkpoint_every=0)
    run.checkpoints = run.metrics_log = None
    history = train_stage(engine, run)
    expected = [STAGE.lr * warmup_cosine(s, total_steps=STAGE.steps, warmup_steps=STAGE.warmup_steps,
                                         min_lr_ratio=STAGE.min_lr_ratio) for s in range(STAGE.steps)]
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    """Kill mid-stage (after the step-6 checkpoint), resume in a fresh 'process': same losses and weights.

    Dropout, epoch reshuffling and Adam moments make every restored piece (RNG, sampler, optimizer,
    schedule, weights) matter. One process, same ops: the trajectories must be bit-identical.
    """
    engine, run = fresh_run(tmp_path / "straight")
    straight = train_stage(engine, run)
    straight_weights = weights(engine)

    # 2 micro-batches per step: the 13th objective call is step 7's first; checkpoints exist at 3 and 6.
    engine, run = fresh_run(tmp_path / "crashed", objective=CrashAfter(12))
    with pytest.raises(Crash):
        train_stage(engine, run)
    (tmp_path / "crashed" / "checkpoints" / "step-toy-7.tmp").mkdir()  # as if killed while saving step 7

    engine, run = fresh_run(tmp_path / "crashed")
    start = resume(engine, run)
    assert start == 6
    resumed = train_stage(engine, run, start_step=start)

    assert resumed == straight  # every metric of every step, exactly
    assert all(torch.equal(weights(engine)[name], value) for name, value in straight_weights.items())
    logged = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, STAGE.steps + 1))  # the crashed step 7 is not doubled
    assert [row["loss"] for row in logged] == [h["loss"] for h in straight]


def test_resume_survives_a_metrics_line_cut_short(tmp_path):
    """A crash or a full disk can leave the metrics log's last line half written; it is only a log, so the resumed
    run drops that line (and this stage's later steps) and logs them again instead of failing on every retry."""
    engine, run = fresh_run(tmp_path, objective=CrashAfter(12))
    with pytest.raises(Crash):
        train_stage(engine, run)
    log_path = tmp_path / "metrics.jsonl"
    text = log_path.read_text()
    log_path.write_text(text + '{"stage": "other", "step": 9}\n' + text.splitlines()[-1][:-15])  # torn last line
    engine, run = fresh_run(tmp_path)
    start = resume(engine, run)
    train_stage(engine, run, start_step=start)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [row["step"] for row in rows if row["stage"] == run.name] == list(range(1, STAGE.steps + 1))
    assert {"stage": "other", "step": 9} in rows  # another stage's lines are kept


def test_resume_without_checkpoint_starts_at_zero(tmp_path):
    engine, run = fresh_run(tmp_path)
    assert resume(engine, run) == 0


def test_resume_refuses_a_checkpoint_past_the_schedule(tmp_path):
    engine, run = fresh_run(tmp_path)
    save_checkpoint(engine, run, 5)
    engine, run = fresh_run(tmp_path)
    run.steps = 4
    with pytest.raises(ValueError, match="past this stage's 4 steps"):
        resume(engine, run)


# ---------------------------------------------------------------------------------------------- checkpoints


class RecordingEngine:
    """Engine stand-in: writes one file, remembers what it loaded."""

    def __init__(self, **describe):
        self.description = {"engine": "fake", "world_size": 1, **describe}
        self.loaded: Path | None = None

    def describe(self) -> dict:
        return self.description

    def save(self, directory: Path) -> None:
        (Path(directory) / "weights.bin").write_bytes(b"w")

    def load(self, directory: Path) -> None:
        self.loaded = Path(directory)


def test_keep_last_prunes_old_checkpoints_per_stage(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=2)
    engine = RecordingEngine()
    for step in (2, 4, 6, 8, 10):
        checkpoints.save(engine, "a", step, {}, {})
    checkpoints.save(engine, "b", 3, {}, {})
    assert [p.name for p in checkpoints.complete("a")] == ["step-a-8", "step-a-10"]  # numeric order, not text
    assert [p.name for p in checkpoints.complete("b")] == ["step-b-3"]
    assert not list(tmp_path.glob("*.tmp"))


def test_leftover_tmp_dir_is_ignored_and_overwritten(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=3)
    engine = RecordingEngine()
    checkpoints.save(engine, "a", 2, {}, {})
    (tmp_path / "step-a-4.tmp").mkdir()  # killed mid-save: no trainer_state.json
    (tmp_path / "step-a-4.tmp" / "partial").write_text("x")
    assert checkpoints.latest("a") == tmp_path / "step-a-2"
    checkpoints.save(engine, "a", 4, {}, {})
    assert checkpoints.latest("a") == tmp_path / "step-a-4"
    assert not (tmp_path / "step-a-4" / "partial").exists() and not (tmp_path / "step-a-4.tmp").exists()


def test_checkpoint_contents_and_load(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=1)
    path = checkpoints.save(RecordingEngine(), "a", 7, {"sampler": {"epoch": 1}}, {"rng": [1, 2]})
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank-0.json", "rank-0.safetensors",
                                                      "trainer_state.json", "weights.bin"]
    engine = RecordingEngine()
    state, rank_state = checkpoints.load(engine, path)
    assert engine.loaded == path
    assert (state["stage"], state["step"], state["sampler"], rank_state) == ("a", 7, {"epoch": 1}, {"rng": [1, 2]})


def test_load_refuses_a_checkpoint_of_another_engine_or_world(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep_last=1)
    path = checkpoints.save(RecordingEngine(zero_stage=2, world_size=2), "a", 1, {}, {})
    with pytest.raises(ValueError, match="cannot be resumed by"):
        checkpoints.load(RecordingEngine(zero_stage=3, world_size=2), path)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoints.load(RecordingEngine(), tmp_path / "step-a-99")


@pytest.mark.parametrize(("keep_last", "stage"), [(0, "a"), (1, "bad-name")])
def test_checkpoint_dir_rejects_bad_settings(tmp_path, keep_last, stage):
    with pytest.raises(ValueError):
        CheckpointDir(tmp_path, keep_last).save(RecordingEngine(), stage, 1, {}, {})


# ---------------------------------------------------------------------------------------------- deepspeed config


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_deepspeed_config_zero_stage_and_batch(zero_stage):
    cfg = EngineConfig(kind="deepspeed", zero_stage=zero_stage, grad_clip=0.5)
    ds = deepspeed_config(cfg, micro_batch=2, accumulation=3, world_size=4, param_dtype=torch.float32)
    assert ds["zero_optimization"] == {"stage": zero_stage}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 24)
    assert ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    json.dumps(ds)  # DeepSpeed takes it as JSON


def test_deepspeed_config_offload():
    cfg = EngineConfig(kind="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    zero = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=1,
                            param_dtype=torch.float32)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    cfg = EngineConfig(kind="deepspeed", zero_stage=2, offload_optimizer=True)
    zero = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=1,
                            param_dtype=torch.float32)["zero_optimization"]
    assert "offload_optimizer" in zero and "offload_param" not in zero


def test_deepspeed_config_zero_options_merge_and_are_checked():
    cfg = EngineConfig(kind="deepspeed", zero_stage=2, offload_optimizer=True,
                       zero_options={"overlap_comm": True, "reduce_bucket_size": 10**9})
    zero = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=1,
                            param_dtype=torch.bfloat16)["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 10**9
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match=r"^engine.zero_options.overlap_com is not a DeepSpeed"):
        deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=2, zero_options={"overlap_com": True}),
                         micro_batch=1, accumulation=1, world_size=1, param_dtype=torch.bfloat16)
    both = {"prefetch_bucket_size": 10**7, "stage3_prefetch_bucket_size": 10**7}  # a name and its alias
    with pytest.raises(ConfigError, match="stage3_prefetch_bucket_size and engine.zero_options.prefetch_bucket_size"):
        deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=3, zero_options=both),
                         micro_batch=1, accumulation=1, world_size=1, param_dtype=torch.bfloat16)
    alias = deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=3,
                                          zero_options={"stage3_prefetch_bucket_size": 10**7}),
                             micro_batch=1, accumulation=1, world_size=1, param_dtype=torch.bfloat16)
    assert alias["zero_optimization"]["stage3_prefetch_bucket_size"] == 10**7


@pytest.mark.parametrize(("options", "message"), [
    ({"stage": 3}, "engine.zero_options.stage is set by engine.zero_stage"),
    ({"cpu_offload": True}, "engine.zero_options.cpu_offload is set by engine.offload_optimizer"),
])
def test_zero_options_may_not_set_what_engine_fields_own(options, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(kind="deepspeed", zero_stage=2, zero_options=options)
    with pytest.raises(ConfigError, match="needs engine.kind=deepspeed"):
        EngineConfig(zero_options={"overlap_comm": True})


@pytest.mark.parametrize(("dtype", "bf16", "fp16"), [(torch.bfloat16, True, False), (torch.float16, False, True),
                                                      (torch.float32, False, False)])
def test_deepspeed_config_precision_follows_the_trainable_parameters(dtype, bf16, fp16):
    ds = deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=1), micro_batch=1, accumulation=1, world_size=1,
                          param_dtype=dtype)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    # 16-bit models accumulate their micro-batch gradients in fp32 under ZeRO-1/2
    assert ds.get("data_types") == (None if dtype == torch.float32 else {"grad_accum_dtype": "fp32"})


def test_deepspeed_config_rejects_bad_geometry():
    with pytest.raises(ValueError, match="accumulation=0"):
        deepspeed_config(EngineConfig(kind="deepspeed"), micro_batch=1, accumulation=0, world_size=1,
                         param_dtype=torch.float32)


def test_grad_norm_is_measured_without_clipping():
    engine, run = fresh_run(Path("unused"), checkpoint_every=0)
    engine.cfg = EngineConfig(grad_clip=0.0)
    run.checkpoints = run.metrics_log = None
    history = train_stage(engine, run)
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
