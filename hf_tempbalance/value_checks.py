"""Type checks of values read from users and saved files (configs, states, history rows).

``bool`` is an ``int`` in Python, and ``True`` counted as 1 or a string counted as on would
silently change a run, so these keep the kinds apart; NumPy scalars count as what they hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_bool", "is_int", "is_number"]


def is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)


def is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not is_bool(value)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not is_bool(value)
