"""Spectral core: ESDs, Hill power-law fits and HT-SR metrics for any PyTorch layer.

Framework-free (no Trainer, Accelerate or Ultralytics imports)::

    from hf_tempbalance.spectral import esd, hill_alpha
    alpha = hill_alpha(esd(model.layer1[0].conv1))
"""

from .esd import batched_esd, esd, resolve_dtype
from .esd_reference import esd_reference
from .hill import (
    FLAT_LOG_SPREAD,
    NOISE_FLOOR,
    XMIN_METHODS,
    HillFit,
    filter_eigs,
    hill_alpha,
    hill_alpha_tensor,
    hill_fit,
    noise_floor,
)
from .lowrank import low_rank_esd
from .matrices import num_eigs, weight_matrices
from .metrics import available_metrics, compute_metric, layer_metrics, metric_table, register_metric

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
    "NOISE_FLOOR",
    "noise_floor",
    "FLAT_LOG_SPREAD",
    "XMIN_METHODS",
    "weight_matrices",
    "num_eigs",
    "low_rank_esd",
    "register_metric",
    "available_metrics",
    "compute_metric",
    "layer_metrics",
    "metric_table",
]
