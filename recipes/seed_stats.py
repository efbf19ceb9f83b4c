"""Mean ± std over seeds, and how a result table prints it (image sweep, the studies' reports).

The std is the sample standard deviation (``ddof=1``). One seed has no spread to estimate: its
std is ``None`` (``null`` in a summary file, as a paired difference of one seed has it) and it
prints as ``x (1 seed)``, never ``x ± 0.00``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["mean_std", "format_mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, sample std)`` of ``values`` (std ``None`` for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(mean: float, std: float | None, digits: int = 2) -> str:
    """``"mean ± std"``, or ``"mean (1 seed)"`` when there is no std (:func:`mean_std` of one
    value)."""
    if std is None:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
