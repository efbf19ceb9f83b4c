"""Cross-check: our KS-xmin alpha (``hf-tempbalance analyze --xmin ks``) against weightwatcher's.

    pip install weightwatcher        # not a dependency of hf_tempbalance; any environment will do
    python benchmarks/weightwatcher_check.py [--models resnet18 toy trained heavy]
                                             [--dtype float32 float64] [--json FILE]
    python benchmarks/weightwatcher_check.py --write-fixture tests/ww_fixture

For each model, both tools fit the same weights and the per-layer alphas are compared:

* ours: :func:`hf_tempbalance.analysis.analyze_model` with ``TempBalanceConfig(xmin="ks")``
  (every ``Linear``/``Conv`` layer, every eigenvalue; a tail may start anywhere above the
  eigensolver's noise floor, ``2e-6·λ_max`` in float32), in ``--dtype``;
* weightwatcher: ``WeightWatcher(model).analyze(randomize=False, plot=False)``, i.e. its defaults
  (``pool=True``: a conv's k×k slices pooled into one ESD, as ours; ``fix_fingers`` off;
  ``fit="PL"`` with its own KS search ``WW_powerlaw`` over every eigenvalue above its absolute
  ``EVALS_THRESH = 1e-5``; ``conv2d_norm=True``, a scale, which alpha ignores; ``glorot_fix`` and
  ``normalize`` off); ``randomize=False`` and ``plot=False`` only skip work that does not touch
  alpha. Layers whose ESD has fewer than 20 eigenvalues are left out: weightwatcher fits those
  with a bias-corrected small-sample estimator (``SMALL_N_CUTOFF``) that is not the Hill fit.

Models: ``resnet18`` is what ``hf-tempbalance analyze resnet18`` reads (timm's random init, seed
0); ``toy`` a small random CNN; ``trained`` the same CNN after 150 SGD steps on a synthetic task;
``heavy`` Linear layers whose spectra are power laws with alpha 1.5 to 8 (so that the verdicts
over-trained, none and under-trained all occur). Reported per model and dtype: layers compared,
max |Δalpha| and max |Δalpha|/alpha, mean alpha of each tool, and whether every layer gets the
same verdict (weightwatcher's ``warning`` column).

``--write-fixture DIR`` records the small models' weights (``models.safetensors``) and
weightwatcher's fit of each (``weightwatcher.json``: alpha, warning, number of eigenvalues per
layer), so that ``tests/test_weightwatcher.py`` checks ours against weightwatcher's own numbers
where weightwatcher is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_tempbalance.analysis import analyze_model  # noqa: E402
from hf_tempbalance.config import TempBalanceConfig  # noqa: E402

MODELS = ("resnet18", "toy", "trained", "heavy")
#: Below this many eigenvalues weightwatcher switches to its small-sample fit (WW_powerlaw).
SMALL_N = 20


def import_weightwatcher():
    """``weightwatcher``, imported without letting it silence warnings process-wide."""
    with warnings.catch_warnings():  # its powerlaw module calls warnings.simplefilter("ignore")
        import weightwatcher

    return weightwatcher


class ToyCNN(nn.Module):
    """3 convs and 3 Linears; 8x8 RGB images, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64),
                                  nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ToyCNN().eval()


