"""Independent expectations shared by the tests (plain NumPy, written from the paper's formulas)."""

from __future__ import annotations

import numpy as np

# The library's noise floor in float32 and float64 (hf_tempbalance.spectral.noise_floor), restated.
NOISE_FLOOR = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 2e-6 * 2.0**-52 / 2.0**-23}


def numpy_hill(eigs, include_xmin: bool = True, rtol: float | None = None) -> float:
    """PL_Alpha_Hill, Eq. (3) with k = n/2, on every eigenvalue (or those above ``rtol·λ_max``).

    Sorted ascending λ_1..λ_N (1-based), xmin index i = floor(N/2) (0-based), so
    λ_min = λ_(i+1) and the tail has N - i points. Paper form:
    alpha = 1 + k / Σ_{j=1..k} ln(λ_(N-j+1) / λ_min) over the k points above λ_min (textbook),
    while the authors put the tail size N - i (λ_min included) in the numerator.
    Returns nan with fewer than 2 eigenvalues, or when λ_min is at the noise floor.
    """
    floor = NOISE_FLOOR[np.asarray(eigs).dtype if np.asarray(eigs).dtype == np.float32 else np.dtype(np.float64)]
    lam = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    if lam.size == 0:
        return float("nan")
    if rtol:
        lam = lam[lam > rtol * lam[-1]]
    big_n = len(lam)
    if big_n < 2:
        return float("nan")
    i = big_n // 2
    lam_min = lam[i]
    if lam_min <= floor * lam[-1]:
        return float("nan")
    above = lam[i + 1:]  # k = N - i - 1 points strictly above λ_min
    log_sum = float(np.sum(np.log(above / lam_min)))
    numerator = (big_n - i) if include_xmin else len(above)
    return 1.0 + numerator / log_sum


def numpy_ks_hill(eigs, floor: float = NOISE_FLOOR[np.dtype(np.float32)]) -> tuple[float, float]:
    """``(alpha, xmin)`` of the KS-xmin fit (Clauset et al. 2009), as weightwatcher fits it.

    Every eigenvalue above ``floor · λ_max`` may start the tail; for a start ``x_i`` with the
    ``n`` points ``x >= x_i``, alpha = 1 + n / Σ ln(x / x_i) and the KS distance is
    max |(rank / n) - (1 - (x / x_i)^(1 - alpha))| over the tail; the start with the smallest
    distance wins (the first one on ties).
    """
    return _numpy_ks_over(np.sort(np.asarray(eigs, dtype=np.float64).ravel()), floor, None)


def numpy_fix_finger_hill(eigs, floor: float = NOISE_FLOOR[np.dtype(np.float32)]) -> tuple[float, float]:
    """``(alpha, xmin)`` of the fix-finger fit (Yang et al. 2023): the KS fit above, with the tail
    start limited to eigenvalues within [0.95, 1.5] times the histogram peak of log10 λ (100 equal
    bins from the smallest eigenvalue above ``floor · λ_max`` to the largest; the peak is the left
    edge of the fullest bin); with none in that window, the eigenvalue nearest the peak."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    log10 = np.log10(lam[lam > floor * lam[-1]])
    counts, edges = np.histogram(log10, bins=100, range=(log10[0], log10[-1]))
    peak = 10.0 ** edges[int(np.argmax(counts))]
    starts = [i for i in range(len(lam) - 1) if lam[i] > floor * lam[-1]]
    window = [i for i in starts if 0.95 * peak <= lam[i] <= 1.5 * peak]
    return _numpy_ks_over(lam, floor, window or [min(starts, key=lambda i: abs(lam[i] - peak))])


def _numpy_ks_over(lam: np.ndarray, floor: float, starts) -> tuple[float, float]:
    best = (float("inf"), float("nan"), float("nan"))
    for i in range(len(lam) - 1) if starts is None else starts:
        if lam[i] <= floor * lam[-1]:
            continue
        tail = lam[i:]
        n = len(tail)
        alpha = 1.0 + n / float(np.sum(np.log(tail / lam[i])))
        if not alpha > 1:
            continue
        dist = float(np.max(np.abs(np.arange(n) / n - (1.0 - (tail / lam[i]) ** (1.0 - alpha)))))
        if dist < best[0]:
            best = (dist, alpha, float(lam[i]))
    return best[1], best[2]
