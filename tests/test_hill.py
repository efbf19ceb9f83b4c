"""Hill alpha (paper Eq. 3) against a NumPy computation written here from the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from expected import NOISE_FLOOR, numpy_fix_finger_hill, numpy_hill, numpy_ks_hill
from torch import nn

from hf_tempbalance.spectral import esd, hill_alpha, hill_fit
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference


def random_spectra():
    gen = torch.Generator().manual_seed(7)
    gauss = torch.randn(300, 120, generator=gen, dtype=torch.float64)
    with torch.random.fork_rng():  # StudentT.sample takes no generator: seed the global one here
        torch.manual_seed(7)
        heavy = torch.distributions.StudentT(torch.tensor(2.5, dtype=torch.float64)).sample((250, 100))
    conv = torch.randn(32, 16, 3, 3, generator=gen, dtype=torch.float64)
    lowrank = torch.randn(80, 10, generator=gen, dtype=torch.float64) @ torch.randn(
        10, 60, generator=gen, dtype=torch.float64)  # 50 exact zeros in its ESD
    return {name: esd(w, dtype="float64") for name, w in
            {"gauss": gauss, "heavy": heavy, "conv": conv, "lowrank": lowrank}.items()}


SPECTRA = random_spectra()


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("include_xmin", [True, False], ids=["authors", "textbook"])
def test_median_matches_numpy_formula(name, include_xmin):
    eigs = SPECTRA[name]
    expected = numpy_hill(eigs.numpy(), include_xmin=include_xmin)
    assert math.isnan(expected) == (name == "lowrank")  # rank 10 of 60: its median eigenvalue is 0
    assert hill_alpha(eigs, include_xmin=include_xmin) == pytest.approx(expected, rel=1e-12, nan_ok=True)
    # float32 input, same answer to float32 accuracy
    assert hill_alpha(eigs.float(), include_xmin=include_xmin) == pytest.approx(expected, rel=1e-5,
                                                                                 nan_ok=True)


def test_authors_convention_is_larger_than_textbook():
    eigs = SPECTRA["gauss"]
    fit = hill_fit(eigs)
    n_kept = eigs.numel()
    assert fit.n_tail == n_kept - n_kept // 2
    assert fit.xmin == pytest.approx(float(torch.sort(eigs).values[n_kept // 2]))
    # (alpha_authors - 1) / (alpha_textbook - 1) = n / (n - 1)
    ratio = (hill_alpha(eigs) - 1) / (hill_alpha(eigs, include_xmin=False) - 1)
    assert ratio == pytest.approx(fit.n_tail / (fit.n_tail - 1), rel=1e-12)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("xmin", ["ks", "fix_finger"])
def test_ks_and_fix_finger_match_loop_reference(name, xmin):
    eigs = SPECTRA[name]
    expected = hill_alpha_reference(eigs.numpy(), xmin)
    assert math.isfinite(expected)  # (tail starts above the noise floor only: lowrank fits too)
    assert hill_alpha(eigs, xmin) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("xmin", ["ks", "fix_finger"])
def test_ks_and_fix_finger_match_numpy_written_from_the_papers(name, xmin):
    """Against tests/expected.py (NumPy from Clauset et al. and Yang et al.), which shares no code
    or constant with the package but the noise floor it restates."""
    eigs = SPECTRA[name]
    fit = {"ks": numpy_ks_hill, "fix_finger": numpy_fix_finger_hill}[xmin]
    alpha, start = fit(eigs.numpy(), floor=NOISE_FLOOR[np.dtype(np.float64)])
    assert math.isfinite(alpha)
    got = hill_fit(eigs, xmin)
    assert float(got.alpha) == pytest.approx(alpha, rel=1e-9)
    assert float(got.xmin) == pytest.approx(start, rel=1e-12)


def test_ks_fit_minimises_ks_distance():
    """The chosen xmin is the candidate with the smallest KS distance (checked by brute force)."""
    eigs = SPECTRA["heavy"].numpy()
    lam = np.sort(eigs)
    best = math.inf
    for i in range(len(lam) - 1):
        tail = lam[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / lam[i]))
        cdf_fit = 1 - (tail / lam[i]) ** (1 - alpha)
        dist = np.max(np.abs(np.arange(n) / n - cdf_fit))
        best = min(best, dist)
    fit = hill_fit(torch.from_numpy(eigs), "ks")
    assert fit.ks_distance == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_power_law_decay_gives_one_plus_one_over_s(s):
    """Appendix A.2: λ_k = k^(-s) has PL_Alpha_Hill ≈ 1 + 1/s, more exactly as n grows."""
    errors = []
    for n in (250, 4000):
        lam = torch.arange(1, n + 1, dtype=torch.float64) ** (-s)
        alpha = hill_alpha(lam)
        errors.append(abs(alpha - (1 + 1 / s)))
    # the Hill sum over the top half is s·(m - ln m!/...) ~ s·m(1 - O(ln m / m)): 0.5% at n = 4000
    assert errors[1] <= 0.005 / s
    assert errors[1] < errors[0]


@pytest.mark.parametrize("c", [1e-6, 3.7, 2.0**20])
def test_scale_invariance(c):
    w = torch.randn(200, 80)
    for xmin in ("median", "ks", "fix_finger"):
        base = hill_alpha(esd(w, dtype="float64"), xmin)
        scaled = hill_alpha(esd(c * w.double(), dtype="float64"), xmin)
        assert scaled == pytest.approx(base, rel=1e-9)
    assert hill_alpha(esd(c * w)) == pytest.approx(hill_alpha(esd(w)), rel=1e-5)


def test_every_eigenvalue_counts_by_default():
    """As in the authors' runs (filter_zeros=False): zeros and tiny eigenvalues stay in the
    spectrum and move the median index like any other eigenvalue."""
    eigs = SPECTRA["gauss"]
    lam_max = float(eigs.max())
    for low in (0.0, 1e-9 * lam_max):
        padded = torch.cat([torch.full((37,), low, dtype=torch.float64), eigs])
        assert hill_alpha(padded) == pytest.approx(numpy_hill(padded.numpy()), rel=1e-12)
        assert hill_alpha(padded) != pytest.approx(hill_alpha(eigs), rel=1e-3)
        assert hill_fit(padded).num_eigs == padded.numel()
        # The opt-in relative filter drops them again (scale-free, unlike an absolute cut).
        assert hill_alpha(padded, rtol=1e-6) == pytest.approx(hill_alpha(eigs), rel=1e-12)
        assert hill_alpha(padded * 1e-9, rtol=1e-6) == pytest.approx(hill_alpha(eigs), rel=1e-9)


def test_tail_starting_at_the_noise_floor_is_invalid():
    """A median eigenvalue at the eigensolver's noise floor (<= 2e-6·λ_max) has no tail to fit:
    rank below half, all-zero, or float32 rounding noise in place of exact zeros."""
    eigs = SPECTRA["lowrank"]  # rank 10 of 60
    assert math.isnan(hill_alpha(eigs))
    assert math.isnan(hill_alpha(torch.zeros(50)))
    noise = torch.cat([torch.full((31,), 1e-7), torch.linspace(1.0, 2.0, 30)])
    assert math.isnan(hill_alpha(noise))
    # Just above the floor it is a (real, if tiny) eigenvalue.
    assert math.isfinite(hill_alpha(torch.cat([torch.full((31,), 1e-5), torch.linspace(1.0, 2.0, 30)])))


def test_lowrank_layer_fits_its_nonzero_part_with_the_filter():
    eigs = SPECTRA["lowrank"]
    nonzero = eigs[eigs > 1e-8 * eigs.max()]
    assert nonzero.numel() == 10
    assert hill_alpha(eigs, rtol=1e-8) == pytest.approx(numpy_hill(nonzero.numpy()), rel=1e-9)


@pytest.mark.parametrize("eigs", [[], [3.0], [0.0, 0.0, 5.0], [float("nan")] * 4],
                         ids=["empty", "one", "one-nonzero", "all-nan"])
@pytest.mark.parametrize("xmin", ["median", "ks", "fix_finger"])
def test_fewer_than_two_eigenvalues_is_nan(eigs, xmin):
    assert math.isnan(hill_alpha(torch.tensor(eigs, dtype=torch.float64), xmin))


def test_flat_spectrum_is_not_finite():
    assert not math.isfinite(hill_alpha(torch.ones(100)))
    # An orthogonal layer: flat up to float32 rounding, which must not read as a huge alpha.
    for shape in ((64, 64), (128, 64), (48, 160)):
        w = torch.empty(shape)
        nn.init.orthogonal_(w)
        assert not math.isfinite(hill_alpha(esd(w)))
        assert not math.isfinite(hill_alpha(esd(w, dtype="float64")))


def test_unknown_xmin_is_rejected():
    with pytest.raises(ValueError, match="xmin"):
        hill_alpha(torch.ones(10), xmin="peak")
