"""Reliability of stage checkpoints and the train loop (issue 9), on the toy model of test_engine.py.

No pickle is ever loaded, damaged checkpoints are passed over by name, non-finite steps are skipped and
never written, a signal checkpoints and exits with 75, a changed config is refused on resume.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ascend_edit.train.checkpoint_io import (
    MANIFEST,
    CheckpointIntegrityError,
    NonFiniteTensorError,
    load_tree,
    manifest_problem,
    save_tree,
    verify_manifest,
    write_manifest,
)
from ascend_edit.train.loop import (
    ConfigChangedOnResume,
    NonFiniteSteps,
    check_config_change,
    resume,
    save_checkpoint,
    train_stage,
)
from ascend_edit.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag
from tests.unit.test_engine import STAGE, Crash, fresh_run, next_token_loss, weights

# ---------------------------------------------------------------------------------------------- helpers


class PlantedPickle:
    """Unpickling this creates `marker`: what a crafted checkpoint file could do with any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    torch.save({"state": PlantedPickle(marker)}, path)


def test_the_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    """The control for the tests below: a pickle loader would execute it."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


class CountingObjective:
    """The toy objective, with a hook that runs before optimizer step `step` (1-based) is computed."""

    def __init__(self, accumulation: int = 2, on_step=None):
        self.calls, self.accumulation, self.on_step = 0, accumulation, on_step or {}

    @property
    def step(self) -> int:
        return self.calls // self.accumulation + 1

    def __call__(self, model, batch):
        action = self.on_step.get(self.step)
        self.calls += 1
        if action is not None:
            action(model)
        return next_token_loss(model, batch)


def crash(model) -> None:
    raise Crash  # the process dies here


def nan_gradient(model) -> None:
    """Make this micro-batch's gradient of head.weight NaN (the loss stays finite); later backwards pass."""
    fired = []

    def once(grad):
        if fired:
            return grad
        fired.append(True)
        return torch.full_like(grad, float("nan"))

    model.head.weight.register_hook(once)


def all_tensors_finite(checkpoint: Path) -> bool:
    files = [f for f in checkpoint.iterdir() if f.suffix == ".safetensors"]
    assert files, checkpoint
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values()
               if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- no pickles


def test_checkpoint_holds_no_pickle_and_round_trips_every_state(tmp_path):
    engine, run = fresh_run(tmp_path)
    train_stage(engine, run)
    path = run.checkpoints.latest("toy")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["engine_state.json", "engine_state.safetensors", MANIFEST, "rank-0.json", "rank-0.safetensors",
                     "trainable.safetensors", "trainer_state.json"]
    assert manifest_problem(path) is None


def test_tree_codec_keeps_types_that_json_alone_would_lose(tmp_path):
    import random

    import numpy as np

    tree = {"python": random.getstate(), "numpy": np.random.get_state(), 3: (1.5, float("inf")),
            "t": torch.arange(4.0)}
    save_tree(tree, tmp_path, "x")
    back = load_tree(tmp_path, "x")
    assert back["python"] == tree["python"] and back[3] == tree[3] and torch.equal(back["t"], tree["t"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], tree["numpy"][1])
    assert back["numpy"][1].dtype == tree["numpy"][1].dtype


def test_planted_pickles_are_never_executed_on_resume(tmp_path):
    """rank-0.pt / engine.pt planted into the newest checkpoint, with and without a re-signed manifest."""
    marker = tmp_path / "ran"
    engine, run = fresh_run(tmp_path / "run")
    train_stage(engine, run)
    newest = run.checkpoints.latest("toy")
    for name in ("rank-0.pt", "engine.pt"):
        plant(newest / name, marker)
    # Unlisted files: the checkpoint no longer matches its manifest and is passed over.
    assert "rank-0.pt" in manifest_problem(newest) or "engine.pt" in manifest_problem(newest)
    engine, run = fresh_run(tmp_path / "run")
    assert newest.name == "step-toy-6"
    assert resume(engine, run) == 3  # the previous checkpoint
    # An attacker who can also rewrite the manifest: the checkpoint is used, the pickles are still never read.
    write_manifest(newest)
    engine, run = fresh_run(tmp_path / "run")
    assert resume(engine, run) == 6
    assert not marker.exists()


