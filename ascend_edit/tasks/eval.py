"""`ascend-edit eval eval.checkpoint=PATH`: the held-out suite on a converted or exported model, teacher beside it.

PATH is a run directory (its `converted/` model; the teacher and data come from the run's own
`.hydra/config.yaml`), a converted directory (`ascend_edit.json`) or an exported HF checkpoint (the
teacher is then `model=...` of this command). Writes `eval.json` and `report.md` into this command's
output directory and prints the table. The same suite runs at the end of every conversion
(`suite_after_conversion`).

Under ZeRO-3 (`engine=zero3`, this command's engine, launched on every rank) neither model is ever whole on a
rank: both are built partitioned and loaded tensor by tensor into the partitions (models/zero3.py), and each
module is gathered only for its own forward. Rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml  # type: ignore[import-untyped]  # PyYAML (OmegaConf.load raises its errors); no stubs pinned
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from ascend_edit import jsonio
from ascend_edit.config import DataConfig, RootConfig, to_typed
from ascend_edit.data.heldout import run_documents
from ascend_edit.device import resolve_device
from ascend_edit.eval.metrics import model_logits, paired_logits
from ascend_edit.eval.passkey import check_passkey_contexts
from ascend_edit.eval.report import EFFECTIVE_CONFIG
from ascend_edit.eval.suite import held_out_sets, run_suite
from ascend_edit.models.checkpoint import run_directory_of
from ascend_edit.run_dir import saved_run_config, set_aside_previous_run

log = logging.getLogger(__name__)

# What an evaluation writes into its directory: moved aside together when another evaluation writes there
EVAL_OUTPUTS = ("eval.json", "report.md", "plots", EFFECTIVE_CONFIG)


def suite_after_conversion(model: torch.nn.Module, tokenizer, cfg: RootConfig, out_dir: Path, device,
                           teacher: torch.nn.Module | None = None) -> dict:
    """The suite on both paths of the freshly converted model; writes eval.json (the report reads it).
    `teacher`: the frozen copy that is the teacher when stage 2 trained shared weights (metrics.paired_logits)."""
    if tokenizer is None:
        log.warning("eval: this teacher has no tokenizer; the held-out suite is skipped")
        return {}
    sets = held_out_sets(cfg.eval, run_documents(cfg.data, cfg.device.seed))
    teacher_logits, student_logits = paired_logits(model, teacher)
    results = run_suite(teacher_logits, student_logits, tokenizer, cfg.eval, sets, _max_positions(model), device)
    write_results(results, out_dir)
    return results


def write_results(results: dict, out_dir: Path) -> None:
    path = Path(out_dir) / "eval.json"
    path.write_text(jsonio.dumps(results, indent=2))
    try:
        print_suite(Console(width=max(Console().width, 150)), results)  # ten columns: never cut a domain's name
    except OSError as err:  # stdout closed (a pipe into `head`): the results are written, the table is not needed
        log.warning("the suite's table could not be printed (%s); it is in %s", err, path)


def _max_positions(model: torch.nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def run_config(path: Path, cfg: RootConfig) -> RootConfig:
    """The run's own config (teacher, data, seed) with this command's eval and engine settings, if PATH is a run
    dir or a converted model inside one."""
    run_dir = run_directory_of(path)
    if run_dir is None:
        return cfg
    from ascend_edit.cli import one_line

    saved = run_dir / ".hydra" / "config.yaml"
    try:
        raw = saved_run_config(run_dir)  # its relative teacher / data paths against where the run was started
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"eval.checkpoint={path}: the run's saved config {saved} is damaged "
                         f"({one_line(err)})") from err
    if not isinstance(raw, DictConfig) or "model" not in raw:  # an empty or cut file would merge as the defaults
        raise ValueError(f"eval.checkpoint={path}: the run's saved config {saved} has no model section (empty or "
                         "cut short): its teacher and data are not known")
    raw.pop("output_dir", None)
    raw.pop("eval", None)
    raw.pop("engine", None)  # this job's engine decides how it loads (ZeRO-3: partitioned), not the run's
    run_seed = OmegaConf.select(raw, "device.seed", default=cfg.device.seed)  # the seed that split its data
    raw.pop("device", None)  # where this job runs (device=cuda), not where the run trained
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), raw,
                                 {"eval": OmegaConf.structured(cfg.eval), "engine": OmegaConf.structured(cfg.engine),
                                  "device": {**dataclasses.asdict(cfg.device), "seed": run_seed},
                                  "output_dir": cfg.output_dir, "task": "eval"})
    except OmegaConfBaseException as err:  # e.g. a key this version no longer has (a run of an older version)
        key = getattr(err, "full_key", None)
        raise ValueError(f"eval.checkpoint={path}: the run's saved config {saved} does not fit this version's "
                         f"schema{f' at {key}' if key else ''} ({one_line(err).split(' full_key')[0]})") from err
    assert isinstance(merged, DictConfig)  # merged onto RootConfig's schema
    run_cfg = to_typed(merged)
    refuse_run_overrides(path, command_overrides(), cfg, run_cfg)
    return run_cfg


# What a run directory decides for its evaluation: the teacher, the data whose held-out part is in_domain, and
# the seed that split it. The same keys on an eval command would be silently unused, so they are refused.
RUN_OWNED_KEYS = ("model", "data", "device.seed")


def command_overrides() -> list[str]:
    """This command's own overrides (Hydra's task overrides), or none outside a Hydra job (tests, scripts)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def refuse_run_overrides(path: Path, overrides: list[str], command: RootConfig, run: RootConfig) -> None:
    """An eval of a run directory takes the teacher, data and seed from the run; the same keys given on the command
    with other values would be unused without a word (and the report would show them), so they are refused in one
    line. Overrides that restate the run's own values are fine."""
    def section(cfg: RootConfig, key: str):
        return cfg.device.seed if key == "device.seed" else getattr(cfg, key)

    def differs(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0]
        owner = next((k for k in RUN_OWNED_KEYS if key == k or key.startswith(k + ".")), None)
        return owner is not None and section(command, owner) != section(run, owner)

    given = [o for o in overrides if differs(o)]
    if given:
        raise ValueError(f"eval.checkpoint={path} is a run: its teacher, data and seed come from the run's "
                         f".hydra/config.yaml, so {' '.join(given)} would not be used; drop them, or evaluate "
                         "its converted/ model outside the run (an export: ascend-edit export) to choose them")


