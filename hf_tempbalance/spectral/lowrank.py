r"""The ESD of a low-rank product ``ΔW = L·R`` without forming ``ΔW``.

A LoRA update ``ΔW = s·B·A`` (``B`` ``out x r``, ``A`` ``r x in``; several adapters stack their
factors side by side) has rank at most ``k = r``: ``ΔWᵀΔW`` has ``min(out, in) - k`` zero
eigenvalues and ``k`` others. Those ``k`` are exact, and cheap, from the thin QR factorisations
``L = Q_L·R_L`` and ``Rᵀ = Q_R·R_R``:

.. math::  ΔW = Q_L\,(R_L R_Rᵀ)\,Q_Rᵀ,

and ``Q_L``, ``Q_R`` have orthonormal columns, so the singular values of ``ΔW`` are those of the
``k x k`` core ``C = R_L R_Rᵀ``, and the non-zero eigenvalues of ``ΔWᵀΔW`` are the eigenvalues
of ``CᵀC``. Cost ``O((out + in)·k²)`` instead of ``O(out·in·min(out, in))`` for the dense ESD,
and no ``out x in`` matrix is ever held. (Equivalently they are the eigenvalues of
``(LᵀL)(R Rᵀ)``; the QR route keeps the symmetric ``eigvalsh`` and its accuracy.)

These are the eigenvalues weightwatcher's adapter view fits: the ``k`` non-zero ones. The zeros
carry no information and would put the median tail start at zero.
"""

from __future__ import annotations

import torch

__all__ = ["low_rank_esd"]


@torch.no_grad()
def low_rank_esd(left: torch.Tensor, right: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ascending eigenvalues of ``(L·R)ᵀ(L·R)`` that can be non-zero: ``min(k, out, in)`` of them.

    Args:
        left: ``L``, ``out x k``.
        right: ``R``, ``k x in``.
        dtype: ``float32`` or ``float64`` (the factors are upcast first).

    Returns:
        1-D tensor on the factors' device, sorted ascending, clamped at 0.
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"expected L (out x k) and R (k x in), got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    left, right = left.detach().to(dtype), right.detach().to(dtype)
    _, r_left = torch.linalg.qr(left)            # (min(out, k), k)
    _, r_right = torch.linalg.qr(right.mT)       # (min(in, k), k)
    core = r_left @ r_right.mT                   # singular values = those of L·R
    gram = core.mT @ core if core.shape[0] >= core.shape[1] else core @ core.mT
    return torch.linalg.eigvalsh(gram).clamp_min(0.0)
