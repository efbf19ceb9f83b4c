"""Mean ± std over seeds, and how a result table prints it (image sweep, the studies' reports).

The std is the sample standard deviation (``ddof=1``). One seed has no spread to estimate: its
std is stored as 0.0 but printed as ``x (1 seed)``, never ``x ± 0.00``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["mean_std", "format_mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)`` of ``values`` (std 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"``, or ``"mean (1 seed)"`` for a single value."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
