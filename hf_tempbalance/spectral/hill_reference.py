"""Plain NumPy Hill fits with explicit loops: the obviously-correct twin of :mod:`hill`.

Slow (the KS search is O(N²) in Python), used only by tests and benchmarks to check the
vectorised torch implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .hill import FLAT_LOG_SPREAD, noise_floor

__all__ = ["hill_alpha_reference"]


def _alpha(eigs: np.ndarray, i: int, include_xmin: bool) -> float:
    tail = eigs[i:]
    n = len(tail)
    denom = float(np.sum(np.log(tail)) - n * math.log(eigs[i]))
    k = n if include_xmin else n - 1
    return 1.0 + k / denom if denom > n * FLAT_LOG_SPREAD else math.inf


def _ks(eigs: np.ndarray, i: int, alpha: float) -> float:
    tail = eigs[i:]
    n = len(tail)
    worst = 0.0
    for rank, value in enumerate(tail):
        fitted = 1.0 - (value / eigs[i]) ** (1.0 - alpha)
        worst = max(worst, abs(rank / n - fitted))
    return worst


def hill_alpha_reference(
    eigs, xmin: str = "median", rtol: float | None = None, include_xmin: bool = True
) -> float:
    """Same contract as :func:`hf_tempbalance.spectral.hill.hill_alpha`, in float64 NumPy."""
    eigs = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    if rtol:
        eigs = eigs[eigs > eigs[-1] * rtol]
    n_total = len(eigs)
    if n_total < 2:
        return math.nan
    floor = noise_floor(torch.float64) * eigs[-1]
    if xmin == "median":
        i = n_total // 2
        return _alpha(eigs, i, include_xmin) if eigs[i] > floor else math.nan

    candidates = [i for i in range(n_total - 1) if eigs[i] > floor]
    if xmin == "fix_finger":
        log10 = np.log10(eigs[eigs > floor])
        counts, edges = np.histogram(log10, bins=100, range=(log10[0], log10[-1]))
        peak = 10.0 ** edges[int(np.argmax(counts))]
        window = [i for i in candidates if 0.95 * peak <= eigs[i] <= 1.5 * peak]
        candidates = window or [min(candidates, key=lambda i: abs(eigs[i] - peak))]
    elif xmin != "ks":
        raise ValueError(xmin)

    best_alpha, best_dist = math.nan, math.inf
    for i in candidates:
        alpha = _alpha(eigs, i, include_xmin)
        if not (math.isfinite(alpha) and alpha > 1):
            continue
        dist = _ks(eigs, i, alpha)
        if dist < best_dist:
            best_alpha, best_dist = alpha, dist
    return best_alpha
