"""Faults and bad inputs, each run through the real command line: what the user sees, and the exit code.

Every case runs `ascend-edit ...` as a subprocess on tiny models (random Qwen3 from config, or a tiny
local Hugging Face checkpoint built here) with a few steps, on the CPU, and nothing is downloaded. For
each it records the one line the user gets (the `ascend-edit: error:` line, or for faults a run survives,
the log line saying what happened), the exit code, and checks:

* no `Traceback` reaches the user (stdout or stderr), and
* the exit code and message are the expected ones (the `ok` column), plus case-specific checks
  (a planted pickle did not run, files next to an export survived, ...).

The table is written to docs/reliability.md (regenerate it with this script):

    python benchmarks/reliability_faults.py                  # all cases (~10 min on 2 CPU cores)
    python benchmarks/reliability_faults.py --only config    # cases whose name contains "config"
    python benchmarks/reliability_faults.py --list

Exit code: 0 when every case passes, 1 otherwise (the table is written either way).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RUN_TIMEOUT_S = 600
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75

# A conversion that takes seconds: random tiny Qwen3 (4 layers, hidden 64), random token ids.
TINY = ["experiment=tiny", "distill.log_every=1"]
# A tiny conversion of the local HF checkpoint (model.path is appended by the cases).
HF = ["model=hf", "model.dtype=fp32", "target=mla_small", "target.mla.kv_lora_rank=32",
      "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8", "target.mla.v_head_dim=16",
      "data=synthetic", "data.seq_len=32", "data.synthetic_sequences=16", "data.eval_sequences=4", "device=cpu",
      "distill.layerwise.steps=2", "distill.layerwise.warmup_steps=1", "distill.layerwise.batch_size=2",
      "distill.model_level.steps=0", "target.calibration_batches=1", "eval.suite=false"]
# The base run that checkpoint, resume and export cases start from (copied per case).
BASE = [*TINY, "engine.checkpoint_every=1", "engine.keep_last=3", "eval.suite=false"]


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    command: str


@dataclass
class Case:
    name: str  # what goes wrong, as the table says it
    args: list[str] = field(default_factory=list)  # after `ascend-edit`; `{ws}` is the workspace
    rc: int = EXIT_BAD_INPUT  # expected exit code
    expect: str = ""  # expected in the message
    pattern: str = ""  # regex picking the message line from the output (default: the error line)
    setup: Callable[[Path], None] | None = None  # prepares files in the workspace before the run
    run: Callable[[Case, Path], Result] | None = None  # multi-step cases (signals, resumes)
    check: Callable[[Path], str | None] | None = None  # after the run: a problem, or None
    group: str = "config"
    note: str = ""  # what the check verified, appended to the message in the table


# ---------------------------------------------------------------------------------------------------
# running the CLI


def cli(args: list[str], ws: Path, timeout: int = RUN_TIMEOUT_S, **popen) -> Result:
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_EDIT_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "ascend_edit.cli", *args]
    proc = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                          **popen)
    return Result(proc.returncode, proc.stdout, proc.stderr, shown(args, ws))


def shown(args: list[str], ws: Path) -> str:
    return "ascend-edit " + " ".join(args).replace(str(ws), "$WS")


def run_dir_arg(ws: Path, name: str) -> str:
    return f"hydra.run.dir={ws / name}"


def message_of(case: Case, result: Result, ws: Path) -> str:
    text = ANSI.sub("", result.stdout + "\n" + result.stderr).replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ascend-edit: error:")]
    picked = None
    if case.pattern:
        picked = next((line for line in lines if re.search(case.pattern, line)), None)
    if picked is None and errors:
        picked = errors[-1]
    if picked is None:
        stderr = [line.strip() for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]
        picked = stderr[-1] if stderr else (lines[-1] if lines else "")
    picked = re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", picked)  # Hydra's log prefix
    return picked.replace(str(ws), "$WS")


# ---------------------------------------------------------------------------------------------------
# workspace: a tiny HF checkpoint, broken copies of it, and one finished run with checkpoints


def build_teacher(ws: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(ws / "teacher")


def copy_teacher(ws: Path, name: str) -> Path:
    target = ws / name
    if not target.exists():
        shutil.copytree(ws / "teacher", target)
    return target


def base_run(ws: Path) -> Path:
    """One finished tiny conversion with a checkpoint after every step (made once, copied per case)."""
    run = ws / "base-run"
    if not (run / "converted").exists():
        result = cli([*BASE, run_dir_arg(ws, "base-run")], ws)
        if result.rc != 0:
            raise RuntimeError(f"the base run failed (exit {result.rc}):\n{result.stderr[-3000:]}")
    return run


def copy_run(ws: Path, name: str) -> Path:
    target = ws / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base_run(ws), target)
    return target


def newest_checkpoint(run: Path, stage: str = "model_level") -> Path:
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in (run / "checkpoints").glob(f"step-{stage}-*")
                   if p.name.rsplit("-", 1)[1].isdigit())
    return found[-1][1]


def biggest_file(directory: Path, suffix: str = ".safetensors") -> Path:
    return max(directory.rglob(f"*{suffix}"), key=lambda p: p.stat().st_size)


class PlantedPickle:
    """Unpickling this creates `marker`: proof that a loader executed the file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"params": PlantedPickle(marker)}))


