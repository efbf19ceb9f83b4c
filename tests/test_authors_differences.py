"""Each "bug fixed" of docs/differences.md (differences from the authors' code), shown on a
concrete input.

Every test computes what the authors' code does on that input (their formulas and LR writes,
restated from their ``tempbalance.py`` in a few NumPy/torch lines, not imported) and shows it going
wrong, then shows the library's answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_tempbalance import TempBalance
from hf_tempbalance.spectral import esd, hill_fit


def authors_alpha(weight: torch.Tensor) -> float:
    """Their median PL_Alpha_Hill: svdvals² of the weight, i = N // 2, n = N - i, no filter."""
    eigs = torch.linalg.svdvals(weight.detach()).square().sort().values
    i = len(eigs) // 2
    n = len(eigs) - i
    logs = eigs.log()
    return float(1 + n / (logs[i:].sum() - n * logs[i]))


def authors_linear_map(alphas, s1=0.5, s2=1.5) -> np.ndarray:
    """Their tb_linear_map: np.interp of each alpha over [min, max] onto [s1, s2]."""
    return np.interp(alphas, [min(alphas), max(alphas)], [s1, s2])


def linears(*weights: torch.Tensor) -> nn.Sequential:
    """Linear layers with the given weights between a first and a last layer (both excluded)."""
    d = weights[0].shape[1]
    layers = [nn.Linear(d, d)]
    for w in weights:
        layer = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(w)
        layers.append(layer)
    layers.append(nn.Linear(weights[-1].shape[0], 3))
    return nn.Sequential(*layers)


def multipliers(model: nn.Module) -> list[float]:
    tb = TempBalance(model)
    tb.update()
    return [tb.multipliers[name] for name in tb.plan.names]


def test_equal_alphas_do_not_raise_every_lr():
    """Identical layers have equal alphas. np.interp over the zero-width range [a, a] gives every
    layer s2 (each LR 1.5x, nothing balanced); their step map ranks them by position instead."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    model = linears(w, w.clone(), w.clone())
    alphas = [authors_alpha(model[i].weight) for i in (1, 2, 3)]
    assert authors_linear_map(alphas).tolist() == [1.5, 1.5, 1.5]
    # their step map ranks equal alphas by position: three identical layers, three different LRs
    ranks = np.argsort(np.argsort(alphas, kind="stable"))
    assert [0.5 + (1.5 - 0.5) * r / 3 for r in ranks] == pytest.approx([0.5, 0.5 + 1 / 3, 0.5 + 2 / 3])
    assert multipliers(model) == [1.0, 1.0, 1.0]
    tb = TempBalance(model, assign="step")
    tb.update()
    assert list(tb.multipliers.values()) == [1.0, 1.0, 1.0]


def test_a_flat_spectrum_does_not_push_the_other_layers_to_s1():
    """An orthogonal layer's ESD is flat (1 ± float32 rounding): their alpha is ~1e5..inf, which
    becomes alpha_max, and every other layer lands at s1. Here it keeps its multiplier and the
    others are mapped among themselves."""
    gen = torch.Generator().manual_seed(1)
    ortho = torch.empty(64, 64)
    nn.init.orthogonal_(ortho, generator=gen)
    heavy = torch.randn(64, 64, generator=gen) * torch.rand(64, 64, generator=gen) ** 4
    model = linears(torch.randn(64, 64, generator=gen), ortho, heavy)
    alphas = [authors_alpha(model[i].weight) for i in (1, 2, 3)]
    assert alphas[1] > 1e4
    theirs = authors_linear_map(alphas)
    assert theirs[0] == pytest.approx(0.5, abs=1e-3) and theirs[2] == pytest.approx(0.5, abs=1e-3)
    ours = multipliers(model)
    assert ours[1] == 1.0  # invalid: kept
    assert sorted([ours[0], ours[2]]) == [0.5, 1.5]


def test_a_zero_median_eigenvalue_does_not_give_nan_lrs():
    """A layer of rank below half has a zero median eigenvalue: their alpha is nan (ln 0 in the
    Hill sum), np.interp passes it on, and SGD turns the weights into NaN. Here the layer is
    invalid, keeps its multiplier, and the other layers are mapped without it."""
    gen = torch.Generator().manual_seed(2)
    low_rank = torch.randn(64, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
    model = linears(torch.randn(64, 64, generator=gen), low_rank,
                    torch.randn(64, 64, generator=gen) ** 3)
    low_rank_eigs = torch.linalg.svdvals(low_rank).square()
    low_rank_eigs[8:] = 0.0  # exactly what it is (float rounding leaves ~1e-12 instead)
    i = len(low_rank_eigs) // 2
    logs = low_rank_eigs.sort().values.log()
    assert math.isnan(float(1 + (64 - i) / (logs[i:].sum() - (64 - i) * logs[i])))
    assert math.isnan(authors_linear_map([2.0, float("nan"), 3.0])[1])
    ours = multipliers(model)
    assert ours[1] == 1.0 and sorted([ours[0], ours[2]]) == [0.5, 1.5]
    assert all(math.isfinite(m) for m in ours)


def test_fix_finger_window_compares_like_with_like():
    """Their fix-finger window is [log10(0.95·peak), 1.5·peak] on linear eigenvalues: with a peak
    below 1 its lower end is negative, so every eigenvalue up to 1.5·peak is a candidate, not the
    [0.95, 1.5]·peak window the method describes. Ours searches that window."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / 30
    eigs = esd(w, dtype="float64")
    log10 = eigs.log10()
    counts = torch.histc(log10, 100, min=float(log10.min()), max=float(log10.max()))
    peak = 10 ** float(torch.linspace(float(log10.min()), float(log10.max()), 101)[counts.argmax()])
    assert peak < 1
    theirs = [float(x) for x in eigs[:-1] if math.log10(0.95 * peak) <= x <= 1.5 * peak]
    assert min(theirs) < 0.5 * peak  # far outside the window
    fit = hill_fit(eigs, "fix_finger")
    assert 0.95 * peak <= fit.xmin <= 1.5 * peak


