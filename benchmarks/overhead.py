"""What a TempBalance update costs relative to training: update time / training-step time.

    python benchmarks/overhead.py [--models resnet18 gpt2] [--steps 3] [--repeats 3]
                                  [--batch-size 128] [--lm-batch-size 4] [--seq-len 128]
                                  [--device cpu|cuda] [--threads N] [--json FILE]

For each model (random weights; see ``bench_common``):

* a training step is the full loop body with the engine attached: forward, loss, backward and
  ``optimizer.step()`` (SGD momentum 0.9, wd 5e-4, the paper's CIFAR recipe, for the CNNs;
  AdamW for GPT-2), with the engine's step hooks running but no update due; its time is the
  mean over ``--steps`` steps after one warm-up step;
* an update is ``tb.update()`` (every balanced layer's ESD, fit and multiplier), the median of
  ``--repeats``; its peak extra memory is measured on one more call;
* the overhead of updating every ``K`` steps is ``update / (K · step + update)``, the fraction of
  training time spent in TempBalance, for K = 391 (one CIFAR epoch at batch 128, the paper's
  ``interval="epoch"``), 100, and 10 (the paper's language-model setting).

CIFAR images are 32x32 at ``--batch-size`` (default 128, the paper's); GPT-2 takes
``--lm-batch-size`` sequences of ``--seq-len`` tokens (short, so that CPU steps take seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    TRAINABLE,
    VISION,
    PeakMemory,
    add_common_args,
    build_model,
    forward,
    make_batch,
    median,
    report,
    run_with_threads,
    start,
    timed,
)

from hf_tempbalance import TempBalance  # noqa: E402

INTERVALS = (391, 100, 10)


def bench_model(name: str, device: torch.device, steps: int, repeats: int, batch_size: int,
                seq_len: int, llama_layers: int = 2) -> dict:
    model = build_model(name, llama_layers=llama_layers).to(device).train()
    # interval="epoch" with an epoch longer than the run: one update, in the untimed warm-up step
    tb = TempBalance(model, steps_per_epoch=10**9)
    if name in VISION:
        optimizer = torch.optim.SGD(tb.param_groups(lr=0.1, weight_decay=5e-4), momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(tb.param_groups(lr=1e-4, weight_decay=0.01))
    tb.attach(optimizer)
    batch, loss_of = make_batch(name, model, batch_size, seq_len, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(forward(model, batch)).backward()
        optimizer.step()

    step()  # warm-up: allocations, optimizer state
    step_times = [timed(step, device)[0] for _ in range(steps)]
    tb.update()  # warm-up
    update_times = [timed(tb.update, device)[0] for _ in range(repeats)]
    with PeakMemory(device) as mem:
        tb.update()

    t_step = sum(step_times) / len(step_times)
    t_update = median(update_times)
    return {
        "model": name, "layers": len(tb.plan.layers),
        "batch": f"{batch_size}x3x32x32" if name in VISION else f"{batch_size}x{seq_len} tokens",
        "step_s": t_step, "update_s": t_update, "step_times": step_times,
        "update_times": update_times, "update_peak_extra_MiB": mem.peak / 2**20,
        "overhead": {str(k): t_update / (k * t_step + t_update) for k in INTERVALS},
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt2"], choices=TRAINABLE)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lm-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    add_common_args(parser)
    return run_with_threads(parser.parse_args(argv), run)


def run(args: argparse.Namespace) -> list[dict]:
    device = start(args, "overhead")
    results = []
    for name in args.models:
        batch = args.batch_size if name in VISION else args.lm_batch_size
        res = bench_model(name, device, args.steps, args.repeats, batch, args.seq_len)
        results.append(res)
        print(f"{name}: step {res['step_s']:.3f} s, update {res['update_s']:.3f} s, "
              f"epoch overhead {100 * res['overhead']['391']:.3f}%", flush=True)

    headers = ["model", "batch", "train step (s)", "update (s)", "update / step"]
    headers += [f"overhead, every {k} steps" for k in INTERVALS] + ["update peak extra memory (MiB)"]
    rows = [[r["model"], r["batch"], f"{r['step_s']:.3f}", f"{r['update_s']:.3f}",
             f"{r['update_s'] / r['step_s']:.2f}"]
            + [f"{100 * r['overhead'][str(k)]:.2f}%" for k in INTERVALS]
            + [f"{r['update_peak_extra_MiB']:.0f}"] for r in results]
    report(args, device, f"Training-time fraction spent in TempBalance updates ({device.type})",
           headers, rows, results=results)
    return results


if __name__ == "__main__":
    main()