def trained_toy(seed: int = 0, steps: int = 150) -> nn.Module:
    """:class:`ToyCNN` after ``steps`` SGD steps (lr 0.1, momentum 0.9) fitting a random teacher."""
    model = toy_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(512, 3, 8, 8, generator=gen)
    with torch.no_grad():
        labels = toy_model(seed + 2)(inputs).argmax(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(inputs)
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def heavy_tailed(seed: int = 0, alphas=(1.5, 2.5, 4.0, 8.0), shape=(384, 256)) -> nn.Module:
    """Linear layers ``U diag(√λ) Vᵀ`` whose eigenvalues λ follow a power law
    ``p(λ) ∝ λ^(-alpha)`` (inverse-CDF samples), one layer per alpha."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    out_dim, in_dim = shape
    for alpha in alphas:
        u = torch.rand(in_dim, generator=gen, dtype=torch.float64)
        lam = (1.0 - u) ** (-1.0 / (alpha - 1.0))  # Pareto with x_min = 1
        left = torch.linalg.qr(torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen, dtype=torch.float64))[0]
        layer = nn.Linear(in_dim, out_dim, bias=False)
        with torch.no_grad():
            layer.weight.copy_((left * lam.sqrt()) @ right.T)
        layers.append(layer)
    return nn.Sequential(*layers).eval()


def resnet18() -> nn.Module:
    """What ``hf-tempbalance analyze resnet18`` reads: timm's random init, seed 0."""
    from hf_tempbalance.loading import resolve_model

    return resolve_model("resnet18").model


def build(name: str) -> nn.Module:
    return {"resnet18": resnet18, "toy": toy_model, "trained": trained_toy, "heavy": heavy_tailed}[name]()


#: The models whose weights and weightwatcher fits the fixture records (resnet18 is 11M weights).
FIXTURE_MODELS = ("toy", "trained", "heavy")
FIXTURE_WEIGHTS, FIXTURE_FITS = "models.safetensors", "weightwatcher.json"


def write_fixture(folder: Path) -> dict:
    """Record :data:`FIXTURE_MODELS`' weights and weightwatcher's fit of each into ``folder``."""
    from safetensors.torch import save_file

    ww = import_weightwatcher()
    tensors, fits = {}, {}
    for name in FIXTURE_MODELS:
        model = build(name)
        tensors.update({f"{name}.{key}": value.detach().contiguous()
                        for key, value in model.state_dict().items()})
        fits[name] = ww_details(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / FIXTURE_WEIGHTS)
    record = {"weightwatcher": ww.__version__, "torch": torch.__version__,
              "call": "WeightWatcher(model=model).analyze(randomize=False, plot=False)",
              "models": fits}
    (folder / FIXTURE_FITS).write_text(json.dumps(record, indent=1) + "\n")
    return record


def fixture_model(name: str, folder: Path) -> nn.Module:
    """Model ``name`` of :data:`FIXTURE_MODELS` with the weights recorded in ``folder``."""
    from safetensors.torch import load_file

    model = ToyCNN() if name in ("toy", "trained") else heavy_tailed()  # the architecture
    prefix = f"{name}."
    weights = {k[len(prefix):]: v for k, v in load_file(folder / FIXTURE_WEIGHTS).items()
               if k.startswith(prefix)}
    model.load_state_dict(weights)
    return model.eval()


def ww_details(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"alpha", "warning", "num_evals"}}`` from weightwatcher's defaults."""
    ww = import_weightwatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(randomize=False, plot=False)
    return {row.longname: {"alpha": float(row.alpha), "warning": str(row.warning or ""),
                           "num_evals": int(row.num_evals)} for row in details.itertuples()}


def compare(model: nn.Module, dtype: str = "float64", theirs: dict[str, dict] | None = None) -> dict:
    """Per-layer alphas and verdicts of both tools on ``model``, and their largest differences;
    ``theirs``: weightwatcher's fit recorded earlier (:func:`ww_details`; default: run it now)."""
    ours = analyze_model(model, TempBalanceConfig(xmin="ks", dtype=dtype), layers="all",
                         progress=False)
    if theirs is None:
        theirs = ww_details(model)
    rows, small = [], []
    for layer in ours.layers:
        ref = theirs.get(layer.name)
        if ref is None or ref["num_evals"] < SMALL_N:
            small.append(layer.name)
            continue
        rows.append({"name": layer.name, "num_eigs": layer.num_eigs, "ours": layer.alpha,
                     "weightwatcher": ref["alpha"], "verdict": layer.verdict,
                     "ww_warning": ref["warning"]})
    ours_a = np.array([r["ours"] for r in rows])
    ww_a = np.array([r["weightwatcher"] for r in rows])
    diff = np.abs(ours_a - ww_a)
    return {
        "dtype": dtype,
        "layers": len(rows),
        "left_out": small,  # fewer than SMALL_N eigenvalues, or not a layer weightwatcher fits
        "max_abs_diff": float(diff.max()) if len(rows) else math.nan,
        "max_rel_diff": float((diff / np.abs(ww_a)).max()) if len(rows) else math.nan,
        "mean_alpha_ours": float(ours_a.mean()) if len(rows) else math.nan,
        "mean_alpha_weightwatcher": float(ww_a.mean()) if len(rows) else math.nan,
        "same_verdicts": all(r["verdict"] == r["ww_warning"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64"),
                        default=["float32", "float64"])
    parser.add_argument("--json", metavar="FILE", help="also write the results (with every layer)")
    parser.add_argument("--write-fixture", metavar="DIR", type=Path,
                        help="record the small models' weights and weightwatcher's fits (only)")
    args = parser.parse_args(argv)
    if args.write_fixture:
        record = write_fixture(args.write_fixture)
        print(f"weightwatcher {record['weightwatcher']}: {', '.join(record['models'])} recorded in "
              f"{args.write_fixture}")
        return [record]
    ww = import_weightwatcher()
    results = []
    print(f"weightwatcher {ww.__version__}; layers with < {SMALL_N} eigenvalues left out\n")
    print("| model | dtype | layers | max abs diff | max rel diff | mean alpha (ours / ww) | same verdicts |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = build(name)
        for dtype in args.dtype:
            res = {"model": name, **compare(model, dtype)}
            results.append(res)
            print(f"| {name} | {dtype} | {res['layers']} | {res['max_abs_diff']:.2e} | "
                  f"{res['max_rel_diff']:.2e} | {res['mean_alpha_ours']:.3f} / "
                  f"{res['mean_alpha_weightwatcher']:.3f} | {res['same_verdicts']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
