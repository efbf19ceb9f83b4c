"""float32 ESDs split at the fits' zero threshold exactly as float64 does (batched_esd(rtol=...)).

A square slice's small eigenvalues lie close to ``rtol·λ_max`` (2e-6·λ_max by default); float32
rounding (~1e-7·λ_max) can put one on the wrong side, which moves the median tail start and
alpha by ~1e-3. The expectation here is computed independently: float64 SVD of the same
(float32) weights, the threshold applied to it, and the NumPy loop Hill fit.
"""

from __future__ import annotations

import pytest
import torch

from hf_tempbalance.spectral import (
    DEFAULT_RTOL,
    batched_esd,
    esd_reference,
    hill_alpha,
    layer_metrics,
)
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference


def straddling_weight(d: int, near: int, seed: int, at: float = DEFAULT_RTOL) -> torch.Tensor:
    """A ``d x d`` float32 matrix with ``near`` eigenvalues of WᵀW within ~1e-7·λ_max of ``at``·λ_max."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.05, 1.0, d, dtype=torch.float64)
    offsets = torch.linspace(-1.5e-7, 1.5e-7, near, dtype=torch.float64)
    lam[:near] = at + offsets  # relative to λ_max = 1
    return ((u * lam.sqrt()) @ v.T).float()


def kept(eigs: torch.Tensor, rtol: float = DEFAULT_RTOL) -> int:
    return int((eigs > rtol * eigs.max()).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_split_matches_float64(seed):
    weights = [straddling_weight(256, 24, seed), straddling_weight(192, 16, seed + 10).T.contiguous()]
    got = batched_esd(weights, rtol=DEFAULT_RTOL)
    for w, e in zip(weights, got):
        ref = esd_reference(w)  # float64 SVD of the float32 weights: the exact spectrum
        assert kept(e) == kept(ref)
        assert hill_alpha(e) == pytest.approx(hill_alpha_reference(ref.numpy()), rel=1e-6)
        # Still the float32 ESD: the check moves eigenvalues by less than float32 rounding.
        torch.testing.assert_close(e.double(), ref, rtol=0, atol=1e-5 * ref.max().item())


def test_layer_metrics_alpha_matches_float64_at_the_threshold():
    conv = torch.nn.Conv2d(128, 128, 2, bias=False)
    with torch.no_grad():  # four 128x128 slices, each with eigenvalues straddling the threshold
        for pos in range(4):
            conv.weight[:, :, pos // 2, pos % 2] = straddling_weight(128, 25, 100 + pos)
    (alpha,) = layer_metrics([conv])["alpha_hill"]
    assert alpha == pytest.approx(hill_alpha_reference(esd_reference(conv).numpy()), rel=1e-6)


@pytest.mark.parametrize("rtol", [1e-5, 5e-7])
def test_any_threshold(rtol):
    w = straddling_weight(256, 25, 7, at=rtol)
    assert kept(batched_esd([w], rtol=rtol)[0], rtol) == kept(esd_reference(w), rtol)


def test_float64_is_left_alone():
    w = straddling_weight(128, 12, 7)
    e64 = batched_esd([w], dtype="float64", rtol=DEFAULT_RTOL)[0]
    torch.testing.assert_close(e64, esd_reference(w), rtol=0, atol=1e-12)
