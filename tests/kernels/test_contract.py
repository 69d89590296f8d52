"""Every attention entry point checks its inputs through ``kernels/contract.py``: bad input gets the
contract's ``ValueError`` before any kernel work, so the NPU and Triton entry points refuse it on CPU too."""
from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch

SLIDING_WINDOW_ENTRY_POINTS = [
    ("reference", "sliding_window_attention"),
    ("sdpa", "sliding_window_attention"),
    ("flex", "sliding_window_attention"),
    ("npu.fusion_attention", "sliding_window_attention"),
    ("npu.infer_attention", "sliding_window_decode"),
    ("triton.sliding_window", "sliding_window_attention"),
]
MLA_ENTRY_POINTS = [
    ("reference", "mla_absorbed_attention"),
    ("npu.infer_attention", "mla_absorbed_attention"),
    ("triton.mla_decode", "mla_absorbed_attention"),
]


def entry_point(module: str, name: str):
    if module.startswith("triton."):
        pytest.importorskip("triton")
    return getattr(importlib.import_module(f"ascend_edit.kernels.{module}"), name)


def swa_inputs(**change) -> dict:
    b, h, s, d = 1, 2, 4, 8
    pos = torch.arange(s)[None].expand(b, s)
    inputs = {"q": torch.randn(b, h, s, d), "k": torch.randn(b, h, s, d), "v": torch.randn(b, h, s, d),
              "q_pos": pos, "k_pos": pos, "window": 2, "sink_tokens": 1, "scale": d**-0.5}
    return inputs | change


def mla_inputs(**change) -> dict:
    b, h, s, t, c, r = 1, 2, 1, 5, 8, 4
    inputs = {"q_latent": torch.randn(b, h, s, c), "q_rope": torch.randn(b, h, s, r), "latent": torch.randn(b, t, c),
              "k_rope": torch.randn(b, t, r), "q_pos": torch.full((b, s), t - 1), "k_pos": torch.arange(t)[None],
              "scale": 0.5}
    return inputs | change


@pytest.mark.parametrize(("module", "name"), SLIDING_WINDOW_ENTRY_POINTS)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": -1}, "window must be an int >= 0"),
        ({"k_pos": torch.zeros(1, 4)}, "k_pos must be an integer tensor"),
        ({"k": torch.randn(1, 3, 4, 8), "v": torch.randn(1, 3, 4, 8)}, r"query heads \(2\) must be a multiple"),
    ],
)
def test_sliding_window_entry_points_refuse_what_the_contract_refuses(module, name, change, message) -> None:
    attend = entry_point(module, name)
    inputs = swa_inputs(**change)
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    with pytest.raises(ValueError, match=message):
        attend(q, k, v, **inputs)


@pytest.mark.parametrize(("module", "name"), MLA_ENTRY_POINTS)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latent": torch.randn(1, 2, 5, 8)}, "latent and k_rope must be 3-D"),
        ({"k_pos": torch.arange(4)[None]}, r"k_pos must have shape \[1, 5\]"),
    ],
)
def test_mla_entry_points_refuse_what_the_contract_refuses(module, name, change, message) -> None:
    attend = entry_point(module, name)
    inputs = mla_inputs(**change)
    args = [inputs.pop(n) for n in ("q_latent", "q_rope", "latent", "k_rope")]
    with pytest.raises(ValueError, match=message):
        attend(*args, **inputs)


def test_the_check_keeps_the_kernels_name_and_signature() -> None:
    """The decorator is invisible to readers of the API: name, docstring and signature are the kernel's."""
    from ascend_edit.kernels import flex

    assert flex.sliding_window_attention.__name__ == "sliding_window_attention"
    assert "flex" in (flex.sliding_window_attention.__doc__ or "")
    assert "compiled" in inspect.signature(flex.sliding_window_attention).parameters


def test_a_valid_call_passes_backend_options_through() -> None:
    from ascend_edit.kernels import flex, reference

    inputs = swa_inputs()
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    expected = reference.sliding_window_attention(q, k, v, **inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile"
        out = flex.sliding_window_attention(q, k, v, **inputs, compiled=False)  # flex's option, not the contract's
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
