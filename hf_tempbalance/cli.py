"""The ``hf-tempbalance`` console script: ``analyze`` a model, ``plot`` training runs.

::

    hf-tempbalance analyze gpt2 --csv layers.csv --plots esd/
    hf-tempbalance analyze ckpt.safetensors --arch timm:resnet18
    hf-tempbalance analyze runs/tb --xmin ks --json -       # a Trainer run: its model or latest checkpoint
    hf-tempbalance analyze ./lora-adapter --base ./base     # a PEFT adapter: W0 + ΔW and ΔW alone
    hf-tempbalance plot runs/tb runs/baseline --out figures/
    hf-tempbalance --version

Exit status: 0 on success, 2 for a bad argument, path, model name, a model that is not in the
local cache while offline, or a malformed input file (with one line on stderr that names the
problem and what to run or change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import LoadedAdapter, is_adapter_dir, load_adapter
from .analysis import (
    CALIBRATED_XMIN,
    ModelAnalysis,
    analyze_lora_deltas,
    analyze_model,
    analyze_state_dict,
    bare_weights,
    read_analysis_csv,
)
from .config import LAYER_TYPES, ConfigError, TempBalanceConfig
from .history import HISTORY_FILE, read_history
from .loading import (
    LoadedModel,
    ModelLoadError,
    choose_model_dir,
    find_saved_model,
    resolve_model,
)
from .spectral.hill import XMIN_METHODS
from .streaming import analyze_checkpoint, is_streamable, return_large_frees

__all__ = ["main", "build_parser", "run_analyze", "run_plot", "CliError"]


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-tempbalance",
        description="TempBalance diagnostics: HT-SR metrics of a model, plots of a training run.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    an = sub.add_parser(
        "analyze", help="per-layer alpha, spectral norm, stable rank of a model",
        description="Print one row of spectral metrics per weight matrix of MODEL and a summary. "
                    "With the default --xmin median, alpha ranks the layers against each other "
                    "(the ranking TempBalance sets LRs from) and no verdict is given: random "
                    "weights mostly score 2-4 with it too. --xmin ks fits the tail as weightwatcher does "
                    "and adds its verdicts (alpha < 2 over-trained, > 6 under-trained). A banner "
                    "says when the weights are a random initialisation.",
        epilog="Offline (HF_HUB_OFFLINE=1), a Hub id or pretrained timm weights that are not in "
               "the local cache stop with exit status 2 and the command that downloads them.")
    an.add_argument("model", metavar="MODEL",
                    help="a local Transformers or timm model directory; a training output "
                         "directory (its saved model, else its latest checkpoint-N); a "
                         ".safetensors/.pt state dict (with --arch); a timm model name "
                         "(resnet18 or timm:NAME; random init without --pretrained); a "
                         "Hugging Face Hub id (gpt2 or hf:ID; downloaded unless cached); or a "
                         "PEFT LoRA adapter folder (adapter_config.json + "
                         "adapter_model.safetensors), reported as its effective weights W0 + ΔW "
                         "and as ΔW alone")
    _add_loading_args(an)
    an.add_argument("--base", metavar="NAME_OR_PATH",
                    help="for a PEFT adapter folder: its base model (a local model directory or "
                         "Hub id; default: the adapter_config.json's base_model_name_or_path, "
                         "when it loads here)")
    an.add_argument("--checkpoint", metavar="N",
                    help="for a training output directory: read its checkpoint-N (N, "
                         "checkpoint-N or latest) instead of the saved model")
    an.add_argument("--pretrained", action="store_true",
                    help="for a timm model name: download its pretrained weights (default: random init)")
    an.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub model")
    an.add_argument("--csv", metavar="PATH", help="write the table as CSV (- for stdout)")
    an.add_argument("--json", metavar="PATH",
                    help="write the report as JSON (- for stdout): model, random_weights, "
                         "summary, layers")
    an.add_argument("--plots", metavar="DIR", help="write one ESD plot (PNG) per layer into DIR")
    an.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="eigensolver precision (default float32, as in training)")
    an.add_argument("--xmin", choices=XMIN_METHODS, default="median",
                    help="start of the power-law tail: median (default, the paper's; a relative "
                         "ranking), ks (KS fit as in weightwatcher; absolute, with verdicts), "
                         "fix_finger")
    an.add_argument("--layer-types", nargs="+", choices=LAYER_TYPES, default=["linear", "conv"],
                    help="module kinds to analyse (default: linear conv)")
    an.add_argument("--include", action="append", default=[], metavar="REGEX",
                    help="only layers whose name matches (repeatable)")
    an.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="skip layers whose name matches (repeatable)")
    an.add_argument("--balanced-only", action="store_true",
                    help="only the layers TempBalance would balance (default: all layers)")
    an.add_argument("--top", type=int, default=3, help="extremes named in the summary (default 3)")
    an.add_argument("--no-progress", action="store_true", help="no progress bar")
    an.add_argument("--layers", metavar="REGEX",
                    help="analyse only the layers whose name matches REGEX (re.search), e.g. "
                         "'layers\\.(0|31)\\.' or 'mlp'; unlike --include it does not change "
                         "which layers count as balanced")
    an.add_argument("--no-stream", action="store_true",
                    help="load the whole model even for a sharded safetensors checkpoint "
                         "(default: such a checkpoint is streamed, one tensor group at a time)")
    an.set_defaults(func=run_analyze)

    pl = sub.add_parser(
        "plot", help="LR/alpha heatmaps and curves of runs; alpha distributions of runs side by side",
        description=f"Read {HISTORY_FILE} from each run directory and draw the per-layer LR and "
                    "alpha heatmaps (paper Fig. 13) and curves (Fig. 14). With two or more runs "
                    "(e.g. TempBalance and a baseline), also their final alpha distributions "
                    "side by side (Fig. 11): from each run's saved model when there is one (its "
                    "directory or latest checkpoint-N), else from the last TempBalance update in "
                    "its history. A run without history counts as a baseline.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output directories")
    pl.add_argument("--out", metavar="DIR",
                    help="where the PNGs go (default: RUN_DIR/tempbalance_plots of the first run)")
    pl.add_argument("--layers", nargs="+", metavar="NAME",
                    help="layers whose curves to draw (default: four spread over depth)")
    pl.add_argument("--baseline-alphas", metavar="CSV", action="append", default=[],
                    help="a CSV from `hf-tempbalance analyze --csv` to add as a distribution "
                         "(repeatable), e.g. for a baseline whose model is not in a run dir")
    _add_loading_args(pl)
    pl.set_defaults(func=run_plot)
    return parser


def _add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", metavar="ARCH",
                        help="architecture of a bare state dict: timm:NAME, hf:ID, a Transformers "
                             "config directory, or `tensors` (the weight tensors as they are)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a Hub model to run code from its repository (off by default)")
    parser.add_argument("--device", default="auto",
                        help="where the spectra are computed: auto (CUDA if available), cpu, cuda:0 ...")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-tempbalance``; returns the exit status."""
    if argv is None:  # the command itself, in its own process (not a call from Python)
        return_large_frees()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # `... --csv - | head`: the reader left; not an error of ours
        _silence_stdout()
        return 0
    except (CliError, ModelLoadError, OSError) as err:
        # OSError: an unreadable or unwritable path (missing, a directory, no permission).
        print(f"hf-tempbalance {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "hf_tempbalance[" not in str(err):  # not a missing extra: a real bug, show it
            raise
        print(f"hf-tempbalance {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured)
        pass


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------- analyze
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device {name!r} is not a device (try cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name} asked for CUDA, but no GPU is available; use --device cpu")
    return device


def _analyze_loaded(model, config: TempBalanceConfig, device: torch.device, *, layers: str = "all",
                    keep_esds: bool = False, progress: bool | None = None,
                    select: str | None = None) -> ModelAnalysis:
    if isinstance(model, dict):
        return analyze_state_dict({k: v.to(device) for k, v in model.items()}, config,
                                  keep_esds=keep_esds, progress=progress, select=select)
    return analyze_model(model.to(device), config, layers=layers, keep_esds=keep_esds,
                         progress=progress, select=select)


def _streamable_dir(args: argparse.Namespace) -> tuple[Path, str | None] | None:
    """The directory ``analyze`` would load, with the loader's note, when it is a checkpoint
    that can be streamed (a model directory, the picked ``--checkpoint`` or a run's latest
    one), else None."""
    path = Path(os.path.expanduser(args.model))
    if not path.is_dir():
        return None
    try:
        chosen, note = choose_model_dir(path, args.checkpoint)
    except ModelLoadError:
        return None  # the loader says what is wrong
    return (chosen, note) if is_streamable(chosen) else None


RANDOM_BANNER = ("RANDOM WEIGHTS: {source} is timm's random initialisation (seed 0; no "
                 "--pretrained), not a trained model: these numbers describe an untrained network.")


def run_analyze(args: argparse.Namespace) -> ModelAnalysis:
    """``analyze``: load, compute, print, and write the CSV, JSON and plots asked for.

    The human-readable report goes to stdout, unless ``--csv -`` or ``--json -`` puts data
    there; then notes (and the random-weights banner) go to stderr.
    """
    if args.top < 0:
        raise CliError("--top must be >= 0")
    to_stdout = [flag for flag in ("csv", "json") if getattr(args, flag) == "-"]
    if len(to_stdout) > 1:
        raise CliError("--csv - and --json - both ask for stdout; write one of them to a file")
    device = _device(args.device)
    try:
        config = TempBalanceConfig(dtype=args.dtype, xmin=args.xmin,
                                   layer_types=tuple(args.layer_types),
                                   include=tuple(args.include), exclude=tuple(args.exclude))
    except ConfigError as err:  # the flag that holds the value, not the config field
        flag = "--" + err.field.replace("_", "-")  # --include, --layer-types, --xmin, --dtype
        value = (" ".join(map(repr, err.value)) if isinstance(err.value, tuple) else repr(err.value))
        raise CliError(f"{flag} {value}: {err.why}") from err
    if args.layers is not None:
        try:
            re.compile(args.layers)
        except re.error as err:
            raise CliError(f"--layers {args.layers!r} is not a regular expression ({err})") from err
    progress = False if args.no_progress else None
    layers = "balanced" if args.balanced_only else "all"
    adapter = is_adapter_dir(args.model)
    if args.base is not None and not adapter:
        raise CliError(f"--base is for a PEFT adapter folder (one with adapter_config.json), and "
                       f"{args.model} is not one")
    streamable = None if args.no_stream or adapter else _streamable_dir(args)
    delta = None
    if adapter:
        read = load_adapter(args.model, args.base, trust_remote_code=args.trust_remote_code,
                            revision=args.revision)
        loaded = LoadedModel(read.model, read.source, note=read.note)
        try:
            report = _analyze_loaded(read.model, config, device, layers=layers,
                                     keep_esds=bool(args.plots), progress=progress,
                                     select=args.layers)
            delta = analyze_lora_deltas(read.model, config, layers=layers,
                                        keep_esds=bool(args.plots), select=args.layers)
        except ValueError as err:  # discovery refuses the model, e.g. a quantized (QLoRA) base
            raise CliError(str(err)) from err
        for row in report.layers:
            if row.type == "LoraAdapted":
                row.view = "effective"
    elif streamable is not None:
        # A save_pretrained checkpoint: streamed, never loaded whole.
        stream_dir, note = streamable
        loaded = LoadedModel(None, str(stream_dir), note=note)
        report = analyze_checkpoint(stream_dir, config, layers=layers, select=args.layers,
                                    keep_esds=bool(args.plots), progress=progress,
                                    trust_remote_code=args.trust_remote_code, device=device)
    else:
        loaded = resolve_model(args.model, arch=args.arch, pretrained=args.pretrained,
                               trust_remote_code=args.trust_remote_code, revision=args.revision,
                               checkpoint=args.checkpoint)
        report = _analyze_loaded(loaded.model, config, device, layers=layers,
                                 keep_esds=bool(args.plots), progress=progress, select=args.layers)
    notes = []
    if loaded.random_init:
        notes.append(RANDOM_BANNER.format(source=loaded.source))
    if loaded.note:
        notes.append(loaded.note)
    if not report.layers:
        if args.arch == "tensors" and isinstance(loaded.model, dict):
            state = loaded.model
            readable = len(bare_weights(state))
            held = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:6])
            why = (f"the filters (--include/--exclude/--layers) keep none of its {readable}"
                   if readable else f"it has none (it holds {held}{', ...' if len(state) > 6 else ''})")
            raise CliError(f"{args.model}: --arch tensors reads the floating-point tensors of 2 or "
                           f"more dimensions whose key ends in 'weight', and {why}")
        raise CliError(f"{args.model} has no layer of kinds {args.layer_types} matching the "
                       "filters; check --layer-types/--include/--exclude/--layers")
    human = sys.stderr if to_stdout else sys.stdout
    if loaded.random_init:
        banner = "!" * 78
        print("\n".join([banner, notes[0], banner]), file=human)
    for note in notes[1 if loaded.random_init else 0:]:
        print(f"note: {note}", file=human)
    if delta is not None:
        print(f"adapter {read.source} on base model {read.base}: "
              + ", ".join(f"{k}={v}" for k, v in read.settings.items()), file=human)
    if not to_stdout:
        if delta is not None:
            print(f"\n{EFFECTIVE_TITLE}:\n")
        print(report.format_table())
        if any(re.fullmatch(r"Conv(Transpose)?[123]d", layer.type) for layer in report.layers):
            # training's spectral_norm / alpha_weighted see √conv_norm·W (the authors' scaling)
            print(f"(spec_norm, alpha_w: of each weight as stored; as TempBalance metrics, conv "
                  f"layers use √conv_norm·W, λ_max × {config.conv_norm:g})")
        print()
        print(report.summary(top=args.top).format())
        if delta is not None:
            print(f"\n{DELTA_TITLE}:\n")
            print(delta.format_table())
            print()
            print(delta.summary(top=args.top).format())
    if args.csv:
        (report if delta is None else ModelAnalysis(report.layers + delta.layers, config)
         ).to_csv(args.csv)
        if args.csv != "-":
            print(f"\ntable written to {args.csv}", file=human)
    if args.json:
        data = report_json(report, loaded, args.model, top=args.top)
        if delta is not None:
            data = adapter_json(data, read, delta, top=args.top)
        _write_json(data, args.json)
        if args.json != "-":
            print(f"report written to {args.json}", file=human)
    if args.plots:
        written = write_esd_plots(report, args.plots, progress=not args.no_progress)
        if delta is not None:
            written += write_esd_plots(delta, args.plots, progress=not args.no_progress,
                                       suffix=".delta")
        removed = replace_earlier_plots(args.plots, "analyze", written)
        print(f"{len(written)} ESD plot(s) written to {args.plots}"
              + (f" ({len(removed)} of an earlier analyze there removed)" if removed else ""),
              file=human)
    return report


# How the two views of a LoRA adapter are labelled, in the text report and the JSON.
EFFECTIVE_TITLE = ("EFFECTIVE WEIGHT W0 + ΔW per adapted module (ΔW = s·B·A; the spectrum "
                   "TempBalance balances by)")
DELTA_TITLE = ("ΔW = s·B·A ALONE per adapted module (the adapter view weightwatcher offers; its "
               "rank is at most r, so only its non-zero eigenvalues are fitted; TempBalance does "
               "not rank by it)")


def adapter_json(data: dict, read: LoadedAdapter, delta: ModelAnalysis, *, top: int = 3) -> dict:
    """``report_json`` of an adapter's effective view, plus the adapter and its ΔW view: the
    top-level ``layers`` / ``summary`` are the effective weights (``view`` ``"effective"``),
    ``delta`` holds the same fields for ΔW alone."""
    return {**data, "view": EFFECTIVE_TITLE,
            "adapter": {"path": read.source, "base": read.base, **read.settings},
            "delta": {"view": DELTA_TITLE, **delta.to_dict(top=top)}}


def report_json(report: ModelAnalysis, loaded: LoadedModel, model: str, *, top: int = 3) -> dict:
    """The JSON ``analyze --json`` writes: what was read, how alpha reads, summary and layers."""
    return {
        "hf_tempbalance": __version__,
        "model": model,
        "source": loaded.source,
        "random_weights": loaded.random_init,
        "note": loaded.note,
        "alpha_reading": ("absolute: HT-SR verdicts on weightwatcher's scale"
                          if report.config.xmin in CALIBRATED_XMIN else
                          "relative: a ranking of the layers (TempBalance's LR order), no verdict"),
        **report.to_dict(top=top),
    }


def _write_json(data: dict, path: str) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def esd_plot_name(layer_name: str, suffix: str = "") -> str:
    """File name of a layer's ESD plot: the layer name with anything odd replaced by ``_``
    (``suffix`` before ``.png``, e.g. ``.delta`` for an adapter's ΔW view)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer_name) + suffix + ".png"


def write_esd_plots(report: ModelAnalysis, out_dir: str | os.PathLike, *,
                    progress: bool = True, suffix: str = "") -> list[str]:
    """One Figure-1 ESD plot per layer with at least two non-zero eigenvalues; returns the file
    names written."""
    from .plotting import plot_esd

    os.makedirs(out_dir, exist_ok=True)
    cfg = report.config
    written = []
    for layer in tqdm(report.layers, desc="ESD plots", unit="plot",
                      disable=not progress or len(report.layers) < 24):
        try:
            plot = plot_esd(layer, xmin_method=cfg.xmin, rtol=cfg.eig_rtol,
                            include_xmin=cfg.include_xmin)
        except ValueError as err:  # fewer than 2 non-zero eigenvalues: nothing to draw
            print(f"skipped {layer.name}: {err}", file=sys.stderr)
            continue
        written.append(esd_plot_name(layer.name, suffix))
        plot.save(os.path.join(out_dir, written[-1]))
    return written


#: In a plots folder: the PNGs each command last drew there (see :func:`replace_earlier_plots`).
PLOTS_RECORD = ".hf_tempbalance_plots.json"


def replace_earlier_plots(out_dir: str | os.PathLike, command: str, written: Sequence[str]) -> list[str]:
    """Record ``written`` as what ``command`` drew in ``out_dir`` and remove the PNGs its earlier
    run there drew and this one did not: the ESD plots of another model's layers (or the curves
    of other runs) would sit beside the new ones, indistinguishable from them. Files this command
    did not write are never touched. Returns the names removed."""
    record_path = Path(out_dir) / PLOTS_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: nothing is known to be ours
        record = {}
    if not isinstance(record, dict):
        record = {}
    removed = []
    for name in sorted(set(map(str, record.get(command, []))) - set(written)):
        path = Path(out_dir) / name
        # only a PNG directly in the folder, whatever a hand-edited record says
        if path.suffix == ".png" and path.parent == Path(out_dir) and path.is_file():
            path.unlink()
            removed.append(name)
    _write_json({**record, command: list(written)}, str(record_path))
    return removed


# ---------------------------------------------------------------------------- plot
def _labels(runs: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for run in runs:
        labels.append(_unique(Path(run).resolve().name or "run", labels))
    return labels


def _unique(base: str, taken: Iterable[str]) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first label not in ``taken``."""
    taken = set(taken)
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    return label