def test_planted_engine_pickle_is_never_executed_by_export(tmp_path):
    from ascend_edit.tasks import export as export_task
    from ascend_edit.train.checkpoint_io import read_trainable_weights

    marker = tmp_path / "ran"
    engine, run = fresh_run(tmp_path / "run")
    train_stage(engine, run)
    newest = save_checkpoint(engine, run, STAGE.steps)
    plant(newest / "engine.pt", marker)
    with pytest.raises(CheckpointIntegrityError, match="engine.pt is not in the manifest"):
        read_trainable_weights(newest)
    write_manifest(newest)  # re-signed: the safetensors weights are read, the pickle is not
    trained = read_trainable_weights(newest)
    assert torch.equal(trained["head.weight"], engine.model.head.weight)
    only_pickle = tmp_path / "old"
    only_pickle.mkdir()
    plant(only_pickle / "engine.pt", marker)
    with pytest.raises(ValueError, match="a pickle"):
        export_task.resolve_source(only_pickle)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- integrity


def _straight(tmp_path):
    engine, run = fresh_run(tmp_path / "straight")
    history = train_stage(engine, run)
    return history, weights(engine)


def _truncate(path: Path) -> None:
    data = (path / "trainable.safetensors").read_bytes()
    (path / "trainable.safetensors").write_bytes(data[: len(data) // 2])


def _flip_low_mantissa_bit(path: Path) -> None:
    """Flip the lowest bit of the last fp32 value: still finite, just wrong."""
    file = path / "trainable.safetensors"
    data = bytearray(file.read_bytes())
    data[-4] ^= 0x01
    file.write_bytes(bytes(data))
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(file)).values())


@pytest.mark.parametrize("damage", [_truncate, _flip_low_mantissa_bit], ids=["truncated", "bit_flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    straight, straight_weights = _straight(tmp_path)
    engine, run = fresh_run(tmp_path / "run", objective=CountingObjective(on_step={8: crash}))
    with pytest.raises(Crash):  # killed during step 8: checkpoints at 3 and 6
        train_stage(engine, run)
    damage(tmp_path / "run" / "checkpoints" / "step-toy-6")
    engine, run = fresh_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        start = resume(engine, run)
    assert start == 3
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "step-toy-6" in lines[0] and "trainable.safetensors" in lines[0]
    resumed = train_stage(engine, run, start_step=start)
    assert resumed == straight  # bit-exact from the older checkpoint
    assert all(torch.equal(weights(engine)[n], v) for n, v in straight_weights.items())


def test_a_checkpoint_without_manifest_is_not_resumed(tmp_path):
    engine, run = fresh_run(tmp_path)
    save_checkpoint(engine, run, 3)
    (run.checkpoints.latest("toy") / MANIFEST).unlink()
    engine, run = fresh_run(tmp_path)
    assert resume(engine, run) == 0


# ---------------------------------------------------------------------------------------------- non-finite steps


def test_nan_gradient_step_is_skipped_counted_and_never_saved(tmp_path):
    engine, run = fresh_run(tmp_path, objective=CountingObjective(on_step={4: nan_gradient}))
    history = train_stage(engine, run)
    assert [row["step"] for row in history if row["skipped"]] == [4] == run.skipped_steps
    assert math.isfinite(history[3]["loss"]) and math.isnan(history[3]["grad_norm"])
    # No update: AdamW counted 7 steps, the schedule advanced 7 times.
    assert all(int(s["step"]) == STAGE.steps - 1 for s in engine.optimizer.state.values())
    assert engine.scheduler.last_epoch == STAGE.steps - 1
    assert all(bool(torch.isfinite(p).all()) for p in engine.model.parameters())
    for checkpoint in run.checkpoints.complete("toy"):
        assert all_tensors_finite(checkpoint)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if row["skipped"]] == [4]


def test_skipped_step_leaves_weights_and_optimizer_untouched(tmp_path):
    """Steps 1-3, then a NaN step 4: weights and optimizer state after step 4 equal those after step 3."""
    engine, run = fresh_run(tmp_path, objective=CountingObjective(on_step={4: nan_gradient}), checkpoint_every=0)
    run.steps = 3
    train_stage(engine, run)
    before = weights(engine)
    moments = {k: v["exp_avg"].clone() for k, v in engine.optimizer.state.items()}
    run.steps = 4
    train_stage(engine, run, start_step=3)
    assert run.history[-1]["skipped"]
    assert all(torch.equal(weights(engine)[n], v) for n, v in before.items())
    assert all(torch.equal(engine.optimizer.state[k]["exp_avg"], v) for k, v in moments.items())


def test_nan_loss_is_skipped_too(tmp_path):
    calls = []

    def nan_loss_in_step_2(model, batch):
        calls.append(1)
        loss, metrics = next_token_loss(model, batch)
        if len(calls) in (3, 4):  # step 2's two micro-batches
            loss = loss * float("nan")
            metrics = {"loss": float("nan")}
        return loss, metrics

    engine, run = fresh_run(tmp_path, objective=nan_loss_in_step_2, checkpoint_every=0)
    train_stage(engine, run)
    assert run.skipped_steps == [2]
    assert all(bool(torch.isfinite(p).all()) for p in engine.model.parameters())


def test_consecutive_skips_stop_the_stage_keeping_the_last_good_checkpoint(tmp_path):
    objective = CountingObjective(on_step={s: nan_gradient for s in range(5, 20)})
    engine, run = fresh_run(tmp_path, objective=objective)
    run.max_consecutive_skips = 3
    with pytest.raises(NonFiniteSteps, match=r"toy step 5: loss is .*3 steps in a row.*step-toy-6") as err:
        train_stage(engine, run)  # skips 5, 6, 7: stops after step 7
    assert "\n" not in str(err.value)
    assert run.skipped_steps == [5, 6, 7]
    # step 6 was saved after a skipped step: weights as after step 4, finite
    assert [p.name for p in run.checkpoints.complete("toy")] == ["step-toy-3", "step-toy-6"]
    assert all(all_tensors_finite(p) for p in run.checkpoints.complete("toy"))
    # its state is strict JSON (a skipped step's NaN norm is null, not a NaN literal that parsers refuse)
    state = (run.checkpoints.complete("toy")[-1] / "trainer_state.json").read_text()
    history = json.loads(state, parse_constant=lambda name: pytest.fail(f"{name} in trainer_state.json"))["history"]
    assert [row["grad_norm"] for row in history if row["skipped"]] == [None, None]  # steps 5 and 6


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    engine, run = fresh_run(tmp_path)
    with torch.no_grad():
        engine.model.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteTensorError, match="head.weight"):
        save_checkpoint(engine, run, 1)
    assert run.checkpoints.complete("toy") == []


