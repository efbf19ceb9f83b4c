"""``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer``): its packed q/k/v input
projection is balanced like the Linear most attention code uses for it; the separate-weights
variant is listed as skipped, never silently dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True,
                                       dropout=0.0)
    return nn.Sequential(nn.Linear(16, 64), nn.TransformerEncoder(layer, num_layers=2,
                                                                   enable_nested_tensor=False),
                         nn.Linear(64, 3))


def test_packed_input_projection_is_balanced_with_its_bias():
    model = encoder()
    tb = TempBalance(model, TempBalanceConfig(dtype="float64"))
    attn = "1.layers.0.self_attn"
    assert tb.plan.names == [f"1.layers.{i}.{m}" for i in (0, 1)
                             for m in ("self_attn", "self_attn.out_proj", "linear1", "linear2")]
    layer = next(la for la in tb.plan.layers if la.name == attn)
    assert layer.param_names == [f"{attn}.in_proj_weight", f"{attn}.in_proj_bias"]
    assert layer.num_eigs == 64
    # ESD: the squared singular values of the (192, 64) packed matrix.
    w = model.get_submodule(attn).in_proj_weight.detach().double()
    expected = torch.linalg.svdvals(w).pow(2).sort().values
    torch.testing.assert_close(esd(model.get_submodule(attn), dtype=torch.float64), expected)
    tb.update()
    assert tb.metrics[attn] == pytest.approx(hill_alpha_reference(expected.numpy()), rel=1e-9)


def test_input_projection_steps_with_the_multiplier():
    model = encoder()
    tb = TempBalance(model, TempBalanceConfig(interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # a user's own groups: split per step
    tb.attach(optimizer)
    used = {}
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer.register_step_pre_hook(lambda opt, *_: used.update(
        {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}))
    model(torch.randn(2, 5, 16)).sum().backward()
    optimizer.step()
    m = tb.multipliers["1.layers.1.self_attn"]
    # the step updated TempBalance first (interval 1) and the layers got different multipliers,
    # so a step at the base LR would not pass for one at 0.1 * m
    assert tb.num_updates == 1 and len({round(v, 6) for v in tb.multipliers.values()}) > 2
    assert m != pytest.approx(1.0)
    assert used["1.layers.1.self_attn.in_proj_weight"] == pytest.approx(0.1 * m)
    assert used["1.layers.1.self_attn.in_proj_bias"] == pytest.approx(0.1 * m)
    assert len(optimizer.param_groups) == 1  # the split lasted only for the step


def test_separate_projection_weights_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 64)
            self.attn = nn.MultiheadAttention(64, 4, kdim=32, vdim=32)
            self.b = nn.Linear(64, 64)
            self.c = nn.Linear(64, 2)

    tb = TempBalance(Net(), TempBalanceConfig(min_eigs=10))
    assert "separate q, k and v" in tb.plan.skipped["attn"]
    assert tb.plan.names == ["attn.out_proj", "b"]
