"""Layer discovery: which modules TempBalance balances, and which parameters follow each one.

Walks ``model.named_modules()`` in registration order (the order the authors' code uses):

1. *Candidates* are modules of the configured kinds: ``linear`` (``nn.Linear`` and subclasses,
   Transformers' ``Conv1D``, the packed q/k/v input projection of ``nn.MultiheadAttention``),
   ``conv`` (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``), ``embedding``
   (``nn.Embedding``).
2. With ``exclude_first_last`` the first and last candidate are dropped (authors' choice: the stem
   and the classifier have few eigenvalues).
3. Name filters (``include``/``exclude`` regexes, ``re.search``), then frozen weights, weights tied
   to an earlier balanced module, and ESDs smaller than ``min_eigs`` are skipped, each with a
   recorded reason (:attr:`LayerPlan.skipped`).
4. A norm module (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, any ``*RMSNorm``) follows the
   candidate registered just before it when ``norm_follow="previous"``: if that candidate is
   balanced, the norm's parameters take its multiplier; otherwise they stay at the base LR.
   A balanced module's own bias always follows its weight.

A weight computed by a ``torch.nn.utils.parametrize`` parametrization (``parametrizations.
weight_norm``, ``spectral_norm``, orthogonal, ...) is balanced like any other: its ESD is that of
the effective weight the layer uses, and the parametrization's trainable originals (e.g. weight
norm's ``g`` and ``v``) follow the layer's multiplier. A weight that is neither a parameter nor
parametrized (the deprecated ``torch.nn.utils.weight_norm``) is skipped with the reason.

Every trainable parameter is owned by at most one balanced layer; shared parameters are counted
once (by identity), so no parameter can land in two optimizer groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import TempBalanceConfig
from .spectral.matrices import is_transposed_conv1d, num_eigs, weight_name, weight_of

__all__ = ["BalancedLayer", "LayerPlan", "discover_layers", "is_norm", "weight_sources"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


def is_norm(module: nn.Module) -> bool:
    """BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm, including framework-specific ones."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith(("RMSNorm", "LayerNorm"))


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear | nn.MultiheadAttention) or is_transposed_conv1d(module):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):  # Conv1/2/3d and ConvTranspose1/2/3d
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def weight_sources(module: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors a module's weight is made of: the weight parameter itself, or the
    originals of its parametrization; empty for a weight that is neither."""
    name = weight_name(module)
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name].parameters())
    weight = getattr(module, name, None)
    return [weight] if isinstance(weight, nn.Parameter) else []


def _esd_size(module: nn.Module) -> int:
    weight = weight_of(module)
    if is_transposed_conv1d(module):
        return min(weight.shape)
    return num_eigs(tuple(weight.shape))


@dataclass
class BalancedLayer:
    """A module whose LR TempBalance sets, with every parameter that follows its multiplier."""

    name: str
    module: nn.Module
    num_eigs: int
    param_names: list[str] = field(default_factory=list)


@dataclass
class LayerPlan:
    """Result of discovery: balanced layers in registration order, and why others were skipped."""

    layers: list[BalancedLayer]
    skipped: dict[str, str]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def owner_of(self) -> dict[str, str]:
        """Parameter name -> name of the balanced layer that owns it."""
        return {p: layer.name for layer in self.layers for p in layer.param_names}


def discover_layers(model: nn.Module, config: TempBalanceConfig) -> LayerPlan:
    """Find the balanced layers of ``model`` under ``config`` (see the module docstring)."""
    # Canonical parameter names, deduplicated by identity (tied weights keep their first name).
    canonical: dict[int, str] = {}
    for pname, param in model.named_parameters(remove_duplicate=True):
        canonical.setdefault(id(param), pname)

    modules = list(model.named_modules())
    candidates = [(name, m) for name, m in modules if _kind(m) in config.layer_types
                  and (parametrize.is_parametrized(m, weight_name(m))  # (reading it could change it)
                       or isinstance(getattr(m, weight_name(m), None), torch.Tensor))]
    skipped: dict[str, str] = {
        name: ("separate q, k and v projection weights (kdim or vdim differ from embed_dim); only "
               "the packed in_proj_weight is supported")
        for name, m in modules if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is None
        and "linear" in config.layer_types}
    dropped_edges: set[str] = set()
    if config.exclude_first_last and candidates:
        dropped_edges = {candidates[0][0], candidates[-1][0]}

    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    layers: list[BalancedLayer] = []
    by_name: dict[str, BalancedLayer] = {}
    claimed: set[int] = set()
    candidate_names = {name for name, _ in candidates}

    for name, module in candidates:
        sources = weight_sources(module)
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in sources):
            raise ValueError(
                f"{name} ({type(module).__name__}) is a lazy module whose weight has no shape yet; "
                "run one forward pass (e.g. on a dummy batch) before building TempBalance.")
        tied = next((p for p in sources if id(p) in claimed), None)
        if name in dropped_edges:
            skipped[name] = "first/last layer (exclude_first_last=True)"
        elif include and not any(p.search(name) for p in include):
            skipped[name] = "not matched by include"
        elif any(p.search(name) for p in exclude):
            skipped[name] = "matched by exclude"
        elif not sources:
            skipped[name] = ("weight is neither a parameter nor parametrized (the deprecated "
                             "torch.nn.utils.weight_norm? use torch.nn.utils.parametrizations."
                             "weight_norm)")
        elif not any(p.requires_grad for p in sources):
            skipped[name] = "frozen weight"
        elif tied is not None:
            skipped[name] = f"weight tied to already balanced {canonical.get(id(tied), '?')}"
        elif (n := _esd_size(module)) < config.min_eigs:
            skipped[name] = f"{n} eigenvalues < min_eigs={config.min_eigs}"
        else:
            layer = BalancedLayer(name, module, n)
            for param in [*sources, *module.parameters(recurse=False)]:
                if param.requires_grad and id(param) not in claimed and id(param) in canonical:
                    claimed.add(id(param))
                    layer.param_names.append(canonical[id(param)])
            layers.append(layer)
            by_name[name] = layer

    if config.norm_follow == "previous":
        previous: str | None = None
        for name, module in modules:
            if name in candidate_names:
                previous = name
            elif is_norm(module) and previous in by_name:
                for param in module.parameters(recurse=False):
                    if param.requires_grad and id(param) not in claimed and id(param) in canonical:
                        claimed.add(id(param))
                        by_name[previous].param_names.append(canonical[id(param)])

    return LayerPlan(layers, skipped)
