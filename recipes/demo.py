#!/usr/bin/env python
"""``make demo``: TempBalance vs the CAL baseline on real data, on a CPU, in a few minutes.

1. Obtains Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` into ``data/``
   (``apt-get download`` + ``dpkg-deb -x``; no root, no Hub).
2. Trains the paper's small-image ResNet18 at 1/8 of its width (timm ``cifar_resnet18``,
   8-16-32-64 channels, 16 balanced conv layers) twice from the same initialisation and data
   order: CAL (SGD, momentum 0.9, weight decay 5e-4, cosine LR) and TB (the same plus
   ``TempBalanceCallback``, multipliers updated every 10 steps), through
   ``recipes/image_classification.py``.
3. Prints the results and writes PNGs to ``demo_output/``: test accuracy per epoch for both,
   and TempBalance's per-layer LR and alpha over training (``hf_tempbalance.plotting``).

The default budget (12,000 training images, 5 epochs, the full 10,000-image test set after each
epoch; the setting of the seed-43, LR-0.1 cell of the study in recipes/README.md) costs about
5 CPU-minutes. It is one seed of a tiny run: the printed difference is what was measured and
nothing more; recipes/README.md has the multi-seed study.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from image_classification import main as run_recipe
from image_data.fashion_mnist import load_fashion_mnist

from hf_tempbalance.plotting import plot_heatmaps, plot_layer_curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output", help="where runs and PNGs go")
    parser.add_argument("--data-dir", default="data", help="Fashion-MNIST cache folder")
    parser.add_argument("--train-samples", type=int, default=12000, help="training images used")
    parser.add_argument("--eval-samples", type=int, default=10000, help="test images used")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--lr", type=float, default=0.1, help="initial LR of both methods")
    parser.add_argument("--width", type=float, default=0.125, help="ResNet18 channel multiplier")
    parser.add_argument("--tb-interval", default="10",
                        help="TempBalance update every N optimizer steps ('epoch': paper)")
    parser.add_argument("--seed", type=int, default=43)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: see main())")
    return parser.parse_args(argv)


def plot_accuracy(results: list[dict], path: str) -> str:
    """Test accuracy per epoch, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for run in results:
        rows = [r for r in run["history"] if "test_accuracy" in r]
        ax.plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o",
                label=f"{run['method']} (final {100 * run['test_accuracy']:.2f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results[0]['dataset']}, {results[0]['model']} width {results[0]['width']:g}, "
                 f"seed {results[0]['seed']}", fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def report(results: list[dict]) -> str:
    """The per-epoch table and a one-line reading of the measured difference."""
    by_method = {r["method"]: r for r in results}
    epochs = sorted({row["epoch"] for r in results for row in r["history"]})
    lines = ["epoch | " + " | ".join(f"{m} test acc (%)" for m in by_method),
             "---|" + "---|" * len(by_method)]
    for epoch in epochs:
        cells = []
        for run in by_method.values():
            row = next((x for x in run["history"] if x["epoch"] == epoch), {})
            cells.append(f"{100 * row['test_accuracy']:.2f}" if "test_accuracy" in row else "")
        lines.append(f"{epoch} | " + " | ".join(cells))
    lines.append("")
    for method, run in by_method.items():
        lines.append(f"{method:>4}: final {100 * run['test_accuracy']:.2f}%  best "
                     f"{100 * run['best_test_accuracy']:.2f}%  ({run['train_runtime_s']:.0f} s)")
    if {"cal", "tb"} <= set(by_method):
        diff = 100 * (by_method["tb"]["test_accuracy"] - by_method["cal"]["test_accuracy"])
        verdict = "higher" if diff > 0 else "lower" if diff < 0 else "equal"
        lines.append(
            f"TB - CAL = {diff:+.2f} points of final test accuracy ({verdict} for TB) on this single "
            f"seed of {by_method['tb']['train_samples']} images; one seed cannot separate an effect "
            "this size from seed-to-seed noise (see the multi-seed study in recipes/README.md).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    # Convolutions with 8-64 channels gain little from a second thread, and with OpenMP's default
    # spin-wait two threads stall whenever the other core is busy (a shared machine, a test run).
    torch.set_num_threads(args.threads)
    start = time.time()
    print(f"[1/3] Fashion-MNIST from the Debian package into {args.data_dir}/ ...", flush=True)
    dataset = load_fashion_mnist(args.data_dir)
    print(f"      {len(dataset['train'])} training and {len(dataset['test'])} test images; using "
          f"{args.train_samples} and {args.eval_samples}", flush=True)

    print("[2/3] training CAL and TB (same initialisation, same data order) ...", flush=True)
    runs_dir = os.path.join(args.output_dir, "runs")
    results = run_recipe([
        "--dataset", "fashion_mnist", "--data-dir", args.data_dir, "--model", "resnet18",
        "--width", str(args.width), "--method", "cal", "tb", "--lr", str(args.lr),
        "--epochs", str(args.epochs), "--seed", str(args.seed),
        "--max-train-samples", str(args.train_samples),
        "--max-eval-samples", str(args.eval_samples), "--tb_interval", str(args.tb_interval),
        "--output-dir", runs_dir, "--rerun",
        # Pinned host memory only helps copies to a GPU (and warns without one).
        "--dataloader_pin_memory", str(torch.cuda.is_available()),
    ])

    print("\n[3/3] results and plots", flush=True)
    print(report(results))
    tb = next(r for r in results if r["method"] == "tb")
    history_dir = tb["output_dir"]
    paths = [
        plot_accuracy(results, os.path.join(args.output_dir, "test_accuracy.png")),
        plot_heatmaps(history_dir, title="TempBalance: per-layer LR and alpha",
                      path=os.path.join(args.output_dir, "tb_layer_heatmaps.png")).path,
        plot_layer_curves(history_dir, title="TempBalance: LR and alpha of four layers",
                          path=os.path.join(args.output_dir, "tb_layer_curves.png")).path,
    ]
    print("\nwrote", *paths, os.path.join(runs_dir, "sweep_table.md"), sep="\n  ")
    print(f"demo finished in {(time.time() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
