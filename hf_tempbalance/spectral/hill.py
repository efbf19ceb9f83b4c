r"""Power-law tail fits of an ESD with the Hill estimator (PL_Alpha_Hill, paper Eq. 3).

For ascending eigenvalues :math:`\lambda_0 \le \dots \le \lambda_{N-1}` and a tail start index
:math:`i` (so :math:`\lambda_{\min} = \lambda_i`), with :math:`n = N - i` tail points,

.. math::  \alpha = 1 + \frac{n}{\sum_{j \ge i} \ln \lambda_j - n \ln \lambda_i}.

This counts :math:`\lambda_{\min}` itself among the ``n`` points, as the TempBalance authors' code
does (``include_xmin=True``, default, so numbers are comparable with theirs); the textbook Hill
estimator uses ``n - 1`` points strictly above :math:`\lambda_{\min}` (``include_xmin=False``).

Choice of :math:`\lambda_{\min}` (``xmin``):

* ``"median"`` (paper default): :math:`i = \lfloor N/2 \rfloor` (the authors' index), so the tail
  holds :math:`\lceil N/2 \rceil` points with :math:`\lambda_{\min}`, i.e. ``k = ceil(N/2) - 1``
  points above it in Eq. 3's notation (the paper writes ``k = n/2``). Cheap and stable; the paper's
  Fig. 8 shows it trains best.
* ``"ks"`` (goodness of fit, Clauset et al. 2009): the :math:`\lambda_i` minimising the
  Kolmogorov-Smirnov distance between the empirical tail CDF and the fitted power law, over every
  candidate ``i <= N - 2``. Vectorised over candidates (chunked to bound memory).
* ``"fix_finger"`` (Yang et al. 2023): the KS search restricted to candidates within
  ``[0.95, 1.5]`` times the peak of the histogram (100 bins) of :math:`\log_{10}\lambda`. The
  authors' code compares a log10 bound with linear eigenvalues; we compare like with like.

Every eigenvalue counts, as in the authors' runs (their ``filter_zeros=False``): zeros below the
median only fill the body of the spectrum, and the median index is :math:`\lfloor N/2 \rfloor` over
all :math:`N` eigenvalues. A fit whose tail would start at or below the eigensolver's noise floor
(:math:`\lambda_{\min} \le` :func:`noise_floor` :math:`\cdot\lambda_{\max}`, 2e-6 in float32: an all-zero layer,
rank below half, a LoRA ``B`` still at zero) has no power-law tail to measure and is invalid
(alpha = nan); ``ks``/``fix_finger`` consider only tail starts above that floor. ``rtol`` is an
opt-in filter: it drops :math:`\lambda \le \text{rtol}\cdot\lambda_{\max}` first (relative, so
the fit stays scale-free, unlike the authors' optional absolute ``1e-5`` cut). A tail whose mean
log-spread is at most :data:`FLAT_LOG_SPREAD` is flat (alpha = inf; e.g. an orthogonal matrix,
whose float32 spectrum is 1 ± rounding noise).

The loop-based NumPy version these must agree with is :mod:`hill_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "HillFit",
    "XMIN_METHODS",
    "NOISE_FLOOR",
    "noise_floor",
    "FLAT_LOG_SPREAD",
    "filter_eigs",
    "hill_fit",
    "hill_alpha",
    "hill_alpha_tensor",
]

XMIN_METHODS = ("median", "fix_finger", "ks")

#: Relative level at or below which a float32 eigenvalue cannot be told from zero: a float32
#: Gram-matrix ``eigvalsh`` leaves rounding noise of at most 4.2e-7·λ_max on exact zeros (measured
#: for d up to 4096). Nothing is filtered at this level; a tail may not start at or below it.
#: float64 eigenvalues get the same margin over their own rounding (:func:`noise_floor`).
NOISE_FLOOR = 2e-6


def noise_floor(dtype: torch.dtype) -> float:
    """:data:`NOISE_FLOOR` scaled to the machine epsilon of ``dtype`` (3.7e-15 for float64)."""
    return NOISE_FLOOR * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps

#: Mean log-spread ``(1/n) Σ ln(λ_j / λ_min)`` of a tail below which it counts as flat (alpha =
#: inf). A float32 Gram ``eigvalsh`` of an orthogonal matrix leaves a spread of 5e-7 to 2.5e-6
#: (d = 64..2048, measured), which would otherwise read as alpha ~ 1e6 and, being finite, push
#: every other layer to s1 or s2. Any alpha above ``1 + 1 / FLAT_LOG_SPREAD`` = 1e4 is noise.
FLAT_LOG_SPREAD = 1e-4

# Candidates x eigenvalues elements per KS chunk (16 Mi float64 = 128 MiB).
_KS_CHUNK_ELEMENTS = 1 << 24
_FIX_FINGER_BINS = 100
_FIX_FINGER_WINDOW = (0.95, 1.5)


@dataclass(frozen=True)
class HillFit:
    """Result of a tail fit.

    Attributes:
        alpha: PL_Alpha_Hill (dimensionless; ``nan`` when no fit is possible, ``inf`` when the
            tail is flat, e.g. an orthogonal matrix).
        xmin: :math:`\\lambda_{\\min}`, start of the fitted tail (squared weight units).
        n_tail: number of eigenvalues in the tail (``xmin`` included).
        ks_distance: KS distance of the fit (only computed for ``ks``/``fix_finger``, else nan).
        num_eigs: eigenvalues the fit used (all of them, or those above ``rtol · λ_max``).
    """

    alpha: float
    xmin: float
    n_tail: int
    ks_distance: float
    num_eigs: int


def filter_eigs(eigs: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Sorted finite eigenvalues, without those ``<= rtol · λ_max`` when ``rtol`` is given."""
    eigs = sorted_eigs(eigs)
    return eigs[_kept(eigs, rtol)]


