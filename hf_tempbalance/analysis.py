r"""HT-SR diagnostics of a model: one row of spectral metrics per weight matrix, and a summary.

::

    from hf_tempbalance.analysis import analyze_model
    report = analyze_model(model)          # every Linear/Conv layer (config.layer_types)
    print(report.format_table())
    print(report.summary().format())
    report.to_csv("layers.csv")

Per layer (ESD = ascending eigenvalues :math:`\lambda_j` of :math:`W^\top W`, i.e. squared singular
values, squared weight units; Conv kernels pooled as in :mod:`hf_tempbalance.spectral.matrices`):

* ``alpha``: PL_Alpha_Hill (paper Eq. 3), fitted from ``xmin`` with ``n_tail`` tail eigenvalues.
* ``spectral_norm``: :math:`\lambda_{\max}`; ``alpha_weighted``: :math:`\alpha\log_{10}\lambda_{\max}`;
  ``stable_rank``: :math:`\sum_j\lambda_j/\lambda_{\max}` (dimensionless).
* ``balanced``: whether TempBalance with the same config would set this layer's LR.

Reading alpha (HT-SR theory, Martin & Mahoney): :math:`2 \le \alpha \le 4` is typical of
well-trained layers; larger alpha (a light tail) suggests an under-trained layer, smaller alpha an
over-trained one. The numbers come from the same batched path TempBalance trains with
(:func:`~hf_tempbalance.spectral.batched_esd` + the registered metrics), so they are exactly the
values it would use.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TempBalanceConfig
from .distributed import layer_cost, world
from .layers import discover_layers
from .spectral import batched_esd, hill_fit, metric_table, resolve_dtype
from .spectral.matrices import is_transposed_conv1d, num_eigs, weight_matrices, weight_of

__all__ = ["LayerAnalysis", "AnalysisSummary", "ModelAnalysis", "analyze_model",
           "analyze_state_dict", "read_analysis_csv", "WELL_TRAINED_RANGE"]

#: Alpha range HT-SR theory associates with well-trained layers.
WELL_TRAINED_RANGE = (2.0, 4.0)

#: Metrics every report carries (their columns are always present).
STANDARD_METRICS = ("alpha_hill", "spectral_norm", "alpha_weighted", "stable_rank")

# Flops (see distributed.layer_cost) per batched_esd call: bounds memory and paces the progress bar.
_CHUNK_FLOPS = 2e10
# Show a progress bar by default from this many layers on.
_PROGRESS_MIN_LAYERS = 24

_COLUMNS = ("name", "type", "shape", "num_eigs", "alpha", "xmin", "n_tail", "spectral_norm",
            "alpha_weighted", "stable_rank", "balanced")


@dataclass
class LayerAnalysis:
    """Spectral metrics of one layer (see the module docstring for the formulas and units)."""

    name: str
    type: str
    shape: tuple[int, ...]
    num_eigs: int
    alpha: float
    xmin: float
    n_tail: int
    spectral_norm: float
    alpha_weighted: float
    stable_rank: float
    balanced: bool
    extra: dict[str, float] = field(default_factory=dict)
    eigs: np.ndarray | None = field(default=None, repr=False)

    def to_row(self) -> dict[str, Any]:
        """Flat dict for CSV/pandas (``shape`` written as ``"768x2304"``)."""
        row = {c: getattr(self, c) for c in _COLUMNS}
        row["shape"] = "x".join(str(s) for s in self.shape)
        row.update(self.extra)
        return row


@dataclass
class AnalysisSummary:
    """Summary over the layers with a finite alpha.

    Attributes:
        num_layers / num_fitted: layers analysed / with a finite alpha.
        alpha_mean / alpha_median: of the finite alphas (nan if none).
        num_in_range: layers with ``2 <= alpha <= 4`` (:data:`WELL_TRAINED_RANGE`).
        under_trained: ``(name, alpha)`` of the largest alphas, largest first.
        over_trained: ``(name, alpha)`` of the smallest alphas, smallest first.
    """

    num_layers: int
    num_fitted: int
    alpha_mean: float
    alpha_median: float
    num_in_range: int
    under_trained: list[tuple[str, float]]
    over_trained: list[tuple[str, float]]

    def format(self) -> str:
        lo, hi = WELL_TRAINED_RANGE
        lines = [
            f"layers analysed: {self.num_layers} ({self.num_fitted} with a finite alpha)",
            f"alpha mean {self.alpha_mean:.3f}, median {self.alpha_median:.3f}",
            f"alpha in [{lo:g}, {hi:g}]: {self.num_in_range} of {self.num_fitted}",
            "most under-trained (largest alpha): "
            + (", ".join(f"{n} ({a:.2f})" for n, a in self.under_trained) or "-"),
            "most over-trained (smallest alpha): "
            + (", ".join(f"{n} ({a:.2f})" for n, a in self.over_trained) or "-"),
        ]
        return "\n".join(lines)


@dataclass
class ModelAnalysis:
    """Result of :func:`analyze_model`: ``layers`` in registration order and the config used."""

    layers: list[LayerAnalysis]
    config: TempBalanceConfig

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no analysed layer named {name!r}")

    @property
    def alphas(self) -> dict[str, float]:
        return {layer.name: layer.alpha for layer in self.layers}

    def summary(self, top: int = 3) -> AnalysisSummary:
        """Mean/median alpha, how many lie in [2, 4], and the ``top`` extremes each way."""
        fitted = [(layer.name, layer.alpha) for layer in self.layers if math.isfinite(layer.alpha)]
        values = np.array([a for _, a in fitted], dtype=np.float64)
        lo, hi = WELL_TRAINED_RANGE
        by_alpha = sorted(fitted, key=lambda item: item[1])
        return AnalysisSummary(
            num_layers=len(self.layers),
            num_fitted=len(fitted),
            alpha_mean=float(values.mean()) if len(values) else math.nan,
            alpha_median=float(np.median(values)) if len(values) else math.nan,
            num_in_range=int(((values >= lo) & (values <= hi)).sum()),
            under_trained=by_alpha[::-1][:top],
            over_trained=by_alpha[:top],
        )

    def to_rows(self) -> list[dict[str, Any]]:
        return [layer.to_row() for layer in self.layers]

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the table as CSV (floats in full precision, ``nan``/``inf`` spelled out)."""
        rows = self.to_rows()
        columns = list(_COLUMNS) + sorted({k for r in rows for k in r} - set(_COLUMNS))
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()}
                             for r in rows)

    def to_frame(self):
        """The table as a ``pandas.DataFrame`` (needs the ``plot`` extra)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is in the plot extra
            raise ImportError("to_frame() needs pandas: pip install 'hf_tempbalance[plot]'") from err
        return pd.DataFrame(self.to_rows())

    def format_table(self, max_name: int = 48) -> str:
        """Fixed-width text table, one line per layer."""
        head = ("layer", "type", "shape", "eigs", "alpha", "xmin", "spec_norm", "alpha_w",
                "stable_rk", "TB")
        lines = []
        for layer in self.layers:
            name = layer.name if len(layer.name) <= max_name else "…" + layer.name[-max_name + 1:]
            lines.append((name, layer.type, "x".join(map(str, layer.shape)), str(layer.num_eigs),
                          f"{layer.alpha:.3f}", f"{layer.xmin:.3g}", f"{layer.spectral_norm:.4g}",
                          f"{layer.alpha_weighted:.3f}", f"{layer.stable_rank:.2f}",
                          "yes" if layer.balanced else "-"))
        widths = [max([len(h)] + [len(row[i]) for row in lines]) for i, h in enumerate(head)]
        left = {0, 1, 2}

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


@dataclass
class _Item:
    name: str
    type: str
    shape: tuple[int, ...]
    layer: nn.Module | torch.Tensor
    balanced: bool


def analyze_model(
    model: nn.Module,
    config: TempBalanceConfig | None = None,
    *,
    layers: str = "all",
    dtype: str | torch.dtype | None = None,
    keep_esds: bool = False,
    progress: bool | None = None,
) -> ModelAnalysis:
    """Spectral metrics of every weight matrix of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module`` (weights may live on any device; the work runs there).
        config: which layers count and how alpha is fitted (``layer_types``, ``include``,
            ``exclude``, ``xmin``, ``eig_rtol``, ``include_xmin``, ``dtype``, ``metric``); ``None``
            means the paper's defaults. A non-standard ``config.metric`` adds its own column.
        layers: ``"all"``: every candidate layer of ``config.layer_types`` that passes the name
            filters, including the first/last and the small ones TempBalance leaves alone;
            ``"balanced"``: only the layers TempBalance would balance. Frozen weights are skipped
            in both, as in layer discovery.
        dtype: eigensolver precision (default ``config.dtype``).
        keep_esds: keep each layer's eigenvalues (``LayerAnalysis.eigs``), e.g. for
            :func:`hf_tempbalance.plotting.plot_esd`.
        progress: show a progress bar (default: on the main process, for 24 layers or more).
    """
    config = TempBalanceConfig.build(config)
    if layers not in ("all", "balanced"):
        raise ValueError(f"layers must be 'all' or 'balanced', got {layers!r}")
    balanced = set(discover_layers(model, config).names)
    plan = discover_layers(model, config if layers == "balanced"
                           else config.replace(exclude_first_last=False, min_eigs=0))
    items = []
    for layer in plan.layers:
        shape = tuple(weight_of(layer.module).shape)
        if is_transposed_conv1d(layer.module):
            shape = shape[::-1]  # report (out, in) like nn.Linear
        items.append(_Item(layer.name, type(layer.module).__name__, shape, layer.module,
                           layer.name in balanced))
    return _analyze(items, config, dtype, keep_esds, progress)


def analyze_state_dict(
    state_dict: dict[str, torch.Tensor],
    config: TempBalanceConfig | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    keep_esds: bool = False,
    progress: bool | None = None,
) -> ModelAnalysis:
    """Metrics of the bare ``*weight`` tensors of a state dict, when no architecture is known.

    Every floating-point ``...weight`` tensor with two or more dimensions counts: 2-D as one
    ``out x in`` matrix, more as a convolution ``(out, in, *kernel)``. Without the modules the
    type (Linear vs Embedding, GPT-2's transposed ``Conv1D``) is unknown, so the type column says
    ``tensor`` and ``balanced`` is False; the spectra are the same as with the architecture.
    """
    config = TempBalanceConfig.build(config)
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    items = []
    for key, tensor in state_dict.items():
        if not (key.endswith("weight") and isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point() and tensor.ndim >= 2):
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        items.append(_Item(name, "tensor", tuple(tensor.shape), tensor, False))
    return _analyze(items, config, dtype, keep_esds, progress)


def _chunks(items: Sequence[_Item]) -> list[list[int]]:
    """Index groups of about ``_CHUNK_FLOPS`` each, equal matrix shapes kept together.

    Sorting by slice shape puts same-shaped layers in one :func:`batched_esd` call, where they
    share one batched ``eigvalsh``.
    """
    def shape_key(i: int) -> tuple[int, int]:
        m, n = weight_matrices(items[i].layer).shape[-2:]
        return (max(m, n), min(m, n))

    order = sorted(range(len(items)), key=lambda i: (shape_key(i), i))
    chunks: list[list[int]] = []
    load = 0.0
    for i in order:
        cost = layer_cost(items[i].layer)
        if not chunks or load + cost > _CHUNK_FLOPS:
            chunks.append([])
            load = 0.0
        chunks[-1].append(i)
        load += cost
    return chunks


@torch.no_grad()
def _analyze(items: list[_Item], config: TempBalanceConfig, dtype: Any, keep_esds: bool,
             progress: bool | None) -> ModelAnalysis:
    dtype = resolve_dtype(dtype if dtype is not None else config.dtype)
    metrics = list(STANDARD_METRICS) + ([config.metric] if config.metric not in STANDARD_METRICS else [])
    fit_kw = {"xmin": config.xmin, "rtol": config.eig_rtol, "include_xmin": config.include_xmin}
    if progress is None:
        progress = len(items) >= _PROGRESS_MIN_LAYERS
    progress = progress and world()[0] == 0

    results: list[LayerAnalysis | None] = [None] * len(items)
    with tqdm(total=len(items), unit="layer", desc="ESD", disable=not progress) as bar:
        for chunk in _chunks(items):
            eig_list = batched_esd([items[i].layer for i in chunk], dtype=dtype)
            # One host transfer per chunk for the metrics; hill_fit adds the tail start and size.
            values = metric_table(eig_list, metrics, **fit_kw)
            for i, eigs, row in zip(chunk, eig_list, values):
                item = items[i]
                fit = hill_fit(eigs, config.xmin, rtol=config.eig_rtol,
                               include_xmin=config.include_xmin)
                named = dict(zip(metrics, row))
                results[i] = LayerAnalysis(
                    name=item.name, type=item.type, shape=item.shape,
                    num_eigs=num_eigs(item.layer),
                    alpha=named.pop("alpha_hill"), xmin=fit.xmin, n_tail=fit.n_tail,
                    spectral_norm=named.pop("spectral_norm"),
                    alpha_weighted=named.pop("alpha_weighted"),
                    stable_rank=named.pop("stable_rank"), balanced=item.balanced, extra=named,
                    eigs=eigs.detach().to("cpu", torch.float64).numpy() if keep_esds else None,
                )
            bar.update(len(chunk))
    return ModelAnalysis([r for r in results if r is not None], config)


def read_analysis_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV written by :meth:`ModelAnalysis.to_csv` / ``hf-tempbalance analyze --csv``.

    Numeric columns come back as floats/ints and ``balanced`` as bool. A malformed file raises
    ``ValueError`` naming the file and the line.
    """
    ints = {"num_eigs", "n_tail"}
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            fields = reader.fieldnames or ()
            missing = {"name", "alpha"} - set(fields)
            if missing:
                raise ValueError(f"{path} is not an `hf-tempbalance analyze --csv` table "
                                 f"(missing columns {sorted(missing)})")
            for raw in reader:
                if None in raw or None in raw.values():
                    raise ValueError(f"{path} line {reader.line_num}: {len(fields)} columns "
                                     "expected (a torn or hand-edited line?)")
                row: dict[str, Any] = {}
                for key, value in raw.items():
                    if key in ("name", "type", "shape"):
                        row[key] = value
                    elif key == "balanced":
                        row[key] = value == "True"
                    else:
                        try:
                            row[key] = int(value) if key in ints else float(value)
                        except ValueError:
                            raise ValueError(f"{path} line {reader.line_num}: column {key!r} is "
                                             f"{value!r}, not a number") from None
                rows.append(row)
        except (csv.Error, UnicodeDecodeError) as err:
            raise ValueError(f"{path} line {max(reader.line_num, 1)}: not a CSV table "
                             f"({err})") from err
    return rows
