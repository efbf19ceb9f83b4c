"""What the long studies share: a resumable grid of runs in parallel workers, and paired statistics.

A *run* is one training command (``recipes/image_classification.py`` or ``recipes/ptb_lm.py``)
identified by its *settings* (a small dict: method, LR, seed, epochs, ...). The grid:

* reuses a finished run when the committed JSON in the results dir holds the same settings, and
  refuses a results dir of another study rather than replace its runs or rewrite its report;
* keeps checkpoints outside the repository, in ``CHECKPOINT_DIR/<key>-<hash of the settings>``,
  so a killed run is found again by its settings and resumes from its last ``checkpoint-N``;
* runs ``workers`` commands at once, each under ``nice`` with ``threads`` torch/OpenMP threads,
  its output in ``worker.log`` in its checkpoint folder;
* prints the progress and an estimate of the remaining time every ``eta_every`` seconds (from the
  rate measured in this sitting; progress is read from the last checkpoint of each run).

:func:`run_study` is a study's whole command (the results-folder check, what the runs need when
one is left to train, the grid or ``--report_only``, and the report).

Statistics: :func:`paired_differences` (per-seed ``b - a`` with a 95% t-interval) and
:func:`mean_multiplier` (the average TempBalance LR multiplier over training, from its history).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# recipes/ is on sys.path, as for every study
from run_records import read_record, setting_differences, write_whole
from usage import UsageError

__all__ = ["CACHE", "GridArguments", "Run", "recorded_settings", "settings_hash", "last_checkpoint",
           "checkpoint_snapshots", "load_finished", "check_results_dir", "check_same_inputs",
           "run_grid", "run_study",
           "ensure_corpus", "curve_gaps", "start_report", "save_report", "paired_differences", "t_quantile_975",
           "mean_multiplier", "multiplier_table", "cosine_lr", "format_duration", "verdict",
           "pair_row"]

RESULTS_FILE = "results.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

#: Where the studies keep data and checkpoints (outside the repository).
CACHE = Path(os.environ.get("HF_TEMPBALANCE_CACHE", Path.home() / ".cache" / "hf_tempbalance"))


@dataclass
class GridArguments:
    """How a study's grid runs: the command-line fields every study shares (its own
    ``StudyArguments`` adds what it trains)."""

    workers: int = field(default=2, metadata={"help": "runs trained at the same time"})
    threads: int = field(default=1, metadata={
        "help": "torch threads per run (and per preparation step, e.g. pre-training)"})
    nice: int = field(default=10, metadata={"help": "niceness of the runs (0: none)"})
    eta_every: float = field(default=300.0, metadata={"help": "seconds between progress lines"})
    report_only: bool = field(default=False, metadata={
        "help": "rewrite the report from the committed results, train nothing"})
    # each study redeclares these two with its own folders as defaults
    results_dir: str = field(default="", metadata={"help": "committed results"})
    checkpoint_dir: str = field(default="", metadata={
        "help": "checkpoints and logs of the runs (outside the repository)"})

    def study_record(self) -> dict[str, Any]:
        """The arguments as a study's ``summary.json`` keeps them: without this machine's paths
        and this sitting's mode (``report_only``, ``eta_every``), so that rewriting a report does
        not change what it says the study was."""
        local = {"results_dir", "checkpoint_dir", "data_dir", "report_only", "eta_every"}
        return {k: v for k, v in asdict(self).items() if k not in local}


def recorded_settings(settings: dict[str, Any], implicit: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as a run records them, for reuse and for its checkpoint folder's hash.

    ``implicit`` holds the settings added after runs were committed, each with the value those
    runs were made with: such a setting is left out while it has that value, so the committed
    runs (and half-trained checkpoints) stay found; any other value is recorded and makes new runs.
    """
    return {k: v for k, v in settings.items() if k not in implicit or v != implicit[k]}