def load_student(path: Path, zero3: dict | None = None, trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
    """(model, kind) from a run dir, a converted dir or an exported HF checkpoint, in `dtype`. `zero3`: a
    `zero.Init` config — the model is built ZeRO-3 partitioned (every rank of the job calls this). An export in
    auto_map format loads only with `trust_remote_code` (eval.trust_remote_code)."""
    from ascend_edit.models.checkpoint import converted_damage, load_converted
    from ascend_edit.models.export import load_exported
    from ascend_edit.train.checkpoint_io import CheckpointIntegrityError

    if (path / "converted" / "ascend_edit.json").is_file():
        return load_converted(path / "converted", dtype=dtype, zero3=zero3), "run"
    if (path / "converted").is_dir():  # a run whose model lost its marker: name the damage
        raise CheckpointIntegrityError(f"eval.checkpoint={path}: {converted_damage(path / 'converted')}")
    if (path / "ascend_edit.json").is_file():
        return load_converted(path, dtype=dtype, zero3=zero3), "converted"
    if (path / "config.json").is_file():
        if json.loads((path / "config.json").read_text()).get("auto_map") and not trust_remote_code:
            raise ValueError(f"eval.checkpoint={path} is an auto_map export: it runs the modeling code it ships; "
                             "add eval.trust_remote_code=true if you trust that code")
        if zero3 is None:
            return load_exported(path, dtype, trust_remote_code=trust_remote_code), "exported"
        from ascend_edit.models.zero3 import partitioned_construction

        with partitioned_construction(zero3):  # from_pretrained loads each tensor into its partitions
            return load_exported(path, dtype, trust_remote_code=trust_remote_code).requires_grad_(False), "exported"
    raise FileNotFoundError(f"eval.checkpoint={path} is not a run directory (no converted/), a converted model "
                            "(no ascend_edit.json) nor an exported checkpoint (no config.json)")


def in_domain_data(path: Path, cfg: RootConfig) -> tuple[DataConfig, int, str]:
    """(data config, seed, where they come from) that define the in-domain held-out split. A run directory (or a
    converted model inside one) has its own (`run_config` merged them in); an export names the run it came from
    (models/export.py `PROVENANCE_FILE`); otherwise this command's `data=` is split as a conversion splits it,
    which is the conversion's held-out text only if it trained on that data with that seed — said in one line."""
    from ascend_edit.models.export import read_provenance

    if run_directory_of(path) is not None:
        return cfg.data, cfg.device.seed, f"the run's data ({cfg.data.source}, seed {cfg.device.seed})"
    provenance = read_provenance(path)
    if provenance is not None:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), {"data": provenance["data"]})
        assert isinstance(merged, DictConfig)  # merged onto RootConfig's schema
        data = to_typed(merged).data
        return data, provenance["seed"], (f"the source run's data ({data.source}, seed {provenance['seed']}, "
                                          f"recorded by export from {provenance['run_directory']})")
    log.warning("eval: %s does not say which data it was converted on; in_domain is the held-out part of this "
                "command's data=%s (seed %d): name the conversion's data (data=..., device.seed=...) if it differs",
                path, cfg.data.source, cfg.device.seed)
    return cfg.data, cfg.device.seed, f"this command's data ({cfg.data.source}, seed {cfg.device.seed})"


