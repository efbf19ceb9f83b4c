"""Optimizer parameter groups labelled by balanced layer, and the step-time layout.

Every group TempBalance scales carries the key :data:`GROUP_KEY` with the name of its balanced
layer (``None`` for groups that stay at the base LR). Multipliers are always matched to groups by
this label, never by position, so adding or reordering groups cannot misassign LRs.

Two ways to give an optimizer per-layer LRs:

* :func:`build_param_groups`: labelled groups from the start, one per (balanced layer,
  decay / no-decay), then the remaining parameters in shared groups (the way
  ``timm.optim._param_groups`` and the Transformers ``Trainer`` split decay from no-decay).
* :class:`StepLayout`: any existing optimizer, e.g. the one a ``Trainer`` built from
  ``args.optim``. Its groups are split by layer only *during* ``optimizer.step()`` (children copy
  every hyperparameter of their group and get ``lr = group lr × m_i``) and merged back right after.
  Between steps the optimizer has exactly the groups its owner made, so LR schedulers,
  ``state_dict()`` and checkpoint resume never see the split. Per-parameter optimizer state is
  unaffected by grouping; group-level state that an optimizer writes during the step (e.g. a
  ``step`` counter kept in the group) is copied back to the parent group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from .layers import LayerPlan

__all__ = ["GROUP_KEY", "DEFAULT_NO_DECAY", "build_param_groups", "StepLayout", "check_optimizer",
           "unwrap_optimizer"]

GROUP_KEY = "tempbalance_layer"

#: Name patterns excluded from weight decay (besides every 1-D parameter), as in Transformers.
DEFAULT_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` behind wrappers such as Accelerate's.

    The ``.optimizer`` chain is followed through wrappers that are no torch optimizer themselves
    (DeepSpeed's ZeRO-1/2 optimizer sits between Accelerate's wrapper and the torch optimizer
    whose ``step()`` it calls). timm's ``Lookahead`` is followed to its ``_base_optimizer``: it
    skips ``Optimizer.__init__``, so step hooks registered on it never run.
    """
    found, current = optimizer, optimizer
    for _ in range(8):
        current = getattr(current, "optimizer", None) or getattr(current, "_base_optimizer", None)
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found = current
    return found


def _decay_rule(no_decay: Iterable[str], decay_names: Collection[str] | None):
    if decay_names is not None:
        decay_set = set(decay_names)
        return lambda name, param: name in decay_set
    patterns = [re.compile(p) for p in no_decay]
    return lambda name, param: param.ndim > 1 and not any(p.search(name) for p in patterns)


def build_param_groups(
    model: nn.Module,
    plan: LayerPlan,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    no_decay: Iterable[str] = DEFAULT_NO_DECAY,
    decay_names: Collection[str] | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """One group per (balanced layer, decay/no-decay), then the rest; trainable params only.

    Args:
        lr: base LR stored in every group (omit to use the optimizer's default).
        weight_decay: applied to decay parameters; no-decay groups get 0.
        no_decay: regexes of parameter names without decay (1-D parameters never decay).
        decay_names: exact set of names that decay, overriding ``no_decay`` (e.g. the
            ``Trainer.get_decay_parameter_names(model)`` set, to keep the Trainer's split).
        group_kwargs: extra keys copied into every group (e.g. ``momentum``).
    """
    decays = _decay_rule(no_decay, decay_names)
    owner = plan.owner_of()
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    order = [(name, d) for name in plan.names for d in (True, False)] + [(None, True), (None, False)]
    for key in order:
        buckets[key] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets[(owner.get(name), decays(name, param))].append(param)

    groups = []
    for (layer, decay), params in buckets.items():
        if not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0, GROUP_KEY: layer,
                 **group_kwargs}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


def check_optimizer(optimizer: torch.optim.Optimizer, owner: dict[int, str]) -> None:
    """Refuse optimizers whose LRs TempBalance cannot set per layer, naming the fix.

    Args:
        optimizer: the innermost ``torch.optim.Optimizer``.
        owner: ``id(param) -> balanced layer name`` (as for :class:`StepLayout`).
    """
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, int | float | torch.Tensor):
            raise ValueError(
                f"TempBalance sets each layer's LR to group['lr'] x multiplier, but param group {i} "
                f"of {name} has lr={lr!r}: this optimizer chooses its own step size (e.g. Adafactor "
                "with relative_step=True). Give it an explicit learning rate (Adafactor: lr=..., "
                "relative_step=False, scale_parameter=False, warmup_init=False).")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("LBFGS steps every parameter with the LR of its single param group: "
                         "per-layer learning rates are impossible with it. Use another optimizer.")
    if name == "ZeroRedundancyOptimizer" and any(
            GROUP_KEY not in g and any(id(p) in owner for p in g["params"])
            for g in optimizer.param_groups):
        # Its step() asserts that its groups match those of its local shard optimizer.
        raise ValueError("ZeroRedundancyOptimizer cannot have its param groups split during a "
                         "step: build it from tb.param_groups(...) (one group per balanced layer).")


