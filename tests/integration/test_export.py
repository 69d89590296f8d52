"""Export round trips (issue 6): converted model -> HF checkpoint -> `from_pretrained` -> same model.

For each conversion the reloaded model must give the in-framework model's logits (fp32, max difference
within 1e-5 of the largest logit) and the same greedy tokens, load without remote code where the format
is native, and keep the KV savings: a native MLA cache holds [b, 1, t, kv_lora_rank] latents and
[b, 1, t, rope] keys, a sliding layer's cache stays bounded. Tiny random models, CPU, nothing downloaded.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ascend_edit.kernels import registry
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ascend_edit.attention.cache_layers import SinkWindowLayer
from ascend_edit.config import (
    EngineConfig,
    GateSWAConfig,
    MLAConfig,
    StageConfig,
    TargetConfig,
    register_configs,
    to_typed,
)
from ascend_edit.device import seed_everything
from ascend_edit.hf import kernels as bundled_kernels
from ascend_edit.hf.bundle import MODELING_FILE, BundleError, bundled_modules
from ascend_edit.models import export as export_module
from ascend_edit.models.checkpoint import save_converted
from ascend_edit.models.export import ExportError, export_converted, load_exported
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, edit_model, set_mode
from ascend_edit.tasks import export as export_task
from ascend_edit.train.checkpoint_io import write_manifest
from ascend_edit.train.engine import TorchEngine
from tests.conftest import tiny_model
from tests.helpers.tiny_checkpoint import char_tokenizer, synthetic_corpus

LOGIT_ATOL = 1e-5  # relative to the largest reference logit (fp32)
MLA_DEEPSEEK = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, latent_norm=True)
MLA_NO_NORM = MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, latent_norm=False)
WINDOW, SINKS = 8, 2
GATED = GateSWAConfig(window=WINDOW, sink_tokens=SINKS, gate="headwise", full_every=2)  # layers 1, 3 full
UNGATED = GateSWAConfig(window=WINDOW, sink_tokens=0, gate="none", full_every=2)


def converted(arch: str, target: TargetConfig, seed: int = 0) -> torch.nn.Module:
    """A tiny converted model whose targets are no longer their warm start (as after training)."""
    model = tiny_model(arch, seed=seed)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".target." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def prompt(length: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(7))


def assert_same_model(model: torch.nn.Module, reloaded: torch.nn.Module, new_tokens: int = 12) -> None:
    ids = prompt()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_ATOL * float(want.abs().max()))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    want_tokens = model.generate(ids, **kwargs)
    got_tokens = reloaded.generate(ids, **kwargs)
    assert want_tokens.shape[1] == ids.shape[1] + new_tokens
    assert torch.equal(got_tokens, want_tokens)


def python_files(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*.py"))


# ------------------------------------------------------------------------------------------------
# Native deepseek_v3: dense teachers converted to MLA in every layer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_mla_exports_as_native_deepseek_v3_with_a_latent_cache(arch: str, tmp_path: Path):
    model = converted(arch, TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    result = export_converted(model, tmp_path / "hf", native="always")
    assert result.format == "deepseek_v3"
    assert python_files(tmp_path / "hf") == []  # stock transformers code only
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 4

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()  # no remote code
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM"
    assert_same_model(model, reloaded)

    ids = prompt(length=10, batch=3)
    with torch.no_grad():
        cache = reloaded(input_ids=ids, use_cache=True).cache
    assert len(cache.layers) == 4
    for layer in cache.layers:  # only the latent and the shared RoPE key, never per-head keys/values
        assert tuple(layer.keys.shape) == (3, 1, 10, MLA_DEEPSEEK.kv_lora_rank)
        assert tuple(layer.values.shape) == (3, 1, 10, MLA_DEEPSEEK.qk_rope_head_dim)


def test_native_export_writes_the_tokenizer(tmp_path: Path):
    tokenizer = char_tokenizer(synthetic_corpus(documents=20))
    model = converted("qwen3", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    export_converted(model, tmp_path / "hf", tokenizer=tokenizer)

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert reloaded("the cat sees")["input_ids"] == tokenizer("the cat sees")["input_ids"]


def test_export_in_bf16_writes_bf16_weights_that_reproduce_the_rounded_model(tmp_path: Path):
    model = converted("qwen3", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    result = export_converted(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert result.max_rel_logit_diff <= LOGIT_ATOL  # against the model rounded to bf16, compared in fp32
    assert next(model.parameters()).dtype == torch.bfloat16  # cast in place: the model is what was written
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert export_task.stored_dtype_of(tmp_path / "hf" / "model.safetensors") == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# auto_map: what stock architectures cannot express
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, target, reason", [
    ("qwen3_moe", TargetConfig(kind="mla", mla=MLA_DEEPSEEK), "qwen3_moe"),
    ("qwen2", TargetConfig(kind="mla", mla=MLA_DEEPSEEK), "query bias"),
    ("qwen3", TargetConfig(kind="mla", mla=MLA_NO_NORM), "latent_norm"),
    ("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED), "gate=headwise"),
], ids=["mla-moe", "mla-qwen2-query-bias", "mla-no-latent-norm", "gate_swa-gated-sinks"])
def test_auto_map_round_trip(arch: str, target: TargetConfig, reason: str, tmp_path: Path):
    model = converted(arch, target)
    result = export_converted(model, tmp_path / "hf")
    assert result.format == "auto_map"
    assert any(reason in r for reasons in result.blockers.values() for r in reasons)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "ascend_edit"
    assert config["ascend_edit"]["plan"] == [e.kind for e in model.edit_plan]
    assert MODELING_FILE in python_files(tmp_path / "hf")

    reloaded = load_exported(tmp_path / "hf", trust_remote_code=True)
    assert type(reloaded).__name__ == "AscendEditForCausalLM"
    assert_same_model(model, reloaded, new_tokens=2 * WINDOW)  # decode runs well past the window


def test_auto_map_keeps_the_latent_and_bounded_window_caches(tmp_path: Path):
    mla = converted("qwen3_moe", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    export_converted(mla, tmp_path / "mla")
    swa = converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED))
    export_converted(swa, tmp_path / "swa")
    ids = prompt(length=30)
    with torch.no_grad():
        mla_cache = load_exported(tmp_path / "mla", trust_remote_code=True)(input_ids=ids, use_cache=True).cache
        swa_cache = load_exported(tmp_path / "swa", trust_remote_code=True)(input_ids=ids, use_cache=True).cache
    for layer in mla_cache.layers:
        assert tuple(layer.keys.shape) == (2, 1, 30, MLA_DEEPSEEK.kv_lora_rank)
    # the checkpoint's own copy of the class: compare by name
    sliding = [layer for layer in swa_cache.layers if type(layer).__name__ == SinkWindowLayer.__name__]
    assert len(sliding) == 2  # layers 0 and 2
    for layer in sliding:
        assert layer.keys.shape[-2] == SINKS + WINDOW - 1  # 30 tokens fed, the bounded cache holds 9


def test_a_moe_export_runs_the_teachers_fast_expert_kernels(tmp_path: Path):
    """transformers reads the model class's own module to decide whether the grouped-GEMM experts may run; the
    exported class asks the teacher's (was: every reloaded Qwen3-MoE export looped over experts in Python, and
    asking for grouped_mm raised)."""
    model = converted("qwen3_moe", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    export_converted(model, tmp_path / "hf")
    reloaded = load_exported(tmp_path / "hf", trust_remote_code=True)
    teacher_default = tiny_model("qwen3_moe").config._experts_implementation
    assert type(reloaded)._can_set_experts_implementation()
    assert reloaded.config._experts_implementation == teacher_default != "eager"
    reloaded.set_experts_implementation("eager")
    ids = prompt()
    with torch.no_grad():
        eager = reloaded(input_ids=ids).logits
        reloaded.set_experts_implementation(teacher_default)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)


def test_gate_swa_export_rolls_back_for_assisted_decoding(tmp_path: Path):
    """Prompt lookup and a draft model crop the cache after rejected guesses: the bounded window layers keep what a
    rollback needs while transformers records past states, and the tokens equal a no-cache greedy decode, well past
    the window (was: an internal 'cannot be cropped' error partway through generate). A static ring refuses up front."""
    export_converted(converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED)), tmp_path / "swa")
    model = load_exported(tmp_path / "swa", trust_remote_code=True)
    ids = prompt(length=6, batch=1).repeat(1, 4)  # repeats: prompt lookup proposes, and is partly rejected
    kwargs = dict(max_new_tokens=3 * WINDOW, min_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=3, **kwargs), want)
        assert torch.equal(model.generate(ids, assistant_model=model, **kwargs), want)
        with pytest.raises(ValueError, match="cache that can be cropped"):
            model.generate(ids, prompt_lookup_num_tokens=3, cache_implementation="static", **kwargs)


def test_auto_map_checkpoint_loads_without_ascend_edit(tmp_path: Path):
    """The shipped code is self-contained: a fresh interpreter that cannot import ascend_edit loads it."""
    model = converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED))
    export_converted(model, tmp_path / "hf", native="never")
    ids = prompt(length=20)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoAscendEdit(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "ascend_edit":
                    raise ImportError("ascend_edit must not be needed: " + name)
        sys.meta_path.insert(0, NoAscendEdit())
        import torch
        from transformers import AutoModelForCausalLM
        want = torch.load({str(tmp_path / 'want.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            got = model(input_ids=want["ids"]).logits
        assert not [m for m in sys.modules if m.split(".")[0] == "ascend_edit"]
        print("MAXDIFF", float((got - want["logits"]).abs().max() / want["logits"].abs().max()))
    """)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    max_diff = float(done.stdout.split("MAXDIFF")[1])
    assert max_diff <= LOGIT_ATOL


