r"""Spectral norm regularisation (SNR, paper Eq. 4; Yoshida & Miyato 2017).

Adds :math:`\frac{\lambda_{sr}}{2}\sum_l \sigma(W_l)^2` to the loss, implemented directly on the
gradients: :math:`\nabla_{W} \frac{\lambda}{2}\sigma^2 = \lambda\,\sigma\,u v^\top`, where
:math:`(u, \sigma, v)` is the top singular triplet of W reshaped to ``(dim0, -1)``, found by
``iterations`` steps of power iteration. A mixture-of-experts stack (``ExpertStack``) counts
each expert matrix as its own ``W_l``.

Unlike the authors' code (which until April 2025 skipped SNR whenever weight decay was non-zero),
this is applied whatever the optimizer's weight decay. Each power iteration starts from a fixed,
per-layer pseudo-random vector, so the result is deterministic and needs no saved state on resume
(no draw from the global RNG, which would change the data order of the run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import weight_sources
from .spectral.matrices import ExpertStack, eval_parametrization, weight_name, weight_of

__all__ = ["SpectralNormRegularizer", "top_singular_triplet"]


def top_singular_triplet(matrix: torch.Tensor, start: torch.Tensor, iterations: int):
    """Power iteration on ``matrix (..., m, n)`` (a batch of matrices too) from ``start (n,)``.

    Returns ``(u, sigma, v)`` with shapes ``(..., m)``, ``(...)``, ``(..., n)``.
    """
    v = (start / start.norm()).expand(*matrix.shape[:-2], -1)
    u = (matrix @ v.unsqueeze(-1)).squeeze(-1)
    for _ in range(iterations):
        u = (matrix @ v.unsqueeze(-1)).squeeze(-1)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v = (matrix.mT @ u.unsqueeze(-1)).squeeze(-1)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sigma = (u.unsqueeze(-2) @ (matrix @ v.unsqueeze(-1))).squeeze(-1).squeeze(-1)
    return u, sigma, v


def _matrices(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The matrix (or, for an expert stack, the batch of matrices) whose σ_max is penalised:
    ``W`` reshaped to ``(dim0, -1)`` as the authors do, or the ``k`` expert matrices."""
    if isinstance(module, ExpertStack):
        return weight.detach().float()
    return weight.detach().reshape(weight.shape[0], -1).float()


class SpectralNormRegularizer:
    """Adds the SNR gradient ``strength · σ u vᵀ`` to each module's weight gradient.

    Args:
        modules: modules with a ``weight`` (Linear, Conv, Conv1D, ...).
        strength: λ_sr (paper grid: 1e-3, 5e-3, 1e-2, 1.5e-2; 1e-4 for WRN).
        iterations: power iterations per call (authors: 5).
    """

    def __init__(self, modules: Sequence[nn.Module], strength: float, iterations: int = 5) -> None:
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.modules = list(modules)
        self.strength = float(strength)
        self.iterations = int(iterations)
        self._starts: dict[int, torch.Tensor] = {}

    def _start(self, index: int, n: int, weight: torch.Tensor) -> torch.Tensor:
        start = self._starts.get(index)
        if start is None or start.numel() != n or start.device != weight.device:
            gen = torch.Generator().manual_seed(1000003 * (index + 1))
            start = torch.randn(n, generator=gen, dtype=torch.float32).to(weight.device)
            self._starts[index] = start
        return start

    @torch.no_grad()
    def apply_(self) -> None:
        """Add the regulariser's gradient in place (call after backward, before the step)."""
        if self.strength == 0:
            return
        for index, module in enumerate(self.modules):
            if all(p.grad is None for p in weight_sources(module)):
                continue  # not used in this step's forward
            weight = weight_of(module)
            matrix = _matrices(module, weight)
            u, sigma, v = top_singular_triplet(matrix, self._start(index, matrix.shape[-1], weight),
                                               self.iterations)
            outer = u.unsqueeze(-1) * v.unsqueeze(-2)  # u vᵀ (per expert for a stack)
            update = (self.strength * sigma[..., None, None] * outer).reshape(weight.shape)
            if weight.grad is not None:  # a plain weight parameter
                weight.grad.add_(update.to(weight.grad.dtype))
            else:  # a parametrized weight: the chain rule through the parametrization
                with torch.enable_grad(), eval_parametrization(module):
                    effective = getattr(module, weight_name(module))
                    effective.backward(update.to(effective.dtype))

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """Current value of ``(λ/2) Σ σ²`` (for logging; uses the same power iteration)."""
        total = torch.zeros(())
        for index, module in enumerate(self.modules):
            weight = weight_of(module)
            matrix = _matrices(module, weight)
            _, sigma, _ = top_singular_triplet(matrix, self._start(index, matrix.shape[-1], matrix),
                                               self.iterations)
            total = total + (sigma.cpu() ** 2).sum()
        return 0.5 * self.strength * total
