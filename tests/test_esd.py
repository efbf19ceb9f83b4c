"""ESD of every supported layer kind against per-slice float64 SVDs computed here."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hf_tempbalance.spectral import batched_esd, esd, hill_alpha


def svd_esd(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Expected ESD: squared singular values of every (out x in) kernel slice, float64, pooled."""
    w = weight.detach().double()
    if transposed:
        w = w.t()
    if w.ndim == 2:
        slices = [w]
    else:
        slices = [w[(slice(None), slice(None), *pos)]
                  for pos in itertools.product(*(range(k) for k in w.shape[2:]))]
    values = torch.cat([torch.linalg.svdvals(s) ** 2 for s in slices])
    return torch.sort(values).values


def assert_close_esd(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float32 accuracy relative to the largest eigenvalue."""
    assert got.shape == expected.shape
    scale = expected.max().item()
    torch.testing.assert_close(got.double(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)], ids=["tall", "wide", "square"])
def test_linear(shape):
    layer = nn.Linear(shape[1], shape[0])
    got = esd(layer)
    assert got.dtype == torch.float32
    assert got.numel() == min(shape)
    assert torch.all(got[1:] >= got[:-1]), "ESD must be sorted ascending"
    assert_close_esd(got, svd_esd(layer.weight))


@pytest.mark.parametrize(
    "layer",
    [nn.Conv1d(12, 20, 5), nn.Conv2d(16, 24, 3), nn.Conv2d(24, 8, (3, 2)), nn.Conv3d(6, 10, 2)],
    ids=["conv1d", "conv2d", "conv2d-wide-rect", "conv3d"],
)
def test_conv_slices_pooled(layer):
    out_ch, in_ch, *kernel = layer.weight.shape
    got = esd(layer)
    n_positions = int(torch.tensor(kernel).prod())
    assert got.numel() == n_positions * min(out_ch, in_ch)
    assert_close_esd(got, svd_esd(layer.weight))


def test_gpt2_conv1d_is_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 80)  # nf=48 outputs, nx=80 inputs; weight stored (in, out) = (80, 48)
    assert conv.weight.shape == (80, 48)
    linear = nn.Linear(80, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    got = esd(conv)
    assert got.numel() == 48
    torch.testing.assert_close(got, esd(linear), rtol=1e-6, atol=1e-6 * got.max().item())
    assert_close_esd(got, svd_esd(conv.weight, transposed=True))


def test_embedding():
    emb = nn.Embedding(120, 24)
    got = esd(emb)
    assert got.numel() == 24
    assert_close_esd(got, svd_esd(emb.weight))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_upcast(half):
    layer = nn.Linear(48, 72).to(half)
    got = esd(layer)
    assert got.dtype == torch.float32
    # Expected from the same (rounded) half weights, upcast to float64 here.
    assert_close_esd(got, svd_esd(layer.weight.float()))
    conv = nn.Conv2d(8, 16, 3).to(half)
    assert_close_esd(esd(conv), svd_esd(conv.weight.float()))


def test_bare_tensors():
    matrix = torch.randn(30, 50)
    assert_close_esd(esd(matrix), svd_esd(matrix))
    kernel = torch.randn(10, 6, 3, 3)
    got = esd(kernel)
    assert got.numel() == 9 * 6
    assert_close_esd(got, svd_esd(kernel))


def test_batched_equals_per_layer():
    from transformers.pytorch_utils import Conv1D

    layers = [
        nn.Linear(32, 64),   # oriented 64x32
        nn.Linear(64, 32),   # wide, same oriented shape as the one above: batched together
        nn.Linear(32, 64),
        nn.Conv2d(32, 64, 3),  # 9 slices 64x32: same group again
        nn.Conv1d(8, 4, 3),
        Conv1D(64, 32),
        nn.Embedding(50, 10),
        torch.randn(7, 5, dtype=torch.float64),
        nn.Linear(16, 16).to(torch.bfloat16),
    ]
    batched = batched_esd(layers)
    assert len(batched) == len(layers)
    for layer, got in zip(layers, batched):
        single = esd(layer)
        assert got.shape == single.shape
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5 * single.max().item())
        # and both are the real spectrum (singular values do not depend on orientation)
        weight = layer if isinstance(layer, torch.Tensor) else layer.weight
        expected = svd_esd(weight).to(got.dtype)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.max().item())


def test_float32_matches_float64():
    layer = nn.Conv2d(32, 48, 3)
    with torch.no_grad():
        layer.weight.mul_(37.0)  # arbitrary scale: accuracy is relative to the layer's own λ_max
    e32, e64 = esd(layer, dtype=torch.float32), esd(layer, dtype="float64")
    assert e64.dtype == torch.float64
    assert_close_esd(e32, svd_esd(layer.weight))
    assert_close_esd(e64, svd_esd(layer.weight), rel=1e-10)
    # The median fit only reads the top half, where float32 is accurate: same alpha.
    assert hill_alpha(e32) == pytest.approx(hill_alpha(e64), rel=1e-4)


def test_large_and_tiny_weights():
    # Scales whose eigenvalues (~1e36 and ~1e-32) are still representable in float32.
    for w in (torch.randn(40, 20) * 1e17, torch.randn(40, 20) * 1e-17):
        got = esd(w)
        assert torch.isfinite(got).all()
        assert_close_esd(got, svd_esd(w))


def test_non_finite_weights_give_a_zero_spectrum_not_nan():
    w = torch.randn(20, 10)
    w[3, 4] = float("nan")
    got = esd(w)
    assert torch.equal(got, torch.zeros(10))


def test_bad_inputs_have_clear_errors():
    with pytest.raises(TypeError, match="weight"):
        esd(nn.ReLU())
    with pytest.raises(ValueError, match="dimension"):
        esd(torch.randn(5))
    with pytest.raises(ValueError, match="float32 or float64"):
        esd(nn.Linear(4, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        esd(nn.Linear(4, 4), dtype="half")