def sorted_eigs(eigs: torch.Tensor) -> torch.Tensor:
    """Eigenvalues sorted ascending as a float tensor, non-finite values replaced by 0."""
    eigs = torch.as_tensor(eigs)
    if not eigs.is_floating_point():
        eigs = eigs.double()
    # Non-finite values (from non-finite weights) count as zeros: the layer gets no fit.
    eigs = torch.where(torch.isfinite(eigs), eigs, torch.zeros_like(eigs))
    return torch.sort(eigs.reshape(-1)).values


def _kept(eigs: torch.Tensor, rtol: float | None) -> torch.Tensor:
    """Mask of the eigenvalues the fit uses: all of them, or with ``rtol`` those above
    ``rtol · λ_max`` (a suffix of the sorted eigenvalues)."""
    if not rtol or eigs.numel() == 0:
        return torch.ones(eigs.shape, dtype=torch.bool, device=eigs.device)
    return eigs > eigs[-1] * rtol


def _alpha_at(log_eigs: torch.Tensor, start: torch.Tensor, include_xmin: bool) -> torch.Tensor:
    """Hill alpha for each tail start index in ``start`` (vectorised; no host sync)."""
    n_total = log_eigs.numel()
    suffix = torch.flip(torch.cumsum(torch.flip(log_eigs, [0]), 0), [0])
    n = (n_total - start).to(log_eigs.dtype)
    denom = suffix[start] - n * log_eigs[start]
    k = n if include_xmin else n - 1
    # A tail flatter than the eigensolver can resolve is flat: inf, not 1 + n / rounding noise.
    flat = denom <= n * FLAT_LOG_SPREAD
    return torch.where(flat, torch.full_like(denom, float("inf")), 1.0 + k / denom)


