"""Assignment functions (paper Eq. 2 and Appendix C) against their formulas."""

from __future__ import annotations

import numpy as np
import pytest

from hf_tempbalance.assign import ASSIGN_FUNCTIONS, assign_multipliers

ALPHAS = [2.3, 4.1, 3.0, 6.5, 2.9, 3.7]


@pytest.mark.parametrize("s1,s2", [(0.5, 1.5), (0.6, 1.4), (1.0, 2.0)])
def test_linear_is_eq2(s1, s2):
    got = assign_multipliers(ALPHAS, "linear", s1, s2)
    lo, hi = min(ALPHAS), max(ALPHAS)
    expected = [s1 + (s2 - s1) * (a - lo) / (hi - lo) for a in ALPHAS]
    assert got == pytest.approx(expected, rel=1e-12)
    assert min(got) == pytest.approx(s1) and max(got) == pytest.approx(s2)
    assert got[ALPHAS.index(lo)] == pytest.approx(s1)
    assert got[ALPHAS.index(hi)] == pytest.approx(s2)
    assert all(s1 <= m <= s2 for m in got)


def test_linear_is_scale_free_in_alpha():
    """Eq. 2 is unchanged by α -> a·α + b (a > 0): the paper's scale-free argument."""
    base = assign_multipliers(ALPHAS, "linear")
    assert assign_multipliers([7.0 * a + 3.0 for a in ALPHAS], "linear") == pytest.approx(base)


def test_sqrt_and_log2_formulas():
    a = np.array(ALPHAS)
    sqrt = assign_multipliers(ALPHAS, "sqrt")
    assert sqrt == pytest.approx((np.sqrt(a) / np.mean(np.sqrt(a))).tolist(), rel=1e-12)
    log2 = assign_multipliers(ALPHAS, "log2")
    assert log2 == pytest.approx((np.log2(a) / np.mean(np.log2(a))).tolist(), rel=1e-12)
    for got in (sqrt, log2):
        assert np.mean(got) == pytest.approx(1.0)
        # larger alpha -> larger LR
        assert np.argsort(got).tolist() == np.argsort(a).tolist()


def test_step_is_rank_based():
    s1, s2 = 0.5, 1.5
    got = assign_multipliers(ALPHAS, "step", s1, s2)
    n = len(ALPHAS)
    for i, alpha in enumerate(ALPHAS):
        k = 1 + sum(other < alpha for other in ALPHAS)  # k-th smallest alpha
        assert got[i] == pytest.approx(s1 + (k - 1) * (s2 - s1) / n)  # the authors' i/n
    # only ranks matter
    assert assign_multipliers([a**3 for a in ALPHAS], "step") == pytest.approx(got)


def test_step_ties_are_broken_by_layer_order():
    got = assign_multipliers([2.0, 3.0, 2.0], "step", 0.5, 1.5)
    assert got == pytest.approx([0.5, 0.5 + 2 / 3, 0.5 + 1 / 3])


@pytest.mark.parametrize("assign", list(ASSIGN_FUNCTIONS))
def test_all_equal_gives_one(assign):
    """Not s2 (the authors' np.interp over a zero range), and no ranking invented by layer order."""
    assert assign_multipliers([3.2] * 5, assign, 0.5, 1.5) == pytest.approx([1.0] * 5)


@pytest.mark.parametrize("assign", list(ASSIGN_FUNCTIONS))
def test_single_layer_gives_one(assign):
    assert assign_multipliers([4.2], assign, 0.5, 1.5) == pytest.approx([1.0])


def test_empty_and_errors():
    assert assign_multipliers([], "linear") == []
    with pytest.raises(ValueError, match="unknown assign"):
        assign_multipliers(ALPHAS, "cubic")
    with pytest.raises(ValueError, match="domain"):
        assign_multipliers([0.5, 2.0], "log2")  # log2 needs alpha > 1
    with pytest.raises(ValueError, match="domain"):
        assign_multipliers([float("nan"), 2.0], "linear")
