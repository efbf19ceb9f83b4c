"""OptimizerBinding: factors on any group key, seen by the step, never left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_tempbalance.binding import OptimizerBinding
from hf_tempbalance.groups import GROUP_KEY


class RecordingSGD(torch.optim.SGD):
    """SGD that records, at each step, the (lr, weight_decay) each parameter's group had."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[int, tuple[float, float]]] = []

    def step(self, closure=None):
        self.seen.append({id(p): (g["lr"], g["weight_decay"]) for g in self.param_groups
                          for p in g["params"]})
        return super().step(closure)


def _setup(labelled: bool):
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    owner = {id(a.weight): "a", id(a.bias): "a", id(b.weight): "b"}
    if labelled:
        groups = [{"params": list(a.parameters()), GROUP_KEY: "a"},
                  {"params": [b.weight], GROUP_KEY: "b"},
                  {"params": [b.bias, *c.parameters()], GROUP_KEY: None}]
    else:
        groups = [{"params": [*a.parameters(), *b.parameters(), *c.parameters()]}]
    opt = RecordingSGD(groups, lr=0.1, weight_decay=0.01)
    for p in [*a.parameters(), *b.parameters(), *c.parameters()]:
        p.grad = torch.ones_like(p)
    return opt, owner, (a, b, c)


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "split"])
def test_every_factor_reaches_the_step_and_none_stays_behind(labelled):
    """Per-layer LR and weight-decay factors are what the step sees; afterwards the owner's
    groups hold exactly their own values again (a split group's children never write a scaled
    key back to the parent)."""
    opt, owner, (a, b, c) = _setup(labelled)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    factors = {"lr": {"a": 2.0, "b": 0.5}, "weight_decay": {"a": 3.0}}
    binding = OptimizerBinding(opt, owner, before_step=lambda: factors, after_step=lambda: None)
    for _ in range(2):
        opt.step()
    for seen in opt.seen:
        assert seen[id(a.weight)] == pytest.approx((0.2, 0.03))
        assert seen[id(a.bias)] == pytest.approx((0.2, 0.03))
        assert seen[id(b.weight)] == pytest.approx((0.05, 0.01))
        assert seen[id(b.bias)] == pytest.approx((0.1, 0.01))
        assert seen[id(c.weight)] == pytest.approx((0.1, 0.01))
    after = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert after == before
    binding.detach()
    opt.step()
    assert set(opt.seen[-1].values()) == {(0.1, 0.01)}


def test_no_factors_leaves_the_optimizer_untouched():
    opt, owner, _ = _setup(False)
    groups = opt.param_groups[0]
    OptimizerBinding(opt, owner, before_step=lambda: None, after_step=lambda: None)
    opt.step()
    assert opt.param_groups[0] is groups and len(opt.param_groups) == 1
    assert set(opt.seen[-1].values()) == {(0.1, 0.01)}


def test_a_second_binding_replaces_the_first():
    """Two bindings on one optimizer would multiply their factors: the newer one wins."""
    opt, owner, (a, _, _) = _setup(True)
    first = OptimizerBinding(opt, owner, before_step=lambda: {"lr": {"a": 2.0}},
                             after_step=lambda: None)
    with pytest.warns(UserWarning, match="detached"):
        OptimizerBinding(opt, owner, before_step=lambda: {"lr": {"a": 3.0}}, after_step=lambda: None)
    assert not first.attached
    opt.step()
    assert opt.seen[-1][id(a.weight)][0] == pytest.approx(0.3)


def test_a_step_that_raises_restores_the_groups_at_once():
    opt, owner, _ = _setup(False)
    groups = list(opt.param_groups)
    OptimizerBinding(opt, owner, before_step=lambda: {"lr": {"a": 2.0}}, after_step=lambda: None)

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert opt.param_groups == groups and opt.param_groups[0]["lr"] == 0.1
