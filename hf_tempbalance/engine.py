r"""The framework-free TempBalance engine.

``TempBalance(model, config)`` finds the layers to balance, builds labelled optimizer groups, and
every ``interval`` optimizer steps recomputes each layer's metric (PL_Alpha_Hill by default) and
maps it to a multiplier ``m_i`` (paper Eq. 2). The LR layer ``i`` really uses at step ``t`` is

.. math::  \eta_i(t) = \eta_{\text{sched}}(t) \cdot m_i(t)

where :math:`\eta_{\text{sched}}` is whatever value the LR scheduler (or the user) left in the
group. The engine applies this with an optimizer *step pre-hook* that multiplies each labelled
group's ``lr`` by its multiplier and a *step post-hook* that puts the scheduler's value back. So a
scheduler never sees a scaled LR: multipliers never compound, every scheduler (``LambdaLR``,
``ReduceLROnPlateau``, Ultralytics' warm-up ramps, a user's own) keeps working unchanged, and
step 0 is covered::

    tb = TempBalance(model, TempBalanceConfig(interval=100))
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1, weight_decay=5e-4), momentum=0.9)
    tb.attach(optimizer)          # that is all: updates and LR scaling happen inside step()

For ``interval="epoch"`` call :meth:`TempBalance.request_update` at the start of each epoch, or
pass ``steps_per_epoch``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .assign import assign_multipliers, valid_for
from .binding import Factors, OptimizerBinding, unwrap_optimizer
from .config import TempBalanceConfig
from .distributed import check_unsharded, is_main_process, sharded_metrics
from .groups import DEFAULT_NO_DECAY, GROUP_KEY, build_param_groups
from .history import row_problem
from .layers import LayerPlan, discover_layers, kind_of, weight_sources
from .schedule import UpdateSchedule
from .snr import SpectralNormRegularizer
from .spectral.matrices import layer_device
from .spectral.metrics import layer_metrics
from .value_checks import is_int, is_number

__all__ = ["TempBalance"]

_STATE_VERSION = 1
_LISTED = 5  # layers named in one warning about invalid metrics
# Slack of the [s1, s2] check of saved multipliers: Eq. 2 rounds at the ends (0.6 + 0.8 > 1.4).
_RANGE_RTOL = 1e-9
_STATE_FIX = ("resume from an intact checkpoint, or load no TempBalance state (the multipliers "
              "then restart at 1.0 until the next update)")


class TempBalance:
    """Layer-wise LR balancing for any ``nn.Module`` (see the module docstring).

    Args:
        model: the model (unwrapped or wrapped by DDP/Accelerate/``torch.compile``).
        config: settings; ``None`` means the paper's defaults.
        steps_per_epoch: optimizer steps per epoch, needed only for ``interval="epoch"`` when
            nobody calls :meth:`request_update` at epoch boundaries.
        clock: returns the index of the next optimizer step (e.g. the Trainer's
            ``state.global_step``); default: the engine counts the attached optimizer's steps.
        **overrides: fields of :class:`TempBalanceConfig` to change.

    Attributes:
        multipliers: ``{layer name: m_i}`` currently applied (1.0 before the first update).
        metrics: ``{layer name: metric value}`` of the last update (nan if invalid).
        history: one dict per (update, layer): ``step, update, layer, metric, value, multiplier,
            valid``.
        num_steps: the next optimizer step (the ``clock``, or the steps counted).
    """

    def __init__(self, model: nn.Module, config: TempBalanceConfig | None = None, *,
                 steps_per_epoch: int | None = None, clock: Callable[[], int] | None = None,
                 **overrides: Any) -> None:
        self.config = TempBalanceConfig.build(config, **overrides)
        # Immutable once validated; checked again in case it was forced (object.__setattr__).
        self.config.validate()
        self.schedule = UpdateSchedule(self.config.interval, self.config.start_step, steps_per_epoch)
        self._clock = clock
        self._steps = 0  # optimizer steps seen (the clock when none is given)
        self.model = _unwrap_model(model)
        self.plan: LayerPlan = discover_layers(self.model, self.config)
        if not self.plan.layers and is_main_process():
            why = (self.plan.skipped_summary()
                   or f"no layer of layer_types={self.config.layer_types} in the model")
            warnings.warn(f"TempBalance found no layer to balance ({why}; all in .plan.skipped); "
                          "every LR stays at the base schedule. See the config fields min_eigs, "
                          "layer_types, include/exclude and exclude_first_last.", stacklevel=2)
        self.multipliers: dict[str, float] = {name: 1.0 for name in self.plan.names}
        self.metrics: dict[str, float] = {name: math.nan for name in self.plan.names}
        self.history: list[dict[str, Any]] = []
        self.num_updates = 0
        self.last_computed: list[str] = []  # layers this process computed itself in the last update
        self._warned: set[str] = set()
        self._binding: OptimizerBinding | None = None
        # Every trainable weight matrix of the configured kinds, balanced or not (the first and
        # last layers too), as the authors' SGDSNR regularises every weight with >= 2 dims.
        regularised = [module for _, module in self.plan.candidates
                       if any(p.requires_grad for p in weight_sources(module))]
        self.snr = (SpectralNormRegularizer(regularised, self.config.snr_strength,
                                            self.config.snr_iterations)
                    if self.config.snr_strength > 0 else None)

    # ------------------------------------------------------------------ optimizer groups
    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0, *,
                     no_decay: Iterable[str] = DEFAULT_NO_DECAY,
                     decay_names: Collection[str] | None = None, **group_kwargs: Any) -> list[dict]:
        """Labelled param groups for a new optimizer (see :func:`groups.build_param_groups`)."""
        return build_param_groups(self.model, self.plan, lr=lr, weight_decay=weight_decay,
                                  no_decay=no_decay, decay_names=decay_names, **group_kwargs)

    # ------------------------------------------------------------------ hooks
    def attach(self, optimizer: Any) -> TempBalance:
        """Apply the multipliers to ``optimizer``'s steps (Accelerate/other wrappers are unwrapped).

        One optimizer at a time (attaching again to the same one re-attaches; another one needs
        :meth:`detach` first), one TempBalance per optimizer (attaching replaces another one, with
        a warning). Labelled groups (:meth:`param_groups`) are scaled in place, other groups are
        split by layer for the duration of each step (:class:`~hf_tempbalance.binding.
        OptimizerBinding`); optimizers that cannot work that way are refused.
        """
        inner = unwrap_optimizer(optimizer)
        if self._binding is not None and self._binding.optimizer is not inner:
            raise ValueError(
                f"this TempBalance is already attached to a {type(self._binding.optimizer).__name__}; "
                "it follows the steps of one optimizer (attaching a second would silently leave the "
                "first at the base LR). Call detach() first to move it, or use one optimizer for "
                "all balanced layers.")
        # Refuse FSDP1 / ZeRO-3 shards here, at the start of training, not at the first update.
        check_unsharded({layer.name: layer.module for layer in self.plan.layers}, self.model,
                        allow_dtensor=self.snr is None)
        named = dict(self.model.named_parameters())
        owner = {id(named[p]): layer.name for layer in self.plan.layers for p in layer.param_names}
        labels = {g.get(GROUP_KEY) for g in inner.param_groups} - {None}
        unknown = sorted(labels - set(self.plan.names))
        if unknown:
            warnings.warn(f"optimizer groups are labelled with layers this TempBalance does not balance "
                          f"({unknown[:3]}...): they stay at the base LR. Build the groups and the "
                          "engine from the same model and TempBalanceConfig.", stacklevel=2)
        self.detach()
        self._binding = OptimizerBinding(inner, owner, before_step=self._before_step,
                                         after_step=self._after_step)
        return self

    @property
    def attached(self) -> bool:
        """Whether the engine is attached to an optimizer."""
        return self._binding is not None and self._binding.attached

    def detach(self) -> None:
        """Stop applying multipliers; the optimizer's groups and LRs are the scheduler's again
        (also after a step that raised inside ``optimizer.step()``, whose post-hook never ran)."""
        if self._binding is not None:
            self._binding.detach()
        self._binding = None

    def _before_step(self) -> Factors | None:
        """Before each optimizer step: update if due, add the SNR gradient, hand over the
        multipliers (``None`` when all are 1: the optimizer stays exactly as its owner made it)."""
        step = self.num_steps
        if (self.interval is None and step == self.config.start_step
                and not self.schedule.requested and self.config.balance_lr and is_main_process()):
            # Otherwise a plain loop that forgot both would run at the base LR without a word.
            warnings.warn("TempBalance: interval='epoch' without steps_per_epoch, and no "
                          "request_update() before the first step: the multipliers are recomputed "
                          "only when request_update() is called. Pass TempBalance(..., "
                          "steps_per_epoch=len(loader)), call tb.request_update() at the start of "
                          "each epoch, or set interval=N steps.", stacklevel=4)
        if self.config.balance_lr and self.schedule.due(step):
            rows = self.update()
            self.schedule.served(step)
            base = self._base_lrs(self._binding.optimizer)
            for row in rows:
                row["base_lr"] = base.get(row["layer"])
        if self.snr is not None:
            self.snr.apply_()
        return {"lr": self.multipliers} if self._needs_scaling() else None

    def _after_step(self) -> None:
        self._steps += 1

    def _needs_scaling(self) -> bool:
        """Whether any multiplier differs from 1.0; ``ValueError`` for one that is not finite and
        positive (``multipliers`` is a plain dict: a value written into it by hand is checked
        here, before it reaches the optimizer)."""
        scaled = False
        for name, m in self.multipliers.items():
            if m != 1.0:
                if not (isinstance(m, int | float) and 0 < m < math.inf):
                    raise ValueError(f"TempBalance.multipliers[{name!r}] = {m!r}: a multiplier must "
                                     "be a finite number > 0; set multipliers only through update() "
                                     "or load_state_dict().")
                scaled = True
        return scaled

    def _base_lrs(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Scheduler LR of the group holding each layer's weight (before any multiplier)."""
        named = dict(self.model.named_parameters())
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        out = {}
        for layer in self.plan.layers:
            group = group_of.get(id(named[layer.param_names[0]])) if layer.param_names else None
            if group is not None:
                out[layer.name] = float(group["lr"])
        return out

    def multiplier(self, layer: str | None) -> float:
        """Multiplier of a balanced layer (1.0 for ``None`` and unknown names)."""
        return self.multipliers.get(layer, 1.0) if layer is not None else 1.0

    # ------------------------------------------------------------------ schedule
    @property
    def num_steps(self) -> int:
        """The next optimizer step: the clock given at construction (the Trainer's
        ``global_step``), else the count of steps the attached optimizer has made."""
        return self._clock() if self._clock is not None else self._steps

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps per epoch for ``interval="epoch"`` (None: unknown, see
        :meth:`request_update`); compute it with :func:`hf_tempbalance.schedule.steps_per_epoch`."""
        return self.schedule.steps_per_epoch

    @steps_per_epoch.setter
    def steps_per_epoch(self, steps: int | None) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps}")
        self.schedule.steps_per_epoch = steps

    @property
    def interval(self) -> int | None:
        """Optimizer steps between updates (None: epoch-driven, via :meth:`request_update`)."""
        return self.schedule.every

    def request_update(self) -> None:
        """Ask for an update before the next optimizer step (e.g. at an epoch boundary)."""
        self.schedule.request()

    def update_due(self, step: int | None = None) -> bool:
        """Whether the multipliers are recomputed before optimizer step ``step`` (default: the
        next one, :attr:`num_steps`; see :mod:`hf_tempbalance.schedule`). For a step other than
        the next one the answer is the plain schedule."""
        if step is None or step == self.num_steps:
            return self.schedule.due(self.num_steps)
        return self.schedule.planned(step)

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def compute_metrics(self) -> list[float]:
        """Metric of every balanced layer, sharing the work across processes when distributed."""
        modules = [layer.module for layer in self.plan.layers]
        if not modules:
            return []
        check_unsharded({layer.name: layer.module for layer in self.plan.layers},
                        allow_dtensor=self.snr is None)
        cfg = self.config

        # (the authors' conv_norm: their conv ESDs are of √0.5·W)
        scales = [cfg.conv_norm if kind_of(m) == "conv" else 1.0 for m in modules]

        def compute(subset, indices):
            values = layer_metrics(subset, (cfg.metric,), xmin=cfg.xmin, dtype=cfg.dtype,
                                   rtol=cfg.eig_rtol, include_xmin=cfg.include_xmin,
                                   scales=[scales[i] for i in indices])[cfg.metric]
            return [[v] for v in values]

        device = layer_device(modules[0])
        rows, mine = sharded_metrics(modules, compute, 1, device)
        self.last_computed = [self.plan.names[i] for i in mine]
        return [row[0] for row in rows]

    def update(self) -> list[dict[str, Any]]:
        """Recompute metrics and multipliers now; returns this update's rows of :attr:`history`.

        Layers whose metric is not finite (NaN/Inf or all-zero weights, fewer than 2 non-zero
        eigenvalues, a flat spectrum) keep their previous multiplier and warn once; the others
        are mapped among themselves, so one broken layer cannot push the rest to the extremes.
        """
        cfg = self.config
        names = self.plan.names
        values = np.asarray(self.compute_metrics(), dtype=np.float64)
        ok = valid_for(cfg.assign, values) if len(values) else np.zeros(0, dtype=bool)
        if ok.any():
            new = assign_multipliers(values[ok], cfg.assign, cfg.s1, cfg.s2)
            if not all(math.isfinite(m) and m > 0 for m in new):
                # Unreachable with a validated config; a forced one must not reach the optimizer.
                raise ValueError(
                    f"TempBalance computed multipliers {new} from {cfg.metric} values "
                    f"{values[ok].tolist()} with assign={cfg.assign!r}, s1={cfg.s1!r}, s2={cfg.s2!r}; "
                    "the config was changed after it was validated. Build the engine from a "
                    "TempBalanceConfig made with its constructor or replace().")
            for name, m in zip([n for n, good in zip(names, ok) if good], new):
                self.multipliers[name] = float(m)
        self._warn_invalid([name for name, good in zip(names, ok) if not good])
        rows = []
        for name, value, good in zip(names, values.tolist(), ok.tolist()):
            self.metrics[name] = value
            rows.append({"step": self.num_steps, "update": self.num_updates, "layer": name,
                         "metric": cfg.metric, "value": value, "multiplier": self.multipliers[name],
                         "valid": good})
        self.history.extend(rows)
        self.num_updates += 1
        self.schedule.requested = False  # an update made by hand serves a pending request too
        return rows

    def _warn_invalid(self, invalid: list[str]) -> None:
        # One warning per update for the layers not warned about before: a LoRA model starts
        # with every lora_B at zero, and hundreds of separate warnings would bury the message.
        new = [name for name in invalid if name not in self._warned]
        if not new or not is_main_process():
            return
        self._warned.update(new)
        shown = ", ".join(f"layer {name!r} ({self.multipliers[name]:.4g})" for name in new[:_LISTED])
        more = f" and {len(new) - _LISTED} more" if len(new) > _LISTED else ""
        warnings.warn(
            f"TempBalance: no valid {self.config.metric} for {len(new)} layer(s) (NaN/Inf or zero "
            f"weights, too few non-zero eigenvalues, or a flat spectrum); they keep their "
            f"multipliers: {shown}{more}. Rows with valid=False in .history; warned once per layer.",
            stacklevel=3)

    def summary(self) -> dict[str, float]:
        """Mean/min/max of the current metric over valid layers, min/max of the multipliers.

        Always the same five keys (``nan`` where there is nothing to summarise), so that
        loggers that write a CSV header once (Ultralytics' ``results.csv``) stay aligned.
        """
        metric = self.config.metric
        values = [v for v in self.metrics.values() if math.isfinite(v)]
        mults = list(self.multipliers.values())

        def stat(fn, xs):
            return float(fn(xs)) if xs else math.nan

        return {f"{metric}_mean": stat(np.mean, values), f"{metric}_min": stat(min, values),
                f"{metric}_max": stat(max, values), "multiplier_min": stat(min, mults),
                "multiplier_max": stat(max, mults)}

    def log_values(self, prefix: str = "tempbalance/", per_layer: bool | None = None) -> dict[str, float]:
        """Values for a training logger: ``{prefix}<summary key>`` and, per layer (default:
        ``config.log_layers``), ``{prefix}<metric>/<layer>`` and ``{prefix}multiplier/<layer>``.

        The key set never changes during a run (``nan`` for a metric that could not be computed).
        Empty when no layer is balanced: there is nothing to log.
        """
        if not self.plan.names:
            return {}
        values = {prefix + key: value for key, value in self.summary().items()}
        if self.config.log_layers if per_layer is None else per_layer:
            metric = self.config.metric
            for name in self.plan.names:
                values[f"{prefix}{metric}/{name}"] = self.metrics[name]
                values[f"{prefix}multiplier/{name}"] = self.multipliers[name]
        return values

    # ------------------------------------------------------------------ state
    def state_dict(self, include_history: bool = True) -> dict[str, Any]:
        """Everything needed to resume identically; JSON-serialisable.

        Args:
            include_history: also carry :attr:`history`, which grows by one row per layer and
                update (``False``: leave it out when it is kept elsewhere, e.g. in the history
                file, so that checkpoints stay small however often the engine updates).
        """
        state = {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "layers": list(self.plan.names),
            "multipliers": dict(self.multipliers),
            "metrics": dict(self.metrics),
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            **self.schedule.state_dict(),
        }
        if include_history:
            state["history"] = [dict(row) for row in self.history]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the balanced layers must be the same.

        Everything is checked before anything changes: the version, every key and its type, the
        layer set (of ``layers``, ``multipliers`` and ``metrics``), and that every multiplier is
        finite, positive and within the range of the map that made it (``[s1, s2]`` or the
        neutral 1.0 for ``linear``/``step``, with the saved config's ``s1``, ``s2``, ``assign``).
        A bad state raises ``ValueError`` naming the field and the fix, and leaves the engine as
        it was. A state saved without its history leaves :attr:`history` as it is.

        A state saved under other settings (``s1``, ``metric``, ...: a resume after the config
        was edited) loads, with a warning naming them: its multipliers hold until the next
        update, which uses this engine's settings.
        """
        checked = self._checked_state(state)
        self._warn_other_config(state.get("config"))
        self.multipliers = checked["multipliers"]
        self.metrics = checked["metrics"]
        self._steps = checked["num_steps"]  # (with a clock, the clock says where the run is)
        self.num_updates = checked["num_updates"]
        self.schedule.load_state_dict(checked, next_step=self.num_steps)
        if "history" in checked:
            self.history = checked["history"]

    def _warn_other_config(self, saved: Any) -> None:
        if not isinstance(saved, Mapping) or not is_main_process():
            return
        mine = self.config.to_dict()  # lists, as the saved to_dict() (through JSON or not)
        differ = [f"{k} {saved[k]!r} there, {mine[k]!r} here" for k in mine
                  if k in saved and saved[k] != mine[k]]
        if differ:
            warnings.warn(
                f"TempBalance: the state being loaded was saved with other settings "
                f"({'; '.join(differ)}); its multipliers hold until the next update, which uses "
                f"this engine's settings. Resume with the saved config to continue the same run.",
                stacklevel=3)

    def _checked_state(self, state: Any) -> dict[str, Any]:
        """The values of a saved state, parsed; ``ValueError`` for the first bad one."""
        def bad(field: str, why: str, fix: str = _STATE_FIX) -> None:
            raise ValueError(f"TempBalance state: {field!r} {why}; {fix}.")

        if not isinstance(state, Mapping):
            raise ValueError(f"a TempBalance state is the dict TempBalance.state_dict() returns, got "
                             f"a {type(state).__name__}; {_STATE_FIX}.")
        if state.get("version") != _STATE_VERSION:
            bad("version", f"is {state.get('version')!r}, but this hf_tempbalance reads version "
                f"{_STATE_VERSION}", "resume with the hf_tempbalance version that saved it, or "
                "load no TempBalance state (the multipliers then restart at 1.0)")
        missing = [key for key in ("layers", "multipliers", "metrics", "num_steps", "num_updates",
                                   "update_requested") if key not in state]
        if missing:
            raise ValueError(f"the TempBalance state lacks {missing}: it is not a whole "
                             f"TempBalance.state_dict() (truncated or edited); {_STATE_FIX}.")
        layers = state["layers"]
        if not (isinstance(layers, list | tuple) and all(isinstance(n, str) for n in layers)):
            bad("layers", f"is {layers!r}, not a list of layer names")
        if list(layers) != self.plan.names:
            differing = sorted(set(layers) ^ set(self.plan.names))
            bad("layers", "was saved for different layers than this engine balances (differing: "
                f"{differing[:5]}{'...' if len(differing) > 5 else ''})",
                "resume with the same model and TempBalanceConfig (layer_types, include/exclude, "
                "min_eigs, exclude_first_last)")
        out: dict[str, Any] = {}
        for field in ("multipliers", "metrics"):
            values = state[field]
            if not isinstance(values, Mapping):
                bad(field, f"is a {type(values).__name__}, not a dict {{layer name: number}}")
            if set(values) != set(self.plan.names):
                unknown = sorted(map(str, set(values) - set(self.plan.names)))
                absent = sorted(set(self.plan.names) - set(values))
                bad(field, f"does not name the state's layers (unknown: {unknown[:5]}, missing: "
                    f"{absent[:5]}); a layer without its value would silently run at the base LR")
            for name, value in values.items():
                if not (is_number(value) or (field == "metrics" and value is None)):
                    bad(field, f"holds {value!r} for layer {name!r}, not a number")
            out[field] = {name: math.nan if values[name] is None else float(values[name])
                          for name in self.plan.names}
        self._check_multipliers(out["multipliers"], state.get("config"), bad)
        for field in ("num_steps", "num_updates"):
            if not (is_int(state[field]) and state[field] >= 0):
                bad(field, f"is {state[field]!r}, not a non-negative integer")
            out[field] = int(state[field])
        if not isinstance(state["update_requested"], bool):
            bad("update_requested", f"is {state['update_requested']!r}, not true/false")
        out["update_requested"] = state["update_requested"]
        if "last_scheduled_step" in state:
            last = state["last_scheduled_step"]
            if not (last is None or (is_int(last) and last >= 0)):
                bad("last_scheduled_step", f"is {last!r}, not null or a non-negative integer")
            out["last_scheduled_step"] = None if last is None else int(last)
        epoch = state.get("steps_per_epoch")
        if not (epoch is None or (is_int(epoch) and epoch >= 1)):
            bad("steps_per_epoch", f"is {epoch!r}, not null or a positive integer")
        out["steps_per_epoch"] = None if epoch is None else int(epoch)
        if "history" in state:
            history = state["history"]
            if not isinstance(history, list | tuple):
                bad("history", f"is a {type(history).__name__}, not a list of rows")
            for i, row in enumerate(history):
                why = row_problem(dict(row) if isinstance(row, Mapping) else row)
                if why is not None:
                    bad("history", f"row {i} is not a history row ({why})")
            out["history"] = [dict(row) for row in history]
        return out

    def _check_multipliers(self, multipliers: dict[str, float], saved_config: Any, bad) -> None:
        """Finite, positive, and within the range of the map that made them (the saved config's;
        this engine's when the state carries none)."""
        cfg = self.config
        if saved_config is not None:
            if not isinstance(saved_config, Mapping):
                bad("config", f"is a {type(saved_config).__name__}, not TempBalanceConfig.to_dict()")
            try:
                cfg = TempBalanceConfig(**{k: saved_config[k] for k in ("s1", "s2", "assign")
                                           if k in saved_config})
            except (TypeError, ValueError) as err:
                bad("config", f"is not a valid config ({err})")
        bounded = cfg.assign in ("linear", "step")
        lo, hi = cfg.s1 * (1 - _RANGE_RTOL), cfg.s2 * (1 + _RANGE_RTOL)
        for name, m in multipliers.items():
            if not (math.isfinite(m) and m > 0):
                bad("multipliers", f"holds {m!r} for layer {name!r}; a multiplier must be a finite "
                    "number > 0 (this one would reach the optimizer as the layer's LR factor)")
            if bounded and m != 1.0 and not lo <= m <= hi:
                bad("multipliers", f"holds {m!r} for layer {name!r}, outside [s1, s2] = "
                    f"[{cfg.s1}, {cfg.s2}] of assign={cfg.assign!r} that made it")

    def __repr__(self) -> str:
        return (f"TempBalance({len(self.plan.layers)} layers, metric={self.config.metric}, "
                f"assign={self.config.assign}, s=({self.config.s1}, {self.config.s2}), "
                f"interval={self.config.interval}, updates={self.num_updates})")


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            break
    return model