# ---------------------------------------------------------------------------------------------- preemption


def test_sigterm_checkpoints_exits_75_and_the_restart_equals_the_uninterrupted_run(tmp_path):
    """A real SIGTERM to this process during step 5: checkpoint at step 5, Preempted(75); the restart
    resumes there. One process, same ops: bit-identical metrics and weights."""
    straight, straight_weights = _straight(tmp_path)

    objective = CountingObjective(on_step={5: lambda m: os.kill(os.getpid(), signal.SIGTERM)})
    engine, run = fresh_run(tmp_path / "run", objective=objective)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag() as flag, pytest.raises(Preempted) as stop:
        run.preemption = flag
        train_stage(engine, run)
    assert stop.value.code == EXIT_PREEMPTED == 75
    assert "SIGTERM after step 5" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert run.checkpoints.latest("toy").name == "step-toy-5"

    engine, run = fresh_run(tmp_path / "run")
    start = resume(engine, run)
    assert start == 5
    assert train_stage(engine, run, start_step=start) == straight
    assert all(torch.equal(weights(engine)[n], v) for n, v in straight_weights.items())


def test_second_sigint_interrupts_at_once():
    flag = PreemptionFlag()
    flag.request(signal.SIGINT)
    assert flag.requested
    with pytest.raises(KeyboardInterrupt):
        flag.request(signal.SIGINT)


# ---------------------------------------------------------------------------------------------- config on resume


def test_changed_learning_rate_is_refused_in_one_message_listing_the_keys(tmp_path):
    engine, run = fresh_run(tmp_path)
    run.config = {"distill.layerwise.lr": 1e-3, "distill.layerwise.steps": 8, "target.mla.kv_lora_rank": 32}
    save_checkpoint(engine, run, 3)
    engine, run = fresh_run(tmp_path)
    run.config = {"distill.layerwise.lr": 1e-2, "distill.layerwise.steps": 8, "target.mla.kv_lora_rank": 64}
    with pytest.raises(ConfigChangedOnResume) as err:
        resume(engine, run)
    message = str(err.value)
    assert "distill.layerwise.lr: 0.001 -> 0.01" in message and "target.mla.kv_lora_rank: 32 -> 64" in message
    assert "\n" not in message


def test_resumable_changes_are_applied_and_logged(caplog):
    saved = {"distill.layerwise.steps": 8, "distill.model_level.steps": 8, "engine.checkpoint_every": 3,
             "distill.log_every": 10, "eval.batch_size": 4}
    current = {**saved, "distill.layerwise.steps": 12, "distill.model_level.steps": 20, "engine.checkpoint_every": 5,
               "eval.batch_size": 8}
    with caplog.at_level(logging.INFO):
        check_config_change(saved, current, "layerwise", Path("ckpt"))
    assert any("engine.checkpoint_every: 3 -> 5" in r.getMessage() for r in caplog.records)
    # An earlier stage's steps cannot change once a later stage resumes.
    with pytest.raises(ConfigChangedOnResume, match="distill.layerwise.steps"):
        check_config_change(saved, current, "model_level", Path("ckpt"))


