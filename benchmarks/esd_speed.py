"""The library's batched ESD engine against a straightforward per-layer implementation.

    python benchmarks/esd_speed.py [--models resnet18 resnet34 vgg16 gpt2 llama mixtral yolov8n]
                                   [--repeats 5]
                                   [--device cpu|cuda] [--threads N] [--json FILE]

For each model (random weights, see ``bench_common``), on the layers TempBalance balances:

* **engine**: ``TempBalance.compute_metrics()`` (batched Gram + ``eigvalsh``, fits on device,
  one host transfer), default config (median PL_Alpha_Hill, float32);
* **per-layer**: the paper's algorithm as the authors compute it, written here: for each layer,
  ``torch.linalg.svdvals`` of its ``(kernel positions, out, in)`` slice stack in float32, the
  squared values sorted, the (near-)zeros dropped (same relative threshold as the engine), the
  median Hill fit and ``.item()``, one layer after the other;
* **fp64 reference** (once, untimed): per-slice float64 SVD (``esd_reference``) and the NumPy
  loop Hill fit (``hill_alpha_reference``).

The two timed methods alternate on the same weights in the same process, ``--repeats`` rounds
after one warm-up each; the table gives the medians, their ratio, the largest relative
difference of each method's alphas from the fp64 ones, and the engine's peak extra memory.
Times are wall-clock seconds on this machine at its load; the ratio is what carries over. The
CPU-time ratio (process CPU seconds, all threads) is the same comparison measured in work
rather than waiting: at one thread it does not move when other processes share the cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    MODELS,
    PeakMemory,
    add_common_args,
    build_model,
    machine,
    median,
    report,
    run_with_threads,
    start,
    timed,
)

from hf_tempbalance import TempBalance  # noqa: E402
from hf_tempbalance.spectral import esd_reference  # noqa: E402
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference  # noqa: E402
from hf_tempbalance.spectral.matrices import weight_matrices  # noqa: E402

DEFAULT_MODELS = ("resnet18", "resnet34", "vgg16", "gpt2", "llama")


def per_layer_alphas(modules: list[nn.Module]) -> list[float]:
    """The straightforward implementation: one SVD and one fit per layer, a host sync each."""
    alphas = []
    for module in modules:
        # (kernel positions or experts, out, in): the slices the authors take, one matrix each.
        # (Transformers' Conv1D stores W transposed; the singular values are the same.)
        w = weight_matrices(module).float()
        eigs = torch.linalg.svdvals(w).square().flatten().sort().values
        n_total = eigs.numel()
        i = n_total // 2
        n = n_total - i
        log_eigs = eigs.log()
        alpha = 1.0 + n / (log_eigs[i:].sum() - n * log_eigs[i])
        alphas.append(alpha.item())
    return alphas


def fp64_alphas(modules: list[nn.Module]) -> list[float]:
    """Reference alphas: per-slice float64 SVD and the NumPy loop fit."""
    return [hill_alpha_reference(esd_reference(m, torch.float64).cpu().numpy(), "median")
            for m in modules]


def max_rel_diff(got: list[float], ref: list[float]) -> float:
    got_a, ref_a = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(got_a) == np.isfinite(ref_a)):
        return math.inf
    ok = np.isfinite(ref_a)
    return float(np.max(np.abs(got_a[ok] - ref_a[ok]) / np.abs(ref_a[ok]))) if ok.any() else 0.0


def bench_model(name: str, device: torch.device, repeats: int, llama_layers: int) -> dict:
    model = build_model(name, llama_layers=llama_layers).to(device).eval()
    tb = TempBalance(model)
    modules = [layer.module for layer in tb.plan.layers]
    slices = sum(len(weight_matrices(m)) for m in modules)

    reference = fp64_alphas(modules)
    engine_alphas = tb.compute_metrics()  # warm-up (allocator, kernels, thread pools)
    baseline_alphas = per_layer_alphas(modules)

    times = {"engine": [], "per_layer": []}
    cpu_times = {"engine": [], "per_layer": []}
    runs = {"engine": tb.compute_metrics, "per_layer": lambda: per_layer_alphas(modules)}
    for r in range(repeats):
        order = ("engine", "per_layer") if r % 2 == 0 else ("per_layer", "engine")
        for key in order:
            cpu_start = time.process_time()
            seconds, _ = timed(runs[key], device)
            times[key].append(seconds)
            cpu_times[key].append(time.process_time() - cpu_start)
    with PeakMemory(device) as mem:
        tb.compute_metrics()

    t_engine, t_base = median(times["engine"]), median(times["per_layer"])
    return {
        "model": name, "layers": len(modules), "slices": slices,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "engine_s": t_engine, "per_layer_s": t_base, "speedup": t_base / t_engine,
        "engine_times": times["engine"], "per_layer_times": times["per_layer"],
        "engine_cpu_s": median(cpu_times["engine"]), "per_layer_cpu_s": median(cpu_times["per_layer"]),
        "engine_max_rel_diff_fp64": max_rel_diff(engine_alphas, reference),
        "per_layer_max_rel_diff_fp64": max_rel_diff(baseline_alphas, reference),
        "engine_peak_extra_MiB": mem.peak / 2**20,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--png", type=Path, default=None,
                        help="also plot both methods' times per model here (needs matplotlib)")
    add_common_args(parser)
    return run_with_threads(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> list[dict]:
    device = start(args, "esd_speed")
    results = []
    for name in args.models:
        res = bench_model(name, device, args.repeats, args.llama_layers)
        results.append(res)
        print(f"{name}: engine {res['engine_s']:.3f} s, per-layer {res['per_layer_s']:.3f} s, "
              f"x{res['speedup']:.2f}, max rel diff vs fp64 {res['engine_max_rel_diff_fp64']:.1e}",
              flush=True)

    headers = ["model", "layers", "slices", "engine (s)", "per-layer (s)", "speed-up",
               "CPU-time ratio",
               "engine alpha rel. diff vs fp64", "per-layer alpha rel. diff vs fp64",
               "engine peak extra memory (MiB)"]
    rows = [[r["model"], r["layers"], r["slices"], f"{r['engine_s']:.3f}", f"{r['per_layer_s']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['per_layer_cpu_s'] / r['engine_cpu_s']:.2f}",
             f"{r['engine_max_rel_diff_fp64']:.1e}",
             f"{r['per_layer_max_rel_diff_fp64']:.1e}", f"{r['engine_peak_extra_MiB']:.0f}"]
            for r in results]
    report(args, device, f"Medians of {args.repeats} alternating repeats ({device.type})", headers,
           rows, repeats=args.repeats, results=results)
    if args.png:
        plot(results, args.png, f"{machine(device)}; medians of {args.repeats}")
    return results


def plot(results: list[dict], path: Path, subtitle: str) -> None:
    """Bar chart: both methods' median times per model (log scale), speed-up on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 2, 4))
    ax.bar(x - 0.2, [r["per_layer_s"] for r in results], 0.4, label="per-layer svdvals + fit")
    ax.bar(x + 0.2, [r["engine_s"] for r in results], 0.4, label="hf_tempbalance engine")
    for xi, r in zip(x, results):
        ax.annotate(f"{r['speedup']:.1f}x", (xi, r["per_layer_s"]), ha="center", va="bottom")
    ax.set_xticks(x, [r["model"] for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("seconds per update (all balanced layers)")
    ax.set_title(f"ESD + alpha of every balanced layer\n{subtitle}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