def check_inputs_unchanged(path: Path, cfg: RootConfig, data: DataConfig) -> None:
    """The teacher and data this evaluation loads must be the ones the conversion had (the identities its run
    recorded when it started, or an export carries from it): a teacher rewritten in place, another one with the
    same vocabulary, or a corpus edited since (its held-out split then holds documents the run trained on) would
    give numbers with exit 0 that mean something else. Runs and exports without the record are not checked."""
    from ascend_edit.models.export import read_provenance
    from ascend_edit.train.stage import changed_inputs, data_identity, model_identity, recorded_inputs

    run_dir = run_directory_of(path)
    if run_dir is not None:
        recorded, where = recorded_inputs(run_dir), f"the run {run_dir}"
    else:
        provenance = read_provenance(path) or {}
        recorded, where = provenance.get("inputs"), f"the run {provenance.get('run_directory')} (the export's source)"
    if not recorded:
        return
    current = {"model.identity": model_identity(cfg), "data.identity": data_identity(dataclasses.replace(cfg, data=data))}
    for key in changed_inputs(recorded, current):
        then, now = recorded[key], current[key]
        if key == "model.identity":
            teacher = f"model.path={cfg.model.path}" if cfg.model.source == "hf" else f"model.source={cfg.model.source}"
            raise ValueError(f"{teacher}: this teacher is not the one {where} was converted from (identity {then} "
                             f"then, {now} now): its scores would compare other models; name that teacher, or "
                             "restore its files")
        raise ValueError(f"data.path={data.path}: the data changed since {where} started (identity {then} then, "
                         f"{now} now): its held-out split would now hold documents the run trained on; restore it")


def check_same_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module, source: str) -> None:
    """A converted or exported model outside its run directory is compared with the teacher `model=` names (the
    default is SmolLM2): a different teacher would index its embeddings out of range, or compare other tokens."""
    sizes = [getattr(m.config, "vocab_size", None) for m in (student, teacher)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"the checkpoint's vocabulary ({sizes[0]} tokens) is not the teacher's ({sizes[1]}, "
                         f"model.source={source}): name the teacher it was converted from (e.g. model=hf "
                         "model.path=DIR)")


