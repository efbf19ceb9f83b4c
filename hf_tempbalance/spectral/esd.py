"""Empirical spectral densities: the eigenvalues of WᵀW, fast and exact.

For a matrix W of shape ``m x n`` the ESD is the set of ``min(m, n)`` eigenvalues of the smaller
Gram matrix (``WᵀW`` when ``m >= n``, else ``WWᵀ``), i.e. the squared singular values σᵢ² of W.
Forming the ``d x d`` Gram (``d = min(m, n)``) and calling ``eigvalsh`` costs ``2·max·d² + O(d³)``
flops and batches well, where an SVD of W costs more and does not (reference-notes §6).

:func:`esd` is the one-layer entry point; :func:`batched_esd` computes many layers at once by
stacking all slices of equal shape into one batched Gram product and one batched ``eigvalsh``, on
the device where the weights live, without any host synchronisation. The plain per-slice SVD it
must agree with lives in :mod:`hf_tempbalance.spectral.esd_reference`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from .matrices import weight_matrices

__all__ = ["esd", "batched_esd", "resolve_dtype"]

# Upper bound on the elements of one stacked Gram batch (256 Mi elements = 1 GiB in fp32);
# larger groups are processed in chunks so an update never needs much more memory than this.
_MAX_BATCH_ELEMENTS = 1 << 28


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map ``"float32"``/``"float64"`` (or a torch dtype) to the dtype the spectra are computed in."""
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32,
                     "float64": torch.float64, "fp64": torch.float64}[dtype]
        except KeyError:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"spectra are computed in float32 or float64, got {dtype}; half-precision weights are "
            "upcast automatically (no half-precision eigensolver exists)."
        )
    return dtype


def _gram(mats: torch.Tensor) -> torch.Tensor:
    """Smaller Gram matrices of a ``(k, m, n)`` stack: ``(k, d, d)`` with ``d = min(m, n)``."""
    if mats.shape[-2] >= mats.shape[-1]:
        return mats.mT @ mats
    return mats @ mats.mT


def esd(layer: nn.Module | torch.Tensor, dtype: torch.dtype | str = torch.float32) -> torch.Tensor:
    """Ascending eigenvalues of WᵀW (the squared singular values of W) of one layer.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (one ``out x in`` slice per kernel position,
            eigenvalues pooled), Transformers' ``Conv1D``, ``nn.Embedding``, or a weight tensor.
            fp16/bf16 weights are upcast.
        dtype: ``float32`` (default; accurate to ~1e-5 relative on the top half of the spectrum)
            or ``float64``.

    Returns:
        1-D tensor of ``k · min(out, in)`` eigenvalues (units: squared weight units), sorted
        ascending, clamped at 0, on the layer's device, in ``dtype``.
    """
    return batched_esd([layer], dtype=dtype)[0]


def batched_esd(
    layers: Sequence[nn.Module | torch.Tensor],
    dtype: torch.dtype | str = torch.float32,
) -> list[torch.Tensor]:
    """:func:`esd` of many layers, batching every slice of equal shape into one ``eigvalsh``.

    Same numbers as calling :func:`esd` on each layer (to floating-point rounding of the batched
    kernels); no host synchronisation happens here.
    """
    dtype = resolve_dtype(dtype)
    stacks, scales = [], []
    for layer in layers:
        mats = weight_matrices(layer).to(dtype)
        # Normalise by the largest |w| (keeps fp32 Grams of large weights finite) and zero out
        # non-finite layers (eigvalsh cannot take NaN); no host sync, the result has no NaN.
        scale = mats.abs().amax() if mats.numel() else torch.ones((), dtype=dtype, device=mats.device)
        finite = torch.isfinite(scale) & (scale > 0)
        scale = torch.where(finite, scale, torch.ones_like(scale))
        stacks.append(torch.where(finite, mats / scale, torch.zeros_like(mats)))
        scales.append(scale)

    # Orient every stack so that rows >= cols, then group by (device, rows, cols).
    groups: dict[tuple, list[int]] = defaultdict(list)
    for idx, mats in enumerate(stacks):
        m, n = mats.shape[-2:]
        key = (mats.device, max(m, n), min(m, n))
        groups[key].append(idx)

    pieces: list[list[torch.Tensor]] = [[] for _ in stacks]
    for (_, rows, cols), members in groups.items():
        oriented = [
            stacks[i] if stacks[i].shape[-2] >= stacks[i].shape[-1] else stacks[i].mT
            for i in members
        ]
        counts = [s.shape[0] for s in oriented]
        per_slice = rows * cols + cols * cols
        chunk = max(1, _MAX_BATCH_ELEMENTS // per_slice)
        eigs = []
        flat = torch.cat(oriented) if len(oriented) > 1 else oriented[0]
        for start in range(0, flat.shape[0], chunk):
            eigs.append(torch.linalg.eigvalsh(_gram(flat[start:start + chunk])))
        eigs = torch.cat(eigs) if len(eigs) > 1 else eigs[0]
        for i, part in zip(members, eigs.split(counts)):
            pieces[i].append(part.reshape(-1))

    # eigvalsh may return tiny negatives for a PSD matrix; the ESD is non-negative by definition.
    return [torch.sort(torch.cat(p).clamp_min_(0.0)).values * scale**2 for p, scale in zip(pieces, scales)]
