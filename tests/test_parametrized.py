"""Layers whose weight comes from a ``torch.nn.utils.parametrize`` parametrization (weight norm,
spectral norm): balanced on the effective weight, their originals follow the multiplier, reading
them changes nothing, and spectral-norm regularisation reaches the originals by the chain rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from hf_tempbalance import SpectralNormRegularizer, TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd, hill_alpha
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 96), nn.ReLU(),
                         weight_norm(nn.Linear(96, 96)), nn.ReLU(),
                         spectral_norm(nn.Linear(96, 80)), nn.ReLU(),
                         nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 5))


def effective_weight_norm(layer: nn.Module) -> torch.Tensor:
    """W = g · v / ‖v‖ per output row, written out from the parametrization's originals."""
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    return g * v / v.norm(dim=1, keepdim=True)


def test_parametrized_layers_are_balanced_and_their_originals_follow():
    net = model()
    tb = TempBalance(net, TempBalanceConfig(min_eigs=10))
    assert tb.plan.names == ["2", "4", "6"]
    params = {layer.name: layer.param_names for layer in tb.plan.layers}
    assert params["2"] == ["2.parametrizations.weight.original0", "2.parametrizations.weight.original1",
                           "2.bias"]
    assert params["4"] == ["4.parametrizations.weight.original", "4.bias"]


def test_deprecated_weight_norm_is_skipped_with_the_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.weight_norm(nn.Linear(96, 96))
    net = nn.Sequential(nn.Linear(40, 96), old, nn.Linear(96, 96), nn.Linear(96, 5))
    tb = TempBalance(net, TempBalanceConfig(min_eigs=10))
    assert tb.plan.names == ["2"]
    assert "parametrizations.weight_norm" in tb.plan.skipped["1"]


def test_alpha_is_the_effective_weights_and_reading_changes_nothing():
    net = model().train()
    with torch.no_grad():  # rows of unequal norm, so that W = g·v/‖v‖ has another spectrum than v
        net[2].parametrizations.weight.original0.mul_(torch.rand(96, 1) * 3 + 0.1)
    net(torch.randn(8, 40))  # a training forward: spectral norm's vectors move once
    sn = net[4].parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    tb = TempBalance(net, TempBalanceConfig(min_eigs=10, dtype="float64"))
    tb.update()
    # Spectral norm's power-iteration vectors are untouched by discovery and the update.
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v) and net[4].training
    with torch.no_grad():
        w_norm = effective_weight_norm(net[2]).double()
        sigma = torch.dot(u.double(), net[4].parametrizations.weight.original.double() @ v.double())
        w_spec = net[4].parametrizations.weight.original.double() / sigma
    for name, weight in (("2", w_norm), ("4", w_spec)):
        eigs = torch.linalg.svdvals(weight).pow(2).sort().values.numpy()
        assert tb.metrics[name] == pytest.approx(hill_alpha_reference(eigs), rel=1e-6)
    v_eigs = torch.linalg.svdvals(net[2].parametrizations.weight.original1.detach().double())
    assert abs(hill_alpha_reference(v_eigs.pow(2).sort().values.numpy()) - tb.metrics["2"]) > 1e-2
    assert hill_alpha(esd(net[2], dtype=torch.float64)) == pytest.approx(tb.metrics["2"], rel=1e-12)


def test_originals_step_with_the_layers_multiplier():
    net = model()
    tb = TempBalance(net, TempBalanceConfig(min_eigs=10, interval=1))
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1), momentum=0.9)
    tb.attach(optimizer)
    seen = {}
    names = {id(p): n for n, p in net.named_parameters()}

    def record(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                seen[names[id(p)]] = group["lr"]

    optimizer.register_step_pre_hook(record)  # after the engine's hook: the LRs step() uses
    net(torch.randn(8, 40)).sum().backward()
    optimizer.step()
    m = tb.multipliers
    assert len(set(m.values())) == 3
    assert seen["2.parametrizations.weight.original0"] == pytest.approx(0.1 * m["2"])
    assert seen["2.parametrizations.weight.original1"] == pytest.approx(0.1 * m["2"])
    assert seen["4.parametrizations.weight.original"] == pytest.approx(0.1 * m["4"])
    assert seen["0.weight"] == pytest.approx(0.1)


def test_snr_gradient_reaches_the_originals_by_the_chain_rule():
    layer = weight_norm(nn.Linear(30, 20))
    strength = 0.01
    # Independent: autograd of (λ/2)·σ_max(W(g, v))² through the parametrization.
    g, v = (p.detach().clone().requires_grad_() for p in layer.parametrizations.weight.parameters())
    w = g * v / v.norm(dim=1, keepdim=True)
    (0.5 * strength * torch.linalg.matrix_norm(w, ord=2) ** 2).backward()

    for p in layer.parametrizations.weight.parameters():
        p.grad = torch.zeros_like(p)  # as after a backward in which the layer took part
    SpectralNormRegularizer([layer], strength, iterations=200).apply_()
    got = [p.grad for p in layer.parametrizations.weight.parameters()]
    np.testing.assert_allclose(got[0].numpy(), g.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[1].numpy(), v.grad.numpy(), rtol=1e-4, atol=1e-7)