def _ks_distances(log_eigs: torch.Tensor, starts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """KS distance of the power-law fit starting at each index in ``starts`` (chunked)."""
    n_total = log_eigs.numel()
    cols = torch.arange(n_total, device=log_eigs.device)
    chunk = max(1, _KS_CHUNK_ELEMENTS // max(n_total, 1))
    out = []
    for lo in range(0, starts.numel(), chunk):
        s = starts[lo:lo + chunk, None]
        a = alphas[lo:lo + chunk, None]
        n = (n_total - s).to(log_eigs.dtype)
        rank = (cols[None, :] - s).to(log_eigs.dtype)
        fitted = 1.0 - torch.exp((1.0 - a) * (log_eigs[None, :] - log_eigs[s]))
        gap = (rank / n - fitted).abs().masked_fill_(cols[None, :] < s, 0.0)
        dist = gap.amax(dim=1)
        good = torch.isfinite(a[:, 0]) & (a[:, 0] > 1)
        out.append(torch.where(good, dist, torch.full_like(dist, float("inf"))))
    return torch.cat(out)


def _fit_tensors(
    eigs: torch.Tensor, xmin: str, include_xmin: bool, rtol: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha, xmin value, tail size, ks distance, kept count) as 0-dim tensors.

    Works on the full sorted spectrum with the (near-)zeros masked out rather than removed, so
    shapes never depend on the data and nothing synchronises with the host on a GPU.
    """
    if xmin not in XMIN_METHODS:
        raise ValueError(f"xmin must be one of {XMIN_METHODS}, got {xmin!r}")
    dtype = torch.float64 if eigs.dtype == torch.float64 else torch.float32
    eigs = sorted_eigs(eigs).to(dtype)
    n_total = eigs.numel()
    device = eigs.device
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)
    if n_total < 2:
        count = torch.tensor(n_total, device=device)
        return nan, nan, count, nan, count
    kept = _kept(eigs, rtol)
    n_kept = kept.sum()
    first = n_total - n_kept  # index of the smallest kept eigenvalue
    # Above the noise floor: the only eigenvalues a tail may start at (and whose logs mean anything).
    signal = eigs > eigs[-1] * noise_floor(dtype)
    log_eigs = torch.where(signal, torch.log(torch.where(signal, eigs, torch.ones_like(eigs))),
                           torch.zeros_like(eigs))
    fittable = n_kept >= 2

    if xmin == "median":
        start = (first + n_kept // 2).clamp_max(n_total - 1).reshape(1)
        alpha = torch.where(fittable & signal[start[0]], _alpha_at(log_eigs, start, include_xmin)[0], nan)
        return alpha, eigs[start[0]], n_total - start[0], nan, n_kept

    starts = torch.arange(n_total - 1, device=device)
    mask = (starts >= first) & signal[:-1]
    if xmin == "fix_finger":
        usable = kept & signal
        first_usable = (n_total - usable.sum()).clamp_max(n_total - 1)
        log10 = log_eigs / torch.log(torch.tensor(10.0, dtype=dtype, device=device))
        lo = log10[first_usable]
        hi = log10[-1]
        width = (hi - lo) / _FIX_FINGER_BINS
        bins = torch.clamp(((log10 - lo) / torch.clamp(width, min=1e-30)).long(), 0, _FIX_FINGER_BINS - 1)
        counts = torch.zeros(_FIX_FINGER_BINS, dtype=torch.long, device=device)
        counts.scatter_add_(0, bins, usable.long())
        peak = 10.0 ** (lo + width * torch.argmax(counts))
        body = eigs[:-1]
        window = mask & (body >= _FIX_FINGER_WINDOW[0] * peak) & (body <= _FIX_FINGER_WINDOW[1] * peak)
        # No candidate in the window: fall back to the usable eigenvalue nearest the peak.
        distance = torch.where(mask, (body - peak).abs(), torch.full_like(body, float("inf")))
        mask = mask & torch.where(window.any(), window, starts == torch.argmin(distance))

    alphas = _alpha_at(log_eigs, starts, include_xmin)
    dists = torch.where(mask, _ks_distances(log_eigs, starts, alphas), torch.full_like(alphas, float("inf")))
    best = torch.argmin(dists)
    alpha = torch.where(fittable & torch.isfinite(dists[best]), alphas[best], nan)
    return alpha, eigs[starts[best]], n_total - starts[best], dists[best], n_kept


def hill_alpha_tensor(
    eigs: torch.Tensor,
    xmin: str = "median",
    *,
    rtol: float | None = None,
    include_xmin: bool = True,
) -> torch.Tensor:
    """PL_Alpha_Hill as a 0-dim tensor on the eigenvalues' device (no host synchronisation)."""
    return _fit_tensors(eigs, xmin, include_xmin, rtol)[0]


def hill_fit(
    eigs: torch.Tensor,
    xmin: str = "median",
    *,
    rtol: float | None = None,
    include_xmin: bool = True,
) -> HillFit:
    """Fit the power-law tail of an ESD; see the module docstring for the formula and ``xmin``.

    Args:
        eigs: eigenvalues of WᵀW (any order, e.g. from :func:`~hf_tempbalance.spectral.esd`).
        xmin: ``"median"``, ``"fix_finger"`` or ``"ks"``.
        rtol: opt-in filter: drop eigenvalues ``<= rtol · λ_max`` first (default: keep all).
        include_xmin: count ``λ_min`` among the tail points (authors' convention).
    """
    alpha, x, n, dist, kept = _fit_tensors(torch.as_tensor(eigs), xmin, include_xmin, rtol)
    return HillFit(float(alpha), float(x), int(n), float(dist), int(kept))


def hill_alpha(
    eigs: torch.Tensor,
    xmin: str = "median",
    *,
    rtol: float | None = None,
    include_xmin: bool = True,
) -> float:
    """PL_Alpha_Hill of an ESD (paper Eq. 3); ``nan`` when the tail would start at the noise floor.

    Scale-free: ``hill_alpha(c * eigs) == hill_alpha(eigs)`` for any ``c > 0``.
    """
    return hill_fit(eigs, xmin, rtol=rtol, include_xmin=include_xmin).alpha
