"""``evaluate`` metrics that work offline (recipe code, not part of the installed package).

:func:`load_metric` returns the Hub's metric when the Hub is reachable and the copy shipped in
this folder otherwise (``HF_HUB_OFFLINE``/``HF_EVALUATE_OFFLINE`` set, or the Hub download
failed). Both are ``evaluate.EvaluationModule`` objects with the same ``compute`` signature.
The recipes import it as ``metrics`` (``recipes/`` is on the path when they run).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = ["load_metric", "local_metrics"]

_HERE = Path(__file__).resolve().parent
_TRUE = {"1", "ON", "YES", "TRUE"}


def local_metrics() -> list[str]:
    """Names of the metric modules shipped with the package."""
    return sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_"))


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def _load_local(name: str, cache_dir: str) -> Any:
    import evaluate

    path = _HERE / f"{name}.py"
    if not path.exists():
        raise ValueError(f"no offline copy of the metric {name!r}; shipped metrics: {local_metrics()}")
    spec = importlib.util.spec_from_file_location(f"recipes_metric_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [obj for obj in vars(module).values() if isinstance(obj, type)
               and issubclass(obj, evaluate.EvaluationModule) and obj.__module__ == module.__name__]
    # keep_in_memory: nothing is written to the metrics cache (single-process evaluation).
    return classes[0](keep_in_memory=True, cache_dir=cache_dir)


def load_metric(name: str = "accuracy", *, offline: bool | None = None,
                cache_dir: str | os.PathLike | None = None) -> Any:
    """An ``evaluate`` metric by name: from the Hub when online, else the shipped copy.

    Args:
        name: metric name (``evaluate.load`` name; offline only :func:`local_metrics`).
        offline: force (True) or forbid (False) the shipped copy; ``None`` follows
            ``HF_HUB_OFFLINE``/``HF_EVALUATE_OFFLINE`` and falls back to it if the Hub fails.
        cache_dir: where ``evaluate`` may put its (empty, in-memory) metric folder; default: a
            folder in the system temp dir, so nothing is written under the user's home.
    """
    cache_dir = str(cache_dir or Path(tempfile.gettempdir()) / "hf_tempbalance_metrics")
    if offline is None:
        offline = _offline()
    if not offline:
        import evaluate

        try:
            return evaluate.load(name, keep_in_memory=True, cache_dir=cache_dir)
        except Exception as err:  # no network, hub error: the shipped copy computes the same
            if name not in local_metrics():
                raise
            warnings.warn(f"evaluate.load({name!r}) failed ({type(err).__name__}: {err}); using "
                          "the copy shipped with hf_tempbalance", stacklevel=2)
    return _load_local(name, cache_dir)
