r"""The paper's pictures from a model or a training history (matplotlib, Agg, no pyplot).

* :func:`plot_esd`: one layer's ESD on log-log axes with the ``xmin`` line and the fitted power
  law (paper Figure 1).
* :func:`plot_heatmaps`: per-layer LR and alpha over training (Figure 13).
* :func:`plot_layer_curves`: LR and alpha curves of chosen layers (Figure 14).
* :func:`plot_alpha_distributions`: alpha histograms of several runs side by side, mean and
  median marked (Figure 11).

Every function returns a :class:`Plot`: the ``figure`` (a ``matplotlib.figure.Figure`` built
without pyplot, so no global backend or figure registry is touched) and ``data``, the arrays it
drew, and writes a PNG when given ``path``. Needs the ``plot`` extra (matplotlib).

A layer's LR at update ``u`` is ``base_lr(u) · multiplier(u)`` (the scheduler's LR times the
TempBalance multiplier); when a history has no ``base_lr`` the multiplier itself is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .analysis import LayerAnalysis
from .history import read_history
from .spectral.hill import filter_eigs, hill_fit

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Plot", "HistoryGrid", "history_grid", "plot_esd", "plot_heatmaps",
           "plot_layer_curves", "plot_alpha_distributions", "default_curve_layers"]


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib; install it with: pip install 'hf_tempbalance[plot]'"
        ) from err
    # A bare Figure renders with Agg on savefig and is garbage-collected like any object.
    return Figure(figsize=(width, height), layout="constrained")


@dataclass
class Plot:
    """A drawn figure, the arrays it shows (``data``) and where it was saved (``path``)."""

    figure: Figure
    data: dict[str, Any]
    path: str | None = None

    def save(self, path: str | os.PathLike, dpi: int = 110) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.figure.savefig(path, dpi=dpi)
        self.path = path
        return path


def _finish(plot: Plot, path: str | os.PathLike | None) -> Plot:
    if path is not None:
        plot.save(path)
    return plot


# ---------------------------------------------------------------------------- Figure 1
def plot_esd(
    eigs: LayerAnalysis | np.ndarray | Sequence[float] | Any,
    *,
    xmin_method: str = "median",
    rtol: float | None = None,
    include_xmin: bool = True,
    bins: int | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Plot:
    r"""Log-log histogram of an ESD with the ``xmin`` line and the fitted power law (Figure 1).

    The histogram is a density over ``bins`` log-spaced bins (default ``2·sqrt(N)`` within
    [10, 100]) between the smallest and largest non-zero eigenvalue. The fitted law is drawn as the density of the tail fraction,

    .. math::  p(\lambda) = \frac{n_{\text{tail}}}{N}\,\frac{\alpha-1}{x_{\min}}
               \Big(\frac{\lambda}{x_{\min}}\Big)^{-\alpha},\quad \lambda \ge x_{\min},

    so it lies on the histogram where the power law fits. ``data`` holds ``eigs`` (non-zero,
    ascending), ``edges``, ``density``, ``xmin``, ``alpha``, ``fit_x``, ``fit_y``.

    Args:
        eigs: eigenvalues (array or tensor), or a :class:`LayerAnalysis` made with
            ``keep_esds=True`` (its name becomes the title).
        xmin_method, rtol, include_xmin: the fit (see :func:`hill_fit`).
    """
    if isinstance(eigs, LayerAnalysis):
        if eigs.eigs is None:
            raise ValueError(f"layer {eigs.name!r} has no eigenvalues; analyse with keep_esds=True")
        title = title if title is not None else f"{eigs.name} ({eigs.type} {'x'.join(map(str, eigs.shape))})"
        eigs = eigs.eigs
    import torch

    values = torch.as_tensor(np.asarray(eigs, dtype=np.float64))
    fit = hill_fit(values, xmin_method, rtol=rtol, include_xmin=include_xmin)  # as in training
    kept = filter_eigs(values, rtol).numpy()
    kept = kept[kept > 0]  # the fit counts zeros; log axes cannot draw them
    if kept.size < 2:
        raise ValueError(f"an ESD needs at least 2 non-zero eigenvalues to plot, got {kept.size}")
    lo, hi = kept[0], kept[-1]
    if bins is None:
        bins = int(np.clip(round(2 * math.sqrt(kept.size)), 10, 100))
    edges = np.geomspace(lo, hi, bins + 1) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    density, edges = np.histogram(kept, bins=edges, density=True)
    fit_x = np.geomspace(fit.xmin, hi, 100) if hi > fit.xmin > 0 else np.array([fit.xmin])
    fit_y = ((fit.n_tail / kept.size) * (fit.alpha - 1.0) / fit.xmin
             * (fit_x / fit.xmin) ** (-fit.alpha))

    fig = _new_figure(5.0, 3.8)
    ax = fig.add_subplot()
    ax.stairs(density, edges, fill=True, color="tab:blue", alpha=0.55, label="ESD")
    if fit.xmin > 0:
        ax.axvline(fit.xmin, color="tab:red", linestyle="--", label=rf"$\lambda_{{\min}}$ = {fit.xmin:.3g}")
    if math.isfinite(fit.alpha):
        ax.plot(fit_x, fit_y, color="black", linewidth=1.5, label=rf"power law, $\alpha$ = {fit.alpha:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"eigenvalue $\lambda$ of $W^\top W$")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    data = {"eigs": kept, "edges": edges, "density": density, "xmin": fit.xmin,
            "alpha": fit.alpha, "fit_x": fit_x, "fit_y": fit_y}
    return _finish(Plot(fig, data), path)


# ---------------------------------------------------------------------------- history
@dataclass
class HistoryGrid:
    """A history as ``(layer, update)`` matrices (nan where a layer has no row for an update).

    Attributes:
        layers: layer names in order of first appearance (registration order).
        updates: sorted update indices; ``step``/``epoch`` give each one's optimizer step/epoch
            (``epoch`` is None unless every update has one).
        metric: the metric TempBalance mapped (``alpha_hill`` by default).
        value, multiplier: metric values and multipliers, shape ``(layers, updates)``.
        lr: ``base_lr · multiplier`` when every row has ``base_lr``, else None.
    """

    layers: list[str]
    updates: np.ndarray
    step: np.ndarray
    epoch: np.ndarray | None
    metric: str
    value: np.ndarray
    multiplier: np.ndarray
    lr: np.ndarray | None = None

    @property
    def x(self) -> np.ndarray:
        """Time axis: the epoch when known, else the optimizer step."""
        return self.epoch if self.epoch is not None else self.step

    @property
    def x_label(self) -> str:
        return "epoch" if self.epoch is not None else "optimizer step"

    @property
    def rate(self) -> np.ndarray:
        """What the LR panels draw: the layer LR, or the multiplier when no base LR is known."""
        return self.lr if self.lr is not None else self.multiplier

    @property
    def rate_label(self) -> str:
        return "learning rate" if self.lr is not None else "LR multiplier"

    @property
    def metric_label(self) -> str:
        return "alpha (PL_Alpha_Hill)" if self.metric == "alpha_hill" else self.metric


def history_grid(history: str | os.PathLike | Sequence[Mapping[str, Any]]) -> HistoryGrid:
    """Pivot a history (rows, a ``tempbalance_history.jsonl`` file or a run dir) into matrices.

    When a resumed run logged an update twice, the later row wins.
    """
    rows = read_history(history) if isinstance(history, (str, os.PathLike)) else list(history)
    if not rows:
        raise ValueError("the TempBalance history is empty: no update has run yet")
    layers: dict[str, int] = {}
    for row in rows:
        layers.setdefault(row["layer"], len(layers))
    updates = sorted({int(row["update"]) for row in rows})
    col = {u: j for j, u in enumerate(updates)}
    shape = (len(layers), len(updates))
    value = np.full(shape, np.nan)
    mult = np.full(shape, np.nan)
    base = np.full(shape, np.nan)
    step = np.full(len(updates), np.nan)
    epoch = np.full(len(updates), np.nan)
    has_base = all(row.get("base_lr") is not None for row in rows)
    for row in rows:
        i, j = layers[row["layer"]], col[int(row["update"])]
        value[i, j] = float(row["value"]) if row.get("value") is not None else np.nan
        mult[i, j] = float(row["multiplier"])
        step[j] = row["step"]
        if row.get("epoch") is not None:
            epoch[j] = row["epoch"]
        if has_base:
            base[i, j] = float(row["base_lr"])
    metrics = {row.get("metric", "alpha_hill") for row in rows}
    if len(metrics) > 1:
        raise ValueError(f"the history mixes metrics {sorted(metrics)}; plot one run at a time")
    return HistoryGrid(
        layers=list(layers), updates=np.asarray(updates), step=step,
        epoch=None if np.isnan(epoch).any() else epoch, metric=metrics.pop(),
        value=value, multiplier=mult, lr=base * mult if has_base else None)


def _cell_edges(x: np.ndarray) -> np.ndarray:
    """Edges around each x value (midpoints; half a gap beyond the ends) for pcolormesh."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _layer_ticks(ax, layers: Sequence[str], max_labels: int = 40) -> None:
    every = max(1, math.ceil(len(layers) / max_labels))
    ticks = list(range(0, len(layers), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([layers[i] for i in ticks], fontsize=6)


# ---------------------------------------------------------------------------- Figure 13
def plot_heatmaps(history: str | os.PathLike | Sequence[Mapping[str, Any]] | HistoryGrid, *,
                  title: str | None = None, path: str | os.PathLike | None = None) -> Plot:
    """Per-layer LR (left) and alpha (right) over training, layers top to bottom (Figure 13).

    ``data``: ``x`` (epoch or step per update), ``layers``, ``lr`` (or the multiplier, see
    :attr:`HistoryGrid.rate`) and ``alpha`` (the history's metric), each ``(layers, updates)``.
    """
    grid = history if isinstance(history, HistoryGrid) else history_grid(history)
    x_edges = _cell_edges(grid.x)
    y_edges = np.arange(len(grid.layers) + 1) - 0.5
    fig = _new_figure(11.0, max(3.5, 0.16 * len(grid.layers) + 1.5))
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((grid.rate, grid.rate_label, "viridis"), (grid.value, grid.metric_label, "magma"))
    for ax, (matrix, label, cmap) in zip(axes, panels):
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(matrix), cmap=cmap)
        fig.colorbar(mesh, ax=ax, label=label)
        ax.set_xlabel(grid.x_label)
        ax.set_title(label)
    axes[0].invert_yaxis()  # first layer on top, as in the paper
    _layer_ticks(axes[0], grid.layers)
    if title:
        fig.suptitle(title)
    data = {"x": grid.x, "layers": list(grid.layers), "lr": grid.rate, "alpha": grid.value,
            "lr_label": grid.rate_label}
    return _finish(Plot(fig, data), path)


# ---------------------------------------------------------------------------- Figure 14
def default_curve_layers(layers: Sequence[str], count: int = 4) -> list[str]:
    """``count`` layers spread evenly over depth (first, last and between)."""
    if not layers:
        return []
    idx = np.unique(np.linspace(0, len(layers) - 1, min(count, len(layers))).round().astype(int))
    return [layers[i] for i in idx]


def plot_layer_curves(history: str | os.PathLike | Sequence[Mapping[str, Any]] | HistoryGrid,
                      layers: Sequence[str] | None = None, *, title: str | None = None,
                      path: str | os.PathLike | None = None) -> Plot:
    """LR (top) and alpha (bottom) of chosen layers over training (Figure 14).

    Args:
        layers: names from the history (default: four spread over depth). Unknown names raise
            ``ValueError`` listing the available ones.

    ``data``: ``x``, ``layers``, and ``lr``/``alpha`` as ``{layer: array over updates}``.
    """
    grid = history if isinstance(history, HistoryGrid) else history_grid(history)
    layers = list(layers) if layers else default_curve_layers(grid.layers)
    unknown = [n for n in layers if n not in grid.layers]
    if unknown:
        shown = ", ".join(grid.layers[:12]) + (" ..." if len(grid.layers) > 12 else "")
        raise ValueError(f"layer(s) {unknown} are not in the history; available: {shown}")
    rows = {n: grid.layers.index(n) for n in layers}
    fig = _new_figure(7.0, 6.0)
    ax_lr, ax_alpha = fig.subplots(2, 1, sharex=True)
    lr = {n: grid.rate[i] for n, i in rows.items()}
    alpha = {n: grid.value[i] for n, i in rows.items()}
    for name in layers:
        ax_lr.plot(grid.x, lr[name], marker=".", label=name)
        ax_alpha.plot(grid.x, alpha[name], marker=".", label=name)
    ax_lr.set_ylabel(grid.rate_label)
    ax_alpha.set_ylabel(grid.metric_label)
    ax_alpha.set_xlabel(grid.x_label)
    ax_lr.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    data = {"x": grid.x, "layers": layers, "lr": lr, "alpha": alpha, "lr_label": grid.rate_label}
    return _finish(Plot(fig, data), path)


# ---------------------------------------------------------------------------- Figure 11
def plot_alpha_distributions(distributions: Mapping[str, Sequence[float]], *, bins: int = 20,
                             title: str | None = None,
                             path: str | os.PathLike | None = None) -> Plot:
    """Histograms of per-layer alpha, one panel per run, on shared bins (Figure 11).

    Each panel marks the mean (solid) and median (dashed) of its finite alphas. No "well-trained"
    boundary is drawn: the median-xmin alphas TempBalance fits rank layers against each other and
    random weights also land in [2, 4] with them (see ``analyze``), so such a line would claim a
    verdict these numbers cannot support. ``data[label]`` holds ``alphas`` (finite
    values), ``counts``, ``mean``, ``median``; ``data["edges"]`` the shared bin edges.
    """
    if not distributions:
        raise ValueError("no alpha distribution to plot")
    clean = {}
    for label, values in distributions.items():
        arr = np.asarray(list(values), dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            raise ValueError(f"{label!r} has no finite alpha to plot")
        clean[label] = arr
    everything = np.concatenate(list(clean.values()))
    lo, hi = everything.min(), everything.max() + 1e-9
    edges = np.linspace(lo, hi, bins + 1)
    fig = _new_figure(4.0 * len(clean), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(clean), sharex=True, sharey=True))
    data: dict[str, Any] = {"edges": edges}
    for ax, (label, arr) in zip(axes, clean.items()):
        counts, _ = np.histogram(arr, bins=edges)
        mean, median = float(arr.mean()), float(np.median(arr))
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.6)
        ax.axvline(mean, color="tab:red", linestyle="-", label=f"mean {mean:.2f}")
        ax.axvline(median, color="tab:orange", linestyle="--", label=f"median {median:.2f}")
        ax.set_title(f"{label} ({arr.size} layers)", fontsize=10)
        ax.set_xlabel("alpha (PL_Alpha_Hill)")
        ax.legend(fontsize=7)
        data[label] = {"alphas": arr, "counts": counts, "mean": mean, "median": median}
    axes[0].set_ylabel("layers")
    axes[0].yaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return _finish(Plot(fig, data), path)
