#!/usr/bin/env python
"""Issue 19, image classification: CAL vs TempBalance on all of Fashion-MNIST for 30 epochs.

The paper's small-image ResNet18 at width 0.125, SGD (momentum 0.9, weight decay 5e-4, batch 128),
cosine LR over 30 epochs, TempBalance once per epoch with its default (s1, s2) = (0.5, 1.5); both
methods on the same LR grid and seeds (same seed = same initial weights, data order and
augmentation). Every run is ``recipes/image_classification.py`` with one method, LR and seed::

    python recipes/studies/fashion_mnist_long.py            # the whole study; rerun to continue

Runs go two at a time (``--workers``), one thread each, under ``nice -n 10``. Finished runs are
committed as small JSON files in ``--results_dir`` (``results/fashion_mnist_long/runs/``) and reused
when their settings match; checkpoints (one per epoch) live in ``--checkpoint_dir`` (outside the
repository) and a killed run resumes from its last one. At the start and after every finished
run the report is rewritten: ``report.md`` (mean ± std table, per-seed paired differences with
95% t-intervals, the mean TempBalance multiplier, the verdict, and a snapshot of the unfinished
runs' accuracy so far, from their checkpoints), ``summary.json`` and ``curves.png`` (test
accuracy over epochs). ``--report_only`` rewrites them from the committed results and the
checkpoints as they are now, without training.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent
for _path in (str(RECIPES), str(HERE)):  # image_sweep, image_methods; study_tools
    if _path not in sys.path:
        sys.path.insert(0, _path)

from image_methods import paper_tb_range  # noqa: E402
from image_sweep import aggregate, best_lrs, format_table  # noqa: E402
from study_tools import (  # noqa: E402
    CACHE,
    GridArguments,
    Run,
    checkpoint_snapshots,
    cosine_lr,
    format_duration,
    mean_multiplier,
    multiplier_table,
    pair_row,
    paired_differences,
    recorded_settings,
    run_study,
    running_section,
    save_report,
    start_report,
    verdict,
)
from transformers import HfArgumentParser  # noqa: E402
from usage import run_main  # noqa: E402


@dataclass
class StudyArguments(GridArguments):
    methods: list[str] = field(default_factory=lambda: ["cal", "tb"], metadata={
        "help": "baseline first, then the method compared with it"})
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.2], metadata={
        "help": "LR grid, trained in this order (the paper's 0.1 first)"})
    seeds: list[int] = field(default_factory=lambda: [43, 37, 13], metadata={
        "help": "seeds (the paper's first three)"})
    epochs: int = field(default=30)
    model: str = field(default="resnet18")
    width: float = field(default=0.125, metadata={"help": "channel multiplier of the ResNet18"})
    batch_size: int = field(default=128)
    channels_last: bool = field(default=True, metadata={
        "help": "channels-last model (measured ~1.4x faster per step on one thread)"})
    device: str = field(default="cpu", metadata={
        "help": "cpu (the grid) or cuda (e.g. the paper's 200 epochs for one seed pair: see "
                "recipes/studies/README.md)", "choices": ["cpu", "cuda"]})
    loader_workers: int = field(default=0, metadata={
        "help": "data-loading processes per run (a GPU run needs several to keep up); the "
                "augmentation draws differ with the count, so it is a setting"})
    max_train_samples: int | None = field(default=None, metadata={"help": "smoke tests only"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "smoke tests only"})
    data_dir: str = field(default=str(CACHE / "data"), metadata={
        "help": "Fashion-MNIST cache (obtained with apt-get download on first use)"})
    results_dir: str = field(default=str(HERE / "results" / "fashion_mnist_long"), metadata={
        "help": "committed results: runs/*.json, report.md, summary.json, curves.png"})
    checkpoint_dir: str = field(default=str(CACHE / "studies" / "fashion_mnist_long"), metadata={
        "help": "checkpoints and logs of the runs (outside the repository)"})


#: Settings the committed runs predate, with the value they had (study_tools.recorded_settings).
IMPLICIT = {"device": "cpu", "loader_workers": 0}


def steps_per_epoch(args: StudyArguments) -> int:
    samples = 60000 if args.max_train_samples is None else min(60000, args.max_train_samples)
    return math.ceil(samples / args.batch_size)


def build_runs(args: StudyArguments) -> list[Run]:
    """One :class:`Run` per (LR, seed, method), every method of an (LR, seed) next to each other."""
    runs = []
    for lr in args.lrs:
        for seed in args.seeds:
            for method in args.methods:
                s1, s2 = paper_tb_range(method, "fashion_mnist", args.model)
                settings = {
                    "study": "fashion_mnist_long", "dataset": "fashion_mnist", "model": args.model,
                    "width": args.width, "channels_last": args.channels_last, "method": method, "lr": float(lr), "seed": seed,
                    "epochs": args.epochs, "batch_size": args.batch_size, "optim": "sgd momentum 0.9",
                    "weight_decay": 5e-4, "lr_scheduler": "cosine", "train_samples":
                    args.max_train_samples or "all", "test_samples": args.max_eval_samples or "all",
                    "tempbalance": ({"s1": s1, "s2": s2, "interval": "epoch"}
                                    if method in ("tb", "tb+snr") else None),
                    "device": args.device, "loader_workers": args.loader_workers,
                }
                command = [sys.executable, str(RECIPES / "image_classification.py"),
                           "--dataset", "fashion_mnist", "--data_dir", args.data_dir,
                           "--model", args.model, "--width", str(args.width), "--method", method,
                           "--learning_rate", str(lr), "--seed", str(seed),
                           "--num_train_epochs", str(args.epochs),
                           "--per_device_train_batch_size", str(args.batch_size),
                           "--save_strategy", "epoch", "--save_total_limit", "1",
                           "--use_cpu", str(args.device == "cpu").lower(),
                           "--dataloader_num_workers", str(args.loader_workers),
                           "--disable_tqdm", "true", "--channels_last", str(args.channels_last)]
                if args.max_train_samples is not None:
                    command += ["--max_train_samples", str(args.max_train_samples)]
                if args.max_eval_samples is not None:
                    command += ["--max_eval_samples", str(args.max_eval_samples)]
                runs.append(Run(key=f"{method}_lr{lr:g}_seed{seed}",
                                settings=recorded_settings(settings, IMPLICIT),
                                command=command, total_steps=args.epochs * steps_per_epoch(args)))
    return runs


def collect(run: Run, folder: Path) -> dict[str, Any]:
    """The small committed record of a finished run: accuracies per epoch and the multipliers."""
    full = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    out = {k: full.get(k) for k in ("method", "lr", "seed", "epochs", "steps", "test_accuracy",
                                    "best_test_accuracy", "train_runtime_s", "timm_model",
                                    "train_samples", "test_samples")}
    out["history"] = full["history"]
    out["run_settings"] = {k: v for k, v in full.items()
                           if k not in ("history", "tempbalance", "output_dir")}
    tb = full.get("tempbalance")
    if tb:
        rows = tb["history"]
        steps = int(full["steps"])
        updates: dict[int, list[float]] = {}
        for row in rows:
            updates.setdefault(int(row["step"]), []).append(float(row["multiplier"]))
        last = max(updates) if updates else None
        out["tempbalance"] = {
            "config": tb["config"], "layers": tb["layers"], "updates": tb["updates"],
            "mean_multiplier": mean_multiplier(rows, steps, cosine_lr(steps)),
            "by_update": [{"step": s, "mean": sum(m) / len(m), "min": min(m), "max": max(m)}
                          for s, m in sorted(updates.items())],
            "last_update": {row["layer"]: {"alpha": row["value"], "multiplier": row["multiplier"]}
                            for row in rows if int(row["step"]) == last},
        }
    return out


def in_progress(runs: list[Run], args: StudyArguments, finished: set[str]) -> list[dict[str, Any]]:
    """Unfinished runs with a checkpoint: their test accuracy per epoch so far (from the
    checkpoint's ``trainer_state.json``). Not results: mid-way through a cosine schedule."""
    out = []
    for run, step, state in checkpoint_snapshots(runs, args.checkpoint_dir, finished,
                                                 _trainer_state):
        curve = [(round(float(e["epoch"])), 100 * float(e["eval_accuracy"]))
                 for e in state["log_history"] if "eval_accuracy" in e]
        out.append({"key": run.key, "method": run.settings["method"], "lr": run.settings["lr"],
                    "seed": run.settings["seed"], "step": step, "done": len(curve), "curve": curve,
                    "pair": f"LR {run.settings['lr']:g} seed {run.settings['seed']}"})
    return out


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ report
def _by_seed(results, method, lr) -> dict[int, float]:
    return {int(r["seed"]): 100.0 * float(r["test_accuracy"]) for r in results
            if r["method"] == method and float(r["lr"]) == float(lr)}


def write_report(results: list[dict[str, Any]], args: StudyArguments, planned: int,
                 running: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``report.md``, ``summary.json`` and ``curves.png`` in ``args.results_dir``; ``running``
    (from :func:`in_progress`) adds a snapshot of the unfinished runs."""
    base, other = args.methods[0], args.methods[-1]
    n = len(results)
    lines, summary = start_report(f"Fashion-MNIST, ResNet18 (width {args.width:g}), {args.epochs} "
                                  f"epochs: {base} vs {other}", n, planned, args)
    summary |= {"paired": {}, "multiplier": {}}
    if running:
        lines += running_section(
            running, bases=[base], other=other, progress="epochs done",
            value="test accuracy (%) by epoch", unit="pp", point=lambda epoch: f"e{epoch}",
            intro=f"Test accuracy after the last checkpointed epoch of each unfinished run, of "
                  f"{args.epochs}. Mid-way through a cosine schedule this says little about the end.")
        summary["in_progress"] = running
    if not results:
        lines.append("No run has finished yet: not yet measured.")
        return save_report(args, lines, summary)
    cells = aggregate(results)
    summary["cells"] = [{"method": c.method, "lr": c.lr, "mean": c.mean, "std": c.std,
                         "seeds": list(c.seeds), "values": list(c.values)} for c in cells]
    lines += ["## Final test accuracy (%), mean ± std over seeds (best LR per method in bold)", "",
              format_table(cells), ""]
    # Paired differences, other - base, same seed.
    lines += [f"## Paired differences {other} - {base} (percentage points, same seed)", "",
              "| LR | per seed | n | mean ± std | 95% t-interval |", "|---|---|---|---|---|"]
    for lr in args.lrs:
        pair = paired_differences(_by_seed(results, base, lr), _by_seed(results, other, lr))
        summary["paired"][f"lr={lr:g}"] = pair
        lines.append(pair_row(f"{lr:g}", pair))
    best = best_lrs(cells)
    headline = None
    if base in best and other in best:
        headline = paired_differences(_by_seed(results, base, best[base].lr),
                                      _by_seed(results, other, best[other].lr))
        summary["paired"]["best_vs_best"] = headline | {"lrs": [best[base].lr, best[other].lr]}
        lines.append(pair_row(f"each at its best LR ({base} {best[base].lr:g}, {other} "
                               f"{best[other].lr:g})", headline))
    lines += ["", "The best LR is picked on the test accuracy itself (as the paper's tables do), "
              "which favours whichever method's grid happens to be noisier upwards; the per-LR rows "
              "are free of that selection.", ""]
    # Mean multiplier.
    tb_runs = [r for r in results if r.get("tempbalance")]
    if tb_runs:
        lines += ["## Mean TempBalance multiplier over training (balanced layers)", "",
                  *multiplier_table(tb_runs, args.lrs, summary)]
        lines += ["", "Eq. 2 maps the layers' alphas linearly onto [s1, s2] = [0.5, 1.5]; a mean "
                  "below 1 means TempBalance trains the balanced layers with a lower average LR "
                  "than the baseline (layers outside the plan: first conv, classifier, shortcut "
                  "BNs, stay at 1).", ""]
    # Curves.
    _plot_curves(results, args, Path(args.results_dir) / "curves.png")
    lines += ["## Test accuracy over epochs", "", "![curves](curves.png)", ""]
    lines += ["## Verdict", ""]
    for lr in args.lrs:
        lines.append("- " + verdict(summary["paired"][f"lr={lr:g}"], what=f"LR {lr:g}", unit="pp",
                                    higher_is_better=True, finished=n, planned=planned))
    if headline is not None:
        lines.append("- " + verdict(headline, what="each method at its best LR", unit="pp",
                                    higher_is_better=True, finished=n, planned=planned))
    runtime = [r["train_runtime_s"] for r in results if r.get("train_runtime_s")]
    if runtime:
        where = (f"{args.threads} thread(s), {args.workers} runs in parallel" if args.device == "cpu"
                 else f"{args.device}, {args.loader_workers} loader processes, {args.workers} runs "
                      f"in parallel")
        lines += ["", f"Measured training time per run ({where}, last sitting of each run): "
                  f"median {format_duration(sorted(runtime)[len(runtime) // 2])}."]
    return save_report(args, lines, summary)


def _plot_curves(results: list[dict[str, Any]], args: StudyArguments, path: Path) -> None:
    from matplotlib.figure import Figure

    lrs = [lr for lr in args.lrs if any(float(r["lr"]) == float(lr) for r in results)]
    fig = Figure(figsize=(4.2 * len(lrs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    for ax, lr in zip(axes, lrs):
        for i, method in enumerate(args.methods):
            curves = [[(row["epoch"], 100 * row["test_accuracy"]) for row in r["history"]
                       if "test_accuracy" in row] for r in results
                      if r["method"] == method and float(r["lr"]) == float(lr)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            epochs = [c[0] for c in curves[0][:length]]
            values = [[c[j][1] for c in curves] for j in range(length)]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(epochs, mean, color=f"C{i}", label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                            color=f"C{i}", alpha=0.2, linewidth=0)
        ax.set_title(f"LR {lr:g} (band: min-max over seeds)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        top = max(100 * row["test_accuracy"] for r in results for row in r["history"]
                  if "test_accuracy" in row)
        ax.set_ylim(max(0.0, top - 8), min(100.0, top + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv)

    def report(results: list[dict[str, Any]], runs: list[Run]) -> dict[str, Any]:
        return write_report(results, args, len(runs),
                            in_progress(runs, args, {r["key"] for r in results}))

    return run_study(args, build_runs=build_runs, collect=collect, report=report,
                     prepare=lambda committed: prepare_data(args.data_dir))


def prepare_data(data_dir: str) -> None:
    """Obtain Fashion-MNIST and its Arrow cache once, before the workers start (each would
    otherwise convert the 70,000 images itself)."""
    from image_data.fashion_mnist import load_fashion_mnist

    print(f"preparing Fashion-MNIST in {data_dir} ...", flush=True)
    load_fashion_mnist(data_dir)


if __name__ == "__main__":
    run_main(main)