def run(cfg: RootConfig) -> dict:
    """The suite on student and teacher. Under ZeRO-3 (`engine=zero3`) both are loaded partitioned, every rank
    runs the same forwards (each module gathered for its own, models/zero3.py `GatheredForward`) and rank 0
    writes; otherwise one process holds both whole."""
    from ascend_edit import distributed
    from ascend_edit.models.loading import PARTITIONED_SOURCES, TORCH_DTYPES, load_teacher
    from ascend_edit.models.zero3 import install_gathered_forward, partitioned_load_config
    from ascend_edit.tasks.report import write_report

    if not cfg.eval.checkpoint:
        raise ValueError("eval.checkpoint is required: a run directory, a converted model or an exported checkpoint")
    path = Path(cfg.eval.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"eval.checkpoint={path} does not exist")
    if not cfg.eval.passkey_trials and not (cfg.eval.contexts and cfg.eval.domains):
        # EvalConfig checks this for the end-of-conversion suite only (eval.suite); this task is that suite alone
        empty = "contexts" if not cfg.eval.contexts else "domains"
        raise ValueError(f"eval.{empty} is empty and eval.passkey_trials=0: this evaluation would measure nothing")
    cfg = run_config(path, cfg)
    if cfg.model.source == "config":  # known now, not after both models have loaded
        raise ValueError("eval needs the teacher's tokenizer, and model.source=config (a teacher built from a config, "
                         "as experiment=tiny's) has none: evaluate a conversion of a teacher with one (model=hf "
                         "model.path=DIR, or model=smollm2)")
    data, seed, in_domain_source = in_domain_data(path, cfg)
    check_inputs_unchanged(path, cfg, data)  # before minutes of loading
    env = distributed.discover()
    device = resolve_device(cfg.device.type, local_rank=env.local_rank, dtype=cfg.device.dtype)
    # Both models in the teacher's dtype, as the end-of-run suite holds them: a student in fp32 against a
    # bf16 teacher would report bf16 rounding noise as conversion loss (a student identical to the teacher
    # came out at 97.5 % top-1 agreement).
    dtype = TORCH_DTYPES[cfg.model.dtype]
    student_zero3 = partitioned_load_config(cfg.engine, dtype)
    teacher_zero3 = partitioned_load_config(cfg.engine, dtype)
    if student_zero3 is not None:
        distributed.init_process_group(device.dist_backend, env)
        if cfg.model.source not in PARTITIONED_SOURCES:
            log.warning("eval: model.source=%s cannot be loaded partitioned; the teacher is loaded whole",
                        cfg.model.source)
            teacher_zero3 = None
    student, kind = load_student(path, student_zero3, cfg.eval.trust_remote_code, dtype)
    teacher, tokenizer = load_teacher(cfg.model, device=device.torch_device, zero3=teacher_zero3)
    if tokenizer is None:
        raise ValueError("eval needs a tokenizer: the teacher (model=...) has none")
    if cfg.eval.passkey_trials:
        check_passkey_contexts(tokenizer, cfg.eval.passkey_contexts)
    check_same_vocabulary(student, teacher, cfg.model.source)
    for model, partitioned in ((student, student_zero3), (teacher, teacher_zero3)):
        if partitioned is not None:
            install_gathered_forward(model)  # every rank runs every forward, one module whole at a time
        else:
            model.to(device.torch_device)
    sets = held_out_sets(cfg.eval, run_documents(data, seed))
    with torch.no_grad():
        results = run_suite(model_logits(teacher.eval()), model_logits(student), tokenizer, cfg.eval, sets,
                            _max_positions(student), device.torch_device)
    if not any(results["quality"].values()) and "passkey" not in results:  # an empty table is no result
        raise ValueError(f"eval measured nothing: every domain's held-out text is shorter than each of eval.contexts "
                         f"{list(cfg.eval.contexts)} (see the log); list a shorter context, or give more text")
    results["checkpoint"] = str(path.resolve())  # findable from the eval directory later
    results["teacher"] = {"source": cfg.model.source, "path": cfg.model.path, "dtype": cfg.model.dtype}
    results["in_domain_source"] = in_domain_source
    if "in_domain" in results.get("domains", {}) and in_domain_source.startswith("this command's"):
        # the split is not known to be the conversion's own: no claim that the model never trained on it
        results["domains"]["in_domain"] = (f"held-out part of {in_domain_source}: the conversion's held-out text "
                                           "only if it trained on that data with that seed")
    results["dtype"] = cfg.model.dtype  # student and teacher alike
    if student_zero3 is not None:  # how this job held the models (the suite's numbers do not depend on it)
        results["zero3_partitioned"] = {"student": True, "teacher": teacher_zero3 is not None}
    if env.is_main:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        aside = set_aside_previous_run(out_dir, names=EVAL_OUTPUTS)
        if aside is not None:
            log.warning("eval: an earlier evaluation's results in %s were moved to %s (nothing deleted)", out_dir, aside)
        if run_directory_of(path) is not None:  # the run's teacher, data and seed: not this command's composed ones
            (out_dir / EFFECTIVE_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_results(results, out_dir)
        write_report(out_dir)
    if student_zero3 is not None:
        distributed.barrier()  # every rank returns once rank 0 has written
    return results


def print_suite(console: Console, results: dict) -> None:
    table = Table(title="Held-out suite: student vs teacher per domain and context (KL in nats/token)")
    for col in ("domain", "context", "seqs", "teacher ppl", "student ppl", "ratio", "teacher-KL", "top-1",
                "copyable", "excess on copyable"):
        table.add_column(col, justify="right")
    for domain, per_context in results.get("quality", {}).items():
        for context, m in per_context.items():
            split = m["student"].get("by_copyability", {})
            share = split.get("excess_share_copyable")
            table.add_row(domain, context, str(m["sequences"]), f"{m['teacher']['ppl']:.2f}",
                          f"{m['student']['ppl']:.2f}", f"{m['ppl_ratio']:.3f}x",
                          f"{m['student']['teacher_kl']:.4f}", f"{100 * m['student']['top1_agreement']:.1f} %",
                          f"{100 * split['copyable_fraction']:.1f} %" if split else "-",
                          f"{100 * share:.1f} %" if share is not None else "-")
    console.print(table)
    if results.get("in_domain_source"):
        console.print(f"in_domain: held-out part of {results['in_domain_source']}")
    passkey = results.get("passkey")
    if passkey:
        cells = len(passkey["contexts"]) * len(passkey["depths"])
        for name in ("teacher", "student"):
            if not cells:
                break
            mean = sum(map(sum, passkey[name])) / cells
            console.print(f"passkey {name}: {100 * mean:.0f} % over contexts {passkey['contexts']} x depths "
                          f"{passkey['depths']} ({passkey['trials']} trials each)")
    console.print(f"suite: {results.get('seconds', 0):.1f} s")