class StepLayout:
    """Scale (or temporarily split) an optimizer's groups around one ``step()``.

    Args:
        optimizer: the innermost ``torch.optim.Optimizer``.
        owner: ``id(param) -> balanced layer name`` for every parameter that follows a layer.
    """

    _SKIP = ("params", "lr", GROUP_KEY)

    def __init__(self, optimizer: torch.optim.Optimizer, owner: dict[int, str]) -> None:
        self.optimizer = optimizer
        self.owner = owner
        # id(group) -> (its params list, that list's length, params bucketed by layer). The list
        # itself is kept and compared by identity: a group dict made by load_state_dict() can
        # reuse a freed group's id, and must not inherit its buckets.
        self._splits: dict[int, tuple[list, int, list[tuple[str | None, list]]]] = {}
        self._original: list[dict] | None = None
        self._scaled: list[tuple[dict, Any, Any]] = []  # (group, its LR, the LR set for the step)
        self._children: list[tuple[dict, dict]] = []

    def _split(self, group: dict, splits: dict) -> list[tuple[str | None, list]]:
        """Params of an unlabelled group bucketed by owning layer (cached per params list)."""
        params = group["params"]
        cached = self._splits.get(id(group))
        if cached is None or cached[0] is not params or cached[1] != len(params):
            buckets: dict[str | None, list] = {}
            for param in params:
                buckets.setdefault(self.owner.get(id(param)), []).append(param)
            cached = (params, len(params), list(buckets.items()))
        splits[id(group)] = cached
        return cached[2]

    def enter(self, multiplier: Callable[[str | None], float]) -> None:
        """Apply ``lr × multiplier(layer)`` to every group (splitting unlabelled ones)."""
        # Normally a no-op. A step that raised is undone by TempBalance's guard on step(); where
        # that guard was replaced (Accelerate's fp16 path re-sets step()), undo it here, or the
        # LRs would compound.
        self.exit()
        groups = self.optimizer.param_groups
        self._original, self._scaled, self._children = list(groups), [], []
        layout, splits = [], {}
        for group in groups:
            if GROUP_KEY in group:
                factor = multiplier(group[GROUP_KEY])
                if factor != 1.0:
                    self._scaled.append((group, group["lr"], group["lr"] * factor))
                    group["lr"] = self._scaled[-1][2]
                layout.append(group)
                continue
            buckets = self._split(group, splits)
            if len(buckets) == 1 and buckets[0][0] is None:
                layout.append(group)
                continue
            for layer, params in buckets:
                # Tensors in a group (timm's Lamb keeps its step count there) are copied per child:
                # shared, each child's in-place update would count once per child.
                child = {key: value.clone() if isinstance(value, torch.Tensor) else value
                         for key, value in group.items()}
                child.update(params=params, lr=group["lr"] * multiplier(layer))
                child[GROUP_KEY] = layer
                layout.append(child)
                self._children.append((group, child))
        self._splits = splits  # only the current groups: nothing accumulates across reloads
        if self._children:
            groups[:] = layout

    def exit(self) -> None:
        """Undo :meth:`enter`: restore the owner's groups and LRs, keep group-level state."""
        if self._original is None:
            return
        for group, lr, scaled in self._scaled:
            # After a step that raised, a scheduler may have written a new LR since: keep it.
            # (Identity, not equality: the scheduler's new LR can equal the scaled one.)
            if group["lr"] is scaled:
                group["lr"] = lr
        # Every child of a group made the same step from the same state, so one of them (the
        # last) holds the group's new values: write back once per group, not once per child.
        for parent, child in {id(parent): (parent, child) for parent, child in self._children}.values():
            for key, value in child.items():
                if key in self._SKIP:
                    continue
                old = parent.get(key)
                if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) \
                        and old.shape == value.shape:
                    old.copy_(value)  # keep the parent's tensor (a compiled step may hold it)
                else:
                    parent[key] = value
        if self._children:
            self.optimizer.param_groups[:] = self._original
        self._original, self._scaled, self._children = None, [], []
