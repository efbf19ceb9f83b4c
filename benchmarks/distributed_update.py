"""How the TempBalance update time falls as processes share the ESD work (CPU, gloo).

    python benchmarks/distributed_update.py [--model resnet18] [--max_procs 2] [--repeats 3]

For 1..max_procs processes (``torchrun``, one thread each, so processes = cores used), times
``tb.update()`` on a randomly initialised torchvision model: the whole update (partition, this
rank's ESDs and fits, the all_reduce), and each rank's own compute share. Prints a table:
median update time, speed-up over 1 process, and the load imbalance of the cost-based partition
(slowest rank's compute / mean rank compute; 1.0 is perfect). Ratios are within one run, on the
same machine; the absolute seconds depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def worker(model_name: str, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torchvision

    from hf_tempbalance import TempBalance
    from hf_tempbalance.distributed import layer_cost, partition_by_cost
    from hf_tempbalance.spectral.metrics import layer_metrics

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None)
    tb = TempBalance(model)
    modules = [layer.module for layer in tb.plan.layers]
    share = partition_by_cost([layer_cost(m) for m in modules], size)[rank]
    updates, computes = [], []
    for i in range(repeats + 1):  # the first call warms up allocators and kernels
        dist.barrier()
        start = time.perf_counter()
        layer_metrics([modules[j] for j in share])
        compute = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        tb.update()
        update = time.perf_counter() - start
        if i:
            computes.append(compute)
            updates.append(update)
    gathered = [None] * size
    dist.all_gather_object(gathered, {"update": statistics.median(updates),
                                      "compute": statistics.median(computes),
                                      "layers": len(share)})
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"layers": len(modules), "ranks": gathered}, fh)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--max_procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.repeats, args.worker)
        return

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in range(1, args.max_procs + 1):
            out = os.path.join(tmp, f"p{procs}.json")
            with socket.socket() as sock:  # a free port for this launch
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            subprocess.run([torchrun, "--nproc_per_node", str(procs), "--master_port", str(port),
                            "--monitor_interval", "0.1", __file__, "--model", args.model,
                            "--repeats", str(args.repeats), "--worker", out], env=env, check=True)
            with open(out) as fh:
                rows.append((procs, json.load(fh)))

    base = max(r["update"] for r in rows[0][1]["ranks"])
    print(f"\n{args.model}: {rows[0][1]['layers']} balanced layers, 1 thread per process, "
          f"median of {args.repeats} updates")
    print(f"{'procs':>5} | {'update s':>8} | {'speed-up':>8} | {'compute s per rank':<24} | "
          f"{'layers per rank':<16} | imbalance")
    for procs, data in rows:
        ranks = data["ranks"]
        update = max(r["update"] for r in ranks)
        computes = [r["compute"] for r in ranks]
        imbalance = max(computes) / statistics.mean(computes)
        print(f"{procs:>5} | {update:8.3f} | {base / update:7.2f}x | "
              f"{' '.join(f'{c:.3f}' for c in computes):<24} | "
              f"{' '.join(str(r['layers']) for r in ranks):<16} | {imbalance:.2f}")


if __name__ == "__main__":
    main()
