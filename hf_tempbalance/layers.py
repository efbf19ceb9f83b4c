"""Layer discovery: which modules TempBalance balances, and which parameters follow each one.

Walks ``model.named_modules()`` in registration order (the order the authors' code uses):

1. *Candidates* are modules of the configured kinds: ``linear`` (``nn.Linear`` and subclasses,
   Transformers' ``Conv1D``, the packed q/k/v input projection of ``nn.MultiheadAttention``),
   ``conv`` (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``), ``embedding``
   (``nn.Embedding``). Under ``linear`` too, each 3-D parameter of a Transformers mixture-of-
   experts ``...Experts`` module (``gate_up_proj``, ``down_proj``: one matrix per expert) is a
   candidate named ``<module>.<parameter>`` (:class:`~hf_tempbalance.spectral.matrices.ExpertStack`),
   its ``<parameter>_bias`` following it; so is an MoE ``...Router`` that keeps its
   ``(num_experts, hidden)`` gate as a plain 2-D ``weight`` (as an ``nn.Linear`` gate would be).
   A PEFT LoRA layer (``base_layer`` plus ``lora_A`` / ``lora_B`` dicts, see
   :func:`~hf_tempbalance.spectral.matrices.is_lora_layer`) is one ``linear`` candidate named like
   the PEFT module, :class:`~hf_tempbalance.spectral.matrices.LoraAdapted`: its ESD is that of
   ``W0 + s·B·A``, its A/B (and DoRA magnitude) parameters follow it, and nothing inside it (the
   frozen base, the r-sized ``lora_A`` / ``lora_B``) is a candidate. LoRA on a non-linear base or
   a variant other than DoRA is skipped with the reason; a quantized base raises ``ValueError``.
2. With ``exclude_first_last`` the first and last candidate are dropped (authors' choice: the stem
   and the classifier have few eigenvalues).
3. Name filters (``include``/``exclude`` regexes, ``re.search``), then frozen weights, weights tied
   to an earlier balanced module, and ESDs smaller than ``min_eigs`` are skipped, each with a
   recorded reason (:attr:`LayerPlan.skipped`).
4. Norm modules (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, any ``*RMSNorm``) take the
   multiplier of one candidate, if that candidate is balanced, else stay at the base LR.
   Which one (``norm_follow``):

   * ``"authors"`` (default; the rules of the authors' runs): a BatchNorm follows the candidate
     named like it with ``bn`` replaced by ``conv`` (their CIFAR ``batchnorm_type='name'``:
     ``layer1.0.bn1`` -> ``layer1.0.conv1``; a ResNet shortcut BN ``shortcut.1`` has no such
     partner and stays at the base LR; a pre-activation WRN block's ``bn1`` follows the
     ``conv1`` registered after it). Any other norm follows the candidate registered just
     before it, provided no other such norm came in between (their LM's ``--layernorm True``).
   * ``"previous"``: the candidate registered just before it (conv -> BatchNorm nets named
     otherwise, e.g. ``features.0``/``features.1``, and post-LN transformers).
   * ``"next"``: the candidate registered just after it (pre-LN blocks that register each norm
     before the layer it feeds, as GPT-2 and timm's ViT do).

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
from .spectral.matrices import (
    ExpertStack,
    LoraAdapted,
    is_lora_layer,
    is_transposed_conv1d,
    num_eigs,
    weight_name,
)

__all__ = ["BalancedLayer", "LayerPlan", "discover_layers", "is_norm", "kind_of", "weight_sources",
           "is_experts", "expert_stacks"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


def is_norm(module: nn.Module) -> bool:
    """BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm, including framework-specific ones."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith(("RMSNorm", "LayerNorm"))


def _is_router(module: nn.Module) -> bool:
    """A mixture-of-experts router written without ``nn.Linear`` (Transformers 5's
    ``...Router``): a 2-D ``weight`` parameter ``(num_experts, hidden)`` used as a linear map."""
    weight = module._parameters.get("weight")
    return type(module).__name__.endswith("Router") and weight is not None and weight.ndim == 2


