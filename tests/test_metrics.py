"""Metric registry: built-in formulas from the SVD, and user-registered metrics end to end."""

from __future__ import annotations

import math

import pytest
import torch
from expected import numpy_hill
from torch import nn

import hf_tempbalance.spectral.metrics as metrics_module
from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.assign import assign_multipliers
from hf_tempbalance.spectral import (
    available_metrics,
    compute_metric,
    esd,
    layer_metrics,
    register_metric,
)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registrations made by a test do not leak."""
    monkeypatch.setattr(metrics_module, "_REGISTRY", dict(metrics_module._REGISTRY))


def singular_values(layer: nn.Module) -> torch.Tensor:
    return torch.linalg.svdvals(layer.weight.detach().double())


def test_builtin_formulas():
    layer = nn.Linear(60, 90)
    sv = singular_values(layer)
    lam_max = float(sv.max() ** 2)
    eigs = esd(layer, dtype="float64")
    alpha = numpy_hill((sv**2).numpy())  # Eq. 3 in plain NumPy on the SVD, not the library's fit
    expected = {
        "spectral_norm": lam_max,
        "alpha_weighted": alpha * math.log10(lam_max),
        "stable_rank": float((sv**2).sum()) / lam_max,
        "alpha_hill": alpha,
    }
    for name, value in expected.items():
        assert float(compute_metric(eigs, name)) == pytest.approx(value, rel=1e-9), name
    # The batched, model-level path gives the same numbers (float32 ESD: float32 accuracy).
    table = layer_metrics([layer, nn.Linear(20, 20)], tuple(expected))
    for name, value in expected.items():
        assert table[name][0] == pytest.approx(value, rel=1e-4), name


def test_builtins_are_listed():
    assert {"alpha_hill", "spectral_norm", "alpha_weighted", "stable_rank"} <= set(available_metrics())


def test_dead_layer_metrics_are_nan():
    zeros = torch.zeros(16)
    for name in ("alpha_hill", "spectral_norm", "alpha_weighted", "stable_rank"):
        assert math.isnan(float(compute_metric(zeros, name))), name


def test_unknown_metric_error_lists_the_choices():
    with pytest.raises(ValueError, match="alpha_hill"):
        compute_metric(torch.ones(4), "alpha_magic")


def test_register_metric_is_usable_everywhere(registry):
    @register_metric("top_two_ratio")
    def top_two_ratio(eigs, **_):
        return eigs[-1] / eigs[-2]

    assert "top_two_ratio" in available_metrics()
    layers = [nn.Linear(64, 64) for _ in range(5)]
    expected = [float(singular_values(m)[0] ** 2 / singular_values(m)[1] ** 2) for m in layers]
    got = layer_metrics(layers, ("top_two_ratio",))["top_two_ratio"]
    assert got == pytest.approx(expected, rel=1e-4)

    # ... and by name in the config and the engine.
    model = nn.Sequential(*layers)
    tb = TempBalance(model, TempBalanceConfig(metric="top_two_ratio", exclude_first_last=False,
                                              dtype="float64"))
    rows = tb.update()
    assert [r["metric"] for r in rows] == ["top_two_ratio"] * 5
    assert [r["value"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert [tb.multipliers[str(i)] for i in range(5)] == pytest.approx(
        assign_multipliers(expected, "linear", 0.5, 1.5), rel=1e-6)


def test_duplicate_registration_is_an_error(registry):
    register_metric("mine", lambda eigs, **_: eigs.sum())
    with pytest.raises(ValueError, match="already registered"):
        register_metric("mine", lambda eigs, **_: eigs.mean())
    with pytest.raises(ValueError, match="already registered"):
        register_metric("spectral_norm", lambda eigs, **_: eigs[-1])
    register_metric("mine", lambda eigs, **_: eigs.mean(), overwrite=True)
    assert float(compute_metric(torch.tensor([1.0, 2.0, 6.0]), "mine")) == pytest.approx(3.0)