def marker_absent(marker_name: str) -> Callable[[Path], str | None]:
    def check(ws: Path) -> str | None:
        return f"{marker_name} exists: the planted pickle RAN" if (ws / marker_name).exists() else None
    return check


# ---------------------------------------------------------------------------------------------------
# cases


def config_cases() -> list[Case]:
    def c(name: str, override: str, expect: str, base: list[str] = TINY) -> Case:
        return Case(name, [*base, *override.split()], expect=expect)

    return [
        c("negative gradient clip (gradient ascent)", "engine.grad_clip=-1", "engine.grad_clip=-1.0"),
        c("negative checkpoint interval", "engine.checkpoint_every=-1", "engine.checkpoint_every=-1"),
        c("keep no checkpoints", "engine.keep_last=0", "engine.keep_last=0"),
        c("ZeRO stage without DeepSpeed", "engine.zero_stage=2", "engine.zero_stage=2"),
        c("zero consecutive skips allowed", "engine.max_consecutive_skips=0", "engine.max_consecutive_skips=0"),
        c("eval batch of zero", "eval.batch_size=0", "eval.batch_size=0"),
        c("negative CPU threads", "device.threads=-1", "device.threads=-1"),
        c("negative seed", "device.seed=-5", "device.seed=-5"),
        c("negative warm-up (stage 1)", "distill.layerwise.warmup_steps=-1", "distill.layerwise.warmup_steps=-1"),
        c("warm-up longer than the stage (stage 2)", "distill.model_level.warmup_steps=9",
          "distill.model_level.warmup_steps=9"),
        c("LR floor above 1", "distill.model_level.min_lr_ratio=1.5", "distill.model_level.min_lr_ratio=1.5"),
        c("zero learning rate (stage 1)", "distill.layerwise.lr=0", "distill.layerwise.lr=0"),
        c("NaN learning rate (stage 2)", "distill.model_level.lr=nan", "distill.model_level.lr=nan"),
        c("negative steps", "distill.layerwise.steps=-3", "distill.layerwise.steps=-3"),
        c("zero batch size", "distill.model_level.batch_size=0", "distill.model_level.batch_size=0"),
        c("micro batch larger than the batch", "distill.layerwise.micro_batch_size=3",
          "distill.layerwise.micro_batch_size=3"),
        c("micro batch that does not divide the batch", "distill.layerwise.batch_size=4 "
          "distill.layerwise.micro_batch_size=3", "distill.layerwise.micro_batch_size=3"),
        c("negative weight decay", "distill.layerwise.weight_decay=-0.1", "distill.layerwise.weight_decay=-0.1"),
        c("zero KD chunk", "distill.model_level.chunk_size=0", "distill.model_level.chunk_size=0"),
        c("top-k of zero", "distill.model_level.top_k=0", "distill.model_level.top_k=0"),
        c("top-k above the vocabulary", "distill.model_level.top_k=100000", "distill.model_level.top_k=100000"),
        c("zero KD temperature", "distill.model_level.temperature=0", "distill.model_level.temperature=0"),
        c("GateSWA KV budget below every layer sliding (was refused only after the teacher loaded)",
          "target=gate_swa target.gate_swa.full_every=0 target.gate_swa.kv_budget=0.1",
          "target.gate_swa.kv_budget=0.1 cannot be met"),
        c("feature layer that does not exist", "distill.model_level.feature_layers=[9]",
          "distill.model_level.feature_layers=[9]"),
        c("sequence of one token", "data.seq_len=1", "data.seq_len=1"),
        c("evaluation context of one token", "eval.contexts=[1]", "eval.contexts: 1 must be >= 2"),
        c("bf16 forward over fp16 weights", "model.dtype=fp16 device.dtype=bf16", "would mix two 16-bit formats"),
        c("held-out fraction above 1", "data.eval_fraction=1.5", "data.eval_fraction=1.5"),
        c("layer index out of range", "target.layers=[7]", "target.layers=[7]"),
        c("MLA cache larger than the teacher's", "target.mla.kv_lora_rank=512", "target.mla.kv_lora_rank=512"),
        c("odd RoPE dimension", "target.mla.qk_rope_head_dim=7", "target.mla.qk_rope_head_dim=7"),
        c("sliding window of zero", "target=gate_swa target.gate_swa.window=0", "target.gate_swa.window=0"),
        c("full layer out of range", "target=gate_swa target.gate_swa.full_every=0 target.gate_swa.full_layers=[4]",
          "target.gate_swa.full_layers=[4]"),
        c("warm start without calibration data", "target.calibration_batches=0", "target.calibration_batches=0"),
        c("stage 2 training shared weights under ZeRO-3", "engine=zero3 distill.model_level.trainable=all",
          "distill.model_level.trainable=all"),
        c("recall rows as the evaluation source", "data=mix data.mix=[{name:news,eval:true,repeat_spans:true}]",
          "data.mix[news]: repeat_spans and eval"),
        c("init_from without stage=model_level", "distill.init_from=/nonexistent", "distill.init_from"),
        c("init_from that does not exist", "distill.stage=model_level distill.init_from=/nonexistent",
          "distill.init_from=/nonexistent"),
        Case("data file that does not exist", [*[a for a in HF if a != "data=synthetic"], "model.path={ws}/teacher",
                                               "data=files", "data.path=/nonexistent/corpus.txt"],
             expect="data.path=/nonexistent/corpus.txt"),
        c("unknown key (typo)", "engine.grad_clipp=1", "grad_clipp"),
        c("wrong type", "distill.layerwise.steps=many", "distill.layerwise.steps"),
        c("unknown config group option", "target=mla_tiny", "target/mla_tiny"),
        c("unknown attention implementation", "model.attn_implementation=fast", "model.attn_implementation='fast'"),
        c("unsupported architecture", "model.arch=gpt2", "gpt2"),
        Case("unknown subcommand", ["frobnicate"], expect="unknown subcommand 'frobnicate'"),
        Case("run directory that cannot be created", [*TINY, "hydra.run.dir=/dev/null/run"],
             expect="hydra.run.dir=/dev/null/run cannot be created"),
        c("text data for a teacher without a tokenizer", "data=shakespeare", "needs a tokenizer"),
        Case("empty data file", [*[a for a in HF if a != "data=synthetic"], "model.path={ws}/teacher", "data=files",
                                 "data.path={ws}/empty.txt", "hydra.run.dir={ws}/runs/empty-data"],
             expect="empty.txt", setup=lambda ws: (ws / "empty.txt").write_text("")),
        c("NPU requested without torch_npu", "device=npu", "device=npu"),
        Case("mistyped experiment name (Hydra alone runs the default job)", ["experiment=qwen3_8b_mal"],
             expect="experiment=qwen3_8b_mal not found"),
        c("'+' adding a key nothing reads (typo)", "+target.mla.kv_lora_rnk=16", "target.mla.kv_lora_rnk"),
        c("model.path without model=hf (the default teacher would train)", "model.path=/models/Qwen3-8B",
          "model.path='/models/Qwen3-8B' is only read with model.source=hf"),
        Case("run directory that is someone else's (a model directory)", [*TINY, "hydra.run.dir={ws}/foreign"],
             expect="is a non-empty directory that holds no ascend-edit run",
             setup=lambda ws: ((ws / "foreign").mkdir(exist_ok=True), (ws / "foreign" / "config.json").write_text("{}"))),
        Case("output_dir that is a file", [*TINY, "output_dir={ws}/afile"], expect="is a file, not a directory",
             setup=lambda ws: (ws / "afile").write_text("keep")),
        Case("another task's run directory as hydra.run.dir (Hydra would rewrite the run's saved config)",
             ["inspect", *TINY, "hydra.run.dir={ws}/convert-run"], expect="holds a task=convert run",
             setup=_a_convert_run, check=_convert_run_untouched, note="the run's .hydra/config.yaml unchanged"),
        Case("a bad point in a multirun grid (it failed only when its job came)",
             ["-m", *TINY, "target.mla.kv_lora_rank=32,-4", "hydra.sweep.dir={ws}/sweep"],
             expect="sweep job 1 of 2 (target.mla.kv_lora_rank=-4)",
             check=lambda ws: "a job ran" if (ws / "sweep").exists() else None, note="no job ran"),
    ]