def kind_of(module: nn.Module) -> str | None:
    """The discovery kind of a module: ``linear``, ``conv``, ``embedding`` or None."""
    if isinstance(module, nn.Linear | nn.MultiheadAttention | LoraAdapted) \
            or is_transposed_conv1d(module) or _is_router(module):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):  # Conv1/2/3d and ConvTranspose1/2/3d
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def weight_sources(module: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors a module's weight is made of: the weight parameter itself, or the
    originals of its parametrization; empty for a weight that is neither. For a LoRA-adapted
    layer: its adapters' ``A``, ``B`` (and DoRA magnitude) parameters."""
    if isinstance(module, LoraAdapted):
        return module.adapter_parameters()
    name = weight_name(module)
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name].parameters())
    weight = getattr(module, name, None)
    return [weight] if isinstance(weight, nn.Parameter) else []


def is_experts(module: nn.Module) -> bool:
    """A Transformers mixture-of-experts ``...Experts`` module (its experts in 3-D parameters)."""
    return type(module).__name__.endswith("Experts") and any(
        p.ndim == 3 for p in module.parameters(recurse=False))


def expert_stacks(module: nn.Module) -> list[tuple[str, ExpertStack]]:
    """``(name, ExpertStack)`` for each 3-D parameter of an experts module, in registration order."""
    return [(pname, ExpertStack(module, pname))
            for pname, p in module.named_parameters(recurse=False) if p.ndim == 3]


def _companions(layer: nn.Module) -> list[nn.Parameter]:
    """Parameters besides the weight that take the layer's LR: its own (a bias), or for an expert
    stack ``proj`` the owner's ``proj_bias``-style parameters (``proj`` followed by ``_``)."""
    if isinstance(layer, ExpertStack):
        return [p for pname, p in layer.owner.named_parameters(recurse=False)
                if pname.startswith(layer.param_name + "_")]
    if isinstance(layer, LoraAdapted):
        return layer.companion_parameters()
    return list(layer.parameters(recurse=False))


@dataclass
class BalancedLayer:
    """A module whose LR TempBalance sets, with every parameter that follows its multiplier."""

    name: str
    module: nn.Module
    num_eigs: int
    param_names: list[str] = field(default_factory=list)


