"""A model's module tree as data, rebuilt without the code that defined it; seeded weights.

TempBalance reads only ``named_modules()``, the module types and the weights, so a *skeleton*
with the same names, types, parameter shapes and ties as the authors' models gets the same
treatment from the library as their models do, without their code in this project.
:func:`describe` (used by ``make_fixture.py`` on the authors' models) records the tree;
:func:`rebuild` (used by the tests) makes it again from the record.

:func:`seeded_weights` fills a tree with weights that depend only on the seed, the parameter
names and shapes (``torch.Generator`` streams, stable across torch releases), so the fixture
script and the tests get bit-identical tensors:

* ``init``: every weight uniform in ±1/√fan_in, PyTorch's default for Linear/Conv layers.
* ``heavy_tailed``: the init plus Student-t entries with 2-6 degrees of freedom (varying by
  layer), the heavy-tailed spectra that training produces (Martin & Mahoney) and which spread
  the layers' alphas, as after training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["describe", "rebuild", "seeded_weights", "STATES"]

STATES = ("init", "heavy_tailed")

# Module types rebuilt as themselves; anything else becomes a plain container.
_TYPES = ("Conv2d", "Linear", "BatchNorm2d", "LayerNorm", "Embedding")


def describe(model: nn.Module) -> dict[str, Any]:
    """The record of ``model``'s module tree: names, types, parameter shapes and ties."""
    modules = []
    first_name: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, module in model.named_modules():
        params = {}
        for pname, p in module._parameters.items():
            if p is None:
                continue
            full = f"{name}.{pname}" if name else pname
            if id(p) in first_name:
                ties[full] = first_name[id(p)]
            else:
                first_name[id(p)] = full
            params[pname] = list(p.shape)
        kind = type(module).__name__
        modules.append({"name": name, "type": kind if kind in _TYPES else "Module",
                        "params": params})
    return {"modules": modules, "ties": ties}


def _make(record: dict[str, Any]) -> nn.Module:
    kind, params = record["type"], record["params"]
    if kind == "Conv2d":
        out, inp, kh, kw = params["weight"]
        return nn.Conv2d(inp, out, (kh, kw), bias="bias" in params)
    if kind == "Linear":
        out, inp = params["weight"]
        return nn.Linear(inp, out, bias="bias" in params)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(params["weight"][0])
    if kind == "LayerNorm":
        return nn.LayerNorm(params["weight"])
    if kind == "Embedding":
        return nn.Embedding(*params["weight"])
    module = nn.Module()
    for pname, shape in params.items():
        module.register_parameter(pname, nn.Parameter(torch.zeros(shape)))
    return module


def rebuild(record: dict[str, Any]) -> nn.Module:
    """A module tree with the recorded names, types, shapes and ties (weights: see
    :func:`seeded_weights`)."""
    made: dict[str, nn.Module] = {}
    for item in record["modules"]:
        module = _make(item)
        name = item["name"]
        if name:
            parent, _, child = name.rpartition(".")
            made[parent].add_module(child, module)
        made[name] = module
    root = made[""]
    for tied, source in record["ties"].items():
        owner, _, pname = tied.rpartition(".")
        setattr(root.get_submodule(owner), pname, root.get_parameter(source))
    return root


def _fan_in(shape: torch.Size) -> int:
    fan = 1
    for d in shape[1:]:
        fan *= d
    return max(fan, 1)


@torch.no_grad()
def seeded_weights(model: nn.Module, seed: int, state: str) -> nn.Module:
    """Overwrite every parameter of ``model`` in place with seeded values (see module docstring)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    for index, p in enumerate(model.parameters()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        shape = p.shape
        if p.ndim == 1:
            values = 1.0 + 0.1 * (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1)
        else:
            bound = _fan_in(shape) ** -0.5
            values = bound * (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1)
            if state == "heavy_tailed":
                dof = 2 + index % 5
                normal = torch.randn(shape, generator=gen, dtype=torch.float64)
                chi2 = sum(torch.randn(shape, generator=gen, dtype=torch.float64) ** 2
                           for _ in range(dof))
                values = values + 0.5 * bound * normal / (chi2 / dof).sqrt()
        p.copy_(values.to(p.dtype))
    return model
