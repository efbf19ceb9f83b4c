"""Plain, obviously-correct counterpart of :mod:`hf_tempbalance.spectral.gram_blocks`: read every
piece whole, join them, and hand the matrix to the ordinary engine (:func:`~hf_tempbalance.
spectral.esd`). Holds the whole matrix (and its float32 copy) at once: for tests and for the
layers the block path does not describe, not for large checkpoints.
"""

from __future__ import annotations

import torch

from .esd import esd, resolve_dtype
from .gram_blocks import BlockMatrix

__all__ = ["whole_matrix", "whole_eigvals"]


def whole_matrix(matrix: BlockMatrix) -> torch.Tensor:
    """The matrix itself, every piece read in one go and concatenated."""
    parts = [p.read(0, 0, p.rows) for p in matrix.pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=matrix.axis)


def whole_eigvals(matrix: BlockMatrix, dtype: torch.dtype | str = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Ascending eigenvalues of the smaller Gram of the whole matrix, via :func:`esd`."""
    return esd(whole_matrix(matrix).to(device), dtype=resolve_dtype(dtype))
