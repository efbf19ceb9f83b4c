"""TempBalance for Ultralytics YOLO training (Ultralytics 8.3 / 8.4).

Two entry points share one hook (:class:`TempBalanceHook`)::

    from ultralytics import YOLO
    from hf_tempbalance.integrations.ultralytics import TempBalanceDetectionTrainer

    trainer = TempBalanceDetectionTrainer.with_config(s1=0.6, s2=1.4)
    YOLO("yolov8n.pt").train(trainer=trainer, data="VOC2007.yaml", optimizer="Adam", lr0=1e-5)

    # or, on one device, with callbacks on the model:
    model = YOLO("yolov8n.pt"); add_tempbalance(model, s1=0.6, s2=1.4); model.train(...)

Use the trainer class for multi-GPU runs: Ultralytics starts its DDP workers from the trainer's
class, so a hook living in the class survives; the callback entry point refuses to run there.

What the hook does, and why Ultralytics' own behaviour is untouched:

* Ultralytics builds its optimizer as usual (its optimizer choice, its groups ``weight`` with
  decay, ``bn`` and ``bias`` without, key ``param_group``). The engine is attached to it: during
  each ``optimizer.step()`` the groups are split per balanced layer (each child keeps its group's
  hyperparameters, label and decay) with ``lr = group lr × m_i``, and merged back after the step.
  Between steps the optimizer holds exactly Ultralytics' groups and LRs, so its warm-up (which
  sets each group's lr from ``initial_lr`` every batch), its ``LambdaLR``, its ``lr/pg{i}`` logs
  and its checkpoints (resume reloads the optimizer state dict) work unchanged. The LR a
  parameter of layer ``i`` really gets at a batch is Ultralytics' LR times ``m_i``.
* ``m_i`` is recomputed at the first optimizer step of every epoch (``interval="epoch"``, the
  paper) or every ``interval`` optimizer steps (one step per batch when ``batch >= nbs``;
  Ultralytics accumulates gradients over ``nbs / batch`` batches otherwise).
* Logs (the rule is :mod:`hf_tempbalance.reporting`): at each epoch end the summary is printed
  as one line, and the summary keys and (``log_layers``) ``tempbalance/<metric>/<layer>``,
  ``tempbalance/multiplier/<layer>`` join ``trainer.lr``, which Ultralytics writes to
  ``results.csv`` and passes to its loggers (TensorBoard, W&B, MLflow, ...). The history file
  (:data:`hf_tempbalance.history.HISTORY_FILE`) is appended in ``save_dir`` with the Ultralytics
  epoch (1-based, as in ``results.csv``), from the first update on, and flushed to disk with every
  checkpoint. Files are written by the main process only. With no balanced layer (or
  ``balance_lr=False``) nothing is logged and no file is written.
* The engine state (multipliers, step count, history) is stored in each checkpoint as
  ``ckpt["optimizer"]["tempbalance"]`` and restored on resume.

``optimizer="auto"`` makes Ultralytics ignore ``lr0`` and pick the optimizer itself (SGD-like
MuSGD for long runs, AdamW with a fitted LR otherwise); the hook warns, and TempBalance then
scales whatever LR it picked. Pass an explicit ``optimizer`` to control the base LR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK

from ..config import TempBalanceConfig
from ..engine import TempBalance
from ..history import HISTORY_FILE, HistoryLog
from ..reporting import route_log_values, summary_line

__all__ = ["TempBalanceHook", "TempBalanceTrainerMixin", "TempBalanceDetectionTrainer",
           "add_tempbalance", "CHECKPOINT_KEY"]

#: Key of the engine state inside ``ckpt["optimizer"]`` of Ultralytics checkpoints.
CHECKPOINT_KEY = "tempbalance"


class TempBalanceHook:
    """The glue between one Ultralytics trainer and one :class:`TempBalance` engine.

    Args:
        config: TempBalance settings (``None``: the paper's defaults).
        **overrides: fields of :class:`TempBalanceConfig` to change.

    Attributes:
        tb: the engine, created when Ultralytics builds the optimizer (``None`` before).
    """

    def __init__(self, config: TempBalanceConfig | None = None, **overrides: Any) -> None:
        self.config = TempBalanceConfig.build(config, **overrides)
        self.tb: TempBalance | None = None
        self._path: Path | None = None  # the history file, in the trainer's save_dir
        self._log: HistoryLog | None = None  # the run's history (the file: main process)

    # ------------------------------------------------------------------ setup
    def attach(self, trainer: Any, optimizer: Any, name: str = "") -> Any:
        """Attach a new engine to the optimizer Ultralytics just built for ``trainer``."""
        if str(name).lower() == "auto":
            LOGGER.warning(
                "TempBalance: optimizer='auto' ignores lr0 and lets Ultralytics pick the optimizer and "
                "its LR; TempBalance scales whatever it picked. Pass e.g. optimizer='Adam', lr0=1e-5 "
                "to set the base LR yourself.")
        self.tb = TempBalance(trainer.model, self.config)
        self.tb.attach(optimizer)
        save_dir = getattr(trainer, "save_dir", None)
        self._path = Path(save_dir) / HISTORY_FILE if save_dir is not None else None
        self._log = HistoryLog(self.tb, self._path, writes=RANK in {-1, 0})
        # A new run in an existing save_dir (exist_ok=True) starts a new history at its first
        # update, as Ultralytics starts a new results.csv (the old file is kept as a backup); a
        # resumed one starts from the checkpoint's rows in _load_state.
        self._log.new_run()
        # The engine state travels inside the optimizer state dict, so it lands in every
        # Ultralytics checkpoint (last.pt, best.pt, epochN.pt) and comes back on resume.
        optimizer.register_state_dict_post_hook(self._save_state)
        optimizer.register_load_state_dict_pre_hook(self._load_state)
        if RANK in {-1, 0}:
            LOGGER.info(f"TempBalance: {len(self.tb.plan.layers)} layers balanced, "
                        f"{len(self.tb.plan.skipped)} skipped; {self.tb!r}")
        return optimizer

    def _save_state(self, optimizer: Any, state_dict: dict) -> dict:
        self._log.sync()  # a checkpoint is being made: its rows go to disk first
        state_dict[CHECKPOINT_KEY] = self.tb.state_dict()
        return state_dict

    def _load_state(self, optimizer: Any, state_dict: dict) -> dict:
        state = state_dict.pop(CHECKPOINT_KEY, None)
        if state is None:
            LOGGER.warning("TempBalance: this checkpoint holds no TempBalance state (made without "
                           "TempBalance?); multipliers restart at 1.0 until the next update.")
        else:
            try:
                self.tb.load_state_dict(state)
            except ValueError as err:
                raise ValueError(f"{err} (The state is ckpt['optimizer'][{CHECKPOINT_KEY!r}] of the "
                                 "Ultralytics checkpoint; deleting that key resumes with the "
                                 "multipliers at 1.0.)") from err
            # Resuming in the run's save_dir: drop rows an interrupted run appended after this
            # checkpoint (their epoch is trained again and writes them anew). The file's rows
            # carry the epoch; the checkpoint's own rows stand in for a damaged file.
            self._log.resume(self.tb.num_steps, file_first=True)
        return state_dict

    # ------------------------------------------------------------------ epoch events
    def on_train_epoch_start(self, trainer: Any) -> None:
        if self.config.interval == "epoch":
            self.tb.request_update()

    def on_train_epoch_end(self, trainer: Any) -> None:
        """The summary to the console, the reporters' values to ``trainer.lr`` (results.csv and
        Ultralytics' loggers; :mod:`hf_tempbalance.reporting`), the rows to the history file."""
        tb = self.tb
        # A fixed key set every epoch (results.csv writes its header once); none at all when
        # nothing is ever measured.
        if tb.config.balance_lr:
            values = route_log_values(tb)
            trainer.lr = {**getattr(trainer, "lr", {}), **values.reporters}
            if RANK in {-1, 0} and tb.num_updates and values.console:
                LOGGER.info(summary_line(values))
        self._log.record(epoch=trainer.epoch + 1)  # 1-based, as in results.csv

    EPOCH_EVENTS = ("on_train_epoch_start", "on_train_epoch_end")

    # ------------------------------------------------------------------ callback entry point
    def on_pretrain_routine_start(self, trainer: Any) -> None:
        """Callback mode: attach when the trainer builds its optimizer (before resume loads it)."""
        if isinstance(trainer, TempBalanceTrainerMixin):
            raise RuntimeError("TempBalance is attached twice: this trainer class already balances LRs. "
                               "Use either trainer=TempBalanceDetectionTrainer or add_tempbalance(model).")
        build = trainer.build_optimizer

        def build_optimizer(model: Any, name: str = "auto", *args: Any, **kwargs: Any) -> Any:
            return self.attach(trainer, build(model, name, *args, **kwargs), name)

        trainer.build_optimizer = build_optimizer

    def on_train_start(self, trainer: Any) -> None:
        if self.tb is None:
            raise RuntimeError(
                "TempBalance callbacks were not set up on this process: add_tempbalance(model) works on "
                "one device. For multi-GPU training use model.train(trainer=TempBalanceDetectionTrainer"
                ".with_config(...), ...), which Ultralytics rebuilds in every DDP worker.")

    CALLBACK_EVENTS = ("on_pretrain_routine_start", "on_train_start", *EPOCH_EVENTS)


class TempBalanceTrainerMixin:
    """Adds TempBalance to an Ultralytics trainer class (detect, segment, pose, ...).

    Set ``tempbalance_config`` in a subclass (or use :meth:`with_config`) to change the settings.
    """

    tempbalance_config: TempBalanceConfig = TempBalanceConfig()

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None,
                 _callbacks: dict | None = None) -> None:
        self.tempbalance = TempBalanceHook(self.tempbalance_config)  # before the base runs callbacks
        super().__init__(cfg, overrides, _callbacks)

    @classmethod
    def with_config(cls, config: TempBalanceConfig | None = None, **overrides: Any) -> type:
        """A subclass with other TempBalance settings, e.g. ``with_config(s1=0.6, s2=1.4)``.

        Ultralytics 8.4 sends it to DDP workers with cloudpickle. Versions that re-import the
        trainer by module path need a module-level subclass setting ``tempbalance_config``.
        """
        config = config if config is not None else cls.tempbalance_config
        config = config.replace(**overrides) if overrides else config
        return type(cls.__name__, (cls,), {"tempbalance_config": config, "__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__})

    def build_optimizer(self, model: Any, name: str = "auto", *args: Any, **kwargs: Any) -> Any:
        optimizer = super().build_optimizer(model, name, *args, **kwargs)
        return self.tempbalance.attach(self, optimizer, name)

    def run_callbacks(self, event: str) -> None:
        # The hook runs before user and logger callbacks, so its keys reach every logger.
        if event in TempBalanceHook.EPOCH_EVENTS:
            getattr(self.tempbalance, event)(self)
        super().run_callbacks(event)


class TempBalanceDetectionTrainer(TempBalanceTrainerMixin, DetectionTrainer):
    """Ultralytics' ``DetectionTrainer`` with TempBalance: ``model.train(trainer=...)``."""


def add_tempbalance(model: Any, config: TempBalanceConfig | None = None,
                    **overrides: Any) -> TempBalanceHook:
    """Register TempBalance callbacks on a ``YOLO`` model (one device; resume works).

    Returns the hook; after ``model.train(...)`` its ``tb`` is the engine of the last run.
    """
    hook = TempBalanceHook(config, **overrides)
    for event in TempBalanceHook.CALLBACK_EVENTS:
        model.add_callback(event, getattr(hook, event))
    return hook
