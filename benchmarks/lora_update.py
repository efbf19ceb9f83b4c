#!/usr/bin/env python
"""Cost of a TempBalance update on a LoRA model: the ESDs of W0 + s·B·A against those of W0 alone.

    python benchmarks/lora_update.py [--hidden 1024] [--intermediate 2816] [--layers 8] [--rank 8]
                                     [--repeats 3] [--device cpu] [--threads N] [--json FILE]

A Llama-shaped model built from a config (random weights, nothing downloaded; width ``--hidden``,
MLP ``--intermediate``, ``--layers`` blocks, as many KV heads as heads) gets LoRA adapters of rank
``--rank`` on q/k/v/o/up/down (PEFT, B drawn at random so that ΔW is not zero). Timed, alternately
within the same run (so machine load affects both alike), ``repeats`` times each, median:

* ``base``: ``TempBalance.update()`` of the plain model balancing the same modules (their W0);
* ``lora``: ``TempBalance.update()`` of the PEFT model: every adapted module's ESD is that of
  ``W0 + s·B·A``, computed inside the piece of work that needs it and dropped after its Gram.

Peak extra memory of each update is measured (``bench_common.PeakMemory``), next to what holding
every effective weight at once would take (their float32 size). The ratio is lora / base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    PeakMemory,
    add_common_args,
    median,
    report,
    run_with_threads,
    start,
    timed,
)

from hf_tempbalance import TempBalance, TempBalanceConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=1024, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(device)


def bench(args: argparse.Namespace, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model

    model = build(args, device)
    settings = dict(exclude_first_last=False, min_eigs=1)
    pattern = r"\.(" + "|".join(TARGETS) + r")$"
    base_tb = TempBalance(model, TempBalanceConfig(include=[pattern], **settings))
    base_weights = [layer.module.weight for layer in base_tb.plan.layers]
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                  target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    lora_tb = TempBalance(peft_model, TempBalanceConfig(**settings))
    assert len(lora_tb.plan.layers) == len(base_tb.plan.layers) == len(TARGETS) * args.layers
    # The base engine's modules are the same Linear objects, now inside the LoRA layers: its
    # update still reads W0 alone.
    assert all(a.module.weight is w for a, w in zip(base_tb.plan.layers, base_weights))

    times: dict[str, list[float]] = {"base": [], "lora": []}
    peaks: dict[str, list[int]] = {"base": [], "lora": []}
    for _, tb in [("base", base_tb), ("lora", lora_tb)]:  # warm-up (allocator, threads)
        tb.update()
    for _ in range(args.repeats):
        for which, tb in [("base", base_tb), ("lora", lora_tb)]:
            with PeakMemory(device) as peak:
                seconds, _ = timed(tb.update, device)
            times[which].append(seconds)
            peaks[which].append(peak.peak)
    all_effective = sum(w.numel() * 4 for w in base_weights)
    result = {
        "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
        "rank": args.rank, "modules": len(base_weights),
        "base_s": median(times["base"]), "lora_s": median(times["lora"]),
        "base_peak_bytes": max(peaks["base"]), "lora_peak_bytes": max(peaks["lora"]),
        "all_effective_weights_bytes": all_effective, "times": times, "peaks": peaks,
    }
    result["ratio"] = result["lora_s"] / result["base_s"]
    return result


def run(args: argparse.Namespace) -> dict:
    device = start(args, "lora_update")
    res = bench(args, device)
    mib = 1 / 2**20
    rows = [[f"{res['modules']} modules, {res['hidden']}x{res['intermediate']}, r={res['rank']}",
             f"{res['base_s']:.2f}", f"{res['lora_s']:.2f}", f"{res['ratio']:.2f}",
             f"{res['base_peak_bytes'] * mib:.0f}", f"{res['lora_peak_bytes'] * mib:.0f}",
             f"{res['all_effective_weights_bytes'] * mib:.0f}"]]
    report(args, device, "TempBalance update: ESD of W0 + s·B·A (lora) vs of W0 alone (base)",
           ["model", "base update (s)", "lora update (s)", "lora / base", "base peak (MiB)",
            "lora peak (MiB)", "all W0+ΔW at once (MiB)"], rows, result=res)
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    add_common_args(parser)
    return run_with_threads(parser.parse_args(argv), run)


if __name__ == "__main__":
    main()
