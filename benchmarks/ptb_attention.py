#!/usr/bin/env python
"""Multi-linear attention: ``dense`` (build T, L³ per window) vs ``factored`` (never build T).

Times forward + backward of :func:`multilinear_attention` for the published size (window
L = 32, rank H = 2·R = 80, d = 256) and longer windows, and prints the time ratio next to the
multiply-add ratio behind ``contraction="auto"``. Run on demand::

    python benchmarks/ptb_attention.py [--batch 16] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from models.tensorized_transformer import (  # noqa: E402
    auto_contraction,
    contraction_cost,
    multilinear_attention,
)


def time_once(how: str, a, key, value, core, weight, causal: bool) -> float:
    leaves = [t.detach().requires_grad_() for t in (a, key, value, weight)]
    start = time.perf_counter()
    out = multilinear_attention(leaves[0], leaves[1], leaves[2], core, leaves[3], causal, how)
    out.sum().backward()
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rank, d_model = 80, 256
    print(f"{'L':>4} {'causal':>6} {'dense ms':>9} {'factored ms':>11} {'time f/d':>9} {'MACs f/d':>9}  auto")
    for length in (32, 64, 128):
        gen = torch.Generator().manual_seed(0)
        a, key, value = (torch.randn(args.batch, length, rank, generator=gen).to(args.device) for _ in range(3))
        core = torch.randn(rank, generator=gen).to(args.device)
        weight = torch.randn(d_model, length, length, generator=gen).to(args.device) / length
        for causal in (True, False):
            times = {}
            for how in ("dense", "factored"):
                time_once(how, a, key, value, core, weight, causal)  # warm-up
                times[how] = statistics.median(time_once(how, a, key, value, core, weight, causal)
                                               for _ in range(args.repeats))
            cost = contraction_cost(length, rank, d_model, causal)
            auto = auto_contraction(length, rank, d_model, causal)
            print(f"{length:>4} {causal!s:>6} {times['dense'] * 1e3:>9.1f} {times['factored'] * 1e3:>11.1f} "
                  f"{times['factored'] / times['dense']:>9.2f} {cost['factored'] / cost['dense']:>9.2f}  {auto}")


if __name__ == "__main__":
    main()
