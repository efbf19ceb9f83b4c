"""TempBalance settings as command-line / YAML / JSON arguments (``HfArgumentParser``).

:class:`TempBalanceArguments` has one ``tb_``-prefixed field per :class:`TempBalanceConfig` field
(same defaults, help taken from the config's docstring), in types ``HfArgumentParser`` reads
(``interval`` as a string: ``"epoch"`` or a number of steps; tuples as lists), plus
``use_tempbalance``. So a stock Transformers example script turns TempBalance on in a few lines::

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments,
                               TempBalanceArguments))
    model_args, data_args, training_args, tb_args = parser.parse_args_into_dataclasses()
    ...
    trainer = TempBalanceTrainer(..., tempbalance_config=tb_args.config())
    # or Trainer(..., callbacks=tb_args.callbacks())

and ``python run_clm.py ... --use_tempbalance --tb_interval 100 --tb_s1 0.5`` or a YAML/JSON
file (``parser.parse_yaml_file``) sets it. The prefix keeps the names apart from
``TrainingArguments``' (as ``lora_r`` does in TRL).

:class:`TempBalanceSettings` is the same without ``use_tempbalance``: the base of scripts where
something else decides whether TempBalance runs (the recipes' ``--method cal|tb``), so that they
offer one switch, not two.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from .config import ConfigError, TempBalanceConfig

__all__ = ["TempBalanceArguments", "TempBalanceSettings", "PREFIX"]

PREFIX = "tb_"


def _config_help() -> dict[str, str]:
    """Field name -> its text in TempBalanceConfig's "Attributes:" docstring section."""
    doc = TempBalanceConfig.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1]
    found: dict[str, str] = {}
    for name, text in re.findall(r"^ {8}(\w+): (.*?)(?=^ {8}\w+: |\Z)", section, re.M | re.S):
        found[name] = re.sub(r"``|\s+", lambda m: "" if m.group() == "``" else " ", text).strip()
    return found


def _argument_type(name: str, hint: Any) -> tuple[Any, Any]:
    """(argument type, default converter) for a config field's type hint."""
    if name == "interval":
        return str, str
    origin = typing.get_origin(hint)
    if origin is tuple:
        return list[str], list
    return hint, lambda value: value


def _fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(TempBalanceConfig)
    helps = _config_help()
    out = []
    for f in dataclasses.fields(TempBalanceConfig):
        kind, convert = _argument_type(f.name, hints[f.name])
        default = convert(f.default)
        metadata = {"help": helps.get(f.name, f"TempBalanceConfig.{f.name}")}
        if isinstance(default, list):
            field = dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
        else:
            field = dataclasses.field(default=default, metadata=metadata)
        out.append((PREFIX + f.name, kind, field))
    return out


def _config(self) -> TempBalanceConfig:
    """The validated :class:`TempBalanceConfig` these arguments describe."""
    values = {}
    for f in dataclasses.fields(TempBalanceConfig):
        value = getattr(self, PREFIX + f.name)
        if f.name == "interval" and value != "epoch":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"--{PREFIX}interval={value!r}: give a number of optimizer steps "
                                 "or 'epoch'") from None
        values[f.name] = value
    try:
        return TempBalanceConfig(**values)
    except ConfigError as err:  # the flag that holds the value, not the config field
        raise ValueError(f"--{PREFIX}{err.field}={err.value!r}: {err.why}") from None


def _callbacks(self) -> list:
    """``[TempBalanceCallback(config)]`` when ``use_tempbalance``, else ``[]``."""
    if not self.use_tempbalance:
        return []
    from .integrations.transformers import TempBalanceCallback

    return [TempBalanceCallback(self.config())]


TempBalanceSettings = dataclasses.make_dataclass(
    "TempBalanceSettings", _fields(),
    namespace={"config": _config,
               "__doc__": "The ``tb_*`` fields and ``.config()``, without an on/off switch (see the "
                          "module docstring)."})
TempBalanceSettings.__module__ = __name__

TempBalanceArguments = dataclasses.make_dataclass(
    "TempBalanceArguments",
    [("use_tempbalance", bool, dataclasses.field(default=False, metadata={
        "help": "turn TempBalance on (layer-wise LRs from each layer's ESD, Zhou et al. 2023)"}))],
    bases=(TempBalanceSettings,),
    namespace={"callbacks": _callbacks,
               "__doc__": "TempBalance settings for ``HfArgumentParser`` (see the module docstring)."})
TempBalanceArguments.__module__ = __name__
