"""Optimizer parameter groups labelled by balanced layer.

Every group TempBalance touches carries the key :data:`GROUP_KEY` with the name of its balanced
layer (``None`` for groups that stay at the base LR). Multipliers are always matched to groups by
this label, never by position, so adding, reordering or splitting groups cannot misassign LRs.

Two ways to get such groups:

* :func:`build_param_groups`: from scratch, one group per (balanced layer, decay / no-decay),
  then the remaining parameters in shared groups (the way ``timm.optim._param_groups`` and the
  Transformers ``Trainer`` split decay from no-decay).
* :func:`split_param_groups`: split the groups of an optimizer that already exists (e.g. the one
  a ``Trainer`` built from ``args.optim``), keeping each group's hyperparameters, and re-index
  the per-group lists of its LR scheduler so the scheduler keeps driving every new group.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from .layers import LayerPlan

__all__ = ["GROUP_KEY", "DEFAULT_NO_DECAY", "build_param_groups", "split_param_groups",
           "reindex_scheduler", "unwrap_optimizer"]

GROUP_KEY = "tempbalance_layer"

#: Name patterns excluded from weight decay (besides every 1-D parameter), as in Transformers.
DEFAULT_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` behind wrappers such as Accelerate's."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.optim") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


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


def split_param_groups(optimizer: Any, model: nn.Module, plan: LayerPlan) -> list[int]:
    """Split each group of an existing optimizer by balanced layer, in place.

    Each new group copies every hyperparameter of the group it came from. Must run before the
    optimizer has state (i.e. before the first step). Returns ``parent``: ``parent[j]`` is the index
    of the original group that new group ``j`` came from (see :func:`reindex_scheduler`).
    """
    inner = unwrap_optimizer(optimizer)
    if any(len(s) for s in inner.state.values()):
        raise RuntimeError(
            "the optimizer already has state, so its param groups can no longer be split. Build the "
            "per-layer groups from the start: use TempBalanceTrainer, or pass "
            "optimizer_cls_and_kwargs=tempbalance_optimizer_cls_and_kwargs(...) to the Trainer."
        )
    owner_by_id = {}
    named = dict(model.named_parameters())
    for layer in plan.layers:
        for pname in layer.param_names:
            owner_by_id[id(named[pname])] = layer.name

    new_groups, parent = [], []
    for index, group in enumerate(inner.param_groups):
        if GROUP_KEY in group:  # already labelled: keep as is
            new_groups.append(group)
            parent.append(index)
            continue
        buckets: dict[str | None, list] = {}
        for param in group["params"]:
            buckets.setdefault(owner_by_id.get(id(param)), []).append(param)
        for layer, params in buckets.items():
            new_groups.append({**{k: v for k, v in group.items() if k != "params"},
                               "params": params, GROUP_KEY: layer})
            parent.append(index)
    inner.param_groups[:] = new_groups
    return parent


def reindex_scheduler(scheduler: Any, parent: list[int], num_old_groups: int) -> None:
    """Make a scheduler's per-group lists follow :func:`split_param_groups`.

    ``LambdaLR`` (every Transformers schedule), ``ReduceLROnPlateau`` and most torch schedulers
    keep one entry per group (``base_lrs``, ``lr_lambdas``, ``min_lrs``, ``_last_lr``, ...); each
    list of length ``num_old_groups`` is re-indexed so new group ``j`` inherits entry
    ``parent[j]``. Wrappers (Accelerate's ``AcceleratedScheduler``) and composites
    (``SequentialLR``, ``ChainedScheduler``) are followed.
    """
    if scheduler is None:
        return
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        inner = getattr(obj, "scheduler", None)
        if inner is not None and inner is not obj:
            visit(inner)
        for child in getattr(obj, "_schedulers", []) or []:
            visit(child)
        for attr, value in list(vars(obj).items()):
            if isinstance(value, list) and len(value) == num_old_groups and attr != "_schedulers":
                setattr(obj, attr, [value[p] for p in parent])

    visit(scheduler)