# ------------------------------------------------------------------------------------------------
# Native teacher architecture with layer_types (ungated, sink-free GateSWA on Qwen3)
# ------------------------------------------------------------------------------------------------
def test_ungated_sink_free_gate_swa_exports_as_native_qwen3_hybrid(tmp_path: Path):
    model = converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=UNGATED))
    result = export_converted(model, tmp_path / "hf", native="always")
    assert result.format == "teacher"
    assert python_files(tmp_path / "hf") == []
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["sliding_window"] == WINDOW
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    assert_same_model(model, reloaded, new_tokens=2 * WINDOW)
    with torch.no_grad():
        cache = reloaded(input_ids=prompt(length=30), use_cache=True).cache
    held = [layer.keys.shape[-2] for layer in cache.layers]
    assert held == [WINDOW - 1, 30, WINDOW - 1, 30]  # sliding layers bounded, full layers hold everything


# ------------------------------------------------------------------------------------------------
# Refusals: validate first, clear errors, nothing left behind
# ------------------------------------------------------------------------------------------------
def test_native_always_refuses_what_deepseek_v3_cannot_express(tmp_path: Path):
    model = converted("qwen3", TargetConfig(kind="mla", mla=MLA_NO_NORM))
    with pytest.raises(ExportError, match="latent_norm=false"):
        export_converted(model, tmp_path / "hf", native="always")
    assert list(tmp_path.iterdir()) == []


