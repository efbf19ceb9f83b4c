"""Hugging Face ``Trainer`` integration: ``Trainer(..., callbacks=[TempBalanceCallback()])``.

How the pieces fit the Trainer's loop (``on_pre_optimizer_step -> optimizer.step() ->
lr_scheduler.step() -> on_step_end``, reference-notes §4):

* At ``on_train_begin`` the callback builds a :class:`~hf_tempbalance.TempBalance` engine for the
  model and attaches it to the Trainer's optimizer. The engine's step hooks scale each layer's LR
  by its multiplier *inside* ``optimizer.step()`` and put the scheduler's value back right after,
  so the LR used for layer ``i`` at step ``t`` (step 0 included) is ``scheduler_lr(t) · m_i(t)``
  with every scheduler ``get_scheduler`` makes and with a user's own; nothing compounds, and the
  optimizer's groups, ``state_dict`` and checkpoints stay exactly as the Trainer made them.
* The engine's clock is ``state.global_step`` (passed as its ``clock``: optimizer steps, so
  gradient accumulation counts correctly, and a step the fp16 GradScaler skipped still counts); ``interval="epoch"`` means every ``num_update_steps_per_epoch`` steps, computed the
  way the Trainer does, which keeps resumed runs identical to uninterrupted ones.
* Resume: the engine state is saved with each checkpoint through ``ExportableState`` and restored
  from the checkpoint's ``trainer_state.json`` (with or without
  ``restore_callback_states_from_checkpoint``), so a resumed run applies the same LRs.
* Logging (the rule is :mod:`hf_tempbalance.reporting`): the summary goes to the console and
  ``trainer_state.json``, the summary and per-layer values (``log_layers``) to the reporting
  integrations. The Trainer calls user callbacks after its reporting integrations, and no
  supported API lets a callback change that order: with a plain ``Trainer`` only the console and
  ``trainer_state.json`` get the summary and the callback warns if ``report_to`` names an
  integration; :class:`TempBalanceTrainer` adds the summary in ``log()``, before any callback, and
  then hands the per-layer values to the reporting integrations alone.
  The full history is written to ``<output_dir>/tempbalance_history.jsonl`` (main process only),
  from the first update on: a run that balances no layer, or has made no update yet, adds no file
  and no log key. Resuming cuts the file back to the checkpoint, keeping the old file as a backup
  (see :mod:`hf_tempbalance.history` for this and for when rows reach the disk).

:class:`TempBalanceTrainer` and :func:`tempbalance_optimizer_cls_and_kwargs` build the optimizer
with one labelled group per layer from the start (the ``create_optimizer`` path), for users who want
the per-layer groups visible in the optimizer (e.g. for their own per-group logging).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging as hf_logging

try:  # every reporting integration the Trainer knows (report_to names, or added by hand)
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    _REPORTERS: tuple[type, ...] = tuple(INTEGRATION_TO_CALLBACK.values())
except ImportError:  # pragma: no cover - moved in some future Transformers
    from transformers.integrations import TensorBoardCallback, WandbCallback
    _REPORTERS = (TensorBoardCallback, WandbCallback)

try:  # Transformers >= 5: optimizer factories (Muon, Dion) are called with the model
    from transformers.trainer_optimizer import is_optimizer_factory
except ImportError:  # pragma: no cover - older Transformers have none
    def is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False

from ..config import TempBalanceConfig
from ..distributed import check_launch
from ..engine import TempBalance
from ..history import HISTORY_FILE, HistoryLog
from ..reporting import LogValues, route_log_values
from ..schedule import steps_per_epoch

__all__ = ["TempBalanceCallback", "TempBalanceTrainer", "tempbalance_optimizer_cls_and_kwargs"]

logger = hf_logging.get_logger(__name__)

# optimizer_kwargs keys with which the Trainer's optimizer takes something else than our groups
_OWN_LAYOUT = {"params", "model", "optimizer_dict"}


def _steps_per_epoch(args: TrainingArguments, train_dataloader: Any) -> int | None:
    """Optimizer steps per epoch, as ``Trainer.set_initial_training_values`` computes them."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    return steps_per_epoch(batches, args.gradient_accumulation_steps)


