"""Optimizer parameter groups labelled by balanced layer.

Every group TempBalance scales carries the key :data:`GROUP_KEY` with the name of its balanced
layer (``None`` for groups that stay at the base LR). Multipliers are always matched to groups by
this label, never by position, so adding or reordering groups cannot misassign LRs.

:func:`build_param_groups` makes labelled groups from the start, one per (balanced layer,
decay / no-decay), then the remaining parameters in shared groups (the way
``timm.optim._param_groups`` and the Transformers ``Trainer`` split decay from no-decay). Any
other optimizer works too: :class:`~hf_tempbalance.binding.OptimizerBinding` splits its groups by
layer during each step.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from torch import nn

from .layers import LayerPlan

__all__ = ["GROUP_KEY", "DEFAULT_NO_DECAY", "build_param_groups"]

GROUP_KEY = "tempbalance_layer"

#: Name patterns excluded from weight decay (besides every 1-D parameter), as in Transformers.
DEFAULT_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


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