@dataclass
class LayerPlan:
    """Result of discovery: balanced layers in registration order, why others were skipped, and
    every candidate (balanced or not) in registration order."""

    layers: list[BalancedLayer]
    skipped: dict[str, str]
    candidates: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def owner_of(self) -> dict[str, str]:
        """Parameter name -> name of the balanced layer that owns it."""
        return {p: layer.name for layer in self.layers for p in layer.param_names}

    def skipped_summary(self, most: int = 3) -> str:
        """The commonest reasons for skipping, e.g. ``"8 eigenvalues < min_eigs=50 (12 layers,
        e.g. 'h.0.q.lora_A'); frozen weight (3 layers, ...)"``; reasons that differ only in their
        numbers count as one."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(re.sub(r"\d+", "#", reason), []).append(name)
        ranked = sorted(by_reason.values(), key=len, reverse=True)[:most]
        return "; ".join(f"{self.skipped[names[0]]} ({len(names)} layer(s), e.g. {names[0]!r})"
                         for names in ranked)


def discover_layers(model: nn.Module, config: TempBalanceConfig) -> LayerPlan:
    """Find the balanced layers of ``model`` under ``config`` (see the module docstring)."""
    # Canonical parameter names, deduplicated by identity (tied weights keep their first name).
    canonical: dict[int, str] = {}
    for pname, param in model.named_parameters(remove_duplicate=True):
        canonical.setdefault(id(param), pname)

    modules = list(model.named_modules())
    candidates: list[tuple[str, nn.Module]] = []
    # module name -> its first / last candidate (a module of expert stacks has several)
    first_candidate: dict[str, str] = {}
    last_candidate: dict[str, str] = {}
    adapted: set[str] = set()  # LoRA layers: their inner modules are no candidates
    for name, m in modules:
        if any(name.startswith(prefix) for prefix in adapted):
            continue
        if is_lora_layer(m):
            adapted.add(f"{name}." if name else "")
            if "linear" not in config.layer_types:
                continue
            found: list[tuple[str, nn.Module]] = [(name, LoraAdapted(m))]
        elif kind_of(m) in config.layer_types and (
                parametrize.is_parametrized(m, weight_name(m))  # (reading it could change it)
                or isinstance(getattr(m, weight_name(m), None), torch.Tensor)):
            found = [(name, m)]
        elif "linear" in config.layer_types and is_experts(m):
            found = [(f"{name}.{pname}" if name else pname, stack) for pname, stack in expert_stacks(m)]
        else:
            continue
        candidates += found
        first_candidate[name], last_candidate[name] = found[0][0], found[-1][0]
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

    def claim(layer: BalancedLayer, params) -> None:
        """Give ``layer`` each trainable parameter no layer has yet (once, by identity)."""
        for param in params:
            if param.requires_grad and id(param) not in claimed and id(param) in canonical:
                claimed.add(id(param))
                layer.param_names.append(canonical[id(param)])

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
        elif isinstance(module, LoraAdapted) and (why := module.unsupported()) is not None:
            skipped[name] = why
        elif not sources:
            skipped[name] = ("weight is neither a parameter nor parametrized (the deprecated "
                             "torch.nn.utils.weight_norm? use torch.nn.utils.parametrizations."
                             "weight_norm)")
        elif not any(p.requires_grad for p in sources):
            skipped[name] = "frozen weight"
        elif tied is not None:
            skipped[name] = f"weight tied to already balanced {canonical.get(id(tied), '?')}"
        elif isinstance(module, LoraAdapted) and (quantized := module.quantized()):
            raise ValueError(
                f"{name}: the LoRA base weight is quantized ({quantized}, e.g. QLoRA with "
                "bitsandbytes), and TempBalance computes spectra of W0 + s·B·A only from "
                "unquantized weights (dequantizing every layer at each update is not supported). "
                "Load the base model in bf16/fp16/fp32 (no quantization_config), or leave these "
                "layers out with TempBalanceConfig(exclude=[...]).")
        elif (n := num_eigs(module)) < config.min_eigs:
            skipped[name] = f"{n} eigenvalues < min_eigs={config.min_eigs}"
        else:
            layer = BalancedLayer(name, module, n)
            claim(layer, [*sources, *_companions(module)])
            layers.append(layer)
            by_name[name] = layer

    if config.norm_follow != "none":
        follows = _norm_partners(modules, config.norm_follow, first_candidate, last_candidate)
        for name, module in modules:
            if follows.get(name) in by_name:
                claim(by_name[follows[name]], module.parameters(recurse=False))

    return LayerPlan(layers, skipped, candidates)


def _norm_partners(modules: list[tuple[str, nn.Module]], rule: str, first_candidate: dict[str, str],
                   last_candidate: dict[str, str]) -> dict[str, str | None]:
    """Norm module name -> the candidate it follows under ``rule`` (see the module docstring)."""
    follows: dict[str, str | None] = {}
    if rule == "next":
        nearest = None
        for name, module in reversed(modules):
            if name in first_candidate:
                nearest = first_candidate[name]
            elif is_norm(module):
                follows[name] = nearest
        return follows
    candidate_names = set(last_candidate.values()) | set(first_candidate.values())
    nearest = None
    for name, module in modules:
        if name in last_candidate:
            nearest = last_candidate[name]
        elif rule == "authors" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            partner = name.replace("bn", "conv")
            follows[name] = partner if partner in candidate_names else None
        elif is_norm(module):
            follows[name] = nearest
            if rule == "authors":
                nearest = None  # a second norm in a row follows nothing
    return follows
