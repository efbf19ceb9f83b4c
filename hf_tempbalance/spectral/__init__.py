"""Spectral core: ESDs, Hill power-law fits and HT-SR metrics for any PyTorch layer.

Framework-free (no Trainer, Accelerate or Ultralytics imports)::

    from hf_tempbalance.spectral import esd, hill_alpha
    alpha = hill_alpha(esd(model.layer1[0].conv1))
"""

from .esd import batched_esd, esd, resolve_dtype
from .esd_reference import esd_reference
from .hill import (
    DEFAULT_RTOL,
    FLAT_LOG_SPREAD,
    XMIN_METHODS,
    HillFit,
    filter_eigs,
    hill_alpha,
    hill_alpha_tensor,
    hill_fit,
)
from .matrices import num_eigs, weight_matrices
from .metrics import available_metrics, compute_metric, layer_metrics, register_metric

__all__ = [
    "esd",
    "batched_esd",
    "esd_reference",
    "resolve_dtype",
    "hill_alpha",
    "hill_alpha_tensor",
    "hill_fit",
    "HillFit",
    "filter_eigs",
    "DEFAULT_RTOL",
    "FLAT_LOG_SPREAD",
    "XMIN_METHODS",
    "weight_matrices",
    "num_eigs",
    "register_metric",
    "available_metrics",
    "compute_metric",
    "layer_metrics",
]
