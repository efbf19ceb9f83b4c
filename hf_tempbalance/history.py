"""The TempBalance history file: one JSON object per (update, layer), appended as training runs.

Every integration writes the same format to ``<output_dir>/tempbalance_history.jsonl``, so the
plotting tools read any run. Row keys (from :attr:`TempBalance.history`, plus integration extras):

``step`` (optimizer step of the update), ``update`` (update index), ``layer``, ``metric``
(name), ``value`` (metric value, nan if invalid), ``multiplier`` (m_i), ``valid`` (bool), and
optionally ``epoch`` and ``base_lr`` (the scheduler's LR at that step; the layer's LR is
``base_lr · multiplier``).

Integrity. Nothing in a history file is dropped silently:

* Reading skips a line that is not a history row (a torn line, which a crash in the middle of an
  append leaves, or a foreign one) with one warning naming the file and the line numbers;
  ``read_history(path, strict=True)`` raises instead.
* A file is only ever rewritten as a whole (:func:`rewrite_history`: a new file moved into place,
  so a crash leaves the old file or the new one, never a mix), and when the new content leaves
  out a line of the old file, the old file is first kept as ``<file>.<k>.bak`` with a warning.
  The newest :data:`KEEP_BACKUPS` backups are kept (older ones are deleted as a new one is made),
  so a run resumed again and again does not fill its folder.
* An integration writes nothing until there is a row to record: no file for a run that balances
  no layer or never reaches an update.

Durability. The unit of recovery is the checkpoint: a resumed run restarts from the checkpoint's
step, keeps the rows of the updates before it and makes the later ones again. So an appended row
is handed to the operating system at once (one write per update: it survives a crash or a
``kill -9`` of the training process) but not flushed to disk; the integrations flush the file
(``fsync``) when a checkpoint is saved, so every row the checkpoint follows is on disk no later
than the checkpoint itself. Rows after the last checkpoint may be lost in a power cut or an
operating-system crash; the resumed run writes them again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .value_checks import is_int, is_number

__all__ = ["HISTORY_FILE", "HistoryFormatError", "HistoryLog", "HistoryWriter", "append_history",
           "read_history", "rewrite_history", "history_before", "history_backups", "row_problem",
           "sync_history", "KEEP_BACKUPS"]

HISTORY_FILE = "tempbalance_history.jsonl"
_LISTED = 5  # bad lines named in one warning


class HistoryFormatError(ValueError):
    """A line of a history file that is not a history row (``read_history(..., strict=True)``).

    Attributes:
        path: the file.
        line: the 1-based line number.
    """

    def __init__(self, path: str, line: int, why: str) -> None:
        self.path, self.line = path, line
        super().__init__(f"{path} line {line}: {why}; it is not a TempBalance history row (a torn "
                         "last line is what a crash in the middle of an append leaves): delete or "
                         "repair that line")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _encode(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in rows)


_JSON_TYPES = {list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
               float: "number"}


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a history row (``None`` when it is one)."""
    if not isinstance(row, dict):
        return f"a JSON {_JSON_TYPES.get(type(row), 'value')}, not an object"
    absent = [key for key in ("step", "update", "layer", "multiplier") if key not in row]
    if absent:
        return f"no {', '.join(map(repr, absent))} key"
    for key in ("step", "update"):
        if not (is_int(row[key]) and row[key] >= 0):
            return f"{key!r} is {row[key]!r}, not a non-negative integer"
    if not isinstance(row["layer"], str):
        return f"'layer' is {row['layer']!r}, not a layer name"
    if not is_number(row["multiplier"]):
        return f"'multiplier' is {row['multiplier']!r}, not a number"
    value = row.get("value")
    if not (value is None or is_number(value) or value in ("inf", "-inf", "nan")):
        return f"'value' is {value!r}, not a number"
    for key in ("epoch", "base_lr"):
        if row.get(key) is not None and not is_number(row[key]):
            return f"{key!r} is {row[key]!r}, not a number"
    if "metric" in row and not isinstance(row["metric"], str):
        return f"'metric' is {row['metric']!r}, not a metric name"
    return None


def _resolve(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, HISTORY_FILE) if os.path.isdir(path) else path


