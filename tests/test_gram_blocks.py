"""The block Gram path (spectral.gram_blocks) against the whole-matrix reference and float64 SVD.

Each matrix is built here in memory, cut into pieces that count what is read, and its spectrum
is computed three ways: block by block, whole through the engine (the reference), and by a
float64 SVD of the joined matrix (independent of both).
"""

from __future__ import annotations

import pytest
import torch

from hf_tempbalance.spectral.gram_blocks import BlockMatrix, block_eigvals, block_working_bytes
from hf_tempbalance.spectral.gram_blocks_reference import whole_eigvals, whole_matrix


class TensorPiece:
    """A stored matrix in memory; records the largest block handed out."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.rows, self.cols = tensor.shape
        self.largest = 0
        self.reads = 0

    def read(self, axis: int, lo: int, hi: int) -> torch.Tensor:
        block = (self.tensor[lo:hi] if axis == 0 else self.tensor[:, lo:hi]).clone()
        self.largest = max(self.largest, block.numel())
        self.reads += 1
        return block


def _svd_eigs(matrix: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.linalg.svdvals(matrix.double()) ** 2).values


def _check(values: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    # float32 eigenvalues are accurate to ~1e-7·λ_max absolute: compare on that scale, and the
    # top half (what the Hill fits read) relatively.
    top = expected[-1].item()
    assert values.shape == expected.shape
    assert torch.allclose(values.double(), expected, rtol=0, atol=rtol * top)
    half = expected.numel() // 2
    assert torch.allclose(values[half:].double(), expected[half:], rtol=rtol, atol=0)


CASES = {
    # (piece shapes, axis): tall, wide, a tall stack (gate+up of one expert), pieces side by side
    "tall": ([(700, 96)], 0),
    "wide": ([(80, 650)], 0),
    "tall-rows-stacked": ([(300, 64), (300, 64)], 0),
    "wide-rows-stacked": ([(40, 500), (30, 500)], 0),
    "tall-side-by-side": ([(600, 40), (600, 50)], 1),
    "wide-side-by-side": ([(90, 200), (90, 300)], 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_agree_with_the_whole_matrix(case, dtype):
    shapes, axis = CASES[case]
    gen = torch.Generator().manual_seed(1)
    pieces = tuple(TensorPiece((torch.randn(s, generator=gen) * 0.02).to(dtype)) for s in shapes)
    matrix = BlockMatrix(pieces, axis)
    d = min(matrix.shape)
    # Small blocks, so that every matrix is read in several of them, none whole.
    blocks = block_eigvals(matrix, block_elements=64 * d)
    assert all(p.largest <= 64 * min(p.rows, p.cols) < p.rows * p.cols for p in pieces)
    assert all(p.reads > 1 for p in pieces)
    joined = whole_matrix(matrix)
    assert tuple(joined.shape) == matrix.shape
    reference = whole_eigvals(matrix)
    exact = _svd_eigs(joined)
    _check(blocks, exact, 2e-6)
    _check(reference, exact, 2e-6)
    _check(blocks, reference.double(), 2e-6)


def test_float64_gram_is_float64_accurate():
    gen = torch.Generator().manual_seed(2)
    matrix = BlockMatrix((TensorPiece(torch.randn(500, 70, generator=gen)),))
    values = block_eigvals(matrix, dtype=torch.float64, block_elements=100 * 70)
    assert values.dtype == torch.float64
    _check(values, _svd_eigs(whole_matrix(matrix)), 1e-12)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_tiny_and_huge_weights_are_normalised_like_the_engine(scale):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(400, 60, generator=gen)
    matrix = BlockMatrix((TensorPiece(base * scale),))
    values = block_eigvals(matrix, block_elements=64 * 60)
    # Without normalising, 1e-12² underflows float32 and 1e12² overflows it.
    exact = _svd_eigs(base) * scale ** 2
    _check(values, exact, 2e-6)
    _check(whole_eigvals(matrix).double(), exact, 2e-6)


def test_non_finite_weights_give_a_zero_spectrum_like_the_engine():
    weights = torch.randn(300, 50)
    weights[7, 3] = float("nan")
    matrix = BlockMatrix((TensorPiece(weights),))
    values = block_eigvals(matrix, block_elements=64 * 50)
    assert torch.equal(values, torch.zeros(50))
    assert torch.equal(whole_eigvals(matrix), torch.zeros(50))


def test_working_bytes_bound_what_is_read():
    piece = TensorPiece(torch.randn(5000, 128).to(torch.bfloat16))
    block_eigvals(BlockMatrix((piece,)), block_elements=1 << 16)
    assert piece.largest == (1 << 16)
    # one block (bf16 + fp32) + Gram + eigvalsh's copy + eigenvalues
    assert block_working_bytes((5000, 128), 2, block_elements=1 << 16) == \
        (1 << 16) * 6 + 2 * 128 * 128 * 4 + 128 * 4


def test_pieces_must_agree_on_the_joined_axis():
    with pytest.raises(ValueError, match="agree"):
        BlockMatrix((TensorPiece(torch.zeros(3, 4)), TensorPiece(torch.zeros(3, 5))), 0)
