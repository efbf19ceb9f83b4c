r"""Assignment functions: per-layer metric values -> per-layer LR multipliers ``m_i``.

The learning rate of layer ``i`` at step ``t`` is ``η_t · m_i`` where ``η_t`` is whatever the base
schedule gives. With ``L`` layers whose metric values are ``α_1..α_L``:

* ``linear`` (paper Eq. 2):  :math:`m_i = s_1 + (s_2 - s_1)\frac{\alpha_i - \alpha_{\min}}{\alpha_{\max} - \alpha_{\min}}`,
  so ``m_i ∈ [s1, s2]``. When every α is equal the map is undefined; every layer gets ``1.0``
  (the authors' code silently gives ``s2``).
* ``sqrt`` (App. C):  :math:`m_i = \sqrt{\alpha_i} / \frac1L\sum_j \sqrt{\alpha_j}`  (mean 1).
* ``log2`` (App. C):  :math:`m_i = \log\alpha_i / \frac1L\sum_j \log\alpha_j`  (mean 1; needs α > 1,
  which Hill alphas always are; other values make the layer invalid).
* ``step`` (App. C, as the authors compute it): the layer with the ``k``-th smallest α gets
  :math:`m_i = s_1 + (k-1)\frac{s_2 - s_1}{L}`, so the top layer gets
  :math:`s_1 + (s_2 - s_1)\frac{L-1}{L} < s_2` (ties broken by layer order; all equal: 1.0).

With ``s1 == s2`` every map gives every layer exactly ``s1`` (a constant multiplier; ``1`` is the
identity), the neutral all-equal case included.

Larger metric -> larger multiplier in every case (an under-trained layer learns faster).
All maps are scale-free in α except ``log2``/``sqrt``, which are invariant to scaling of α only
up to their normalisation, as in the paper. Non-finite inputs are the caller's business: pass
only valid layers (the engine keeps invalid layers at their previous multiplier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ASSIGN_FUNCTIONS", "assign_multipliers"]

# Relative spread below which all metric values count as equal (pure rounding noise).
_EQUAL_RTOL = 1e-12


def _all_equal(values: np.ndarray) -> bool:
    lo, hi = values.min(), values.max()
    return bool(hi - lo <= _EQUAL_RTOL * max(abs(hi), abs(lo), 1e-300))


def _linear(values: np.ndarray, s1: float, s2: float) -> np.ndarray:
    if _all_equal(values):
        return np.ones_like(values)
    lo, hi = values.min(), values.max()
    return s1 + (s2 - s1) * (values - lo) / (hi - lo)


def _normalised(transform: Callable[[np.ndarray], np.ndarray]):
    def _assign(values: np.ndarray, s1: float, s2: float) -> np.ndarray:
        f = transform(values)
        return f / f.mean()

    return _assign


def _step(values: np.ndarray, s1: float, s2: float) -> np.ndarray:
    # All equal: no ranking exists (tie-breaking by layer order would invent one).
    if len(values) == 1 or _all_equal(values):
        return np.ones_like(values)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return s1 + ranks * (s2 - s1) / len(values)


ASSIGN_FUNCTIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "linear": _linear,
    "sqrt": _normalised(np.sqrt),
    "log2": _normalised(np.log),
    "step": _step,
}

# Inputs each map is defined on (others are treated as invalid layers by the engine).
_DOMAIN = {"sqrt": lambda v: v > 0, "log2": lambda v: v > 1}


def valid_for(assign: str, values: np.ndarray) -> np.ndarray:
    """Boolean mask of the values ``assign`` can map (finite, and in the map's domain)."""
    ok = np.isfinite(values)
    if assign in _DOMAIN:
        ok &= _DOMAIN[assign](np.where(ok, values, 0.0))
    return ok


def assign_multipliers(values: Sequence[float], assign: str = "linear", s1: float = 0.5,
                       s2: float = 1.5) -> list[float]:
    """Map finite metric values to multipliers with the named function (see module docstring)."""
    try:
        fn = ASSIGN_FUNCTIONS[assign]
    except KeyError:
        raise ValueError(f"unknown assign function {assign!r}; choose from {tuple(ASSIGN_FUNCTIONS)}") from None
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return []
    if not valid_for(assign, arr).all():
        raise ValueError(f"assign={assign!r} got values outside its domain: {arr.tolist()}")
    if s1 == s2:
        return [float(s1)] * arr.size
    return fn(arr, float(s1), float(s2)).tolist()
