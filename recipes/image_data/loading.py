"""Load a data set by the recipe's name: Fashion-MNIST locally, the others from the Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .fashion_mnist import HOW_TO_GET, load_fashion_mnist
from .specs import DatasetSpec

__all__ = ["load_image_dataset", "DataUnavailableError"]


class DataUnavailableError(RuntimeError):
    """The data set is neither cached nor reachable; the message says how to get it."""


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_image_dataset(spec: DatasetSpec, data_dir: str | Path = "data") -> Any:
    """``DatasetDict`` with ``spec.train_split`` and ``spec.test_split``.

    Fashion-MNIST comes from the local Debian copy (obtained into ``data_dir`` on first use) and
    from the Hub only if that fails while online. Hub data sets use the ``datasets`` cache; when
    they are not cached and the Hub is offline, :class:`DataUnavailableError` is raised at once.
    """
    import datasets

    if spec.name == "fashion_mnist":
        try:
            return load_fashion_mnist(data_dir)
        except (RuntimeError, FileNotFoundError) as err:
            if _hub_offline():
                raise DataUnavailableError(str(err)) from err
    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config)
    except Exception as err:  # ConnectionError, offline-mode errors, missing cache
        hint = (HOW_TO_GET if spec.name == "fashion_mnist" else
                f"Download it once with Hub access: python -c \"import datasets; "
                f"datasets.load_dataset('{spec.hub_id}'"
                f"{', ' + repr(spec.hub_config) if spec.hub_config else ''})\" "
                "(it is then cached and works offline), or use --dataset fashion_mnist, which works "
                "offline.")
        raise DataUnavailableError(f"{spec.name} ({spec.hub_id}) could not be loaded: "
                                   f"{type(err).__name__}: {str(err)[:300]}\n{hint}") from err