def _alphas_from_rows(rows: Sequence[dict], names: Sequence[str] | None) -> list[float]:
    """Alphas of the rows named in ``names`` (when they overlap), else of the balanced rows.
    Of an adapter's CSV only the effective view counts (the one TempBalance balances by)."""
    rows = [r for r in rows if r.get("view") != "delta"]
    if names:
        chosen = [r for r in rows if r["name"] in set(names)]
        if chosen:
            return [r["alpha"] for r in chosen]
    balanced = [r for r in rows if r.get("balanced")]
    return [r["alpha"] for r in (balanced or rows)]


def run_plot(args: argparse.Namespace) -> dict[str, object]:
    """``plot``: returns ``{file name: Plot}`` of everything written."""
    from .plotting import (
        history_grid,
        plot_alpha_distributions,
        plot_heatmaps,
        plot_layer_curves,
    )

    for run in args.runs:
        if not os.path.isdir(run):
            raise CliError(f"no such run directory: {run}")
    out = args.out or os.path.join(args.runs[0], "tempbalance_plots")
    labels = _labels(args.runs)
    grids, empty = {}, []
    for run, label in zip(args.runs, labels):
        if os.path.exists(os.path.join(run, HISTORY_FILE)):
            try:
                # Strict: a plot of a damaged file would silently leave rows out.
                rows = read_history(run, strict=True)
                # An empty history (balance_lr=False: the SNR-alone baseline) is a baseline run.
                if rows:
                    grids[label] = history_grid(rows)
                else:
                    empty.append(run)
            except (ValueError, OSError) as err:
                raise CliError(f"cannot read the history of {run}: {err}") from err
    if not grids and len(args.runs) + len(args.baseline_alphas) < 2:
        what = f"an empty {HISTORY_FILE}" if empty else f"no {HISTORY_FILE}"
        raise CliError(f"{args.runs[0]} has {what}: it was not trained with TempBalance (or not "
                       "yet updated). Give a TempBalance run, or two runs to compare their alpha "
                       "distributions.")

    plots: dict[str, object] = {}
    for label, grid in grids.items():
        try:
            plots[f"{label}_heatmaps.png"] = plot_heatmaps(grid, title=label)
            plots[f"{label}_layer_curves.png"] = plot_layer_curves(grid, args.layers, title=label)
        except ValueError as err:
            raise CliError(f"{label}: {err}") from err

    distributions: dict[str, list[float]] = {}
    if len(args.runs) + len(args.baseline_alphas) >= 2:
        names = next(iter(grids.values())).layers if grids else None
        device = _device(args.device)
        for run, label in zip(args.runs, labels):
            distributions[label] = _run_alphas(run, label, grids.get(label), names, args, device,
                                               empty_history=run in empty)
        for csv_path in args.baseline_alphas:
            try:
                rows = read_analysis_csv(csv_path)
            except (OSError, ValueError) as err:
                raise CliError(f"cannot read --baseline-alphas {csv_path}: {err}") from err
            # two CSVs of one name (or a run's) must not replace each other's distribution
            distributions[_unique(Path(csv_path).stem, distributions)] = _alphas_from_rows(rows, names)
        try:
            plots["alpha_distributions.png"] = plot_alpha_distributions(
                distributions, title="final per-layer alpha")
        except ValueError as err:
            raise CliError(str(err)) from err

    for name, plot in plots.items():
        try:
            plot.save(os.path.join(out, name))
        except OSError as err:  # e.g. a file where the folder should be
            raise CliError(f"cannot write the plots into {'--out ' if args.out else ''}{out}: "
                           f"{err.strerror or err}") from err
        print(f"wrote {plot.path}")
    for name in replace_earlier_plots(out, "plot", list(plots)):
        print(f"removed {os.path.join(out, name)} (an earlier plot of other runs)")
    return plots


def _run_alphas(run: str, label: str, grid, names: Sequence[str] | None,
                args: argparse.Namespace, device: torch.device, *,
                empty_history: bool = False) -> list[float]:
    """Final alphas of a run: its saved model if any, else its last TempBalance update."""
    saved = find_saved_model(run)
    if saved is not None:
        model = resolve_model(saved, arch=args.arch,
                              trust_remote_code=args.trust_remote_code).model
        report = _analyze_loaded(model, TempBalanceConfig(), device)
        return _alphas_from_rows(report.to_rows(), names)
    if grid is not None:
        if grid.metric != "alpha_hill":
            raise CliError(f"{run}: its history holds {grid.metric}, not alpha, and no saved model "
                           "was found to compute alphas from")
        last = grid.value[:, -1]
        return [float(v) for v in last if math.isfinite(v)]
    history = f"an empty {HISTORY_FILE}" if empty_history else f"no {HISTORY_FILE}"
    raise CliError(
        f"{run} has {history} and no saved model (config.json, model.safetensors or a "
        "checkpoint-N directory), so its alphas are unknown. Save the final model there, or "
        "run `hf-tempbalance analyze MODEL --csv alphas.csv` and pass --baseline-alphas alphas.csv.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
