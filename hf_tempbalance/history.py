"""The TempBalance history file: one JSON object per (update, layer), appended as training runs.

Every integration writes the same format to ``<output_dir>/tempbalance_history.jsonl``, so the
plotting tools read any run. Row keys (from :attr:`TempBalance.history`, plus integration extras):

``step`` (optimizer step of the update), ``update`` (update index), ``layer``, ``metric``
(name), ``value`` (metric value, nan if invalid), ``multiplier`` (m_i), ``valid`` (bool), and
optionally ``epoch`` and ``base_lr`` (the scheduler's LR at that step; the layer's LR is
``base_lr · multiplier``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["HISTORY_FILE", "append_history", "read_history"]

HISTORY_FILE = "tempbalance_history.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def append_history(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Append rows to a JSONL history file (created with its directory if missing)."""
    rows = list(rows)
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a history file (a run directory is accepted too); nan/inf restored as floats."""
    if os.path.isdir(path):
        path = os.path.join(path, HISTORY_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no TempBalance history at {path}; it is written by training runs that use "
            f"TempBalance (file {HISTORY_FILE} in the output directory)."
        )
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if row.get("value") is None:
                    row["value"] = math.nan
                elif isinstance(row.get("value"), str):
                    row["value"] = float(row["value"])
                rows.append(row)
    return rows