class TempBalanceCallback(TrainerCallback, ExportableState):
    """Turn on TempBalance for any ``Trainer``: ``Trainer(..., callbacks=[TempBalanceCallback()])``.

    Args:
        config: a :class:`TempBalanceConfig` (or its ``to_dict()``); ``None`` = paper defaults.
        history_file: file name of the JSONL history in ``args.output_dir`` (``None``: none).
        **overrides: fields of :class:`TempBalanceConfig` to change, e.g. ``interval=100``.

    Attributes:
        engine: the :class:`TempBalance` engine (built at ``on_train_begin``).
    """

    def __init__(self, config: TempBalanceConfig | dict | None = None, *,
                 history_file: str | None = HISTORY_FILE, **overrides: Any) -> None:
        self.config = TempBalanceConfig.build(config, **overrides)
        self.history_file = history_file
        self.engine: TempBalance | None = None
        # Both set by the Trainer when it restores callback states from a checkpoint:
        self.engine_state: dict | None = None
        self.history_path: str | None = None  # the history file the checkpointed run wrote
        self._log: HistoryLog | None = None  # this run's history (the file: main process)
        self._epoch = 0.0
        self._reentered_epoch = False  # the next on_epoch_begin continues a checkpointed epoch
        self._warned_reporters = False

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        # The history (a row per layer and update) lives in the history file, which a resumed
        # run reads back up to the checkpoint (from its own output_dir, else from the file named
        # here); so trainer_state.json stays the same size however often the engine updates.
        # Without a file the history has to travel here. Called as a checkpoint is saved: the rows
        # it follows go to disk first.
        if self._log is not None:
            self._log.sync()
        engine_state = (self.engine.state_dict(include_history=not self.history_file)
                        if self.engine is not None else self.engine_state)
        return {
            "args": {"config": self.config.to_dict(), "history_file": self.history_file},
            "attributes": {"engine_state": engine_state, "history_path": self.history_path},
        }

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs):
        if optimizer is None:
            raise RuntimeError(
                "TempBalanceCallback found no optimizer at on_train_begin; DeepSpeed builds its optimizer "
                "inside its engine, which TempBalance cannot reach. Train with DDP (accelerate launch / "
                "torchrun) or on one device.")
        check_launch(args.world_size, f"the Trainer (parallel_mode={args.parallel_mode.value})",
                     "On CPU pass --use_cpu true (TrainingArguments(use_cpu=True)) or set "
                     "ACCELERATE_USE_CPU=true; on GPUs check that the launcher sees them.")
        if self.engine is not None:  # a train() that raised never reached on_train_end
            self.engine.detach()
        # The Trainer's global_step is the clock: it also advances over a step the fp16
        # GradScaler skipped (optimizer.step() not called), as the schedule expects.
        self.engine = engine = TempBalance(model, self.config, clock=lambda: state.global_step)
        if self.config.interval == "epoch":
            engine.steps_per_epoch = _steps_per_epoch(args, train_dataloader)
        saved, saved_path = self._saved_state(state)
        if saved is not None:
            try:
                engine.load_state_dict(saved)  # keeps this run's epoch length when it knows one
            except ValueError as err:
                raise ValueError(
                    f"{err} (The state is the {type(self).__name__} entry of stateful_callbacks in "
                    "the checkpoint's trainer_state.json; deleting that entry resumes with the "
                    "multipliers at 1.0.)") from err
        elif state.global_step > 0:
            warnings.warn(
                f"resuming at step {state.global_step} from a checkpoint without TempBalance state "
                f"(made without {type(self).__name__}, or its entry in stateful_callbacks of "
                "trainer_state.json is missing or empty): the multipliers restart at 1.0 until the "
                f"next update and the history starts anew (an earlier {self.history_file} is kept "
                "as a backup when the first update is written).", stacklevel=2)
        self._register(state)
        # A resumed Trainer re-enters the epoch it was in (on_epoch_begin again, mid-epoch): that
        # epoch's start was handled before the checkpoint (a pending request is in its state).
        self._reentered_epoch = saved is not None and state.global_step > 0
        engine.attach(optimizer)
        self._warn_if_too_few_updates(state)
        path = (os.path.abspath(os.path.join(args.output_dir, self.history_file))
                if self.history_file else None)
        self.history_path = path if path is not None else self.history_path
        self._log = HistoryLog(engine, path, writes=state.is_world_process_zero)
        if saved is None:
            self._log.new_run()
        else:
            # A resumed run continues from the checkpoint's history, not from rows a longer
            # earlier run wrote after it; the checkpointed run's own file is a further source.
            self._log.resume(state.global_step, saved_path)

    def _register(self, state: TrainerState) -> None:
        """Give the Trainer's state an entry for this callback if the checkpoint had none: the
        Trainer's next save looks it up by name and raises KeyError without it."""
        stored = state.stateful_callbacks
        if isinstance(stored, dict) and type(self).__name__ not in stored:
            stored[type(self).__name__] = self.state()

    def _saved_state(self, state: TrainerState) -> tuple[dict | None, str | None]:
        """(engine state, history file of the checkpointed run) to resume from: the restored
        attributes, else the checkpoint's trainer state; (None, None) for a new run."""
        if self.engine_state is not None:
            saved, self.engine_state = self.engine_state, None
            return saved, _a_path(self.history_path)
        if state.global_step > 0:
            stored = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(stored, list):
                stored = stored[0] if stored else None
            if stored is not None:
                attributes = stored.get("attributes") if isinstance(stored, dict) else None
                if not isinstance(attributes, dict):
                    raise ValueError(
                        f"the {type(self).__name__} entry of stateful_callbacks in the checkpoint's "
                        f"trainer_state.json is damaged (no 'attributes' dict: {stored!r:.200}); "
                        "resume from an intact checkpoint, or delete that entry to resume with "
                        "the multipliers at 1.0.")
                return attributes.get("engine_state"), _a_path(attributes.get("history_path"))
        return None, None

    def _warn_if_too_few_updates(self, state: TrainerState) -> None:
        engine, cfg = self.engine, self.config
        interval = engine.interval
        if interval is None or not state.max_steps or not cfg.balance_lr:
            return
        remaining = state.max_steps - max(cfg.start_step, state.global_step)
        updates = max(0, math.ceil(remaining / interval))
        if updates < 2:
            suggestion = max(1, (state.max_steps - cfg.start_step) // 10)
            warnings.warn(
                f"TempBalance will update its multipliers only {updates} time(s) in this run "
                f"(interval={cfg.interval!r} = {interval} steps, max_steps={state.max_steps}); "
                f"pass interval={suggestion} (every {suggestion} optimizer steps) for a short run.",
                stacklevel=2)

    # ------------------------------------------------------------------ training loop
    def on_epoch_begin(self, args, state, control, **kwargs):
        # Only when the epoch length is unknown (an IterableDataset): otherwise the step clock
        # decides, which keeps a resumed run (that re-enters its epoch mid-way) identical.
        reentered, self._reentered_epoch = self._reentered_epoch, False
        if self.engine is not None and self.engine.interval is None and not reentered:
            self.engine.request_update()

    def on_step_begin(self, args, state, control, **kwargs):
        self._epoch = state.epoch or 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self._log is not None:
            self._log.record(epoch=self._epoch)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.detach()

    # ------------------------------------------------------------------ logging
    def log_values(self) -> LogValues:
        """The ``tempbalance/...`` values of this logging step by destination
        (:func:`~hf_tempbalance.reporting.route_log_values`); empty before the first update and when
        no layer is balanced."""
        engine = self.engine
        return route_log_values(engine) if engine is not None and engine.num_updates else LogValues()

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if logs is not None and "loss" in logs:  # training logs only, not eval/final summaries
            console = self.log_values().console
            if console and not console.keys() <= logs.keys():
                # not added by TempBalanceTrainer.log: the reporters ran without them
                self._warn_if_reporters_miss_values(args)
                logs.update(console)
                # The Trainer stored its copy of these logs before calling us: add them there too.
                if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                    state.log_history[-1].update(console)

    def _warn_if_reporters_miss_values(self, args: TrainingArguments) -> None:
        # The Trainer runs its reporting integrations before user callbacks, so keys added here
        # reach the console and log_history but not TensorBoard / W&B; TempBalanceTrainer adds
        # them before any callback sees the logs. (A callback cannot reorder the Trainer's
        # callbacks through any supported API.)
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._warned_reporters and args.process_index == 0:
            self._warned_reporters = True
            warnings.warn(
                f"TempBalance values are logged to the console and trainer_state.json but do not "
                f"reach report_to={reporters}: the Trainer calls those before TempBalanceCallback. "
                "Use hf_tempbalance.TempBalanceTrainer (same arguments; it logs them first).",
                stacklevel=2)


def _a_path(value: Any) -> str | None:
    """A history path saved in a checkpoint, or None for anything else (it is only a hint)."""
    return value if isinstance(value, str) and value else None


def _labelled_groups(model: nn.Module, args: TrainingArguments, config: TempBalanceConfig) -> list[dict]:
    """One group per (balanced layer, decay/no-decay) with the Trainer's own decay split."""
    # get_decay_parameter_names does not use the Trainer instance; calling it unbound keeps the
    # Trainer's exact rule (bias, LayerNorm, *norm names) without copying it.
    decay = Trainer.get_decay_parameter_names(None, model)
    return TempBalance(model, config).param_groups(weight_decay=args.weight_decay, decay_names=decay)


def tempbalance_optimizer_cls_and_kwargs(
    model: nn.Module, args: TrainingArguments, config: TempBalanceConfig | None = None
) -> tuple[type, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for ``Trainer`` with one labelled group per balanced layer.

    Keeps the optimizer chosen by ``args.optim`` and the Trainer's weight-decay split::

        trainer = Trainer(model, args, ..., callbacks=[TempBalanceCallback(cfg)],
                          optimizer_cls_and_kwargs=tempbalance_optimizer_cls_and_kwargs(model, args, cfg))

    Use the same ``config`` for the callback so both see the same layers.
    """
    config = TempBalanceConfig.build(config)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls, {**optimizer_kwargs, "params": _labelled_groups(model, args, config)}


class TempBalanceTrainer(Trainer):
    """A ``Trainer`` whose ``create_optimizer`` builds one labelled group per balanced layer.

    Same optimizer (``args.optim``, or ``optimizer_cls_and_kwargs``) and weight-decay split as the
    Trainer. Adds a :class:`TempBalanceCallback` if none was passed.

    Args:
        tempbalance_config: config for the callback it adds (ignored if one was passed).
    """

    def __init__(self, *args: Any, tempbalance_config: TempBalanceConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.tempbalance is None:
            callback = TempBalanceCallback(tempbalance_config)
            self.add_callback(callback)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log`` with the TempBalance summary added first, so that every callback
        (console, ``log_history``, the reporting integrations) receives it; the per-layer values
        then go to the reporting integrations (TensorBoard, W&B, ...) only
        (:mod:`hf_tempbalance.reporting`)."""
        callback = self.tempbalance
        values = callback.log_values() if callback is not None and "loss" in logs else LogValues()
        super().log({**logs, **values.console}, *args, **kwargs)
        if values.reporters_only:
            self._report_only(values.reporters_only)

    def _report_only(self, values: dict[str, float]) -> None:
        """``on_log`` of the reporting integrations alone, at the current step (the console
        printers and the user's callbacks do not see these values)."""
        handler = self.callback_handler
        for reporter in handler.callbacks:
            if isinstance(reporter, _REPORTERS):
                reporter.on_log(self.args, self.state, self.control, logs=dict(values),
                                model=handler.model, processing_class=handler.processing_class,
                                optimizer=handler.optimizer, lr_scheduler=handler.lr_scheduler,
                                train_dataloader=handler.train_dataloader,
                                eval_dataloader=handler.eval_dataloader)

    @property
    def tempbalance(self) -> TempBalanceCallback | None:
        """The TempBalance callback (looked up each time: resuming may replace it)."""
        return next((cb for cb in self.callback_handler.callbacks
                     if isinstance(cb, TempBalanceCallback)), None)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or _OWN_LAYOUT & optimizer_kwargs.keys():
            # The optimizer brings its own layout (user or GaLore groups, LOMO's model, Muon's
            # factory): keep it; the callback splits its groups by layer at each step.
            logger.info("TempBalanceTrainer: the optimizer builds its own parameter groups; "
                        "TempBalance splits them per layer during each step.")
            return super().create_optimizer(model)
        # The Trainer's own create_optimizer with our groups as "params" (its usual override for
        # GaLore), so everything else it does (bitsandbytes overrides, ...) still happens.
        groups = _labelled_groups(opt_model, self.args, self.tempbalance.config)
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (optimizer_cls, {**optimizer_kwargs, "params": groups})
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved
