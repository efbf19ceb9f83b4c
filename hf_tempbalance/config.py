"""Every TempBalance knob in one dataclass, with the paper's defaults and validation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .assign import ASSIGN_FUNCTIONS
from .spectral.hill import XMIN_METHODS
from .spectral.metrics import available_metrics
from .value_checks import is_bool, is_int, is_number

__all__ = ["TempBalanceConfig", "ConfigError", "LAYER_TYPES", "NORM_FOLLOW"]

#: Module kinds that layer discovery can balance. ``linear`` includes Transformers' ``Conv1D``.
LAYER_TYPES = ("linear", "conv", "embedding")
NORM_FOLLOW = ("authors", "previous", "next", "none")


class ConfigError(ValueError):
    """A :class:`TempBalanceConfig` field with a bad value: ``field``, ``value`` and ``why`` (how
    to fix it), so that a command can name its own flag for the field."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"TempBalanceConfig.{field}={value!r}: {why}")
        self.field, self.value, self.why = field, value, why


@dataclass(frozen=True)
class TempBalanceConfig:
    """TempBalance settings. Defaults are the paper's CIFAR setting (Section 4, Appendix D).

    Immutable: every value is validated once, when the config is made, and cannot change after
    (a field set later would reach the optimizer unchecked); ``cfg.replace(s1=0.6)`` makes a
    validated copy.

    Attributes:
        s1: smallest LR multiplier (paper: 0.5; 0.6 for TinyImageNet/WRN and TB+SNR; LM: 1.0).
        s2: largest LR multiplier (paper: 1.5; 1.4 for TinyImageNet/WRN and TB+SNR; LM: 2.0).
            ``s1 == s2`` gives every validly measured layer the constant multiplier ``s1``,
            whatever ``assign`` is; ``s1 == s2 == 1`` leaves every LR exactly as the scheduler
            set it (an A/B baseline with the same code path).
        metric: per-layer metric mapped to LRs: ``alpha_hill`` (PL_Alpha_Hill, Eq. 3; paper
            default), ``spectral_norm``, ``alpha_weighted``, ``stable_rank`` or a registered one.
        xmin: where the power-law tail starts: ``median`` (paper), ``fix_finger``, ``ks``.
        assign: metric -> multiplier map: ``linear`` (Eq. 2), ``sqrt``, ``log2``, ``step`` (App. C).
        interval: recompute multipliers every ``interval`` optimizer steps, or ``"epoch"`` (paper:
            once per epoch; App. H: more often helps mildly). Between updates they are held.
        start_step: first optimizer step at which multipliers are computed; before it every
            layer uses the base LR (App. F, Fig. 21: starting after the first epoch loses nothing).
        layer_types: which module kinds are balanced (``linear``, ``conv``, ``embedding``).
        include: regexes; if given, only modules whose name matches one (``re.search``) count.
        exclude: regexes; modules whose name matches one are never balanced.
        exclude_first_last: drop the first and the last candidate module in registration order,
            as the authors' code does (the stem and the classifier have few eigenvalues).
        min_eigs: modules with fewer ESD eigenvalues stay at the base LR (authors' later code: 50).
        norm_follow: which balanced module a norm layer's parameters follow (else base LR).
            ``authors`` (their runs): a BatchNorm follows the module named like it with ``bn``
            replaced by ``conv`` (so ResNet shortcut BNs stay at the base LR and a pre-activation
            block's ``bn1`` follows ``conv1`` after it); any other norm (LayerNorm, GroupNorm,
            RMSNorm) follows the module registered just before it, if no norm came in between.
            ``previous``: every norm follows the module registered just before it (conv ->
            BatchNorm nets named otherwise, e.g. timm's VGG ``features.N``; post-LN blocks);
            ``next``: the one registered just after it (pre-LN blocks); ``none``: base LR.
        dtype: precision of the eigensolver, ``float32`` (default) or ``float64``.
        eig_rtol: opt-in filter: eigenvalues ``<= eig_rtol · λ_max`` are dropped before the fit.
            None (default): every eigenvalue counts, as in the authors' runs; a layer whose
            median eigenvalue is at the eigensolver's noise floor is invalid instead.
        conv_norm: factor on conv layers' eigenvalues, i.e. their ESD is that of
            ``√conv_norm · W`` (authors: 0.5). Alpha is scale-free; ``spectral_norm`` and
            ``alpha_weighted`` of conv layers depend on it, and so do their LRs.
        include_xmin: count λ_min among the Hill tail points (authors; textbook: False).
        snr_strength: λ_sr of spectral-norm regularisation (Eq. 4) on every weight matrix of
            ``layer_types`` (0 disables; paper grid 1e-3..1.5e-2), whatever the weight decay.
        snr_iterations: power iterations per step for the SNR gradient (authors: 5).
        balance_lr: compute metrics and scale LRs (False: spectral-norm regularisation alone,
            the paper's SNR baseline, with ``snr_strength > 0``).
        log_layers: also send per-layer alpha and multiplier to the reporters (TensorBoard, W&B,
            ...); the summary always goes to the console and the reporters.
    """

    s1: float = 0.5
    s2: float = 1.5
    metric: str = "alpha_hill"
    xmin: str = "median"
    assign: str = "linear"
    interval: int | Literal["epoch"] = "epoch"
    start_step: int = 0
    layer_types: tuple[str, ...] = ("linear", "conv")
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_first_last: bool = True
    min_eigs: int = 50
    norm_follow: str = "authors"
    dtype: str = "float32"
    eig_rtol: float | None = None
    conv_norm: float = 0.5
    include_xmin: bool = True
    snr_strength: float = 0.0
    snr_iterations: int = 5
    balance_lr: bool = True
    log_layers: bool = True

    def __post_init__(self) -> None:
        # NumPy scalars (a sweep's np.linspace, a config read through pandas) become the Python
        # values they hold, so that the config stays JSON-able.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, f.name, value.item())
        # A lone string means one item (tuple("conv") would be four one-letter regexes).
        for name in ("layer_types", "include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first bad field and how to
        fix it."""
        def bad(name: str, why: str) -> None:
            raise ConfigError(name, getattr(self, name), why)

        if not (is_number(self.s1) and 0 < self.s1 < float("inf")):
            bad("s1", "must be a positive finite number (the smallest LR multiplier; the paper's "
                      "CNNs: 0.5, its language model: 1.0)")
        if not (is_number(self.s2) and self.s1 <= self.s2 < float("inf")):
            bad("s2", f"must be a finite number >= s1={self.s1} (the paper's CNNs: s1=0.5, s2=1.5; "
                      "its language model: 1.0, 2.0; s2 == s1 is a constant multiplier)")
        for name in ("exclude_first_last", "include_xmin", "balance_lr", "log_layers"):
            if not is_bool(getattr(self, name)):  # 'no' or 'False' would count as on
                bad(name, "must be True or False")
        if self.metric not in available_metrics():
            bad("metric", f"unknown metric; choose from {available_metrics()} or register_metric() one")
        if self.xmin not in XMIN_METHODS:
            bad("xmin", f"choose from {XMIN_METHODS}")
        if self.assign not in ASSIGN_FUNCTIONS:
            bad("assign", f"choose from {tuple(ASSIGN_FUNCTIONS)}")
        if self.interval != "epoch" and not (
            is_int(self.interval) and self.interval >= 1
        ):
            bad("interval", "must be a positive number of optimizer steps or 'epoch'")
        if not (is_int(self.start_step) and self.start_step >= 0):
            bad("start_step", "must be a non-negative optimizer step")
        unknown = [t for t in self.layer_types if t not in LAYER_TYPES]
        if unknown or not self.layer_types:
            bad("layer_types", f"must be a non-empty subset of {LAYER_TYPES}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    bad(name, f"{pattern!r} is not a valid regular expression ({err})")
        if not (is_int(self.min_eigs) and self.min_eigs >= 0):
            bad("min_eigs", "must be a non-negative integer")
        if self.norm_follow not in NORM_FOLLOW:
            bad("norm_follow", f"choose from {NORM_FOLLOW}")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", "choose 'float32' or 'float64'")
        if self.eig_rtol is not None and not (is_number(self.eig_rtol) and 0 <= self.eig_rtol < 1):
            bad("eig_rtol", "must be None or a number in [0, 1)")
        if not (is_number(self.conv_norm) and 0 < self.conv_norm < float("inf")):
            bad("conv_norm", "must be a positive number (authors: 0.5; 1 for the plain weight)")
        if not (is_number(self.snr_strength) and 0 <= self.snr_strength < float("inf")):
            bad("snr_strength", "must be a finite number >= 0 (0 disables spectral-norm regularisation)")
        if not (is_int(self.snr_iterations) and self.snr_iterations >= 1):
            bad("snr_iterations", "must be a positive integer")

    @classmethod
    def build(cls, config: TempBalanceConfig | Mapping[str, Any] | None = None,
              **overrides: Any) -> TempBalanceConfig:
        """The config every entry point takes: ``None`` (the defaults), a config, or its
        ``to_dict()``, with ``overrides`` applied (validated)."""
        if config is None:
            config = cls()
        elif isinstance(config, Mapping):
            config = cls.from_dict(dict(config))
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a TempBalanceConfig or a dict, got {type(config).__name__}")
        return config.replace(**overrides) if overrides else config

    def replace(self, **overrides: Any) -> TempBalanceConfig:
        """A copy with some fields changed (validated), with a clear error for unknown names."""
        names = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown TempBalanceConfig field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TempBalanceConfig:
        return cls(**data)


def _frozen_setattr(self: TempBalanceConfig, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(
        f"TempBalanceConfig is immutable once validated (cannot set {name!r}); make a validated "
        f"copy with cfg.replace({name}=...)")


def _frozen_delattr(self: TempBalanceConfig, name: str) -> None:
    raise dataclasses.FrozenInstanceError(
        f"TempBalanceConfig is immutable once validated (cannot delete {name!r})")


# frozen=True already refuses assignment; these say how to change a value instead.
TempBalanceConfig.__setattr__ = _frozen_setattr  # type: ignore[method-assign]
TempBalanceConfig.__delattr__ = _frozen_delattr  # type: ignore[method-assign]

