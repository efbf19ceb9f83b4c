"""hf_tempbalance: TempBalance layer-wise learning rates (Zhou et al., NeurIPS 2023).

    from hf_tempbalance import TempBalance, TempBalanceConfig, TempBalanceCallback

The framework glue (``TempBalanceCallback`` and ``TempBalanceTrainer`` need ``transformers``,
``AcceleratedTempBalance`` needs ``accelerate``, ``TempBalanceDetectionTrainer`` needs
``ultralytics``) is imported lazily, on first access, so the spectral core and the engine work
with PyTorch alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .analysis import analyze_model, analyze_state_dict
from .arguments import TempBalanceArguments
from .config import TempBalanceConfig
from .engine import TempBalance
from .snr import SpectralNormRegularizer

#: The single source of the version: pyproject.toml reads it (``[tool.setuptools.dynamic]``).
__version__ = "0.1.0"

_LAZY = {
    "TempBalanceCallback": "hf_tempbalance.integrations.transformers",
    "TempBalanceTrainer": "hf_tempbalance.integrations.transformers",
    "tempbalance_optimizer_cls_and_kwargs": "hf_tempbalance.integrations.transformers",
    "AcceleratedTempBalance": "hf_tempbalance.integrations.accelerate",
    "TempBalanceDetectionTrainer": "hf_tempbalance.integrations.ultralytics",
    "add_tempbalance": "hf_tempbalance.integrations.ultralytics",
}

__all__ = [
    "TempBalance",
    "TempBalanceConfig",
    "TempBalanceArguments",
    "SpectralNormRegularizer",
    "analyze_model",
    "analyze_state_dict",
    "TempBalanceCallback",
    "TempBalanceTrainer",
    "tempbalance_optimizer_cls_and_kwargs",
    "AcceleratedTempBalance",
    "TempBalanceDetectionTrainer",
    "add_tempbalance",
]

if TYPE_CHECKING:  # pragma: no cover
    from .integrations.accelerate import AcceleratedTempBalance
    from .integrations.transformers import (
        TempBalanceCallback,
        TempBalanceTrainer,
        tempbalance_optimizer_cls_and_kwargs,
    )
    from .integrations.ultralytics import TempBalanceDetectionTrainer, add_tempbalance


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_tempbalance' has no attribute {name!r}")
