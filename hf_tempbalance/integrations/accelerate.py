"""Accelerate glue for custom training loops (DDP, FSDP2, one device)::

    accelerator = Accelerator()
    tb = TempBalance(model, TempBalanceConfig(interval=100))
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1, weight_decay=5e-4), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    tempbalance = AcceleratedTempBalance(tb, accelerator, output_dir="run")
    tempbalance.attach(optimizer, loader)       # checks the launch, then tb.attach(optimizer)
    accelerator.register_for_checkpointing(tempbalance)   # save_state / load_state resume it
    for batch in loader:
        ...; accelerator.backward(loss); optimizer.step(); scheduler.step(); optimizer.zero_grad()
        accelerator.log(tempbalance.log())      # history rows -> file; values -> the trackers

What the prepared objects do to the LRs. ``AcceleratedOptimizer.step()`` calls the wrapped torch
optimizer only on real optimizer steps (gradient accumulation, skipped fp16 steps), and the
engine's hooks sit on that torch optimizer, so its clock counts real steps. ``AcceleratedScheduler``
steps the wrapped scheduler ``num_processes`` times per optimizer step unless
``Accelerator(split_batches=True)`` (each step consumed ``num_processes`` batches). The engine
multiplies whatever the scheduler left in a group, so the LR layer ``i`` uses at optimizer step
``t`` is ``scheduler_lr(k) · m_i(t)`` with ``k = num_processes · t`` scheduler steps
(``k = t`` with ``split_batches=True``): size the schedule in single-process steps, as Accelerate
expects, while ``TempBalanceConfig.interval`` always counts optimizer steps.

Resume. Registered for checkpointing, the wrapper saves the engine's state (multipliers, metrics,
step clock) with ``accelerator.save_state``; the history stays in the history file, which
``accelerator.load_state`` followed by the first :meth:`AcceleratedTempBalance.log` reads back up
to the checkpoint's step, from the new ``output_dir`` or else from the file the checkpointed run
wrote (see :func:`hf_tempbalance.history.history_before`); rows the file held after the
checkpoint are cut with a warning and kept in a backup. Without an ``output_dir`` the history
travels in the checkpoint. The file is written from the first row on (no file while there is
nothing to record) and flushed to disk at every ``save_state`` (see :mod:`hf_tempbalance.history`).

Every rank must run the same optimizer steps (so every rank joins each update's collective);
every rank then applies bit-identical multipliers (see :mod:`hf_tempbalance.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..distributed import UNSUPPORTED_SHARDING, check_launch
from ..engine import TempBalance
from ..history import HISTORY_FILE, HistoryLog
from ..reporting import LogValues, route_log_values, summary_line
from ..schedule import steps_per_epoch

__all__ = ["AcceleratedTempBalance", "check_accelerator"]

def check_accelerator(accelerator: Any) -> None:
    """Refuse set-ups where TempBalance would be silently wrong, naming the fix.

    * Several processes launched but the ``Accelerator`` is not distributed (e.g. ``accelerate
      launch --multi_gpu`` on a machine without GPUs and without ``ACCELERATE_USE_CPU=true``):
      every process trains its own model, and one update would mix their layers.
    * FSDP1 and DeepSpeed ZeRO-3, whose local weights are shards (see
      :data:`hf_tempbalance.distributed.UNSUPPORTED_SHARDING`).
    """
    check_launch(accelerator.num_processes,
                 f"the Accelerator (distributed_type={accelerator.distributed_type})",
                 "On CPU launch with ACCELERATE_USE_CPU=true (or Accelerator(cpu=True)); on GPUs "
                 "check that `accelerate launch` sees them.")
    state = accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
        raise RuntimeError(f"TempBalance does not support FSDP1. {UNSUPPORTED_SHARDING}")
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None and getattr(deepspeed, "zero_stage", None) == 3:
        raise RuntimeError(f"TempBalance does not support DeepSpeed ZeRO-3. {UNSUPPORTED_SHARDING}")


class AcceleratedTempBalance:
    """A :class:`TempBalance` engine in a custom Accelerate loop (see the module docstring).

    Args:
        tb: the engine, built on the model before ``accelerator.prepare``.
        accelerator: the ``Accelerator``.
        output_dir: where the main process appends ``tempbalance_history.jsonl`` (None: no file).
        history_file: the history file's name.
    """

    def __init__(self, tb: TempBalance, accelerator: Any, output_dir: str | os.PathLike | None = None,
                 *, history_file: str = HISTORY_FILE) -> None:
        self.tb = tb
        self.accelerator = accelerator
        self.path = (os.path.abspath(os.path.join(output_dir, history_file))
                     if output_dir is not None else None)
        # (step, updates, multipliers) where this process began: new, or a checkpoint's
        self._takeover: tuple[int, int, dict[str, float]] | None = None
        self._saved_path: str | None = None  # history file of the run a checkpoint came from
        self._log: HistoryLog | None = None  # made at the first log(), where this process took over

    def attach(self, optimizer: Any, train_dataloader: Any = None) -> TempBalance:
        """Check the set-up, then attach the engine to the prepared optimizer.

        ``train_dataloader`` (the prepared one) gives ``steps_per_epoch`` for ``interval="epoch"``:
        ``ceil(len(loader) / gradient_accumulation_steps)`` optimizer steps per epoch. Without it,
        call ``tb.request_update()`` at the start of every epoch, on every process.
        """
        check_accelerator(self.accelerator)
        tb = self.tb
        self._takeover = (tb.num_steps, tb.num_updates, dict(tb.multipliers))
        if tb.config.interval == "epoch" and tb.steps_per_epoch is None and train_dataloader is not None:
            accumulation = int(getattr(self.accelerator, "gradient_accumulation_steps", 1))
            tb.steps_per_epoch = steps_per_epoch(len(train_dataloader), accumulation)
        return tb.attach(optimizer)

    def log(self) -> dict[str, float]:
        """Append the history rows of updates since the last call (main process only).

        Returns the values for the reporters, ready for ``accelerator.log`` (which itself logs on
        the main process only): the ``tempbalance/...`` summary and, with ``log_layers``, the
        per-layer values (:mod:`hf_tempbalance.reporting`), when an update was made since the
        last call; else empty. A loop calls it every step, and the values change only at an
        update: sending them every step would repeat hundreds of per-layer scalars per step for
        a large model. For the console, print :meth:`summary_line`.
        """
        if self._log is None:
            self._start_log()
        return self._values().reporters if self._log.record() else {}

    def summary_line(self) -> str:
        """The console summary as one line ("" before the first update), e.g. for
        ``accelerator.print``."""
        return summary_line(self._values())

    def _values(self) -> LogValues:
        return route_log_values(self.tb) if self.tb.num_updates else LogValues()

    def _start_log(self) -> None:
        """Begin the history where this process took over: for a resumed run the rows of the
        updates before the checkpoint, none for a new one."""
        step, updates, multipliers = self._takeover or (0, 0, None)
        self._log = HistoryLog(self.tb, self.path, writes=self.accelerator.is_main_process)
        if step == 0 and updates == 0:
            self._log.new_run()
        else:
            self._log.resume(step, self._saved_path, updates=updates, multipliers=multipliers)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The engine's state and the history file's path, for
        ``accelerator.register_for_checkpointing(self)``.

        The history is left out when it has a file (the checkpoint would otherwise grow by a row
        per layer and update); a run resumed elsewhere reads it back from that path. Called as a
        checkpoint is saved: the rows it follows go to disk first.
        """
        if self._log is not None:
            self._log.sync()
        return {"engine": self.tb.state_dict(include_history=self.path is None),
                "history_path": self.path}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (called by ``accelerator.load_state``); a bare
        :meth:`TempBalance.state_dict` is accepted too. Checked whole before anything changes
        (``ValueError`` naming the field, see :meth:`TempBalance.load_state_dict`)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"an AcceleratedTempBalance state is the dict its state_dict() returns, "
                             f"got a {type(state).__name__}; resume from an intact checkpoint.")
        saved_path = state.get("history_path")
        if not (saved_path is None or isinstance(saved_path, str)):
            raise ValueError(f"AcceleratedTempBalance state: 'history_path' is {saved_path!r}, not "
                             "a path or null; resume from an intact checkpoint.")
        self.tb.load_state_dict(state["engine"] if "engine" in state else state)
        self._saved_path = saved_path
        self._takeover = (self.tb.num_steps, self.tb.num_updates, dict(self.tb.multipliers))
        self._log = None
