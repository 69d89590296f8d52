"""`prepare_for_decode` on the models users load: exported checkpoints decode the same tokens after it.

Tiny converted models exported as native `deepseek_v3` and as `auto_map` (MLA without the latent norm,
gated GateSWA with sinks), loaded back with transformers, prepared for decode (projections reading one
input fused; the GEMV kernel needs CUDA, so on CPU it is not switched on), then transformers'
`generate(..., cache_implementation="static")` on left-padded prompts of different lengths, decoding
past the GateSWA window: the same tokens as the unprepared model (and for the in-repo converted model). Also: one fused GEMM per group and
forward inside the exported models' own forward, the compiled fixed-shape decode loop, the refusals
(training mode, parameters requiring grad, `gemv=True` without CUDA) and the save / export refusal.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from ascend_edit.config import TargetConfig
from ascend_edit.models.decode_fusion import (
    DecodeOnlyError,
    FusedInputLinear,
    choose_gemv,
    prepare_for_decode,
    use_gemv_linears,
)
from ascend_edit.models.export import export_converted, load_exported
from ascend_edit.models.static_decode import StaticDecoder
from tests.integration.test_decode_static import EXPORTS as STATIC_EXPORTS
from tests.integration.test_decode_static import MLA_DEEPSEEK, NEW_TOKENS, padded_prompts
from tests.integration.test_export import converted

pytestmark = pytest.mark.usefixtures("few_cpu_threads")

# The three exports of test_decode_static, and native deepseek_v3 with a low-rank query.
EXPORTS = {**STATIC_EXPORTS,
           "deepseek_v3-q_lora": TargetConfig(kind="mla", mla=dataclasses.replace(MLA_DEEPSEEK, q_lora_rank=24))}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, few_cpu_threads) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, target in EXPORTS.items():
        result = export_converted(converted("qwen3", target), root / name)
        assert result.format == name.split("-")[0]
        out[name] = root / name
    return out


def load(directory: Path) -> nn.Module:
    """As a user loads it: eval mode (from_pretrained's default), then gradients off for inference."""
    model = load_exported(directory, trust_remote_code=directory.name.startswith("auto_map"))
    return model.requires_grad_(False)




def static_generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0, cache_implementation="static")


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_prepared_exported_model_generates_the_same_tokens(name: str, exports: dict[str, Path]):
    ids, mask = padded_prompts()
    want = static_generate(load(exports[name]), ids, mask)
    assert want.shape[1] == ids.shape[1] + NEW_TOKENS
    assert len(set(want[:, ids.shape[1]:].flatten().tolist())) > 3  # not one token repeated: a real comparison

    model = load(exports[name])
    layers = model.config.num_hidden_layers
    prepared = prepare_for_decode(model)
    # every layer: its attention's projections of the layer input, and the MLP's gate + up
    assert prepared.groups_fused == 2 * layers
    assert (prepared.gemv_linears, prepared.cublas_shapes) == (0, ())  # CPU: the kernel needs CUDA
    assert prepared.gemv_reason == "the weights are not on CUDA (cpu)"
    assert prepared.swa_attention_layers == 0  # "auto" off CUDA: every GateSWA layer keeps SDPA
    assert prepared.summary().startswith(f"decode: {2 * layers} projection groups fused; gemv kernel on 0 linears")
    fused = [m for m in model.modules() if isinstance(m, FusedInputLinear)]
    assert len(fused) == 2 * layers

    # one fused GEMM per group and forward: the members read the module's input, not a copy of it
    calls = {id(m): 0 for m in fused}
    handles = [m.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + 1))
               for m in fused]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    assert set(calls.values()) == {1}

    assert torch.equal(static_generate(model, ids, mask), want)
    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=3, max_cache_len=ids.shape[1] + NEW_TOKENS, mode="compile",
                            backend="aot_eager")
    assert torch.equal(decoder.generate(ids, mask, NEW_TOKENS), want)


@pytest.mark.parametrize("kind", ["mla", "gate_swa"])
def test_prepared_in_repo_converted_model_generates_the_same_tokens(kind: str):
    target = EXPORTS["auto_map-mla" if kind == "mla" else "auto_map-gate_swa"]
    ids, mask = padded_prompts()
    want = static_generate(converted("qwen3", target).requires_grad_(False), ids, mask)
    model = converted("qwen3", target).requires_grad_(False)
    assert prepare_for_decode(model).groups_fused > 0
    assert torch.equal(static_generate(model, ids, mask), want)


def test_training_mode_and_gradients_are_refused_before_anything_changes(exports: dict[str, Path]):
    model = load_exported(exports["deepseek_v3"])  # from_pretrained: eval mode, parameters require grad
    with pytest.raises(DecodeOnlyError, match=r"^prepare_for_decode: parameter \S+ requires grad.*requires_grad_"):
        prepare_for_decode(model)
    model.requires_grad_(False).train()
    with pytest.raises(DecodeOnlyError, match="^prepare_for_decode: the model is in training mode"):
        prepare_for_decode(model)
    model.eval()
    model.model.layers[1].mlp.train()
    with pytest.raises(DecodeOnlyError, match="model.layers.1.mlp is in training mode"):
        prepare_for_decode(model)
    assert not any(isinstance(m, FusedInputLinear) for m in model.modules())


