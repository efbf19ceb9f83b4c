"""Plain, obviously-correct ESD: per-slice SVD, as the TempBalance authors compute it.

Kept beside the fast path (:mod:`hf_tempbalance.spectral.esd`) so that tests and benchmarks can
check the batched Gram/eigvalsh engine against it. Slow on purpose; do not use in training.
"""

from __future__ import annotations

import torch
from torch import nn

from .matrices import weight_matrices

__all__ = ["esd_reference"]


def esd_reference(layer: nn.Module | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ascending squared singular values of every slice of ``layer``, pooled, via ``svdvals``."""
    values = [torch.linalg.svdvals(mat.to(dtype)) ** 2 for mat in weight_matrices(layer)]
    return torch.sort(torch.cat(values)).values