def test_native_always_refuses_gated_swa(tmp_path: Path):
    model = converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED))
    with pytest.raises(ValueError, match="gate=headwise.*sink_tokens=2"):
        export_converted(model, tmp_path / "hf", native="always")


def test_native_never_writes_auto_map_for_a_deepseek_expressible_model(tmp_path: Path):
    model = converted("llama", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    assert export_converted(model, tmp_path / "hf", native="never").format == "auto_map"
    assert_same_model(model, load_exported(tmp_path / "hf", trust_remote_code=True), new_tokens=4)


def test_an_export_that_does_not_reproduce_the_model_is_refused(tmp_path: Path, monkeypatch):
    """Drop the rotate-half -> interleaved reordering: the checkpoint loads but computes another function."""
    monkeypatch.setattr(export_module, "_interleave_rope_rows", lambda weight, rope_dim, block: weight)
    model = converted("qwen3", TargetConfig(kind="mla", mla=MLA_DEEPSEEK))
    with pytest.raises(ExportError, match="does not reproduce the model"):
        export_converted(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


def test_a_model_without_a_plan_is_refused(tmp_path: Path):
    with pytest.raises(ExportError, match="not a converted model"):
        export_converted(tiny_model("qwen3"), tmp_path / "hf")


# ------------------------------------------------------------------------------------------------
# The bundler
# ------------------------------------------------------------------------------------------------
def test_bundled_registry_serves_the_registry_op_names():
    assert bundled_kernels.SLIDING_WINDOW_ATTENTION == registry.SLIDING_WINDOW_ATTENTION
    assert bundled_kernels.MLA_ABSORBED_ATTENTION == registry.MLA_ABSORBED_ATTENTION
    assert set(bundled_kernels._PORTABLE) == set(registry.ATTENTION_OPS)


def test_bundle_rewrites_package_imports_and_drops_annotation_only_ones():
    files = bundled_modules()
    mla = files["ascend_edit_attention_mla.py"]
    assert "from .ascend_edit_attention_rope import" in mla
    assert "from .ascend_edit_hf_kernels import" in mla  # the registry is swapped for the portable one
    assert "ascend_edit.config" not in mla  # MLAConfig appears only in a type hint
    assert "ascend_edit_config.py" not in files and "ascend_edit_kernels_registry.py" not in files
    for name, source in files.items():
        assert "from ascend_edit" not in source and "import ascend_edit" not in source, name


def test_bundle_refuses_modules_that_need_more_than_torch_and_transformers(tmp_path: Path, monkeypatch):
    (tmp_path / "probe_runtime_config.py").write_text(
        "from ascend_edit.config import MLAConfig\n\nDEFAULT = MLAConfig()\n")
    (tmp_path / "probe_hint_only.py").write_text(
        "from __future__ import annotations\nfrom ascend_edit.config import MLAConfig\n\n"
        "def f(cfg: MLAConfig) -> int:\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BundleError, match="imports 'hydra'"):
        bundled_modules("probe_runtime_config")  # used at run time: followed into config.py -> hydra
    assert set(bundled_modules("probe_hint_only")) == {"probe_hint_only.py"}


# ------------------------------------------------------------------------------------------------
# The task: sources it accepts
# ------------------------------------------------------------------------------------------------
def compose_raw(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_task_exports_a_run_directory_through_its_converted_model(tmp_path: Path):
    target = TargetConfig(kind="mla", mla=MLA_DEEPSEEK)
    model = converted("qwen3", target)
    save_converted(model, target, tmp_path / "run" / "converted", char_tokenizer(synthetic_corpus(documents=20)))
    cfg = to_typed(compose_raw([f"output_dir={tmp_path / 'out'}", "task=export",
                                  f"export.checkpoint={tmp_path / 'run'}"]))
    report = export_task.run(cfg)
    assert report["format"] == "deepseek_v3" and report["source"] == str(tmp_path / "run" / "converted")
    assert report["max_rel_logit_diff"] <= LOGIT_ATOL
    assert_same_model(model, load_exported(tmp_path / "out" / "hf"), new_tokens=4)
    assert (tmp_path / "out" / "hf" / "tokenizer.json").exists()


def test_task_exports_a_torch_engine_stage_checkpoint(tmp_path: Path):
    """Rebuilt from the run's saved config and teacher, with the checkpoint's trained weights on top."""
    run_dir = tmp_path / "run"
    overrides = ["model=qwen3_tiny", "target=mla", "target.mla.kv_lora_rank=32", "target.mla.qk_rope_head_dim=8",
                 "target.mla.qk_nope_head_dim=16", "target.mla.v_head_dim=16", "device.seed=5"]
    composed = compose_raw([f"output_dir={run_dir}", *overrides])
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(composed))
    cfg = to_typed(composed)
    seed_everything(cfg.device.seed)  # what the convert task does before building the teacher
    model, _ = load_teacher(cfg.model)
    edit_model(model, build_plan(model.config.num_hidden_layers, cfg.target), cfg.target)
    generator = torch.Generator().manual_seed(3)
    params = [p for n, p in model.named_parameters() if ".target." in n]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))  # "trained"
    checkpoint = run_dir / "checkpoints" / "step-layerwise-3"
    checkpoint.mkdir(parents=True)
    TorchEngine(model, lambda m, b: (None, {}), params, StageConfig(), EngineConfig(), accumulation=1).save(checkpoint)
    write_manifest(checkpoint)  # as CheckpointDir does after the engine's files

    export_cfg = to_typed(compose_raw([f"output_dir={tmp_path / 'out'}", "task=export",
                                         f"export.checkpoint={checkpoint}"]))
    report = export_task.run(export_cfg)
    assert report["format"] == "deepseek_v3"
    set_mode(model, "student")
    assert_same_model(model.eval(), load_exported(tmp_path / "out" / "hf"), new_tokens=4)


def test_task_source_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(ValueError, match="export.checkpoint is required"):
        export_task.resolve_source(None)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        export_task.resolve_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no converted model"):
        export_task.resolve_source(tmp_path)
    (tmp_path / "step-layerwise-2" / "deepspeed").mkdir(parents=True)
    assert export_task.resolve_source(tmp_path / "step-layerwise-2").kind == "engine_checkpoint"


def test_task_exports_a_bf16_converted_model_natively(tmp_path: Path):
    """Loading a bf16 converted dir must not round the rotary frequencies the native check and the
    verification compare against (Module.to(bf16) would)."""
    target = TargetConfig(kind="mla", mla=MLA_DEEPSEEK)
    model = converted("llama", target)
    cast = export_module.cast_parameters
    cast(model, torch.bfloat16)
    save_converted(model, target, tmp_path / "run" / "converted")
    cfg = to_typed(compose_raw([f"output_dir={tmp_path / 'out'}", "task=export", "export.native=always",
                                f"export.checkpoint={tmp_path / 'run'}"]))
    report = export_task.run(cfg)
    assert report["format"] == "deepseek_v3" and report["max_rel_logit_diff"] <= LOGIT_ATOL
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_left_padding_does_not_move_a_sliding_layers_sinks(tmp_path: Path):
    """A plain forward of a left-padded batch (no position_ids, as lm-eval or a ranking script calls it) gives each
    row the logits of its unpadded self: positions are counted over the row's real tokens, so the sinks are its
    first tokens, not its padding (they were: up to 0.28 logit error and other greedy tokens, window 8, 2 sinks)."""
    export_converted(converted("qwen3", TargetConfig(kind="gate_swa", gate_swa=GATED)), tmp_path / "swa")
    model = load_exported(tmp_path / "swa", trust_remote_code=True)
    rows = list(prompt(length=20, batch=2))
    pad = 5
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), rows[0]]), torch.cat([rows[1][:pad], rows[1]])])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = model(input_ids=rows[0][None]).logits[0]
        batched = model(input_ids=ids, attention_mask=mask).logits
        unpadded_row = model(input_ids=ids[1:]).logits[0]
    scale = alone.abs().max()
    assert float((batched[0, pad:] - alone).abs().max()) <= LOGIT_ATOL * scale
    assert float((batched[1] - unpadded_row).abs().max()) <= LOGIT_ATOL * scale  # an unpadded row is unchanged


SCALED_ROPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", sorted(SCALED_ROPES))
def test_a_teacher_with_scaled_rope_reloads_and_exports(rope: str, tmp_path: Path):
    """Llama-3.x (llama3) and YaRN teachers: rebuilding the converted model on the meta device read the rope
    scaling there and failed ("Cannot copy out of meta tensor") in export, eval and inspect."""
    from ascend_edit.models.checkpoint import load_converted

    target = TargetConfig(kind="mla", mla=MLA_NO_NORM)
    model = tiny_model("llama", rope_parameters=SCALED_ROPES[rope], max_position_embeddings=128)
    edit_model(model, build_plan(model.config.num_hidden_layers, target), target)
    model.eval()
    save_converted(model, target, tmp_path / "converted")
    assert_same_model(model, load_converted(tmp_path / "converted"))
    export_converted(model, tmp_path / "hf")
    assert_same_model(model, load_exported(tmp_path / "hf", trust_remote_code=True))
