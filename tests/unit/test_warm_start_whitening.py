"""MLA warm start: shrinking the whitening covariance (target.mla.whitening_shrinkage) on tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ascend_edit.attention import init as warm
from ascend_edit.config import ConfigError, MLAConfig, TargetConfig
from ascend_edit.models.surgery import build_plan, collect_layer_stats, edit_model
from tests.conftest import tiny_model

MLA = MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, latent_norm=False)


def _stats():
    """Calibration statistics with a strongly anisotropic input covariance (few token ids only)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 12, (2, 24))
    return collect_layer_stats(tiny_model("llama"), [{"input_ids": ids}])


def _converted(shrinkage: float, stats, toward: str = "identity") -> torch.nn.Module:
    cfg = TargetConfig(kind="mla", mla=dataclasses.replace(MLA, whitening_shrinkage=shrinkage,
                                                           whitening_shrinkage_toward=toward))
    model = tiny_model("llama")
    return edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg, stats)


def _target_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".target." in k}


def test_zero_shrinkage_whitens_by_the_measured_covariance(monkeypatch):
    stats = _stats()
    seen = []
    real_sqrt = warm._matrix_sqrt

    def spy(cov, *args, **kwargs):
        seen.append(cov.clone())
        return real_sqrt(cov, *args, **kwargs)

    monkeypatch.setattr(warm, "_matrix_sqrt", spy)
    default = _target_weights(_converted(0.0, stats))
    measured = [s.input_cov.to(torch.float64) for _, s in sorted(stats.items())]
    # the old code path took the square root of the measured covariance itself, layer by layer
    assert len(seen) == len(measured) and all(torch.equal(a, b) for a, b in zip(seen, measured))
    cov = stats[0].input_cov
    assert warm.shrink_covariance(cov, 0.0) is cov
    again = _target_weights(_converted(0.0, stats))
    assert all(torch.equal(default[k], again[k]) for k in default)


def test_shrinkage_changes_the_warm_start_and_keeps_the_trace():
    stats = _stats()
    base, shrunk = _target_weights(_converted(0.0, stats)), _target_weights(_converted(0.2, stats))
    assert any(not torch.allclose(base[k], shrunk[k]) for k in base)
    cov = stats[0].input_cov
    assert torch.allclose(torch.trace(warm.shrink_covariance(cov, 0.2)), torch.trace(cov))


def test_full_shrinkage_is_the_unwhitened_svd():
    ids = torch.randint(0, 256, (2, 16))
    whitened_off = _converted(1.0, _stats())
    unwhitened = _converted(0.0, None)  # no statistics: identity covariance
    with torch.no_grad():
        a, b = whitened_off(ids).logits, unwhitened(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_converted(0.0, _stats())(ids).logits, b, atol=1e-3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_shrinkage_outside_unit_interval_is_refused_with_its_key(bad):
    with pytest.raises(ConfigError, match="target.mla.whitening_shrinkage"):
        MLAConfig(whitening_shrinkage=bad)


def test_diagonal_target_keeps_each_dims_variance_and_shrinks_correlations():
    cov = _stats()[0].input_cov
    shrunk = warm.shrink_covariance(cov, 0.25, "diagonal")
    assert torch.equal(torch.diagonal(shrunk), torch.diagonal(cov))
    off = ~torch.eye(cov.shape[0], dtype=torch.bool)
    assert torch.allclose(shrunk[off], 0.75 * cov[off])
    base, diag = _target_weights(_converted(0.0, _stats())), _converted(0.25, _stats(), "diagonal")
    assert any(not torch.allclose(base[k], v) for k, v in _target_weights(diag).items())


def test_unknown_shrinkage_target_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="target.mla.whitening_shrinkage_toward"):
        MLAConfig(whitening_shrinkage_toward="ledoit")