SAVED_CONVERT_CONFIG = "task: convert\nmodel: {source: config, arch: qwen3}\n"


def _a_convert_run(ws: Path) -> None:
    (ws / "convert-run" / ".hydra").mkdir(parents=True, exist_ok=True)
    (ws / "convert-run" / ".hydra" / "config.yaml").write_text(SAVED_CONVERT_CONFIG)


def _convert_run_untouched(ws: Path) -> str | None:
    saved = (ws / "convert-run" / ".hydra" / "config.yaml").read_text()
    return None if saved == SAVED_CONVERT_CONFIG else "the run's saved config changed"


def model_cases() -> list[Case]:
    def hf(name: str, extra: str, expect: str, setup=None) -> Case:
        return Case(name, [*HF, *extra.split(), "hydra.run.dir={ws}/runs/" + re.sub(r"\W+", "-", name)],
                    expect=expect, setup=setup, group="model")

    def config_only(ws: Path) -> None:
        (ws / "config-only").mkdir(exist_ok=True)
        shutil.copy(ws / "teacher" / "config.json", ws / "config-only")

    def truncated_safetensors(ws: Path) -> None:
        weights = copy_teacher(ws, "truncated-safetensors") / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def bad_config(ws: Path) -> None:
        (copy_teacher(ws, "bad-config") / "config.json").write_text('{"model_type": "qwen3", ')

    def bad_tokenizer(ws: Path) -> None:
        (copy_teacher(ws, "bad-tokenizer") / "tokenizer.json").write_text('{"version": ')

    def gguf_dir(ws: Path) -> None:
        from ascend_edit.assets import smollm2_gguf

        if (ws / "gguf" / "not-a-gguf.gguf").exists():
            return
        (ws / "gguf").mkdir(exist_ok=True)
        data = smollm2_gguf().read_bytes()
        (ws / "gguf" / "truncated.gguf").write_bytes(data[: len(data) // 3])
        (ws / "gguf" / "not-a-gguf.gguf").write_bytes(b"PK\x03\x04" + os.urandom(4096))

    def missing_tensor(ws: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = copy_teacher(ws, "missing-tensor") / "model.safetensors"
        state = load_file(str(weights))
        del state[next(name for name in sorted(state) if name.endswith("k_proj.weight"))]
        save_file(state, str(weights), metadata={"format": "pt"})

    def other_arch(ws: Path) -> None:
        directory = copy_teacher(ws, "gpt2-teacher")
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))

    def no_tokenizer(ws: Path) -> None:
        directory = copy_teacher(ws, "no-tokenizer")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)

    def sliding_teacher(ws: Path) -> None:
        directory = copy_teacher(ws, "sliding-teacher")
        config = json.loads((directory / "config.json").read_text())
        layers = config["num_hidden_layers"]
        (directory / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8,
                                                           "max_window_layers": 0,
                                                           "layer_types": ["sliding_attention"] * layers}))

    return [
        hf("model.path does not exist", "model.path={ws}/no-such-model", "model.path="),
        hf("model.path is a weights file", "model.path={ws}/teacher/model.safetensors", "is a file"),
        hf("directory with only config.json", "model.path={ws}/config-only", "no weights", config_only),
        hf("truncated safetensors", "model.path={ws}/truncated-safetensors", "is truncated", truncated_safetensors),
        hf("malformed config.json", "model.path={ws}/bad-config", "model.path", bad_config),
        hf("unreadable tokenizer", "model.path={ws}/bad-tokenizer", "tokenizer", bad_tokenizer),
        hf("unsupported architecture in config.json", "model.path={ws}/gpt2-teacher", "gpt2", other_arch),
        hf("teacher directory without tokenizer files", "model.path={ws}/no-tokenizer", "tokenizer", no_tokenizer),
        hf("teacher whose own attention slides", "model.path={ws}/sliding-teacher", "own attention slides",
           sliding_teacher),
        hf("weights missing a tensor of config.json", "model.path={ws}/missing-tensor", "missing keys (1)",
           missing_tensor),
        hf("missing gguf_file (no hub fallback)", "model.path={ws}/gguf model.gguf_file=missing.gguf",
           "model.gguf_file=missing.gguf", gguf_dir),
        hf("truncated GGUF", "model.path={ws}/gguf model.gguf_file=truncated.gguf", "is truncated", gguf_dir),
        hf("GGUF path passed as model.path", "model.path={ws}/gguf/truncated.gguf", "model.gguf_file=truncated.gguf",
           gguf_dir),
        hf("file that is not a GGUF", "model.path={ws}/gguf model.gguf_file=not-a-gguf.gguf", "not a GGUF file",
           gguf_dir),
    ]


