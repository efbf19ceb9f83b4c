"""The one object that touches an optimizer: per-layer factors applied around each ``step()``.

:class:`OptimizerBinding` hooks one optimizer. Before each step it asks its owner (the engine) for
the factors to apply, ``{group key: {layer: factor}}`` (today only ``"lr"``; per-layer weight
decay would be another key), and gives each parameter's group ``value × factor(layer)``:

* a group labelled with a layer (:data:`~hf_tempbalance.groups.GROUP_KEY`, as built by
  :func:`~hf_tempbalance.groups.build_param_groups`) is scaled in place;
* any other group (the one a ``Trainer`` built from ``args.optim``, say) is split by layer for the
  duration of the step: its children copy every key of the group, with the scaled keys scaled.

After the step the owner's groups and values are put back, so between steps the optimizer is
exactly what its owner made: LR schedulers, ``state_dict()`` and checkpoints never see a factor.
What the optimizer writes into a group during the step (a ``step`` counter kept in the group, as
timm's Lamb does) is copied back to the parent group; the scaled keys never are, so a factor can
never stay behind in the owner's groups. When ``step()`` raises, torch runs no post-hook: a guard
around ``optimizer.step`` restores the groups at once.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .groups import GROUP_KEY

__all__ = ["OptimizerBinding", "Factors", "check_optimizer", "unwrap_optimizer"]

#: ``{group key: {layer name: factor}}``; missing layers (and ``None``) get 1.
Factors = Mapping[str, Mapping[str, float]]

# Where an optimizer keeps its binding (one per optimizer; a second one replaces the first).
_BINDING_ATTR = "_tempbalance_binding"


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


def check_optimizer(optimizer: torch.optim.Optimizer, owner: dict[int, str]) -> None:
    """Refuse optimizers whose LRs cannot be set per layer, naming the fix.

    Args:
        optimizer: the innermost ``torch.optim.Optimizer``.
        owner: ``id(param) -> balanced layer name``.
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