# ---------------------------------------------------------------------------------------------- accounting


def test_elapsed_time_and_tokens_cover_the_whole_stage_after_a_resume(tmp_path):
    engine, run = fresh_run(tmp_path / "straight", checkpoint_every=0)
    train_stage(engine, run)
    total_tokens = run.tokens
    assert total_tokens == STAGE.steps * STAGE.batch_size * 6  # SEQ = 6

    engine, run = fresh_run(tmp_path / "run", objective=CountingObjective(on_step={5: crash}))
    with pytest.raises(Crash):
        train_stage(engine, run)
    saved = json.loads((run.checkpoints.latest("toy") / "trainer_state.json").read_text())
    assert saved["elapsed_s"] > 0 and saved["tokens"] == 3 * STAGE.batch_size * 6
    engine, run = fresh_run(tmp_path / "run")
    start = resume(engine, run)
    assert run.elapsed_s == saved["elapsed_s"]
    train_stage(engine, run, start_step=start)
    assert run.tokens == total_tokens and run.elapsed_s > saved["elapsed_s"]


def test_integrity_error_names_the_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345678")
    write_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"1234")
    with pytest.raises(CheckpointIntegrityError, match=r"a.bin is 4 bytes, the manifest says 8"):
        verify_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------- DeepSpeed's pickles


class PicklingEngine:
    """Stand-in for the DeepSpeed engine: writes a torch pickle under deepspeed/, as DeepSpeed does."""

    def describe(self) -> dict:
        return {"engine": "fake", "world_size": 1}

    def save(self, directory: Path) -> None:
        (Path(directory) / "deepspeed").mkdir()
        torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, Path(directory) / "deepspeed" / "m.pt")

    def load(self, directory: Path) -> None:
        raise AssertionError("a rejected checkpoint must never reach the engine")


def test_deepspeed_pickle_naming_foreign_code_is_passed_over_even_with_a_valid_manifest(tmp_path, caplog):
    from ascend_edit.train.checkpoint_io import CheckpointDir, deepspeed_pickle_problem

    marker = tmp_path / "ran"
    checkpoints = CheckpointDir(tmp_path / "checkpoints", keep_last=3)
    good = checkpoints.save(PicklingEngine(), "a", 1, {}, {})
    bad = checkpoints.save(PicklingEngine(), "a", 2, {}, {})
    assert deepspeed_pickle_problem(good) is None  # tensors and plain containers only
    plant(bad / "deepspeed" / "m.pt", marker)
    write_manifest(bad)  # the files match the manifest: only the scan can tell
    with caplog.at_level(logging.WARNING):
        assert checkpoints.newest_intact("a") == good
    assert any("step-a-2" in r.getMessage() and "names code outside DeepSpeed's checkpoint types (io.open)" in r.getMessage()
               for r in caplog.records)
    assert not marker.exists()


class _MemberLookup:
    """Pickles as `getattr(owner, member)`: how Python < 3.11.4 writes an Enum member."""

    def __init__(self, owner, member: str):
        self.owner, self.member = owner, member

    def __reduce__(self):
        return getattr, (self.owner, self.member)


class AllowedOwner:
    weights = 3


def test_getattr_is_accepted_only_as_a_public_member_lookup_on_an_allowed_class():
    import collections
    import pickle

    from ascend_edit.train.checkpoint_io import _only_member_lookups

    allowed = frozenset({f"{__name__}.AllowedOwner"})
    member = pickle.dumps({"stage": _MemberLookup(AllowedOwner, "weights"), "x": [1, 2]}, protocol=2)
    twice = pickle.dumps([_MemberLookup(AllowedOwner, "weights")] * 2 + [_MemberLookup(AllowedOwner, "weights")],
                         protocol=2)  # the second lookup reaches getattr and the class through the memo
    assert _only_member_lookups(member, allowed)
    assert _only_member_lookups(twice, allowed)
    assert not _only_member_lookups(pickle.dumps(_MemberLookup(AllowedOwner, "__class__"), protocol=2), allowed)
    assert not _only_member_lookups(
        pickle.dumps(_MemberLookup(collections.OrderedDict, "fromkeys"), protocol=2), allowed)
    assert not _only_member_lookups(pickle.dumps(_MemberLookup(AllowedOwner, "weights"), protocol=4), allowed)