# --- checkpoint / resume / export faults (they start from a copy of one finished run)


def resume_case(name: str, damage: Callable[[Path], None], extra: list[str], rc: int, expect: str,
                pattern: str = "", check: Callable[[Path], str | None] | None = None, note: str = "") -> Case:
    slug = re.sub(r"\W+", "-", name)

    def run(case: Case, ws: Path) -> Result:
        run_dir = copy_run(ws, slug)
        damage(run_dir)
        return cli([*BASE, *extra, run_dir_arg(ws, slug)], ws)

    return Case(name, [*BASE, *extra, "hydra.run.dir=$WS/" + slug], rc=rc, expect=expect, pattern=pattern,
                run=run, check=check, group="checkpoint", note=note)


def export_case(name: str, prepare: Callable[[Path, Path], list[str]], rc: int, expect: str,
                check: Callable[[Path], str | None] | None = None, pattern: str = "", note: str = "") -> Case:
    slug = re.sub(r"\W+", "-", name)
    shown_args: list[str] = []

    def run(case: Case, ws: Path) -> Result:
        run_dir = copy_run(ws, slug)
        extra = prepare(ws, run_dir)
        source = [] if any(a.startswith("export.checkpoint=") for a in extra) else [f"export.checkpoint={run_dir}"]
        args = ["export", *source, *extra, run_dir_arg(ws, slug + "-export")]
        case.args[:] = [a.replace(str(ws), "$WS") for a in args]
        return cli(args, ws)

    return Case(name, shown_args, rc=rc, expect=expect, run=run, check=check, pattern=pattern, group="export",
                note=note)