def _parse(path: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(rows, [(line number, why) of every non-blank line that is no row])."""
    with open(path, "rb") as fh:
        data = fh.read()
    rows, bad = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, "not UTF-8 text"))
            continue
        except json.JSONDecodeError as err:
            bad.append((number, f"not valid JSON ({err})"))
            continue
        why = row_problem(row)
        if why is not None:
            bad.append((number, why))
            continue
        value = row.get("value")
        row["value"] = math.nan if value is None else float(value)
        rows.append(row)
    return rows, bad


def read_history(path: str | os.PathLike, *, strict: bool = False) -> list[dict[str, Any]]:
    """Rows of a history file (a run directory is accepted too); nan/inf restored as floats.

    A line that is not a history row (torn JSON, a foreign line) is skipped with one warning per
    file naming the line numbers; with ``strict=True`` the first raises
    :class:`HistoryFormatError` (a ``ValueError``) naming the file and the line.
    """
    path = _resolve(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no TempBalance history at {path}; it is written by training runs that use "
            f"TempBalance (file {HISTORY_FILE} in the output directory)."
        )
    rows, bad = _parse(path)
    if bad and strict:
        raise HistoryFormatError(path, *bad[0])
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_LISTED])
        more = f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        warnings.warn(f"{path}: skipped {len(bad)} line(s) that are not TempBalance history rows "
                      f"({shown}{more}); the other {len(rows)} rows are used. A torn last line is "
                      "what a crash in the middle of an append leaves.", stacklevel=2)
    return rows


def append_history(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Append rows to a JSONL history file (created with its directory if missing).

    The rows go to the operating system in one write (see the module docstring on durability).
    A file whose last line was torn gets a line break first, so the new rows stay readable.
    """
    data = _encode(rows)
    if not data:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) and not _ends_with_newline(path):
        data = "\n" + data
    with open(path, "ab") as fh:
        fh.write(data.encode("utf-8"))


