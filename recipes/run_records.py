"""What a recipe's run leaves behind, and how a later command reads it against its own settings.

A run's ``results.json`` (and a study's report) is often the only copy of hours of training: it is
written whole or not at all (:func:`write_whole`), and a command that would reuse or replace it
first compares the settings it recorded with its own (:func:`setting_differences`), so that the
refusal can name every setting that differs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from usage import UsageError

_MISSING = object()


def setting_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any], *,
                        keys: Iterable[str] | None = None,
                        implicit: Mapping[str, Any] | None = None) -> list[str]:
    """``"key R there, W here"`` for each of ``keys`` (default: ``wanted``'s) whose recorded value
    ``R`` is not the wanted ``W``. A key the record lacks takes its ``implicit`` value (a setting
    added after the record was made, at the value every earlier run had), else shows as
    ``(none)``. Floats agree to 1e-9 relative (a value read back from JSON, or computed again)."""
    implicit = implicit or {}
    out = []
    for key in wanted if keys is None else keys:
        had = recorded.get(key, implicit.get(key, _MISSING))
        want = wanted.get(key, _MISSING)
        if not _same(had, want):
            out.append(f"{key} {_show(had)} there, {_show(want)} here")
    return out


def _show(value: Any) -> str:
    return "(none)" if value is _MISSING else repr(value)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def read_record(path: str | os.PathLike, *, fix: str) -> dict[str, Any]:
    """The JSON object a run wrote to ``path``; :class:`UsageError` naming the file and ``fix``
    when it is not one (a later command must not take it for a run, nor silently replace it)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path} is not a run's record (unreadable JSON); {fix}") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a run's record (not a JSON object); {fix}")
    return record


def write_whole(path: str | os.PathLike, text: str) -> None:
    """``path`` with ``text``, replaced in one step: a kill mid-write leaves the old file (or none),
    never a torn one that a later command would read as a run's record."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
