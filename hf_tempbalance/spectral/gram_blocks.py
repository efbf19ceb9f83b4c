"""The ESD of a matrix that is never held whole: its Gram accumulated from blocks read on demand.

A :class:`BlockMatrix` is a matrix made of stored 2-D pieces concatenated along one axis (one
piece for an ordinary weight; a Mixtral expert's gate and up projections stacked as the fused
``gate_up_proj`` stores them). Each piece reads any range of its rows or columns on request
(:mod:`hf_tempbalance.checkpoint_files` reads them from the checkpoint files).

:func:`block_eigvals` forms the smaller Gram of an ``m x n`` matrix, ``d = min(m, n)``, as a sum
over blocks along the long side: ``WᵀW = Σ W[r0:r1]ᵀ W[r0:r1]`` when ``m >= n``, ``WWᵀ = Σ
W[:, c0:c1] W[:, c0:c1]ᵀ`` otherwise. Only the lower triangle is accumulated, in the engine's
Gram blocks, in the engine's precision, and then it goes to the same ``eigvalsh`` call as in
:func:`~hf_tempbalance.spectral.batched_esd`. So the working set is one block (its stored bytes
and its upcast copy, at most ``block_elements``) plus the ``d x d`` Gram plus the copy of it that
``torch.linalg.eigvalsh`` makes for LAPACK: never the whole matrix, never in float32.

Scaling, as the engine does it: a matrix whose largest |w| lies in the engine's direct range is
accumulated as it is (one pass); otherwise (tiny, huge, NaN/Inf weights) it is read a second time
divided by its largest |w|, and the eigenvalues are scaled back (a NaN/Inf matrix gets an all-zero
spectrum). The numbers are the engine's up to float rounding of the summation order.

The plain whole-matrix computation it must agree with is in
:mod:`hf_tempbalance.spectral.gram_blocks_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .esd import _DIRECT_RANGE, _gram_blocks, resolve_dtype

__all__ = ["Piece", "BlockMatrix", "block_eigvals", "block_working_bytes", "BLOCK_ELEMENTS"]

#: Elements of one block (4 Mi: 16 MiB in float32). Large enough that each product runs at full
#: GEMM speed (at least ~1000 rows of a width-4096 matrix), small next to an LLM weight.
BLOCK_ELEMENTS = 1 << 22
# Fewest rows (or columns) per block, whatever the budget: thinner products run below GEMM speed.
_MIN_BLOCK = 64


class Piece(Protocol):
    """One stored ``rows x cols`` matrix that reads ``rows lo:hi`` (``axis=0``) or ``columns
    lo:hi`` (``axis=1``) as a new contiguous tensor, in its stored dtype, on request."""

    rows: int
    cols: int

    def read(self, axis: int, lo: int, hi: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class BlockMatrix:
    """Pieces concatenated along ``axis`` (0: stacked rows, equal ``cols``; 1: side by side,
    equal ``rows``)."""

    pieces: tuple[Piece, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        if not self.pieces or self.axis not in (0, 1):
            raise ValueError("a BlockMatrix needs at least one piece and axis 0 or 1")
        other = [p.cols if self.axis == 0 else p.rows for p in self.pieces]
        if len(set(other)) != 1:
            raise ValueError(f"pieces concatenated along axis {self.axis} must agree on the other "
                             f"axis, got {other}")

    @property
    def shape(self) -> tuple[int, int]:
        if self.axis == 0:
            return sum(p.rows for p in self.pieces), self.pieces[0].cols
        return self.pieces[0].rows, sum(p.cols for p in self.pieces)


def _extent(piece: Piece, axis: int) -> int:
    return piece.rows if axis == 0 else piece.cols


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)


def _blocks(matrix: BlockMatrix, long_axis: int, step: int) -> Iterator[torch.Tensor]:
    """Blocks along ``long_axis`` that together cover the matrix once, each at most ``step``
    wide along it."""
    if matrix.axis == long_axis:
        # Any partition of the long side sums to the same Gram: each piece on its own.
        for piece in matrix.pieces:
            for lo, hi in _ranges(_extent(piece, long_axis), step):
                yield piece.read(long_axis, lo, hi)
        return
    # Pieces lie along the short side: a block is the same range of every piece, joined.
    for lo, hi in _ranges(_extent(matrix.pieces[0], long_axis), step):
        yield torch.cat([piece.read(long_axis, lo, hi) for piece in matrix.pieces], dim=matrix.axis)


def _step(matrix: BlockMatrix, block_elements: int) -> tuple[int, int, int]:
    """``(long_axis, d, step)``: the axis blocks run along, the Gram size, the block width."""
    m, n = matrix.shape
    long_axis, d = (0, n) if m >= n else (1, m)
    step = max(_MIN_BLOCK, block_elements // max(d, 1))
    return long_axis, d, step


def block_working_bytes(shape: Sequence[int], stored_itemsize: int,
                        dtype: torch.dtype | str = torch.float32,
                        block_elements: int = BLOCK_ELEMENTS) -> int:
    """Peak bytes :func:`block_eigvals` holds for an ``m x n`` matrix: one block stored and
    upcast, the Gram, and ``eigvalsh``'s copy of it (plus its eigenvalues)."""
    m, n = shape
    d, long = min(m, n), max(m, n)
    item = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    block = d * min(long, max(_MIN_BLOCK, block_elements // max(d, 1)))
    return block * (stored_itemsize + item) + 2 * d * d * item + d * item


@torch.no_grad()
def block_eigvals(matrix: BlockMatrix, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu",
                  block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """Ascending eigenvalues of the smaller Gram of ``matrix`` (clamped at 0), as
    :func:`~hf_tempbalance.spectral.esd` returns them, from blocks of at most ``block_elements``.

    Args:
        matrix: the pieces and how they join.
        dtype: ``float32`` or ``float64``: the Gram's precision (the engine's ``dtype``).
        device: where the Gram is formed and solved (each block is moved there).
        block_elements: elements per block (along the long side, whole rows or columns).
    """
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    long_axis, d, step = _step(matrix, block_elements)
    if d == 0:
        return torch.empty(0, dtype=dtype, device=device)
    gram = torch.zeros(d, d, dtype=dtype, device=device)
    bounds = _gram_blocks(d)
    peak = torch.zeros((), dtype=dtype, device=device)
    for block in _blocks(matrix, long_axis, step):
        x = block.to(device=device, dtype=dtype)
        del block
        lo, hi = torch.aminmax(x)
        peak = torch.maximum(peak, torch.maximum(hi, -lo))  # NaN propagates
        _accumulate(gram, x if long_axis == 1 else x.mT, bounds)
        del x
    scale = float(peak)
    if not (_DIRECT_RANGE[0] <= scale <= _DIRECT_RANGE[1]):
        # Tiny, huge or non-finite weights: the sum above may have under/overflowed. Read again,
        # divided by max|w| (0 for NaN/Inf: a zero spectrum), as the engine's normalised copy.
        finite = math.isfinite(scale) and scale > 0
        factor = 1.0 / scale if finite else 0.0
        gram.zero_()
        for block in _blocks(matrix, long_axis, step):
            x = block.to(device=device, dtype=dtype)
            del block
            x.mul_(factor)
            if not finite:
                x.nan_to_num_(0.0, 0.0, 0.0)
            _accumulate(gram, x if long_axis == 1 else x.mT, bounds)
            del x
        rescale = scale * scale if finite else 1.0
    else:
        rescale = 1.0
    # The same call as batched_esd: the column-major view, upper triangle = the lower one here.
    values = torch.linalg.eigvalsh(gram.mT, UPLO="U")
    del gram
    values = torch.sort(values.clamp_min_(0.0)).values
    return values * rescale if rescale != 1.0 else values


def _accumulate(gram: torch.Tensor, x: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
    """``gram += x xᵀ`` on the lower-triangle blocks only (``eigvalsh`` reads nothing else;
    the blocks above stay zero); ``x`` is ``d x b``."""
    for bi, (r0, r1) in enumerate(bounds):
        for c0, c1 in bounds[:bi + 1]:
            gram[r0:r1, c0:c1].addmm_(x[r0:r1], x[c0:c1].mT)