def settings_hash(settings: dict[str, Any]) -> str:
    """8 hex digits of the settings' canonical JSON: the checkpoint folder's suffix."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class Run:
    """One training command of a study.

    Attributes:
        key: a readable name (``tb_lr0.1_seed43``): the committed JSON is ``results_dir/key.json``.
        settings: what decides the result besides chance; a finished run is reused only if equal.
        command: the command line without output folder and resume flags.
        total_steps: optimizer steps of the whole run (for the progress and the estimate).
        output_flag, resume_flag: the command's flags for its output folder and checkpoint.
        fresh_flags: added when the run starts without a checkpoint: its folder is its own (by
            the settings' hash), and what a run killed before its first checkpoint left there is
            to be replaced (``recipes/ptb_lm.py`` refuses such a folder otherwise).
    """

    key: str
    settings: dict[str, Any]
    command: list[str]
    total_steps: int
    output_flag: str = "--output_dir"
    resume_flag: str = "--resume_from_checkpoint"
    fresh_flags: tuple[str, ...] = ()

    def checkpoint_dir(self, root: str | os.PathLike) -> Path:
        return Path(root) / f"{self.key}-{settings_hash(self.settings)}"

    def result_path(self, results_dir: str | os.PathLike) -> Path:
        return Path(results_dir) / "runs" / f"{self.key}.json"


def last_checkpoint(folder: str | os.PathLike) -> tuple[Path | None, int]:
    """``(path, step)`` of the newest complete ``checkpoint-N`` in ``folder`` (``(None, 0)``).

    A checkpoint counts once its folder holds the file its writer saves last: the Trainer's
    ``trainer_state.json``; ``ptb_lm.py`` saves into ``checkpoint-N.partial`` and renames it when
    complete (Accelerate writes custom states after ``random_states*``), so its ``checkpoint-N``
    is whole; a kill while saving leaves an empty or partial folder, which is skipped.
    """
    best: tuple[Path | None, int] = (None, 0)
    folder = Path(folder)
    if not folder.is_dir():
        return best
    for path in folder.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        try:
            names = {p.name for p in path.iterdir()}
        except FileNotFoundError:  # rotated away by its run (save_total_limit) while we looked
            continue
        complete = "trainer_state.json" in names or any(n.startswith("random_states") for n in names)
        if complete and int(match.group(1)) > best[1]:
            best = (path, int(match.group(1)))
    return best


def checkpoint_snapshots(runs: Iterable[Run], checkpoint_root: str | os.PathLike,
                         finished: set[str], read: Callable[[Path], Any]) -> Iterator[tuple[Run, int, Any]]:
    """``(run, step, read(checkpoint))`` for each run not in ``finished`` with a checkpoint: its
    newest complete one. ``read`` returns None for a checkpoint without what it looks for.

    The grid writes reports while its workers train, so a checkpoint can be rotated away or half
    replaced between finding and reading it: such a run is left out of this snapshot (a snapshot
    is never worth stopping the grid for); the next report sees its next checkpoint.
    """
    for run in runs:
        if run.key in finished:
            continue
        checkpoint, step = last_checkpoint(run.checkpoint_dir(checkpoint_root))
        if checkpoint is None:
            continue
        try:
            state = read(checkpoint)
        except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError):
            continue
        if state is not None:
            yield run, step, state


def load_finished(run: Run, results_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The committed result of ``run``, None when there is none. A file under its key that this
    run would not reuse (made with other settings, or unreadable) raises :class:`UsageError`:
    training would replace it."""
    path = run.result_path(results_dir)
    if not path.is_file():
        return None
    saved = read_record(path, fix=f"remove it to train {run.key} again")
    recorded = saved.get("study_settings")
    wanted = _as_recorded(run.settings)
    recorded = recorded if isinstance(recorded, dict) else {}
    differ = setting_differences(recorded, wanted, keys=sorted(set(recorded) | set(wanted)))
    if differ:
        raise UsageError(f"{path} holds {run.key} made with other settings "
                         f"({'; '.join(differ)}); pass --results_dir for a study with these "
                         f"settings, or remove the file to replace that run")
    return saved


def check_results_dir(runs: Iterable[Run], results_dir: str | os.PathLike,
                      study: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The committed results of ``runs`` (by key; :func:`load_finished`), once ``results_dir`` is
    known to be this study's. Raise :class:`UsageError` when it belongs to another study: its
    ``summary.json`` records other arguments than ``study`` (``GridArguments.study_record()``;
    a list may grow, as more seeds; the grid's pace, ``workers`` and ``nice``, and arguments the
    summary predates are not compared), or it holds a result under the key of one of ``runs``
    that this run would not reuse (made with other settings, or unreadable).

    Training would replace such a result and a report would leave it out and rewrite the
    folder's report as another study's, so a study with other arguments (``--epochs 5``,
    ``--seeds 43``) needs its own ``--results_dir``; replacing results is done by removing them.
    """
    folder = Path(results_dir)
    summary = folder / "summary.json"
    if study is not None and summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("study") or {}
        except (json.JSONDecodeError, AttributeError):
            recorded = {}  # a damaged summary is rewritten from the runs: nothing is lost
        wanted = _as_recorded(study)
        differ = [f"{k} {recorded[k]!r} there, {wanted[k]!r} here" for k in wanted
                  if k in recorded and k not in _PACE and not _extends(wanted[k], recorded[k])]
        if differ:
            raise UsageError(f"{folder} holds the results of a study with other arguments "
                             f"({', '.join(differ)}; a study may add seeds, LRs or methods, not "
                             f"drop them); pass --results_dir for a study with these")
    # before anything is trained or written: load_finished raises
    return {run.key: saved for run in runs if (saved := load_finished(run, folder)) is not None}


#: Arguments that set how fast a grid goes, not what it trains.
_PACE = ("workers", "nice")


def _extends(wanted: Any, recorded: Any) -> bool:
    """``wanted`` is ``recorded`` or, for a list (seeds, LRs, methods), holds all of it: a grid
    that grew keeps every run its report had."""
    if isinstance(wanted, list) and isinstance(recorded, list):
        return {json.dumps(v) for v in recorded} <= {json.dumps(v) for v in wanted}
    return wanted == recorded


def _as_recorded(settings: dict[str, Any]) -> Any:
    """``settings`` as a result file holds them (JSON: tuples become lists, others strings)."""
    return json.loads(json.dumps(settings, default=str))


def check_same_inputs(committed: Iterable[dict[str, Any]], found: dict[str, Any], *, what: str,
                      fix: str,
                      recorded: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r) -> None:
    """Refuse to train beside committed runs that were made from other inputs: a corpus or a
    base model made again (on a machine without the cache) is not always the one they used, and a
    new run would be paired with them all the same. ``found`` holds what the inputs give now
    (counts, a digest, a base model's perplexity); each ``committed`` result's ``recorded(result)``
    must hold the same values (floats to 1e-9 relative) for the keys it has (a record made before
    a key was recorded is held to the others), else :class:`UsageError` names the run, the
    values, and ``fix``."""
    for result in committed:
        had = recorded(result)
        differ = setting_differences(had, found, keys=[key for key in found if key in had])
        if differ:
            raise UsageError(f"{what} is not the one {result['key']} was trained on "
                             f"({'; '.join(differ)}); {fix}")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_grid(runs: Sequence[Run], *, results_dir: str | os.PathLike,
             checkpoint_root: str | os.PathLike,
             collect: Callable[[Run, Path], dict[str, Any]],
             on_update: Callable[[list[dict[str, Any]]], None] | None = None,
             workers: int = 2, threads: int = 1, nice: int = 10, eta_every: float = 60.0,
             poll: float = 2.0) -> list[dict[str, Any]]:
    """Train every run not finished yet, ``workers`` at a time; return all finished results.

    ``collect(run, checkpoint_dir)`` turns a finished run's output folder into the (small) dict that
    is committed as ``results_dir/runs/<key>.json`` (with ``study_settings`` and ``key`` added).
    ``on_update(results)`` is called with every finished result at the start and after each run
    (the study rewrites its tables and plots there). A run whose command fails is reported with the
    end of its log and left out; the others go on.
    """
    results_dir = Path(results_dir)
    finished: dict[str, dict[str, Any]] = {}
    pending: list[Run] = []
    for run in runs:
        saved = load_finished(run, results_dir)
        folder = run.checkpoint_dir(checkpoint_root)
        if saved is None and (folder / RESULTS_FILE).is_file():  # trained, not yet collected
            saved = _store(run, collect(run, folder), results_dir)
        if saved is not None:
            finished[run.key] = saved
        else:
            pending.append(run)
    _say(f"{len(finished)} of {len(runs)} runs finished before (reused), {len(pending)} to train; "
         f"checkpoints in {checkpoint_root}, results in {results_dir}")
    if on_update is not None:
        on_update(_ordered(runs, finished))

    total = {run.key: run.total_steps for run in pending}
    start_steps = {run.key: last_checkpoint(run.checkpoint_dir(checkpoint_root))[1] for run in pending}
    began: dict[str, float] = {}  # this sitting's start and end of each run
    ended: dict[str, float] = {}
    last_eta = time.time()
    active: dict[str, tuple[Run, subprocess.Popen, Any]] = {}
    queue = list(pending)
    failed: list[str] = []
    child_env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                 "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
                 "TOKENIZERS_PARALLELISM": "false"}
    # The recipes import hf_tempbalance: the copy of this repository, not another installed one.
    repo = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(
        [repo] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p and p != repo])
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    previous_handler = _exit_on_sigterm()  # `kill PID` of the grid stops its workers too
    try:
        while queue or active:
            while queue and len(active) < workers:
                run = queue.pop(0)
                folder = run.checkpoint_dir(checkpoint_root)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "study_settings.json").write_text(
                    json.dumps(run.settings, indent=1, sort_keys=True, default=str) + "\n")
                checkpoint, step = last_checkpoint(folder)
                command = prefix + run.command + [run.output_flag, str(folder)]
                command += ([run.resume_flag, str(checkpoint)] if checkpoint is not None
                            else list(run.fresh_flags))
                log = open(folder / "worker.log", "a", encoding="utf-8")  # noqa: SIM115
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
                log.flush()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env=child_env)
                active[run.key] = (run, process, log)
                began[run.key] = time.time()
                _say(f"start {run.key} (pid {process.pid})" +
                     (f", resuming at step {step} of {run.total_steps}" if checkpoint else ""))
            time.sleep(poll)
            for key, (run, process, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[key]
                folder = run.checkpoint_dir(checkpoint_root)
                if process.returncode == 0 and (folder / RESULTS_FILE).is_file():
                    finished[key] = _store(run, collect(run, folder), results_dir)
                    ended[key] = time.time()
                    _say(f"done {key} ({len(finished)} of {len(runs)} finished)")
                    if on_update is not None:
                        on_update(_ordered(runs, finished))
                else:
                    failed.append(key)
                    tail = (folder / "worker.log").read_text(encoding="utf-8", errors="replace")
                    _say(f"FAILED {key} (exit {process.returncode}); end of {folder / 'worker.log'}:\n"
                         + tail[-2000:])
            now = time.time()
            if active and now - last_eta >= eta_every:
                last_eta = now
                _say(_progress(runs, finished, queue, active, total, start_steps, began, ended,
                               checkpoint_root, workers))
    finally:
        for _run, process, log in active.values():  # interrupted: the runs resume next time
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if failed:
        _say(f"{len(failed)} runs failed: {', '.join(failed)}")
    return _ordered(runs, finished)


def _exit_on_sigterm() -> Any:
    """SIGTERM raises SystemExit, so the grid's ``finally`` stops its workers (they resume next
    time); returns the previous handler (None off the main thread, where nothing changes)."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, stop)


def run_study(args: GridArguments, *, build_runs: Callable[[Any], list[Run]],
              collect: Callable[[Run, Path], dict[str, Any]],
              report: Callable[[list[dict[str, Any]], list[Run]], dict[str, Any]],
              prepare: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """A study's command, as ``args`` says; returns what the last ``report`` returned.

    1. ``runs = build_runs(args)``; a results folder of another study is refused before anything
       is made or written (:func:`check_results_dir`).
    2. With ``args.report_only``, only the committed runs are read. Otherwise, when a run is left
       to train, ``prepare(committed)`` makes what the runs need (a corpus, a base model), given
       the committed results to check it against (:func:`check_same_inputs`), and the runs are
       built again, since what it made may shape them (the LoRA study's step counts come from its
       base model); then the grid trains (:func:`run_grid`).
    3. ``report(results, runs)`` writes ``report.md`` and the rest: at the start, after each
       finished run and at the end; the last report is printed.
    """
    runs = build_runs(args)
    finished = check_results_dir(runs, args.results_dir, args.study_record())
    if args.report_only:
        results = [finished[run.key] for run in runs if run.key in finished]
    else:
        if prepare is not None and any(run.key not in finished for run in runs):
            prepare(list(finished.values()))
            runs = build_runs(args)
        results = run_grid(runs, results_dir=args.results_dir, checkpoint_root=args.checkpoint_dir,
                           collect=collect, on_update=lambda done: report(done, runs),
                           workers=args.workers, threads=args.threads, nice=args.nice,
                           eta_every=args.eta_every)
    summary = report(results, runs)
    print((Path(args.results_dir) / "report.md").read_text(encoding="utf-8"))
    return summary


def ensure_corpus(data_dir: str | os.PathLike) -> None:
    """The offline PTB-format Shakespeare corpus in ``data_dir`` (``ptb.{train,valid,test}.txt``),
    made as ``recipes/ptb_lm.py`` makes it (:func:`ptb_lm.build_offline_corpus`) when a file is
    missing."""
    if all((Path(data_dir) / f"ptb.{split}.txt").is_file() for split in ("train", "valid", "test")):
        return
    from ptb_lm import build_offline_corpus  # torch and Accelerate: only when there is work

    print(f"making the offline corpus in {data_dir} ...", flush=True)
    build_offline_corpus(Path(data_dir))


def start_report(title: str, finished: int, planned: int,
                 args: GridArguments) -> tuple[list[str], dict[str, Any]]:
    """Make ``args.results_dir`` (the report's pictures go there first) and return the start of
    every study's report: the markdown lines of its title and status, and the summary that records
    the status and the study's arguments (:func:`check_results_dir` reads them back); the study
    adds to both, then :func:`save_report`."""
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    status = "complete" if finished >= planned else f"PARTIAL: {finished} of {planned} runs finished"
    lines = [f"# {title}", "", f"Status: {status}.", ""]
    summary = {"status": status, "finished": finished, "planned": planned,
               "study": args.study_record()}
    return lines, summary


def save_report(args: GridArguments, lines: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.md`` and ``summary.json`` into ``args.results_dir``; return ``summary``."""
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)  # also for a report not begun by start_report
    write_whole(out / "report.md", "\n".join(lines) + "\n")
    # whole or not at all: a torn summary would switch off check_results_dir's guard
    write_whole(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _ordered(runs: Sequence[Run], finished: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [finished[run.key] for run in runs if run.key in finished]


def _store(run: Run, result: dict[str, Any], results_dir: Path) -> dict[str, Any]:
    result = {"key": run.key, "study_settings": _as_recorded(run.settings), **result}
    path = run.result_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(result, indent=1, default=_plain) + "\n")
    return result


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _progress(runs, finished, queue, active, total, start_steps, began, ended, checkpoint_root,
              workers, now: float | None = None) -> str:
    """One progress line with the remaining time estimated from this sitting's measured rate.

    Progress is only known at checkpoints, so the rate is steps gained over the worker-seconds up
    to each run's last checkpoint (its folder's time) or its end, never up to now: a run 12 minutes
    into a 13-minute checkpoint interval would otherwise look stalled. Steps made since a run's
    last checkpoint are taken at that rate. ``began`` / ``ended``: when each run of this sitting
    started / finished.
    """
    now = time.time() if now is None else now
    marks = {}  # run -> (step of its last checkpoint, when this sitting reached it)
    for key, (run, _, _) in active.items():
        checkpoint, step = last_checkpoint(run.checkpoint_dir(checkpoint_root))
        # a checkpoint from an earlier sitting (the one a run resumed from) marks its start
        new = checkpoint is not None and step > start_steps[key]
        marks[key] = (step, checkpoint.stat().st_mtime if new else began[key])
    gained = seconds = 0.0
    for key, (step, at) in marks.items():
        if step > start_steps[key]:
            gained += step - start_steps[key]
            seconds += max(at - began[key], 1e-9)
    for key in ended:
        gained += total[key] - start_steps[key]
        seconds += ended[key] - began[key]
    parts = [f"{key} {step}/{total[key]}" for key, (step, _) in marks.items()]
    if gained > 0:
        rate = gained / seconds  # steps per second of one worker
        running = [max(total[key] - step - rate * (now - at), 0.0)
                   for key, (step, at) in marks.items()]
        queued = [total[run.key] - start_steps[run.key] for run in queue]
        eta = (f"about {format_duration(_grid_steps_left(running, queued, workers) / rate)} "
               f"left ({rate * 3600:.0f} steps/h per worker)")
    else:
        eta = "remaining time known after the first checkpoint"
    return (f"{len(finished)} of {len(runs)} runs finished, {len(active)} running "
            f"[{', '.join(parts)}], {len(queue)} queued; {eta}")


def _grid_steps_left(running: Sequence[float], queued: Sequence[float], workers: int) -> float:
    """Steps of one worker until the grid is done: ``running`` holds the steps left of the runs
    in progress, and each queued run starts, in order, on the first worker to come free (as
    :func:`run_grid` starts them). So the last runs, with fewer than ``workers`` left to share the
    pool, count at their own length, not at a share of the total."""
    free = sorted(running) + [0.0] * max(workers - len(running), 0)
    heapq.heapify(free)
    for steps in queued:
        heapq.heappush(free, heapq.heappop(free) + steps)
    return max(free, default=0.0)


def curve_gaps(base: dict[int, float], other: dict[int, float]) -> list[list[float]]:
    """``[x, other - base]`` at every point (epoch, step) both curves of a same-seed pair reached,
    in order."""
    return [[x, other[x] - base[x]] for x in sorted(base.keys() & other.keys())]


def running_section(running: Sequence[dict[str, Any]], *, bases: Sequence[str], other: str,
                    intro: str, progress: str, value: str, unit: str, point: Callable[[int], str],
                    finished: Sequence[dict[str, Any]] = (), digits: int = 2) -> list[str]:
    """Markdown lines of a snapshot of the unfinished runs: not results, mid-way through a schedule.

    ``running``: one entry per unfinished run with ``key``, ``method`` (its arm), ``pair`` (the
    label of its same-seed pair, e.g. ``"LR 0.2 seed 37"``), ``done`` (how far it got, in the unit
    ``progress`` names: ``"epochs done"``) and ``curve`` (``[x, value]`` per evaluation so far,
    ``value`` names the values, ``unit`` their differences). ``finished``: the finished runs in the
    same form (without ``done``), not listed, only partners: a control still running is compared
    with the finished ``other`` of its seed. The differences ``other - base`` for each of
    ``bases``, at the evaluations both runs of a pair reached, come for every pair with a run still
    running; ``point(x)`` labels one evaluation (``e3``, ``step 250``).
    """
    lines = ["## Runs in progress (a snapshot, not a result)", "", intro, "",
             f"| run | {progress} | {value} |", "|---|---|---|"]
    for r in running:
        lines.append(f"| {r['key']} | {r['done']} | "
                     + ", ".join(f"{v:.{digits}f}" for _, v in r["curve"]) + " |")
    pairs: dict[str, dict[str, dict[int, float]]] = {}
    for r in [*finished, *running]:
        pairs.setdefault(r["pair"], {})[r["method"]] = {int(x): float(v) for x, v in r["curve"]}
    unfinished = {(r["pair"], r["method"]) for r in running}
    for base in bases:
        diffs = []
        for label, by in pairs.items():
            if not {(label, base), (label, other)} & unfinished:
                continue
            gaps = curve_gaps(by.get(base, {}), by.get(other, {}))
            if gaps:
                diffs.append(f"{label}: " + ", ".join(f"{point(x)} {d:+.{digits}f}" for x, d in gaps))
        if diffs:
            lines += ["", f"Same-seed differences {other} - {base} ({unit}) at the evaluations both "
                      "reached: " + "; ".join(diffs) + "."]
    return lines + [""]


# ------------------------------------------------------------------------------------ statistics
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Per-seed ``b - a`` over the seeds both have: mean, sample std, 95% t-interval of the mean.

    ``ci`` is ``None`` with fewer than two pairs (no spread to estimate).
    """
    seeds = [s for s in a if s in b]
    diffs = [b[s] - a[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return {"seeds": [], "differences": [], "n": 0, "mean": None, "std": None, "ci": None}
    mean = sum(diffs) / n
    if n < 2:
        return {"seeds": seeds, "differences": diffs, "n": 1, "mean": mean, "std": None, "ci": None}
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"seeds": seeds, "differences": diffs, "n": n, "mean": mean, "std": std,
            "ci": [mean - half, mean + half]}


def mean_multiplier(rows: Iterable[dict[str, Any]], total_steps: int,
                    base_lr: Callable[[int], float] | None = None) -> dict[str, float] | None:
    """The TempBalance LR multiplier averaged over the balanced layers and over training.

    ``rows``: history rows (``step``, ``layer``, ``multiplier``). The multipliers of an update at
    step ``t`` hold until the next update (or ``total_steps``); before the first update they are 1.
    Returns ``{"mean": ..., "lr_weighted": ..., "updates": ...}``: ``mean`` weighs every optimizer
    step equally; ``lr_weighted`` weighs step ``t`` by the scheduler's LR ``base_lr(t)`` (so it is
    the ratio of the average layer LR to the baseline's average LR). None without rows.
    """
    by_step: dict[int, list[float]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), []).append(float(row["multiplier"]))
    if not by_step or total_steps <= 0:
        return None
    per_step = [1.0] * total_steps
    steps = sorted(s for s in by_step if s < total_steps)
    for i, step in enumerate(steps):
        end = steps[i + 1] if i + 1 < len(steps) else total_steps
        value = sum(by_step[step]) / len(by_step[step])
        for t in range(step, end):
            per_step[t] = value
    out = {"mean": sum(per_step) / total_steps, "updates": len(steps)}
    if base_lr is not None:
        weights = [base_lr(t) for t in range(total_steps)]
        out["lr_weighted"] = sum(w * m for w, m in zip(weights, per_step)) / sum(weights)
    return out


def cosine_lr(total_steps: int) -> Callable[[int], float]:
    """The Trainer's / ``get_scheduler``'s cosine schedule without warmup, relative to the initial LR."""
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total_steps))



def multiplier_table(tb_runs: Sequence[dict[str, Any]], lrs: Iterable[float],
                     summary: dict[str, Any], *, what: str = "layers") -> list[str]:
    """Markdown rows of the mean TempBalance multiplier per LR (mean over the seeds' runs), and
    each LR's per-run values into ``summary["multiplier"]``. ``tb_runs``: finished runs with a
    ``tempbalance`` entry (``mean_multiplier``: :func:`mean_multiplier`; ``layers``)."""
    lines = [f"| LR | seeds | mean multiplier (per step) | LR-weighted (cosine) | updates | "
             f"balanced {what} |", "|---|---|---|---|---|---|"]
    for lr in lrs:
        group = [r for r in tb_runs if float(r["lr"]) == float(lr)]
        if not group:
            continue
        means = [r["tempbalance"]["mean_multiplier"]["mean"] for r in group]
        weighted = [r["tempbalance"]["mean_multiplier"]["lr_weighted"] for r in group]
        summary.setdefault("multiplier", {})[f"lr={lr:g}"] = {"mean": means,
                                                              "lr_weighted": weighted}
        lines.append(f"| {lr:g} | {len(group)} | {sum(means) / len(means):.4f} | "
                     f"{sum(weighted) / len(weighted):.4f} | "
                     f"{group[0]['tempbalance']['mean_multiplier']['updates']} | "
                     f"{len(group[0]['tempbalance']['layers'])} |")
    return lines


def pair_row(label: str, pair: dict[str, Any], digits: int = 2) -> str:
    """A markdown row ``| label | per seed | n | mean ± std | 95% t-interval |`` of a pair."""
    if pair["n"] == 0:
        return f"| {label} | | 0 | | |"
    f = f"{{:+.{digits}f}}"
    diffs = ", ".join(f"{s}: {f.format(d)}" for s, d in zip(pair["seeds"], pair["differences"]))
    ci = "" if pair["ci"] is None else f"[{f.format(pair['ci'][0])}, {f.format(pair['ci'][1])}]"
    std = "" if pair["std"] is None else f" ± {pair['std']:.{digits}f}"
    return f"| {label} | {diffs} | {pair['n']} | {f.format(pair['mean'])}{std} | {ci} |"


def verdict(pair: dict[str, Any], *, what: str, unit: str, higher_is_better: bool,
            finished: int, planned: int, against: str | None = None) -> str:
    """One sentence no stronger than ``pair`` (from :func:`paired_differences` of ``tb - cal``).

    A difference is called one only when the 95% interval excludes 0; otherwise the sentence says
    how large a difference the interval still allows. Partial grids say so. ``against`` names
    the arm subtracted when it is a control rather than the study's baseline at its setting.
    """
    partial = f" (partial: {finished} of {planned} runs)" if finished < planned else ""
    if pair["n"] == 0:
        return f"{what}: not yet measured{partial}."
    if pair["ci"] is None:
        return (f"{what}: one paired seed so far ({pair['mean']:+.2f} {unit}); no interval, no "
                f"verdict{partial}.")
    low, high = pair["ci"]
    text = (f"{what}: TempBalance - {against or 'baseline'} = {pair['mean']:+.2f} {unit}, 95% CI "
            f"[{low:+.2f}, {high:+.2f}] over {pair['n']} paired seeds")
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        compared = f"than {against}" if against else "at this setting"
        return (f"{text}: TempBalance is {'better' if better else 'worse'} {compared}; "
                f"the interval excludes 0{partial}.")
    return (f"{text}: no difference detected; the interval allows anything from "
            f"{low:+.2f} to {high:+.2f} {unit}{partial}.")