def checkpoint_cases() -> list[Case]:
    def truncate_newest(run: Path) -> None:
        target = biggest_file(newest_checkpoint(run))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    def bitflip_newest(run: Path) -> None:
        target = biggest_file(newest_checkpoint(run))
        data = bytearray(target.read_bytes())
        data[len(data) - 100] ^= 0x10  # one bit in the tensor data: a finite, silently wrong weight
        target.write_bytes(bytes(data))

    def pickle_in_checkpoint(run: Path) -> None:
        newest = newest_checkpoint(run)
        for name in ("engine.pt", "rank-0.pt"):
            plant_pickle(newest / name, run.parent / "PWNED-resume")

    def nothing(run: Path) -> None:
        pass

    def nonfinite_saved(ws: Path) -> str | None:
        from safetensors.torch import load_file

        for file in (ws / "diverging-training-lr-1e30").rglob("*.safetensors"):
            if any(not t.isfinite().all() for t in load_file(file).values() if t.is_floating_point()):
                return f"{file} holds a non-finite tensor"
        return None

    def diverge(run: Path) -> None:
        shutil.rmtree(run)  # a fresh run in this directory

    return [
        resume_case("malicious pickle planted in the newest checkpoint", pickle_in_checkpoint, [], 0,
                    "resumed", pattern=r"resumed \w+ from", check=marker_absent("PWNED-resume"),
                    note="(the planted engine.pt / rank-0.pt were never unpickled: their marker file is absent)"),
        resume_case("truncated newest checkpoint", truncate_newest, [], 0, "damaged", pattern=r"is damaged"),
        resume_case("bit-flipped newest checkpoint", bitflip_newest, [], 0, "damaged", pattern=r"is damaged"),
        resume_case("changed learning rate on resume", nothing, ["distill.model_level.lr=5e-3"], EXIT_BAD_INPUT,
                    "distill.model_level.lr"),
        resume_case("changed target shape on resume", nothing, ["target.mla.kv_lora_rank=16"], EXIT_BAD_INPUT,
                    "target.mla.kv_lora_rank"),
        resume_case("diverging training (lr=1e30): non-finite steps", diverge,
                    ["distill.layerwise.lr=1e30", "engine.max_consecutive_skips=2"], EXIT_BAD_INPUT,
                    "non-finite", check=nonfinite_saved, note="(no saved tensor is non-finite)"),
        Case("SIGTERM mid-stage, then the same command again", rc=EXIT_PREEMPTED, expect="SIGTERM",
             pattern=r"SIGTERM|preempt|signal", run=sigterm_then_resume, group="checkpoint"),
    ]