class OptimizerBinding:
    """Apply per-layer factors to ``optimizer``'s groups around every ``step()`` (see module doc).

    Args:
        optimizer: a torch optimizer, or a wrapper (Accelerate's) around one.
        owner: ``id(param) -> layer name`` for every parameter that follows a layer.
        before_step: called before each step; returns the factors for this step (``None``: leave
            the optimizer as it is).
        after_step: called after each step that completed.
    """

    def __init__(self, optimizer: Any, owner: dict[int, str], *,
                 before_step: Callable[[], Factors | None], after_step: Callable[[], None]) -> None:
        inner = unwrap_optimizer(optimizer)
        check_optimizer(inner, owner)
        self.optimizer = inner
        self.owner = owner
        self._before_step = before_step
        self._after_step = after_step
        # id(group) -> (its params list, that list's length, params bucketed by layer). The list
        # itself is kept and compared by identity: a group dict made by load_state_dict() can
        # reuse a freed group's id, and must not inherit its buckets.
        self._splits: dict[int, tuple[list, int, list[tuple[str | None, list]]]] = {}
        self._original: list[dict] | None = None
        self._scaled: list[tuple[dict, str, Any, Any]] = []  # (group, key, owner's value, set)
        self._children: list[tuple[dict, dict]] = []
        self._keys: tuple[str, ...] = ()
        previous = inner.__dict__.get(_BINDING_ATTR)
        if previous is not None:
            # Two bindings would multiply their factors (a Trainer re-entered after an exception
            # never ran on_train_end): the newest one wins.
            warnings.warn("another TempBalance was attached to this optimizer; it is detached now "
                          "(one TempBalance per optimizer).", stacklevel=3)
            previous.detach()
        self._handles = [inner.register_step_pre_hook(self._pre_step),
                         inner.register_step_post_hook(self._post_step)]
        inner.__dict__[_BINDING_ATTR] = self
        _guard_step(inner)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the hooks and put the owner's groups back (also after a step that raised)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.restore()
        if self.optimizer.__dict__.get(_BINDING_ATTR) is self:
            del self.optimizer.__dict__[_BINDING_ATTR]

    # ------------------------------------------------------------------ the step
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Normally a no-op. A step that raised is undone by the guard on step(); where that guard
        # was replaced (Accelerate's fp16 path re-sets step()), undo it here, or factors compound.
        self.restore()
        factors = self._before_step()
        if factors is not None:
            self._apply(factors)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()
        self._after_step()

    def _buckets(self, group: dict, splits: dict) -> list[tuple[str | None, list]]:
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

    def _apply(self, factors: Factors) -> None:
        def factor(key: str, layer: str | None) -> float:
            return factors[key].get(layer, 1.0) if layer is not None else 1.0

        keys = tuple(factors)
        groups = self.optimizer.param_groups
        self._original, self._scaled, self._children, self._keys = list(groups), [], [], keys
        layout, splits = [], {}
        for group in groups:
            if GROUP_KEY in group:
                for key in keys:
                    f = factor(key, group[GROUP_KEY])
                    if f != 1.0:
                        self._scaled.append((group, key, group[key], group[key] * f))
                        group[key] = self._scaled[-1][3]
                layout.append(group)
                continue
            buckets = self._buckets(group, splits)
            if len(buckets) == 1 and buckets[0][0] is None:
                layout.append(group)
                continue
            for layer, params in buckets:
                # Tensors in a group (timm's Lamb keeps its step count there) are copied per child:
                # shared, each child's in-place update would count once per child.
                child = {key: value.clone() if isinstance(value, torch.Tensor) else value
                         for key, value in group.items()}
                child.update({key: group[key] * factor(key, layer) for key in keys})
                child.update(params=params)
                child[GROUP_KEY] = layer
                layout.append(child)
                self._children.append((group, child))
        self._splits = splits  # only the current groups: nothing accumulates across reloads
        if self._children:
            groups[:] = layout

    def restore(self) -> None:
        """Put the owner's groups and values back, keeping what the step wrote into them."""
        if self._original is None:
            return
        for group, key, value, scaled in self._scaled:
            # After a step that raised, a scheduler may have written a new value since: keep it.
            # (Identity, not equality: the new value can equal the scaled one.)
            if group[key] is scaled:
                group[key] = value
        skip = {"params", GROUP_KEY, *self._keys}
        # Every child of a group made the same step from the same state, so one of them (the
        # last) holds the group's new values: write back once per group, not once per child.
        for parent, child in {id(parent): (parent, child) for parent, child in self._children}.values():
            for key, value in child.items():
                if key in skip:
                    continue
                old = parent.get(key)
                if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) \
                        and old.shape == value.shape:
                    old.copy_(value)  # keep the parent's tensor (a compiled step may hold it)
                else:
                    parent[key] = value
        if self._children:
            self.optimizer.param_groups[:] = self._original
        self._original, self._scaled, self._children, self._keys = None, [], [], ()


def _guard_step(optimizer: torch.optim.Optimizer) -> None:
    """Restore the groups as soon as ``optimizer.step()`` raises.

    torch runs no post-hook after an exception, so without this the groups stay split / scaled
    until the next step, and whatever reads them in between (a Trainer re-entered after an OOM
    builds its new scheduler from them) sees the wrong layout. The wrapper is a bound method that
    carries the attributes of the one it wraps, so LR schedulers created before or after it keep
    working (they wrap ``step`` the same way). Installed once per optimizer; it finds the current
    binding, if any, when it runs.
    """
    previous = optimizer.step
    if getattr(previous, "_tempbalance_guard", False):
        return

    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        try:
            return previous(*args, **kwargs)
        except BaseException:
            binding = opt.__dict__.get(_BINDING_ATTR)
            if binding is not None:
                binding.restore()
            raise

    step.__dict__.update(getattr(previous, "__dict__", {}))  # e.g. _wrapped_by_lr_sched
    step._tempbalance_guard = True
    optimizer.step = types.MethodType(step, optimizer)
