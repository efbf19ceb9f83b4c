r"""When TempBalance recomputes its multipliers, and the one definition of an epoch.

With ``every`` optimizer steps per update (``interval``, or ``steps_per_epoch`` for
``interval="epoch"``) and first step ``s0`` (``start_step``), step ``t`` lies in window

.. math::  w(t) = \lfloor (t - s_0) / \text{every} \rfloor,

and an update is due before step ``t`` when ``t >= s0`` and either an update was requested, or
no update has been made in window ``w(t)`` yet. So updates come at ``s0, s0 + every, ...``, and a
window whose first step never reached the optimizer (a step the Trainer's fp16 GradScaler
skipped still advances its ``global_step``) gets its update at its next step. With
``interval="epoch"`` and no known epoch length (an ``IterableDataset``), only requests make
updates: the integration calls :meth:`UpdateSchedule.request` at each epoch start.

The step ``t`` is always passed in: the schedule keeps no clock of its own.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["UpdateSchedule", "steps_per_epoch"]


def steps_per_epoch(batches: int, accumulation: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches`` batches: ``ceil(batches / accumulation)``, at
    least 1 (a last, partial accumulation still steps, as the Trainer and Accelerate do)."""
    return max(1, math.ceil(batches / max(1, accumulation)))


class UpdateSchedule:
    """The update schedule of the module docstring.

    Args:
        interval: optimizer steps between updates, or ``"epoch"``.
        start_step: first step that may have an update.
        steps_per_epoch: optimizer steps per epoch, for ``interval="epoch"`` (None: unknown).
    """

    def __init__(self, interval: int | str, start_step: int = 0,
                 steps_per_epoch: int | None = None) -> None:
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.interval = interval
        self.start_step = start_step
        self.steps_per_epoch = steps_per_epoch
        self.requested = False
        self.last_served: int | None = None  # step of the last update the windows made

    @property
    def every(self) -> int | None:
        """Optimizer steps per window (None: epoch-driven with an unknown epoch length)."""
        return self.steps_per_epoch if self.interval == "epoch" else self.interval

    def request(self) -> None:
        """Ask for an update before the next step (an epoch start of unknown length)."""
        self.requested = True

    def planned(self, step: int) -> bool:
        """Whether ``step`` starts a window (the plain schedule, whatever happened before)."""
        every = self.every
        return step >= self.start_step and every is not None and (step - self.start_step) % every == 0

    def due(self, step: int) -> bool:
        """Whether an update is due before optimizer step ``step`` (the next one to run)."""
        if step < self.start_step:
            return False
        if self.requested:
            return True
        every = self.every
        if every is None:
            return False
        last = -1 if self.last_served is None else (self.last_served - self.start_step) // every
        return (step - self.start_step) // every > last

    def served(self, step: int) -> None:
        """Record the update made before ``step``: the request and the window are served."""
        self.requested = False
        if self.every is not None and step >= self.start_step:
            self.last_served = step

    def state_dict(self) -> dict[str, Any]:
        return {"update_requested": self.requested, "last_scheduled_step": self.last_served,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any], next_step: int) -> None:
        """Restore :meth:`state_dict` output (validated by the caller). An epoch length known now
        (this run's data loader) wins over the saved one: a run resumed with another batch size
        or process count has other epochs."""
        self.requested = bool(state["update_requested"])
        self.steps_per_epoch = self.steps_per_epoch or state.get("steps_per_epoch")
        if "last_scheduled_step" in state:
            self.last_served = state["last_scheduled_step"]
        else:  # saved before this key existed: every window up to the last step was served
            self.last_served = next_step - 1 if next_step > self.start_step else None