def sigterm_then_resume(case: Case, ws: Path) -> Result:
    run_dir = ws / "sigterm"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [*TINY, "distill.layerwise.steps=60", "distill.layerwise.warmup_steps=1", "distill.model_level.steps=2",
            "eval.suite=false", run_dir_arg(ws, "sigterm")]
    case.args[:] = [*[a.replace(str(ws), "$WS") for a in args], "(SIGTERM once step 3 is logged)"]
    env = {k: v for k, v in os.environ.items() if k not in ("ASCEND_EDIT_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ascend_edit.cli", *args], cwd=ws, env=env, stdout=out,
                                stderr=err, text=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
        out.seek(0)
        err.seek(0)
        first = Result(rc, out.read(), err.read(), shown(args, ws))
    again = cli(args, ws)
    case.extra = f"; rerun: exit {again.rc}"  # type: ignore[attr-defined]
    if "Traceback" in again.stdout + again.stderr or again.rc != 0:
        first.stderr += f"\nRERUN FAILED (exit {again.rc}): {again.stderr[-2000:]}"
        first.rc = first.rc if again.rc == 0 else -abs(again.rc)
    return first


def export_cases() -> list[Case]:
    def onto_nonempty(ws: Path, run: Path) -> list[str]:
        target = ws / "precious"
        target.mkdir(exist_ok=True)
        (target / "notes.txt").write_text("do not delete")
        return [f"export.output={target}"]

    def precious_kept(ws: Path) -> str | None:
        return None if (ws / "precious" / "notes.txt").exists() else "precious/notes.txt was deleted"

    def onto_source(ws: Path, run: Path) -> list[str]:
        return [f"export.output={run}", "export.overwrite=true"]

    def source_kept(ws: Path) -> str | None:
        run = ws / "export-onto-its-own-source-run-directory-with-overwrite"
        return None if (run / "converted").is_dir() else "the source run's converted/ was deleted"

    def pickle_only(ws: Path, run: Path) -> list[str]:
        stage = ws / "pickle-only-checkpoint"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        plant_pickle(stage / "engine.pt", ws / "PWNED-export")
        return [f"export.checkpoint={stage}"]

    def bitflip_converted(ws: Path, run: Path) -> list[str]:
        target = biggest_file(run / "converted")
        data = bytearray(target.read_bytes())
        data[len(data) - 100] ^= 0x10
        target.write_bytes(bytes(data))
        return [f"export.checkpoint={run / 'converted'}", f"export.output={ws / 'export-bitflip-out'}"]

    def missing_checkpoint(ws: Path, run: Path) -> list[str]:
        return [f"export.checkpoint={ws / 'no-such-run'}"]

    return [
        export_case("export onto a non-empty directory", onto_nonempty, EXIT_BAD_INPUT, "not empty",
                    check=precious_kept, note="(its notes.txt is still there)"),
        export_case("export onto its own source run directory, with overwrite", onto_source, EXIT_BAD_INPUT,
                    "source", check=source_kept, note="(the run's converted/ is still there)"),
        export_case("export of a pickle-only checkpoint", pickle_only, EXIT_BAD_INPUT, "pickle",
                    check=marker_absent("PWNED-export"), note="(never unpickled: its marker file is absent)"),
        export_case("export of a bit-flipped converted model", bitflip_converted, EXIT_BAD_INPUT, "damaged"),
        export_case("export of a checkpoint that does not exist", missing_checkpoint, EXIT_BAD_INPUT,
                    "export.checkpoint="),
    ]


def all_cases() -> list[Case]:
    return [*config_cases(), *model_cases(), *checkpoint_cases(), *export_cases()]


# ---------------------------------------------------------------------------------------------------
# table


def run_case(case: Case, ws: Path) -> dict:
    if case.setup:
        case.setup(ws)
    started = time.monotonic()
    if case.run:
        result = case.run(case, ws)
    else:
        args = [a.replace("{ws}", str(ws)) for a in case.args]
        result = cli(args, ws)
    message = message_of(case, result, ws)
    problems = []
    if "Traceback" in result.stdout + result.stderr:
        problems.append("TRACEBACK")
    if result.rc != case.rc:
        problems.append(f"exit {result.rc} != {case.rc}")
    if case.expect and case.expect not in message:
        problems.append(f"message lacks {case.expect!r}")
    if case.rc == EXIT_BAD_INPUT and message.count("\n"):
        problems.append("message is not one line")
    if case.check:
        problem = case.check(ws)
        if problem:
            problems.append(problem)
    extra = getattr(case, "extra", "")
    if case.note and not problems:
        message = f"{message} {case.note}"
    return {"name": case.name, "group": case.group, "command": shown_command(case, ws), "message": message,
            "rc": f"{result.rc}{extra}", "ok": not problems, "problems": problems,
            "seconds": time.monotonic() - started, "stderr_tail": result.stderr[-2000:]}


def shown_command(case: Case, ws: Path) -> str:
    args = [a.replace("{ws}", "$WS").replace(str(ws), "$WS") for a in case.args]
    common = " ".join(TINY)
    text = "ascend-edit " + " ".join(args)
    return text.replace(" ".join(HF), "<tiny-hf>").replace(" ".join(BASE), "<base-run>").replace(common, "<tiny>")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_table(rows: list[dict], path: Path, seconds: float) -> None:
    lines = [
        "# Reliability: faults and bad inputs",
        "",
        "Every row is a real `ascend-edit` run on a tiny model on the CPU, made by",
        "`python benchmarks/reliability_faults.py` (regenerate this file with it). The message is the one line",
        "the user gets (for faults a run survives: the log line saying what happened); no case may print a",
        "traceback (`--debug`, `ASCEND_EDIT_DEBUG=1` or `HYDRA_FULL_ERROR=1` show one). Exit codes: 0 success,",
        f"{EXIT_BAD_INPUT} bad input or a run that cannot continue safely, {EXIT_PREEMPTED} stopped by SIGTERM/SIGINT",
        "after saving a checkpoint (run the same command with the run's `hydra.run.dir` to resume: the error line names it).",
        "",
        "Shorthands: `<tiny>` = `" + " ".join(TINY) + "`; `<tiny-hf>` = a tiny local HF checkpoint conversion (`"
        + " ".join(HF) + "`); `<base-run>` = `" + " ".join(BASE) + "` on a copy of one finished run. `$WS` is the "
        "script's scratch directory.",
        "",
        "## What guards against what",
        "",
        "* **Config values** are checked when the config is composed, before any model is loaded: each field's",
        "  range in its dataclass (`ascend_edit/config.py`; stage fields carry their stage's prefix, e.g.",
        "  `distill.layerwise.lr`), then the checks that need the world size, the file system or the teacher's",
        "  config (read without its weights): `ascend_edit/validation.py`. An MLA latent whose cache would be",
        "  larger than the teacher's is refused unless `target.mla.allow_larger_cache=true`.",
        "* **Model files** (`model.source=hf`) are checked from their headers before weights load",
        "  (`ascend_edit/models/loading.py`): a missing or file path, config without weights, truncated",
        "  safetensors or GGUF, a missing `gguf_file`; nothing is ever fetched from the hub (`local_files_only`).",
        "* **Run directories** are `runs/<date>/<HH-MM-SS.mmm>[-n]`, created with an exclusive `mkdir`",
        "  (`ascend_edit/run_dir.py`): two runs started together get two directories; ranks of one launch",
        "  share one (`hydra.run.dir=runs/dist-<run id>`). One command at a time works in a run directory: rank 0",
        "  holds an exclusive `flock` on `.ascend-edit.lock` for the task, and a second command naming a busy",
        "  directory is refused before Hydra writes into it (`ascend_edit/cli.py` `run_directory_lock`).",
        "* **Checkpoints** are safetensors + JSON with a sha256 manifest written last; resume and export verify",
        "  it and fall back to the previous good checkpoint; non-finite steps are skipped and counted, and a stage",
        "  whose held-out evaluation after it is not finite (finite but exploded weights) writes nothing of it;",
        "  SIGTERM/SIGINT checkpoint and exit 75. A resume refuses a changed corpus (`data.identity`: the files the",
        "  reader reads) or teacher (`model.identity`: config, weights, tokenizer) and takes the layer plan measured",
        "  at the start (`measured_plan.json`). Export never replaces a non-empty directory or its source; with",
        "  `export.overwrite=true` only an earlier export whose manifest lists every file there",
        "  (`ascend_edit/train/`, `ascend_edit/tasks/export.py`).",
        "* The CLI (`ascend_edit/cli.py`) turns bad-input exceptions (config, value, file-system, device,",
        "  unsupported-model errors) into one line and exit code 2; anything else is a bug and keeps its traceback.",
        "",
        "## Cases",
        "",
        "| # | fault / bad input | command | message the user gets | exit | ok |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        ok = "yes" if row["ok"] else "**NO**: " + "; ".join(row["problems"])
        lines.append(f"| {i} | {cell(row['name'])} | `{cell(row['command'])}` | {cell(row['message'])} | "
                     f"{row['rc']} | {cell(ok)} |")
    passed = sum(row["ok"] for row in rows)
    lines += ["", f"{passed} of {len(rows)} cases pass ({seconds / 60:.1f} min on this machine)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name or group contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: docs/reliability.md when every case runs)")
    parser.add_argument("--workspace", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    cases = [c for c in all_cases() if args.only in c.name or args.only in c.group]
    if args.list:
        for case in cases:
            print(f"{case.group:10s} {case.name}")
        return 0
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="ascend-faults-"))
    ws.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not (ws / "teacher").exists():
        build_teacher(ws)
    rows = []
    for case in cases:
        try:
            row = run_case(case, ws)
        except subprocess.TimeoutExpired:
            row = {"name": case.name, "group": case.group, "command": shown_command(case, ws), "message": "",
                   "rc": "timeout", "ok": False, "problems": ["timed out"], "seconds": RUN_TIMEOUT_S,
                   "stderr_tail": ""}
        rows.append(row)
        status = "ok " if row["ok"] else "FAIL"
        print(f"[{status}] {row['seconds']:5.1f}s exit {row['rc']:>4}  {case.name}: {row['message'][:160]}",
              flush=True)
        if not row["ok"]:
            print("       " + "; ".join(row["problems"]) + "\n       " + row["stderr_tail"][-600:].replace(
                "\n", "\n       "), flush=True)
    out = args.out or (None if args.only else DOC)  # a subset never replaces the full table
    if out:
        write_table(rows, out, time.monotonic() - started)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} ok (workspace {ws}){f'; wrote {out}' if out else ''}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
