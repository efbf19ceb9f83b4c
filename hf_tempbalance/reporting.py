"""Where TempBalance's logged values go: one rule, used by the Trainer, Accelerate and Ultralytics glue.

* **Console** (the Trainer's printed log lines, ``trainer_state.json``, what a loop prints): the
  summary only, five scalars that keep one line readable whatever the model's size:
  ``tempbalance/<metric>_mean|min|max`` and ``tempbalance/multiplier_min|max``.
* **Reporters** (TensorBoard, W&B, MLflow, ... and Ultralytics' ``results.csv``): the summary and,
  with ``config.log_layers`` (default), one scalar per balanced layer,
  ``tempbalance/<metric>/<layer>`` and ``tempbalance/multiplier/<layer>``.
* **History file** (``tempbalance_history.jsonl``, :mod:`hf_tempbalance.history`): every row of
  every update, whatever ``log_layers`` says.

Per-layer values are scalars, not histograms: the question a reporter answers is "what LR did this
layer get, and how did its alpha move" (a tag filter such as ``multiplier/.*layer4`` in TensorBoard
or W&B finds a layer's curve), and a histogram over layers loses which layer is which. The spread
over layers is what the summary's min/mean/max draw, and ``hf-tempbalance plot`` draws every layer
at once as a heatmap from the history file. For a model with hundreds of layers whose reporter
should stay small, ``log_layers=False`` sends the summary only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LogValues", "route_log_values", "summary_line", "PREFIX"]

#: Prefix of every logged key (the Trainer's TensorBoard writer adds ``train/`` before it).
PREFIX = "tempbalance/"


@dataclass(frozen=True)
class LogValues:
    """The values of one logging step, by destination (both empty when no layer is balanced)."""

    console: dict[str, float] = field(default_factory=dict)
    reporters: dict[str, float] = field(default_factory=dict)

    @property
    def reporters_only(self) -> dict[str, float]:
        """What goes to the reporters and not to the console (the per-layer values)."""
        return {k: v for k, v in self.reporters.items() if k not in self.console}


def route_log_values(engine: Any, prefix: str = PREFIX) -> LogValues:
    """The summary for the console; the summary and (``log_layers``) per-layer values for reporters.

    Where, not when: the glue decides when to log (the Trainer and Accelerate from the first update
    on; Ultralytics every epoch, with ``nan`` before one, since ``results.csv`` writes its header
    once). ``engine=None`` (not built yet) logs nothing.
    """
    if engine is None:
        return LogValues()
    return LogValues(console=engine.log_values(prefix, per_layer=False),
                     reporters=engine.log_values(prefix))


def summary_line(values: LogValues, prefix: str = PREFIX) -> str:
    """The console summary as one printed line ("" when there is none), for loops that print
    rather than hand a dict to a logger (Ultralytics' glue, an Accelerate loop)::

        TempBalance: alpha_hill mean 2.531 (min 2.105, max 6.397), LR multipliers 0.5-1.5
    """
    console = {k.removeprefix(prefix): v for k, v in values.console.items()}
    metric = next((k[:-len("_mean")] for k in console
                   if k.endswith("_mean") and not k.startswith("multiplier")), None)
    if metric is None:
        return ""
    return (f"TempBalance: {metric} mean {console[metric + '_mean']:.4g} (min "
            f"{console[metric + '_min']:.4g}, max {console[metric + '_max']:.4g}), LR multipliers "
            f"{console['multiplier_min']:.4g}-{console['multiplier_max']:.4g}")