def _model_with_biases() -> nn.Sequential:
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(64, 64, generator=gen) * torch.rand(64, 64, generator=gen) ** k
               for k in (0, 2, 4)]
    return linears(*weights)


def _lr_used(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-parameter LR of one plain-SGD step with a gradient of ones (p_before - p_after)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return {n: float((before[n] - p.detach()).mean()) for n, p in model.named_parameters()}


def test_lrs_reach_their_layers_whatever_the_group_layout():
    """Their step() writes the i-th scheduled LR into the optimizer's i-th group. With the common
    decay / no-decay layout (the Trainer's), group 0 holds every weight and gets the first
    layer's LR, group 1 every bias and gets the second's. Here each parameter steps with its own
    layer's multiplier, whatever the groups."""
    model = _model_with_biases()
    tb = TempBalance(model)
    tb.update()
    wanted = {p: tb.multipliers.get(layer, 1.0) for p, layer in tb.plan.owner_of().items()}
    wanted = {n: wanted.get(n, 1.0) for n, _ in model.named_parameters()}
    assert len({wanted[f"{i}.weight"] for i in (1, 2, 3)}) == 3

    def grouped():
        params = dict(model.named_parameters())
        return torch.optim.SGD([{"params": [p for n, p in params.items() if n.endswith("weight")]},
                                {"params": [p for n, p in params.items() if n.endswith("bias")]}],
                               lr=1.0)

    theirs = grouped()
    scheduled = [tb.multipliers[name] for name in tb.plan.names]
    for index, group in enumerate(theirs.param_groups):  # their Tempbalance.step()
        group["lr"] = scheduled[index] if index < len(scheduled) else 1.0
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    used = _lr_used(model, theirs)
    assert used["3.weight"] == pytest.approx(scheduled[0]) != pytest.approx(wanted["3.weight"])

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    ours = grouped()
    tb.attach(ours)
    used = _lr_used(model, ours)
    assert used == pytest.approx(wanted, rel=1e-5)


def test_a_scheduler_does_not_erase_the_multipliers():
    """Their LRs are written into the groups once per epoch; a scheduler that recomputes LRs
    from its base LRs each step (LambdaLR, every Transformers schedule) erases them at once."""
    model = _model_with_biases()
    tb = TempBalance(model)
    groups = tb.param_groups(lr=1.0)
    theirs = torch.optim.SGD([dict(g) for g in groups], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(theirs, lambda step: 0.5)
    tb.update()
    for group in theirs.param_groups:  # their write of lr x multiplier
        group["lr"] = group["lr"] * tb.multiplier(group.get("tempbalance_layer"))
    scheduler.step()
    assert {g["lr"] for g in theirs.param_groups} == {0.5}  # every multiplier gone

    ours = torch.optim.SGD(groups, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: 0.5)
    tb.attach(ours)
    scheduler.step()
    used = _lr_used(model, ours)
    owner = tb.plan.owner_of()
    expected = {n: 0.5 * tb.multiplier(owner.get(n)) for n in used}
    assert len(set(expected.values())) > 1
    assert used == pytest.approx(expected, rel=1e-5)


def test_half_precision_weights_are_upcast():
    """Their ESD is torch.linalg.svdvals of the weight as it is: no half-precision SVD exists on
    CPU (cuSOLVER has none either). Here half weights are upcast first."""
    w = torch.randn(80, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError):
        torch.linalg.svdvals(w.half())
    expected = torch.linalg.svdvals(w.half().float()).square().sort().values
    torch.testing.assert_close(esd(w.half()), expected, rtol=1e-5, atol=1e-5 * float(expected[-1]))
