"""Update time with 1 and 2 processes sharing the ESD work, under ``accelerate launch`` (CPU).

    python benchmarks/scaling.py [--models resnet18 gpt2] [--repeats 5] [--threads 1]

Launches, for each model, ``accelerate launch`` with 1 process and with 2 processes
(``--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no``,
``ACCELERATE_USE_CPU=true``: gloo; ``--cpu`` would start only one process). Every process
builds the same randomly initialised model and times ``tb.update()``: the engine splits the
balanced layers across ranks by estimated cost (``hf_tempbalance.distributed``), each rank
computes its share, and one ``all_reduce`` gives every rank all values. The update time of a
launch is the slowest rank's, the median of ``--repeats`` after a warm-up; each configuration is
launched ``--rounds`` times, alternating with the others, and the table gives the median.

Each process runs ``--threads`` torch threads (``OMP_NUM_THREADS``, default 1), so 2 processes
use twice the cores of 1: the ratio measures how well the sharding splits the work. A third
launch, 1 process with ``2 x --threads`` threads, shows the same cores used by one process.
The table also gives each launch's largest relative difference of the metric values from the
1-process ones (the same numbers up to rounding of differently batched kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(model_name: str, repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from bench_common import build_model

    from hf_tempbalance import TempBalance

    accelerator = Accelerator(cpu=True)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise SystemExit(f"accelerate started {accelerator.num_processes} process(es) per group, "
                         f"expected {expected}: launch with --multi_gpu and ACCELERATE_USE_CPU=true")
    model = build_model(model_name)
    tb = TempBalance(model)
    times = []
    for i in range(repeats + 1):  # the first update warms up allocators and threads
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        tb.update()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # an update ends when every rank has it
        if i:
            times.append(float(elapsed))
    if accelerator.is_main_process:
        out.write_text(json.dumps({
            "processes": accelerator.num_processes, "threads": torch.get_num_threads(),
            "layers": len(tb.plan.layers), "update_s": statistics.median(times),
            "times": times, "metrics": [tb.metrics[name] for name in tb.plan.names],
            "computed_by_rank0": len(tb.last_computed),
        }))
    accelerator.wait_for_everyone()


def launch(model: str, processes: int, threads: int, repeats: int, out: Path) -> dict:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    with socket.socket() as sock:  # a free port, so parallel runs on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [accelerate, "launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if processes > 1:
        cmd.append("--multi_gpu")
    cmd += [__file__, "--worker", str(out), "--models", model, "--repeats", str(repeats)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / abs(y) for x, y in zip(a, b) if y == y and y != 0), default=0.0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt2"])
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per launch")
    parser.add_argument("--rounds", type=int, default=3,
                        help="launches of each configuration, alternating between them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.models[0], args.repeats, args.worker)
        return []

    import torch
    from bench_common import machine, report

    cpu = torch.device("cpu")
    print(f"# scaling on {machine(cpu)}", flush=True)
    configs = [(1, args.threads), (2, args.threads), (1, 2 * args.threads)]
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            launches: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
            for r in range(args.rounds):
                # Alternate the order, so that a change in the machine's load hits all alike.
                for p, t in configs if r % 2 == 0 else configs[::-1]:
                    out = Path(tmp) / f"{model}-{p}-{t}-{r}.json"
                    launches[(p, t)].append(launch(model, p, t, args.repeats, out))
            base = launches[configs[0]]
            base_s = statistics.median(run["update_s"] for run in base)
            for (p, t), runs in launches.items():
                update_s = statistics.median(run["update_s"] for run in runs)
                res = {"model": model, "processes": p, "threads": t, "layers": runs[0]["layers"],
                       "update_s": update_s, "ratio_to_1_process": update_s / base_s,
                       "launch_medians": [run["update_s"] for run in runs],
                       "max_rel_diff": max(max_rel_diff(run["metrics"], base[0]["metrics"])
                                           for run in runs)}
                results.append(res)
                rows.append([model, res["layers"], p, t, f"{update_s:.3f}",
                             f"{res['ratio_to_1_process']:.2f}", f"{res['max_rel_diff']:.1e}"])
    report(args, cpu, f"Update time (slowest rank), median over {args.rounds} alternating launches "
           f"of the median of {args.repeats} updates; accelerate launch on CPU",
           ["model", "layers", "processes", "threads each", "update (s)",
            f"time / 1 process x {args.threads} thread(s)", "metric rel. diff vs 1 process"],
           rows, rounds=args.rounds, repeats=args.repeats, results=results)
    return results


if __name__ == "__main__":
    main()