class FailingSave:
    """An engine whose checkpoint write fails with `message` (what a full disk looks like to each writer)."""

    def __init__(self, message: str):
        self.message = message

    def save(self, directory):
        raise RuntimeError(self.message)

    def describe(self):
        return {}


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(tmp_path):
    """safetensors reports a full disk as "os error 28" and torch's serializer under DeepSpeed as a short write: both
    become OSError(ENOSPC) naming the checkpoint and what to do (was: a traceback); the earlier checkpoints stay."""
    import errno

    from ascend_edit.train.checkpoint_io import CheckpointDir, disk_full

    full_disk = FailingSave("Error while serializing: No space left on device (os error 28)")
    with pytest.raises(OSError) as info:
        CheckpointDir(tmp_path / "checkpoints", keep_last=2).save(full_disk, "layerwise", 4, {}, {})
    assert info.value.errno == errno.ENOSPC
    assert "writing checkpoint" in str(info.value) and "step-layerwise-4" in str(info.value)
    assert "\n" not in str(info.value)
    assert not disk_full(RuntimeError("a bug"), tmp_path)  # plenty of space here: other errors stay what they are
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-layerwise-4.tmp"]  # nothing published


class SavesThenFillsTheDisk(FailingSave):
    """The weights fit; the disk is full by the time the state file (or the manifest) is written."""

    def __init__(self, full_at: str):
        super().__init__("")
        self.full_at = full_at

    def save(self, directory):
        (directory / "weights.bin").write_bytes(b"w")


@pytest.mark.parametrize("full_at", ["trainer_state.json", "manifest.json"])
def test_a_full_disk_after_the_weights_is_one_line_naming_the_checkpoint_too(tmp_path, monkeypatch, full_at):
    """The state file and the manifest were written outside the check: a bare "[Errno 28]" with no path."""
    import errno
    import pathlib

    from ascend_edit.train.checkpoint_io import CheckpointDir

    real_write_text, real_open = pathlib.Path.write_text, open

    def write_text(self, *args, **kwargs):
        if self.name == full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    def fake_open(file, *args, **kwargs):
        if str(file).endswith(full_at):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(OSError) as info:
        CheckpointDir(tmp_path / "checkpoints", keep_last=2).save(SavesThenFillsTheDisk(full_at), "layerwise", 4, {}, {})
    assert info.value.errno == errno.ENOSPC and "writing checkpoint" in str(info.value)
    assert "step-layerwise-4" in str(info.value) and "earlier checkpoints are intact" in str(info.value)
    assert not (tmp_path / "checkpoints" / "step-layerwise-4").exists()  # nothing published


def test_a_short_write_on_an_almost_full_disk_is_taken_for_a_full_disk(tmp_path, monkeypatch):
    """torch's serializer under DeepSpeed says 'unexpected pos' for a short write: with almost no space left on
    the device that is a full disk; a non-finite value is never reported as one."""
    import errno
    import shutil
    from collections import namedtuple

    from ascend_edit.train import checkpoint_io
    from ascend_edit.train.checkpoint_io import CheckpointDir, disk_full

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10432 vs 10326"),
                     tmp_path)
    assert not disk_full(FloatingPointError("non-finite"), tmp_path)

    short_write = FailingSave("[enforce fail at inline_container.cc:672] . unexpected pos 10432 vs 10326")
    with pytest.raises(OSError) as info:
        CheckpointDir(tmp_path / "checkpoints", keep_last=2).save(short_write, "layerwise", 2, {}, {})
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="non-finite|NaN|inf"):  # a diverged run is not told to free disk space
        CheckpointDir(tmp_path / "checkpoints", keep_last=2).save(
            short_write, "layerwise", 3, {}, {"x": torch.tensor([float("nan")])})
    assert checkpoint_io.DISK_FULL_MARGIN > (1 << 20)


def test_a_stopped_sweep_job_is_told_to_rerun_its_sweep(monkeypatch, tmp_path):
    """A stopped job of a multirun was told to rerun with hydra.run.dir=, which a multirun ignores: the job started
    over in a new directory."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ascend_edit.train.preemption import resume_instruction

    assert resume_instruction(tmp_path) == (f"run the same command with hydra.run.dir={tmp_path} (the launch "
                                            f"wrappers: RUN_DIR={tmp_path})")
    sweep = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir="/sweeps/s1"))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: sweep))
    assert resume_instruction(tmp_path).startswith("run the same sweep again with hydra.sweep.dir=/sweeps/s1")
