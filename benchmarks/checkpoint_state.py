"""What TempBalance adds to every Trainer checkpoint: ``trainer_state.json`` size and write time.

    python benchmarks/checkpoint_state.py [--model gpt2] [--interval 10] [--steps 1000 10000 100000]
                                          [--repeats 3] [--json FILE]

The Trainer writes the callback's state into ``trainer_state.json`` at every save
(``TrainerState.save_to_json``: ``json.dumps(..., indent=2, sort_keys=True)``). The engine's
history grows by one row per balanced layer and update, so carrying it there makes each save grow
with the run. The callback leaves it to the history file instead (``include_history=False``).
This measures both, for a run of ``--steps`` optimizer steps that updates every ``--interval``
steps: one real update of the model gives the rows, which are repeated with the steps and update
indices of the later updates (the values do not change the size much). Baseline: the same state
with the history. Ratio: with / without. Also: the memory the history holds in the process
(``tracemalloc`` of building the rows, each with float objects of its own as a run makes them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    MODELS,
    add_common_args,
    build_model,
    median,
    report,
    run_with_threads,
    start,
)

from hf_tempbalance import TempBalance, TempBalanceCallback, TempBalanceConfig  # noqa: E402


def save_seconds_and_bytes(callback_state: dict, repeats: int) -> tuple[float, int]:
    """Median time of ``TrainerState.save_to_json`` holding ``callback_state``, and the file size."""
    from transformers import TrainerState

    state = TrainerState(stateful_callbacks={"TempBalanceCallback": callback_state})
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer_state.json"
        for _ in range(repeats):
            start = time.perf_counter()
            state.save_to_json(str(path))
            times.append(time.perf_counter() - start)
        return median(times), path.stat().st_size


def bench(model_name: str, interval: int, steps: int, repeats: int) -> dict:
    model = build_model(model_name)
    callback = TempBalanceCallback(TempBalanceConfig(interval=interval))
    callback.engine = tb = TempBalance(model, callback.config, clock=lambda: steps)
    rows = tb.update()
    updates = -(-steps // interval)
    # What the Trainer's rows also hold: the scheduler LR and the epoch. As in a run, each row has
    # float objects of its own for its value and multiplier (x + 0.0 computed at run time is a new
    # object), and the rows of one update share its step, base LR and epoch.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    history = []
    for u in range(updates):
        shared = {"step": u * interval, "update": u, "base_lr": 1e-4 * (1 - u / updates),
                  "epoch": u / 391}
        history += [{**row, "value": row["value"] + 0.0, "multiplier": row["multiplier"] + 0.0,
                     **shared} for row in rows]
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tb.history = history
    tb.num_updates = updates
    result = {"model": model_name, "layers": len(tb.plan.layers), "steps": steps,
              "updates": updates, "rows": len(tb.history), "memory_MB": held / 1e6,
              "bytes_per_row": held / len(tb.history)}
    for label, history_file in (("with", None), ("without", "tempbalance_history.jsonl")):
        callback.history_file = history_file  # None: the history travels in the checkpoint
        seconds, size = save_seconds_and_bytes(callback.state(), repeats)
        result[f"{label}_s"], result[f"{label}_MB"] = seconds, size / 1e6
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", choices=MODELS)
    parser.add_argument("--interval", type=int, default=10, help="optimizer steps between updates")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    add_common_args(parser)
    return run_with_threads(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> list[dict]:
    device = start(args, "checkpoint_state")
    results = []
    for steps in args.steps:
        res = bench(args.model, args.interval, steps, args.repeats)
        results.append(res)
        print(f"{steps} steps: with history {res['with_MB']:.1f} MB in {res['with_s']:.3f} s, "
              f"without {res['without_MB']:.3f} MB in {res['without_s']:.4f} s; history in "
              f"memory {res['memory_MB']:.1f} MB", flush=True)
    headers = ["model", "layers", "steps", "updates", "history rows", "in memory (MB)",
               "bytes per row", "with history (MB)", "save with (s)", "without (MB)",
               "save without (s)", "size ratio", "time ratio"]
    table = [[r["model"], r["layers"], r["steps"], r["updates"], r["rows"],
              f"{r['memory_MB']:.1f}", f"{r['bytes_per_row']:.0f}", f"{r['with_MB']:.1f}",
              f"{r['with_s']:.3f}", f"{r['without_MB']:.3f}", f"{r['without_s']:.4f}",
              f"{r['with_MB'] / r['without_MB']:.0f}x", f"{r['with_s'] / r['without_s']:.0f}x"]
             for r in results]
    report(args, device, f"trainer_state.json per checkpoint, update every {args.interval} steps "
           f"(median of {args.repeats} saves)", headers, table, interval=args.interval,
           results=results)
    return results


if __name__ == "__main__":
    main()
