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
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["HISTORY_FILE", "append_history", "read_history", "rewrite_history", "history_before"]

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


def rewrite_history(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Replace the history file by ``rows`` (an empty file for none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    open(path, "w", encoding="utf-8").close()
    append_history(rows, path)


def history_before(step: int, updates: int,
                   *sources: Sequence[dict[str, Any]] | str | os.PathLike | None,
                   multipliers: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The history rows of the updates made before optimizer step ``step``.

    What a run resumed from a checkpoint taken after ``step`` optimizer steps continues from:
    rows that a longer earlier run wrote after the checkpoint are left out. ``sources`` are
    looked at in order: lists of rows at hand (e.g. the history a checkpoint carried) and
    history files (typically the resumed run's own, then the one the checkpointed run wrote);
    the first that holds all ``updates`` updates the checkpoint followed wins, and with
    ``multipliers`` (the checkpoint's) only if its last update gave exactly those, so a file of
    another run in the same directory is not taken for this one. If none does (a removed file,
    another machine), this warns and returns the most complete rows of a source that held fewer
    updates (possibly none).
    """
    best: list[dict[str, Any]] = []
    looked: list[str] = []
    for source in _distinct(sources):
        if isinstance(source, str):
            looked.append(source)
            if not os.path.exists(source):
                continue
            source = read_history(source)
        rows = [r for r in source if r["step"] < step]
        if len({r["update"] for r in rows}) != updates:
            best = max(best, rows, key=len)
        elif _ends_with(rows, multipliers):
            return rows
        # else: as many updates, other multipliers: another run's file, never used
    warnings.warn(
        f"the checkpoint at step {step} follows {updates} TempBalance updates, but the history "
        f"files ({', '.join(looked) or 'none given'}) do not hold them all (found "
        f"{len({r['update'] for r in best})} of them, or rows of another run); the history file "
        "continues from what was found.", stacklevel=3)
    return best


def _distinct(sources) -> list:
    """Row lists as given, paths made absolute and each looked at once, in order; None dropped."""
    out, seen = [], set()
    for source in sources:
        if source is None or (isinstance(source, str | os.PathLike) and not source):
            continue
        if isinstance(source, str | os.PathLike):
            source = os.path.abspath(source)
            if source in seen:
                continue
            seen.add(source)
        out.append(source)
    return out


def _ends_with(rows: list[dict[str, Any]], multipliers: Mapping[str, float] | None) -> bool:
    """Whether the last update in ``rows`` gave ``multipliers`` (always true without them)."""
    if multipliers is None or not rows:
        return True
    last = rows[-1]["update"]
    return {r["layer"]: r["multiplier"] for r in rows if r["update"] == last} == dict(multipliers)
