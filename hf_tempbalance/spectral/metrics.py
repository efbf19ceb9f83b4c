"""Layer-quality metrics computed from an ESD, by name, with a small registry.

Every metric maps the ascending, zero-filtered eigenvalues of one layer to a 0-dim tensor (so
that a whole model is evaluated without a host sync per layer):

=================  ===========================================  ============================
name               formula                                      paper
=================  ===========================================  ============================
``alpha_hill``     Hill estimate of the tail exponent (Eq. 3)   PL_Alpha_Hill, default
``spectral_norm``  λ_max  (= σ_max², squared weight units)      SpectralNorm, Fig. 7
``alpha_weighted`` α · log10 λ_max                              AlphaWeighted, Fig. 7
``stable_rank``    Σ λ / λ_max                                  (HT-SR diagnostics)
=================  ===========================================  ============================

Add one with :func:`register_metric`; it then works everywhere a metric name is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .esd import batched_esd, one_intra_op_thread
from .hill import hill_alpha_tensor, sorted_eigs

__all__ = ["MetricFn", "register_metric", "available_metrics", "compute_metric", "metric_table",
           "layer_metrics"]

#: ``fn(eigs, xmin=..., rtol=..., include_xmin=...) -> 0-dim tensor``; ``eigs`` sorted ascending,
#: non-negative, zeros NOT removed (each metric decides; see :mod:`~hf_tempbalance.spectral.hill`).
MetricFn = Callable[..., torch.Tensor]

_REGISTRY: dict[str, MetricFn] = {}


def register_metric(name: str, fn: MetricFn | None = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name`` (usable as a decorator). Re-registering needs ``overwrite``."""

    def _register(f: MetricFn) -> MetricFn:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"metric {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = f
        return f

    return _register(fn) if fn is not None else _register


def available_metrics() -> tuple[str, ...]:
    """Names accepted by :func:`compute_metric` and ``TempBalanceConfig.metric``."""
    return tuple(_REGISTRY)


def _top(eigs: torch.Tensor) -> torch.Tensor:
    """λ_max, or nan for an empty or all-zero spectrum (a dead layer has no scale)."""
    if eigs.numel() == 0:
        return torch.tensor(float("nan"), dtype=eigs.dtype, device=eigs.device)
    return torch.where(eigs[-1] > 0, eigs[-1], torch.full_like(eigs[-1], float("nan")))


@register_metric("alpha_hill")
def _alpha_hill(eigs: torch.Tensor, xmin: str = "median", rtol: float | None = None,
                include_xmin: bool = True, **_) -> torch.Tensor:
    return hill_alpha_tensor(eigs, xmin, rtol=rtol, include_xmin=include_xmin)


@register_metric("spectral_norm")
def _spectral_norm(eigs: torch.Tensor, **_) -> torch.Tensor:
    return _top(eigs)


@register_metric("alpha_weighted")
def _alpha_weighted(eigs: torch.Tensor, xmin: str = "median", rtol: float | None = None,
                    include_xmin: bool = True, **_) -> torch.Tensor:
    return hill_alpha_tensor(eigs, xmin, rtol=rtol, include_xmin=include_xmin) * torch.log10(_top(eigs))


@register_metric("stable_rank")
def _stable_rank(eigs: torch.Tensor, **_) -> torch.Tensor:
    return eigs.sum() / _top(eigs)


def compute_metric(
    eigs: torch.Tensor,
    metric: str = "alpha_hill",
    *,
    xmin: str = "median",
    rtol: float | None = None,
    include_xmin: bool = True,
) -> torch.Tensor:
    """Value of ``metric`` for one ESD, as a 0-dim tensor; ``nan`` when it cannot be computed."""
    try:
        fn = _REGISTRY[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; available: {available_metrics()}") from None
    return fn(sorted_eigs(eigs), xmin=xmin, rtol=rtol, include_xmin=include_xmin)


def metric_table(eig_list: Sequence[torch.Tensor], metrics: Sequence[str], **fit: Any,
                 ) -> list[list[float]]:
    """``[[metric value per name] per ESD]`` as Python floats: the fits run where the ESDs are,
    and the values come to the host in one transfer per device (normally one), not per layer.
    ``fit``: the keyword arguments of :func:`compute_metric` (``xmin``, ``rtol``, ...)."""
    # Fits are many small ops: on CPU, op-level threading only adds barriers (see esd.py).
    on_cpu = all(e.device.type == "cpu" for e in eig_list)
    with one_intra_op_thread() if on_cpu else nullcontext():
        rows = [torch.stack([compute_metric(e, m, **fit).to(torch.float64) for m in metrics])
                for e in eig_list]
    by_device: dict[torch.device, list[int]] = {}
    for i, row in enumerate(rows):
        by_device.setdefault(row.device, []).append(i)
    table = [[float("nan")] * len(metrics) for _ in rows]
    for idxs in by_device.values():
        for i, values in zip(idxs, torch.stack([rows[i] for i in idxs]).cpu().tolist()):
            table[i] = values
    return table


def layer_metrics(
    layers: Sequence[nn.Module | torch.Tensor],
    metrics: Sequence[str] = ("alpha_hill",),
    *,
    xmin: str = "median",
    dtype: torch.dtype | str = torch.float32,
    rtol: float | None = None,
    include_xmin: bool = True,
    scales: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Metrics of many layers: batched ESDs, per-layer fits on device, ONE host sync at the end.

    ``scales`` multiplies each layer's eigenvalues before the metrics (the authors' ``conv_norm``:
    their conv ESDs are those of √0.5·W); scale-free metrics such as alpha do not change.

    Returns ``{metric: [value per layer]}`` as Python floats (nan where a fit is impossible).
    """
    eig_list = batched_esd(layers, dtype=dtype)
    if scales is not None:
        eig_list = [e if s == 1 else e * s for e, s in zip(eig_list, scales, strict=True)]
    table = metric_table(eig_list, metrics, xmin=xmin, rtol=rtol, include_xmin=include_xmin)
    return {m: [row[j] for row in table] for j, m in enumerate(metrics)}