def test_gemv_choice():
    assert choose_gemv("auto", {"cuda"}, triton_available=True) == (True, "CUDA, Triton available")
    assert choose_gemv(True, {"cuda"}, triton_available=True)[0]
    assert choose_gemv("auto", {"cpu"}, triton_available=True) == (False, "the weights are not on CUDA (cpu)")
    assert choose_gemv("auto", {"cuda"}, triton_available=False) == (False, "Triton is not installed")
    assert choose_gemv(False, {"cuda"}, triton_available=True) == (False, "gemv=False")
    with pytest.raises(ValueError, match="gemv=True but the kernel cannot run: the weights are not on CUDA"):
        choose_gemv(True, {"cpu"}, triton_available=True)
    with pytest.raises(ValueError, match="gemv=True but the kernel cannot run: Triton is not installed"):
        choose_gemv(True, {"cuda"}, triton_available=False)
    for bad in ("on", 1, None):
        with pytest.raises(ValueError, match=f"gemv={bad!r} is not one of 'auto', True, False"):
            choose_gemv(bad, {"cuda"}, triton_available=True)


def test_gemv_required_off_cuda_is_refused_before_anything_changes():
    model = converted("qwen3", EXPORTS["auto_map-mla"]).requires_grad_(False)
    with pytest.raises(ValueError, match="gemv=True but the kernel cannot run"):
        prepare_for_decode(model, gemv=True)
    assert not any(isinstance(m, FusedInputLinear) for m in model.modules())
    keys = list(model.state_dict())
    unfused = prepare_for_decode(model, fuse=False, gemv=False)  # nothing asked, nothing changed
    assert (unfused.groups_fused, unfused.gemv_linears) == (0, 0)
    assert use_gemv_linears(model) > 0  # the kernel modules alone (all falling back on CPU) keep the layout
    assert list(model.state_dict()) == keys


def test_saving_or_exporting_a_prepared_model_is_refused(exports: dict[str, Path], tmp_path: Path):
    model = load(exports["auto_map-gate_swa"])
    prepare_for_decode(model)
    with pytest.raises(DecodeOnlyError, match=r"^refusing to build a state dict: model\.layers\.0\.\S+ holds "
                                              "projections fused for decode"):
        model.save_pretrained(tmp_path / "saved")
    # transformers writes the config (and an auto_map model's code) before it asks for the state dict
    written = {p.suffix for p in (tmp_path / "saved").iterdir()}
    assert ".json" in written and not written & {".safetensors", ".bin", ".pt"}

    in_repo = converted("qwen3", EXPORTS["auto_map-mla"]).requires_grad_(False)
    prepare_for_decode(in_repo)
    with pytest.raises(DecodeOnlyError, match="holds projections fused for decode"):
        export_converted(in_repo, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [tmp_path / "saved"]  # neither the output nor a temporary directory


def test_generate_benchmark_prints_its_row(capsys: pytest.CaptureFixture[str]):
    """benchmarks/generate_decode.py on a tiny in-repo converted model (the table the GPU run prints)."""
    from tests.helpers.scripts import benchmark_script

    with benchmark_script("generate_decode") as script:
        assert script.main(["--model", "qwen3_tiny", "--kind", "mla", "--device", "cpu", "--variant", "prepared",
                            "--context", "8", "--short", "2", "--long", "4", "--repeats", "1", "--target-override",
                            "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8",
                            "target.mla.kv_lora_rank=16", "target.mla.v_head_dim=16"]) == 0
    out = capsys.readouterr().out
    assert "| qwen3_tiny mla | prepared | 1 | 8 | " in out
    assert "decode: 8 projection groups fused; gemv kernel on 0 linears" in out  # 4 layers: attention + MLP


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["deepseek_v3", "auto_map-gate_swa"])
def test_prepared_exported_model_generates_the_same_tokens_on_cuda(name: str, exports: dict[str, Path]):
    """The GEMV kernel on every linear (no tuning: none kept on cuBLAS) inside the decode step transformers
    compiles itself for a static cache on CUDA (inductor, reduce-overhead), fp32 weights."""
    pytest.importorskip("triton")
    ids, mask = (t.cuda() for t in padded_prompts())
    torch._dynamo.reset()
    want = static_generate(load(exports[name]).cuda(), ids, mask)
    model = load(exports[name]).cuda()
    prepared = prepare_for_decode(model, gemv=True, tune_rows=())
    assert prepared.groups_fused == 2 * model.config.num_hidden_layers and prepared.gemv_linears > 0
    torch._dynamo.reset()
    assert torch.equal(static_generate(model, ids, mask), want)
