"""Plain NumPy Hill fits with explicit loops: the obviously-correct twin of :mod:`hill`.

Slow (the KS search is O(N²) in Python), used only by tests and benchmarks to check the
vectorised torch implementation.
"""

from __future__ import annotations

import math

import numpy as np

from .hill import FLAT_LOG_SPREAD

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
    eigs, xmin: str = "median", rtol: float = 2e-6, include_xmin: bool = True
) -> float:
    """Same contract as :func:`hf_tempbalance.spectral.hill.hill_alpha`, in float64 NumPy."""
    eigs = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    eigs = eigs[eigs > eigs[-1] * rtol]
    n_total = len(eigs)
    if n_total < 2:
        return math.nan
    if xmin == "median":
        return _alpha(eigs, n_total // 2, include_xmin)

    candidates = list(range(n_total - 1))
    if xmin == "fix_finger":
        log10 = np.log10(eigs)
        counts, edges = np.histogram(log10, bins=100, range=(log10[0], log10[-1]))
        peak = 10.0 ** edges[int(np.argmax(counts))]
        window = [i for i in candidates if 0.95 * peak <= eigs[i] <= 1.5 * peak]
        candidates = window or [int(np.argmin(np.abs(eigs[:-1] - peak)))]
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
