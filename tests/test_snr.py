"""Spectral norm regularisation (paper Eq. 4): the gradient added is strength·σ·u vᵀ."""

from __future__ import annotations

import pytest
import torch
from expected import numpy_hill
from torch import nn

from hf_tempbalance import SpectralNormRegularizer, TempBalance


def gapped(shape: tuple[int, int], top: float = 4.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """A random matrix whose top singular value is ``top`` and the rest are <= 1 (fast power iteration)."""
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    s = torch.linspace(1.0, 0.1, k, dtype=torch.float64)
    s[0] = top
    return (u[:, :k] * s) @ v[:, :k].T


def expected_snr_grad(weight: torch.Tensor, strength: float) -> torch.Tensor:
    """∇_W (strength/2)·σ_max(W)² = strength·σ·u vᵀ, from a float64 SVD of W as (out, -1)."""
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (strength * s[0] * torch.outer(u[:, 0], vh[0])).reshape(weight.shape)


def test_linear_gradient_matches_svd():
    layer = nn.Linear(48, 32)
    with torch.no_grad():
        layer.weight.copy_(gapped((32, 48)))
    grad = torch.randn_like(layer.weight)
    layer.weight.grad = grad.clone()
    snr = SpectralNormRegularizer([layer], strength=0.01)  # the authors' 5 power iterations
    snr.apply_()
    added = layer.weight.grad - grad
    torch.testing.assert_close(added.double(), expected_snr_grad(layer.weight, 0.01),
                               rtol=1e-4, atol=1e-6)
    sigma = torch.linalg.svdvals(layer.weight.detach().double())[0]
    assert float(snr.penalty()) == pytest.approx(0.5 * 0.01 * float(sigma) ** 2, rel=1e-5)


def test_conv_gradient_uses_out_by_rest_reshape():
    conv = nn.Conv2d(6, 16, 3)
    with torch.no_grad():
        conv.weight.copy_(gapped((16, 54)).reshape(16, 6, 3, 3))
    conv.weight.grad = torch.zeros_like(conv.weight)
    SpectralNormRegularizer([conv], strength=0.005, iterations=8).apply_()
    torch.testing.assert_close(conv.weight.grad.double(), expected_snr_grad(conv.weight, 0.005),
                               rtol=1e-4, atol=1e-7)


def test_deterministic_and_skips_layers_without_grad():
    a, b = nn.Linear(20, 30), nn.Linear(20, 30)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    a.weight.grad = torch.zeros_like(a.weight)
    snr = SpectralNormRegularizer([a, b], strength=0.1, iterations=2)  # few iterations: approximate
    snr.apply_()
    first = a.weight.grad.clone()
    a.weight.grad.zero_()
    snr.apply_()
    assert torch.equal(a.weight.grad, first)  # fixed start vector: no RNG state to save
    assert b.weight.grad is None


def test_engine_applies_snr_with_weight_decay():
    """SNR runs whatever the weight decay (here 5e-4; the authors' code skipped it until April
    2025) and, as theirs does, on every weight matrix: the first and last layers too."""
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 3))
    with torch.no_grad():
        for i, top in ((0, 2.0), (2, 3.0), (4, 5.0), (6, 4.0)):
            model[i].weight.copy_(gapped(tuple(model[i].weight.shape), top, gen))
    lr, wd, strength = 0.05, 5e-4, 0.01
    tb = TempBalance(model, snr_strength=strength, interval=1)
    assert tb.plan.names == ["2", "4"]
    optimizer = torch.optim.SGD(tb.param_groups(lr=lr, weight_decay=wd))
    tb.attach(optimizer)

    x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    # Eq. 2 with two layers: the larger alpha (plain NumPy Hill on the SVD) gets s2, the other s1.
    alphas = {n: numpy_hill(torch.linalg.svdvals(model.get_submodule(n).weight.detach().double()) ** 2)
              for n in ("2", "4")}
    expected_m = {n: 1.5 if a == max(alphas.values()) else 0.5 for n, a in alphas.items()}
    snr_grads = {f"{i}.weight": expected_snr_grad(model[i].weight, strength) for i in (0, 2, 4, 6)}
    optimizer.step()

    owner = tb.plan.owner_of()
    for name, param in model.named_parameters():
        w, g = before[name]
        decay = wd if param.ndim > 1 else 0.0
        step_lr = lr * expected_m.get(owner.get(name), 1.0)
        full_grad = g.double() + snr_grads.get(name, 0.0) + decay * w.double()
        torch.testing.assert_close(param.detach().double(), w.double() - step_lr * full_grad,
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert tb.multipliers == expected_m


def test_snr_alone_without_balancing():
    """balance_lr=False: the paper's SNR baseline, every LR at the base value."""
    model = nn.Sequential(nn.Linear(10, 64), nn.Linear(64, 64), nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.copy_(gapped((64, 64), 4.0))
    tb = TempBalance(model, snr_strength=0.02, balance_lr=False, interval=1)
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1))
    tb.attach(optimizer)
    model(torch.randn(4, 10)).sum().backward()
    w, g = model[1].weight.detach().clone(), model[1].weight.grad.clone()
    expected = w.double() - 0.1 * (g.double() + expected_snr_grad(w, 0.02))
    optimizer.step()
    torch.testing.assert_close(model[1].weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert tb.history == [] and tb.multipliers == {"1": 1.0}
