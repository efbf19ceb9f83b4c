"""Read a PEFT LoRA adapter folder onto its base model, for ``hf-tempbalance analyze``.

An adapter folder (``save_pretrained`` of a PEFT model) holds ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), but no base weights. The base comes
from ``base=`` (any source :func:`~hf_tempbalance.loading.resolve_model` reads), else from the
config's ``base_model_name_or_path`` when that loads here (a local directory, or a Hub id in the
local cache while offline). PEFT itself (the ``lora`` extra) attaches the adapter, so its scaling
rules (``lora_alpha / r``, rsLoRA, rank and alpha patterns, DoRA) are the ones the model trained
with. The result is an ordinary PEFT model: :func:`~hf_tempbalance.analysis.analyze_model` reads
each adapted module's effective weight ``W0 + ΔW`` through
:class:`~hf_tempbalance.spectral.matrices.LoraAdapted`, and
:func:`~hf_tempbalance.analysis.analyze_lora_deltas` its ``ΔW`` alone.

Every failure (no weights file, a base that cannot be loaded, an adapter that does not fit the
base) raises :class:`~hf_tempbalance.loading.ModelLoadError` naming what to pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .loading import ModelLoadError, _read_json, load_state_dict, resolve_model

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoadedAdapter", "is_adapter_dir", "load_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory with a PEFT ``adapter_config.json``."""
    return (Path(os.path.expanduser(os.fspath(path))) / ADAPTER_CONFIG).is_file()


@dataclass
class LoadedAdapter:
    """What :func:`load_adapter` read.

    Attributes:
        model: the PEFT model (eval mode, CPU): the base with the adapter attached, unmerged.
        source: the adapter folder.
        base: the base model's source as :func:`~hf_tempbalance.loading.resolve_model` says it.
        config: the adapter's ``adapter_config.json``.
        note: one line on the choice of base (or None).
    """

    model: nn.Module
    source: str
    base: str
    config: dict[str, Any]
    note: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The adapter settings worth printing: type, r, lora_alpha, rsLoRA, DoRA, targets."""
        keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules")
        return {k: self.config.get(k) for k in keys if k in self.config}


def load_adapter(path: str | os.PathLike, base: str | None = None, *,
                 trust_remote_code: bool = False, revision: str | None = None) -> LoadedAdapter:
    """The adapter folder ``path`` loaded on ``base`` (default: the config's
    ``base_model_name_or_path``): the PEFT model is the result's ``.model``."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    config = _read_json(folder / ADAPTER_CONFIG)
    weights = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{folder} has {ADAPTER_CONFIG} but no adapter weights "
                             f"({' or '.join(ADAPTER_WEIGHTS)}); point at the folder the "
                             "adapter was saved into with save_pretrained")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{folder} holds a {config['peft_type']} adapter; only LoRA adapters "
                             "(peft_type LORA, DoRA included) are analysed")
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("reading a PEFT adapter folder needs peft: pip install "
                          "'hf_tempbalance[lora]'") from err

    named = config.get("base_model_name_or_path")
    note = None
    if base is None:
        if not named:
            raise ModelLoadError(f"{folder / ADAPTER_CONFIG} names no base model "
                                 "(base_model_name_or_path); pass the base with --base "
                                 "NAME_OR_PATH")
        try:
            loaded = resolve_model(str(named), trust_remote_code=trust_remote_code,
                                   revision=config.get("revision") or revision)
        except ModelLoadError as err:
            raise ModelLoadError(f"the adapter's base model {named!r} (base_model_name_or_path "
                                 f"in {ADAPTER_CONFIG}) could not be loaded: {err} Pass the base "
                                 "with --base NAME_OR_PATH (a local model directory or a cached "
                                 "Hub id)") from err
        note = f"base model {loaded.source}, named by the adapter's {ADAPTER_CONFIG}"
    else:
        loaded = resolve_model(base, trust_remote_code=trust_remote_code, revision=revision)
    if not isinstance(loaded.model, nn.Module):
        raise ModelLoadError(f"the base model {loaded.source} was read as bare tensors; pass a "
                             "model (a Transformers directory or Hub id) with --base")
    base_source = loaded.source
    try:
        # is_trainable: the adapters count as trained layers (frozen ones are not analysed).
        model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=True)
    except Exception as err:  # size mismatch (RuntimeError), targets not found (ValueError), ...
        raise _mismatch(folder, base_source, err) from err
    _check_all_loaded(model, weights, folder, base_source)
    return LoadedAdapter(model.eval(), str(folder), base_source, config, note)


def _mismatch(folder: Path, base: str, err: BaseException) -> ModelLoadError:
    first = " ".join((str(err).strip().splitlines() or [type(err).__name__])[:2])
    return ModelLoadError(f"the adapter in {folder} does not fit the base model {base}: {first} "
                          "Pass the base model it was trained on with --base NAME_OR_PATH")


def _check_all_loaded(model: nn.Module, weights: Path, folder: Path, base: str) -> None:
    """Every tensor of the adapter file must have landed in the model: PEFT only warns about
    keys it could not place (a base with fewer layers than the adapter's, for instance)."""
    from peft import get_peft_model_state_dict

    saved = set(load_state_dict(weights))
    placed = set(get_peft_model_state_dict(model))
    unplaced = sorted(saved - placed)
    if unplaced:
        raise _mismatch(folder, base, ValueError(
            f"{len(unplaced)} of the adapter's {len(saved)} tensors have no place in it (e.g. "
            f"{unplaced[0]})."))