def _ends_with_newline(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def sync_history(path: str | os.PathLike) -> None:
    """Flush the file to disk, if it exists (called when a checkpoint is saved)."""
    if os.path.exists(path):
        with open(path, "ab") as fh:
            os.fsync(fh.fileno())


#: Backups :func:`rewrite_history` keeps of one history file (the newest).
KEEP_BACKUPS = 5


def history_backups(path: str | os.PathLike) -> list[str]:
    """The backups :func:`rewrite_history` kept of ``path``, newest first."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.bak$")
    try:
        found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder)
                 if (m := pattern.match(f))]
    except FileNotFoundError:
        return []
    return [p for _, p in sorted(found, reverse=True)]


def _next_backup(path: str) -> str:
    backups = history_backups(path)
    last = int(backups[0].rsplit(".", 2)[-2]) if backups else 0
    return f"{path}.{last + 1}.bak"


def _replace_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a new file and move it over ``path``: a crash leaves one or the other."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def rewrite_history(rows: Iterable[dict[str, Any]], path: str | os.PathLike, *,
                    reason: str = "the file was rewritten") -> str | None:
    """Make the history file hold exactly ``rows``; returns the backup kept, if any.

    Lines of the old file that the new content leaves out (rows, torn or foreign lines) are
    never lost: the old file is first kept as ``<file>.<k>.bak`` (``k`` one more than the last
    backup's; backups beyond the newest :data:`KEEP_BACKUPS` are deleted) and a warning says how many lines, why (``reason``), and where they are. The new
    content replaces the file in one step. No rows and no file: nothing is created.
    """
    path = os.path.abspath(path)
    new = _encode(rows).encode("utf-8")
    try:
        with open(path, "rb") as fh:
            old = fh.read()
    except FileNotFoundError:
        old = None
    if old == new or (old is None and not new):
        return None
    backup = None
    if old is not None:
        kept = set(new.splitlines())
        lost = [line for line in old.splitlines() if line.strip() and line not in kept]
        if lost:
            backup = _next_backup(path)
            try:
                os.link(path, backup)
            except OSError:  # no hard links here (some network or FAT file systems)
                with open(backup, "wb") as fh:
                    fh.write(old)
            for old_backup in history_backups(path)[KEEP_BACKUPS:]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old_backup)
            warnings.warn(f"{path}: {len(lost)} line(s) of the history file are not kept ({reason}); "
                          f"the previous file is kept as {backup} (the newest {KEEP_BACKUPS} "
                          "backups are kept).", stacklevel=2)
    if new:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _replace_atomically(path, new)
    elif old is not None and backup is not None:
        os.remove(path)  # every line is in the backup; no rows: no file
    return backup


class HistoryWriter:
    """The history file of one run, as the integrations write it (main process only).

    :meth:`start` gives the rows the file begins with (those before a resumed run's checkpoint;
    none for a new run). The file is (re)written only once there is a row to put in it: at once
    when there are such rows, else at the first :meth:`append`. A run that never records a row
    leaves the directory as it was (also an earlier run's file in it).

    Args:
        path: the history file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(path)
        self._start_rows: list[dict[str, Any]] = []
        self._reason = "a new run starts its own history here"
        self._started = False

    def start(self, rows: Iterable[dict[str, Any]] = (), *,
              reason: str = "a new run starts its own history here") -> None:
        """Begin the file with ``rows``; ``reason`` explains any lines of the present file left
        out (see :func:`rewrite_history`)."""
        self._start_rows, self._reason, self._started = list(rows), reason, False
        if self._start_rows:
            self._begin()

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if not self._started:
            self._begin()
        append_history(rows, self.path)

    def sync(self) -> None:
        """Flush what was written to disk (when a checkpoint is saved)."""
        if self._started:
            sync_history(self.path)

    def _begin(self) -> None:
        rewrite_history(self._start_rows, self.path, reason=self._reason)
        self._start_rows, self._started = [], True


class HistoryLog:
    """A run's history as every integration keeps it: the engine's rows, and the file.

    One per run and process; only the process that ``writes`` (the main one) touches the file.
    :meth:`new_run` or :meth:`resume` once, when training starts; :meth:`record` after updates
    (appends the engine's new rows); :meth:`sync` when a checkpoint is saved.

    Args:
        engine: the :class:`~hf_tempbalance.engine.TempBalance` whose ``history`` this logs.
        path: the history file (None: no file; the history then travels in checkpoints).
        writes: whether this process writes the file.
    """

    def __init__(self, engine: Any, path: str | os.PathLike | None, *, writes: bool) -> None:
        self.engine = engine
        self.path = os.path.abspath(path) if path is not None else None
        self._writer = HistoryWriter(self.path) if self.path is not None and writes else None
        self._written = 0  # rows of engine.history recorded so far

    def new_run(self) -> None:
        """A run from step 0: its file begins with its first row, all the engine's rows count
        as new (an earlier file in the place is kept as a backup then)."""
        if self._writer is not None:
            self._writer.start()
        self._written = 0

    def resume(self, step: int, *sources: str | os.PathLike | None, updates: int | None = None,
               multipliers: Mapping[str, float] | None = None, file_first: bool = False) -> None:
        """Continue from a checkpoint taken before optimizer step ``step`` (the engine's state is
        loaded). The rows of the updates before it come from the first intact source (see
        :func:`history_before`): the engine's own rows (those the checkpoint carried), this log's
        file, ``sources`` (e.g. the file of the run the checkpoint came from), their backups;
        ``file_first`` tries the file before the engine's rows (whose extra keys it may lack).
        ``updates`` and ``multipliers`` are the checkpoint's (default: the engine's, right after
        its state was loaded).
        The engine's history and the file continue from them; rows an earlier, longer run wrote
        after the checkpoint are left out of the file (kept in a backup, with a warning)."""
        engine = self.engine
        if self._writer is not None:
            own = [r for r in engine.history if r["step"] < step]
            first = (self.path, own) if file_first else (own, self.path)
            before = history_before(
                step, engine.num_updates if updates is None else updates, *first, *sources,
                *history_backups(self.path),
                multipliers=engine.multipliers if multipliers is None else multipliers,
                layers=engine.plan.names)
            engine.history = before + [r for r in engine.history if r["step"] >= step]
            self._writer.start(before, reason=f"the run resumes from the checkpoint at step {step} "
                                              "and makes the later updates again")
        self._written = len([r for r in engine.history if r["step"] < step])

    def record(self, **defaults: Any) -> list[dict[str, Any]]:
        """Append the engine's rows not recorded yet, each given ``defaults`` for keys it lacks
        (kept in the engine's rows too, so that checkpoints carry them); returns those rows."""
        rows = self.engine.history[self._written:]
        self._written = len(self.engine.history)
        for row in rows:
            for key, value in defaults.items():
                row.setdefault(key, value)
        if rows and self._writer is not None:
            self._writer.append(rows)
        return rows

    def sync(self) -> None:
        """Flush what was written to disk (a checkpoint is being saved)."""
        if self._writer is not None:
            self._writer.sync()


def history_before(step: int, updates: int,
                   *sources: Sequence[dict[str, Any]] | str | os.PathLike | None,
                   multipliers: Mapping[str, float] | None = None,
                   layers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The history rows of the updates made before optimizer step ``step``.

    What a run resumed from a checkpoint taken after ``step`` optimizer steps continues from:
    rows that a longer earlier run wrote after the checkpoint are left out. ``sources`` are
    looked at in order: lists of rows at hand (e.g. the history a checkpoint carried) and
    history files (typically the resumed run's own, then the one the checkpointed run wrote,
    then backups of them); the first intact one wins: it holds all ``updates`` updates the
    checkpoint followed, with ``layers`` one row per balanced layer in each (a damaged file that
    lost a row is passed over for an intact copy), and with ``multipliers`` (the checkpoint's)
    its last update gave exactly those, so a file of another run in the same directory is not
    taken for this one. If none is intact (a removed file, another machine), this warns and
    returns the most complete rows of a source that held fewer updates (possibly none).
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
        if not _complete(rows, updates, layers):
            best = max(best, rows, key=len)
        elif _ends_with(rows, multipliers):
            return rows
        # else: every update, other multipliers: another run's file, never used
    warnings.warn(
        f"the checkpoint at step {step} follows {updates} TempBalance updates, but the history "
        f"files ({', '.join(looked) or 'none given'}) do not hold them all (found "
        f"{len({r['update'] for r in best})} of them, or rows of another run); the history file "
        "continues from what was found.", stacklevel=3)
    return best


def _complete(rows: list[dict[str, Any]], updates: int, layers: Sequence[str] | None) -> bool:
    """Whether ``rows`` hold updates ``0..updates-1``, each with one row per layer of ``layers``."""
    by_update: dict[int, list[str]] = {}
    for row in rows:
        by_update.setdefault(row["update"], []).append(row["layer"])
    if set(by_update) != set(range(updates)):
        return False
    return layers is None or all(sorted(names) == sorted(layers) for names in by_update.values())


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
    last = max(r["update"] for r in rows)
    return {r["layer"]: r["multiplier"] for r in rows if r["update"] == last} == dict(multipliers)
