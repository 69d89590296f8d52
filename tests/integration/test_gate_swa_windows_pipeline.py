"""GateSWA with per-layer windows chosen for a KV budget, end to end in-process: the convert task measures and
chooses the windows, trains two steps per stage, saves them with the plan; the saved model reloads with the same
windows (and a stage checkpoint's rebuild reads the same plan), exports through auto_map with the windows in its
config, and the exported model computes the same logits and generates the same tokens with static and dynamic
caches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ascend_edit.models.budget import FULL, swa_tokens_held
from ascend_edit.models.checkpoint import load_converted
from ascend_edit.models.export import conversion_spec, export_converted, load_exported, native_blockers
from ascend_edit.tasks.convert import run
from ascend_edit.train.rebuild import rebuild_from_engine_checkpoint
from tests.unit.test_config_cli import compose_typed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT, SINKS, WINDOWS, BUDGET, STEPS = 64, 2, (4, 8, 16, 32), 0.4, 2


def overrides(out: Path) -> list[str]:
    return [
        "model=qwen3_tiny", "target=gate_swa_windows", "data=synthetic", "device=cpu", "device.threads=1",
        f"target.gate_swa.kv_budget={BUDGET}", f"target.gate_swa.kv_budget_context={CONTEXT}",
        f"target.gate_swa.windows=[{','.join(map(str, WINDOWS))}]", f"target.gate_swa.sink_tokens={SINKS}",
        "target.gate_swa.window=8", "target.gate_swa.retrieval_probes=2", "target.calibration_batches=1",
        f"data.seq_len={CONTEXT}", "data.synthetic_sequences=12", "data.eval_sequences=2", "eval.batch_size=2",
        "eval.suite=false", "engine.compile=off", "engine.resume=false", "export.enabled=false",
        *(f"distill.{stage}.{key}" for stage in ("layerwise", "model_level")
          for key in (f"steps={STEPS}", "batch_size=2", "warmup_steps=1")),
        f"output_dir={out}",
    ]


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gate_swa_windows") / "run"
    cfg = compose_typed(overrides(out))
    report = run(cfg)
    return cfg, out, report


def windows_of(model) -> list[int]:
    return [layer.self_attn.window for layer in model.model.layers]


def test_the_budget_chooses_per_layer_windows_that_are_saved_and_reloaded(converted_run):
    cfg, out, report = converted_run
    plan = report["plan"]
    chosen = {e[0]: (FULL if e[1] == "full" else e[3]) for e in plan}
    assert set(chosen.values()) <= {FULL, *WINDOWS}
    held = sum(CONTEXT if w == FULL else swa_tokens_held(w, SINKS, CONTEXT) for w in chosen.values())
    assert held <= BUDGET * CONTEXT * len(plan)  # the budget, met exactly or under
    layers = len(plan)
    kv = report["kv"]  # accounted from the trained model's modules at eval.context
    assert kv["converted_bytes_per_token"] < kv["teacher_bytes_per_token"]
    reloaded = load_converted(out / "converted")
    assert windows_of(reloaded) == [chosen[i] for i in range(layers)]
    saved = json.loads((out / "converted" / "ascend_edit.json").read_text())["plan"]
    assert saved == plan
    # a stage checkpoint is rebuilt from the run's saved config: the plan (windows included) comes from its output
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), out / ".hydra" / "config.yaml")
    rebuilt, _ = rebuild_from_engine_checkpoint(out / "checkpoints" / f"step-model_level-{STEPS}")
    assert [layer.self_attn.target.window for layer in rebuilt.model.layers] == windows_of(reloaded)
    ids = torch.randint(3, 250, (1, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert report["histories"]["layerwise"] and report["histories"]["model_level"]  # trained, both stages


def test_export_keeps_the_windows_and_the_logits_and_decodes_as_the_dynamic_cache(converted_run, tmp_path: Path):
    _, out, _ = converted_run
    model = load_converted(out / "converted")
    spec = conversion_spec(model)
    windows = windows_of(model)
    assert len({w for w in windows if w != FULL}) > 1  # this tiny run's measured costs mix windows (32 and 16)
    assert spec["gate_swa_windows"] == windows and spec["gate_swa"]["window"] == max(windows)
    assert any("per-layer windows" in r for r in native_blockers(model, spec)["teacher"])
    result = export_converted(model, tmp_path / "hf")  # loaded back and its logits compared before it is kept
    assert result.format == "auto_map" and result.max_rel_logit_diff is not None
    exported = load_exported(tmp_path / "hf", trust_remote_code=True)
    assert windows_of(exported) == windows
    ids = torch.randint(3, 250, (2, 3 * CONTEXT // 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    prompt = ids[:, :20]
    options = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)  # past every window
    with torch.no_grad():
        dynamic = exported.generate(prompt, **options)
        static = exported.generate(prompt, cache_implementation="static", **options)
        framework = model.generate(prompt, **options)
    assert torch.equal(static, dynamic) and torch.equal(dynamic, framework)
