"""Module kinds beyond Linear/Conv: transposed convolutions are balanced on their per-position
slices; lazy modules that have not seen data yet get a clear error instead of a crash."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd


def decoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ConvTranspose2d(32, 64, 4, stride=2),
                         nn.ConvTranspose2d(64, 48, 3, groups=2), nn.Conv2d(48, 3, 1))


def test_transposed_convolutions_are_balanced_on_their_slices():
    model = decoder()
    tb = TempBalance(model, TempBalanceConfig(min_eigs=10))
    assert tb.plan.names == ["1", "2"]
    for name, (k, m, n) in {"1": (16, 32, 64), "2": (9, 64, 24)}.items():
        weight = model.get_submodule(name).weight.detach().double()  # (in, out/groups, kh, kw)
        slices = [weight[:, :, i, j] for i in range(weight.shape[2]) for j in range(weight.shape[3])]
        assert len(slices) == k and slices[0].shape == (m, n)
        expected = torch.cat([torch.linalg.svdvals(s).pow(2) for s in slices]).sort().values
        torch.testing.assert_close(esd(model.get_submodule(name), dtype=torch.float64), expected)
        assert next(la for la in tb.plan.layers if la.name == name).num_eigs == k * min(m, n)


def test_lazy_module_before_its_first_forward_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 64), nn.LazyLinear(64), nn.Linear(64, 64), nn.Linear(64, 2))
    with pytest.raises(ValueError, match=r"1 \(LazyLinear\) is a lazy module .* forward pass"):
        TempBalance(model)
    model(torch.randn(2, 8))  # materialises the weight: now an ordinary Linear
    assert "1" in TempBalance(model, TempBalanceConfig(min_eigs=10)).plan.names
