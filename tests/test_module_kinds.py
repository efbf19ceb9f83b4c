"""Module kinds beyond Linear/Conv: transposed convolutions are balanced on their per-position
slices; lazy modules that have not seen data yet get a clear error instead of a crash."""

from __future__ import annotations

import pytest
import torch
from expected import numpy_hill
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


class LoraLinear(nn.Module):
    """The layout PEFT gives a LoRA-adapted Linear: a frozen base plus trainable A (r x in) and
    B (out x r), B starting at zero so that the adapted model equals the base one."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_lora_adapters_are_balanced_and_their_zero_start_warns_once():
    torch.manual_seed(0)
    model = nn.Sequential(*(LoraLinear(96, 96, 32) for _ in range(3)))
    tb = TempBalance(model, TempBalanceConfig(min_eigs=16, exclude_first_last=False, interval=1))
    adapters = [f"{i}.lora_{ab}" for i in range(3) for ab in "AB"]
    assert tb.plan.names == adapters
    assert {tb.plan.skipped[f"{i}.base_layer"] for i in range(3)} == {"frozen weight"}
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.05), lr=0.05)
    tb.attach(optimizer)

    def step():
        loss = model(torch.randn(64, 96)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with pytest.warns(UserWarning, match=r"for 3 layer\(s\)") as record:
        step()  # first update: every lora_B is zero
    assert len([w for w in record if "TempBalance" in str(w.message)]) == 1
    assert all(tb.multipliers[f"{i}.lora_B"] == 1.0 for i in range(3))
    # B has moved: the update before the next step gives all six adapters a real alpha.
    weights = [model.get_submodule(name).weight.detach().double().clone() for name in adapters]
    step()
    alphas = [tb.metrics[name] for name in adapters]
    expected = [numpy_hill(torch.linalg.svdvals(w) ** 2) for w in weights]
    assert alphas == pytest.approx(expected, rel=1e-4)
    assert (min(tb.multipliers.values()), max(tb.multipliers.values())) == pytest.approx((0.5, 1.5))
