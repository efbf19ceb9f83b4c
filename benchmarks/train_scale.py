"""TempBalance's update at LLM scale: per layer and in total, measured here, extrapolated to 7B.

    python benchmarks/train_scale.py [--repeats 2] [--full] [--skip-7b] [--check-blocks 1]
                                     [--device cuda] [--json FILE]

1. **1.1B Llama on this CPU.** The model is TinyLlama-1.1B-shaped (22 blocks, width 2048, MLP
   5632, 32 heads, 4 KV heads, vocabulary 32000, 1.10B parameters). Its balanced layers come
   from :func:`hf_tempbalance.layers.discover_layers` on the model built on the ``meta`` device
   (the exact list an engine would balance: 153 layers, first and last left out). Every block
   has the same shapes, so each distinct layer shape is timed on random fp32 weights with the
   call an update makes (``layer_metrics(..., ("alpha_hill",))``: Gram, ``eigvalsh``, Hill fit),
   as many layers at once as torch has threads (an update runs one matrix per worker thread),
   per layer, median of ``--repeats``; the update's total is the sum over the balanced layers.
   ``--check-blocks N`` also times a real ``TempBalance.update()`` of an N-block model of the
   same shapes (vocabulary 1024) and prints it next to the same sum for that model, as a check
   that the per-layer sum is what an update costs; ``--full`` times one real update of the whole
   1.1B model (4.4 GB of fp32 weights).
2. **7B on GPUs (extrapolated).** Llama-2-7B shapes (32 blocks, width 4096, MLP 11008, 32 heads,
   vocabulary 32000): every balanced matrix has a 4096 x 4096 Gram. Measured here: ``eigvalsh``
   of one 4096 x 4096 Gram and the Gram product rate (flop/s). Per-matrix cost on a device =
   Gram flops / rate + eigvalsh time; the update on one device is the sum, on 8 the largest bin
   of :func:`hf_tempbalance.distributed.partition_by_cost` (the sharded update: each rank its
   bin, then one ``all_reduce``). ``--device cuda`` measures both on the GPU too (a measured
   row); the assumed rows take the per-matrix ``eigvalsh`` time as a parameter
   (``--gpu-eig-s``, and ``--gpu-gram-tflops``).
3. **Interval.** Overhead of updating every K steps = U / (K·S + U) for update time U and
   training-step time S: it stays under 2% for K >= 49·U/S. Printed for several step times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import median, resolve_device, timed  # noqa: E402

from hf_tempbalance import TempBalanceConfig  # noqa: E402
from hf_tempbalance.distributed import partition_by_cost  # noqa: E402
from hf_tempbalance.layers import discover_layers  # noqa: E402
from hf_tempbalance.spectral import layer_metrics  # noqa: E402
from hf_tempbalance.spectral.matrices import stack_shape, weight_of  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, num_hidden_layers=22, vocab_size=32000)
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000)


def meta_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw))


def balanced_shapes(model) -> list[tuple[str, tuple[int, int]]]:
    plan = discover_layers(model, TempBalanceConfig())
    return [(layer.name, tuple(weight_of(layer.module).shape)) for layer in plan.layers]


def time_layer(shape: tuple[int, int], repeats: int, gen: torch.Generator) -> float:
    """Seconds per layer of this shape inside an update: ``threads`` such layers in one
    ``layer_metrics`` call (as an update runs them: one matrix per worker thread), divided."""
    n = max(1, torch.get_num_threads())
    weights = [torch.randn(shape, generator=gen) * 0.02 for _ in range(n)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer_metrics(weights, ("alpha_hill",), xmin="median", dtype="float32")
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def gram_flops(m: int, n: int) -> float:
    d, r = min(m, n), max(m, n)
    return 2.0 * r * d * d


def device_costs(device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds of one fp32 ``eigvalsh`` of a 4096 x 4096 Gram, Gram flop/s) on ``device``:
    medians of ``repeats`` after one warm-up call (the first call loads the solver's kernels)."""
    def seconds(fn) -> float:
        fn()
        return median([timed(fn, device)[0] for _ in range(max(1, repeats))])

    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(4096, 4096, generator=gen, device=device)
    gram = (w.T @ w).contiguous()
    eig = seconds(lambda: torch.linalg.eigvalsh(gram))
    a = torch.randn(11008, 4096, generator=gen, device=device)
    rate = gram_flops(11008, 4096) / seconds(lambda: torch.mm(a.T, a))
    return eig, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-blocks", type=int, default=1,
                        help="blocks of the model whose real update is timed (0: none)")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--full", action="store_true",
                        help="also time one real TempBalance.update() of the whole 1.1B model "
                             "(fp32, 4.4 GB; weights N(0, 0.02^2) written into an empty model)")
    parser.add_argument("--gpu-eig-s", type=float, nargs="+", default=[0.05, 0.2, 0.5],
                        help="assumed eigvalsh time of one 4096x4096 Gram on the GPU (s)")
    parser.add_argument("--gpu-gram-tflops", type=float, default=50.0,
                        help="assumed fp32 Gram (matmul) rate on the GPU, TFLOP/s")
    parser.add_argument("--device", default="cpu",
                        help="also measure eigvalsh(4096) and the Gram rate on this device (e.g. "
                             "cuda): the 7B table gets a measured row next to the assumed ones")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)  # before the long CPU part: a missing GPU fails at once
    gen = torch.Generator().manual_seed(0)
    out: dict = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()}

    # 1. 1.1B on this CPU
    model = meta_llama(**TINYLLAMA)
    params = sum(p.numel() for p in model.parameters())
    layers = balanced_shapes(model)
    shapes = sorted({s for _, s in layers}, key=lambda s: -math.prod(s))
    per_shape = {s: time_layer(s, args.repeats, gen) for s in shapes}
    total = sum(per_shape[s] for _, s in layers)
    out["1.1b"] = {"params": params, "balanced_layers": len(layers),
                   "per_shape_s": {"x".join(map(str, s)): t for s, t in per_shape.items()},
                   "count": {"x".join(map(str, s)): sum(1 for _, t in layers if t == s) for s in shapes},
                   "update_s": total}
    print(f"Llama {params / 1e9:.2f}B (TinyLlama shape), {len(layers)} balanced layers, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print("| layer shape (out x in) | layers | per layer (s) | subtotal (s) |")
    print("|---|---|---|---|")
    for s in shapes:
        n = sum(1 for _, t in layers if t == s)
        print(f"| {s[0]} x {s[1]} | {n} | {per_shape[s]:.2f} | {n * per_shape[s]:.1f} |")
    print(f"| **update (sum)** | {len(layers)} | | **{total:.1f}** |")

    if args.check_blocks:
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_tempbalance import TempBalance

        torch.manual_seed(0)
        small = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **{
            **TINYLLAMA, "num_hidden_layers": args.check_blocks, "vocab_size": 1024}))
        tb = TempBalance(small, steps_per_epoch=10**9)
        t0 = time.perf_counter()
        tb.update()
        real = time.perf_counter() - t0
        predicted = sum(per_shape.get(tuple(weight_of(layer.module).shape)) or
                        time_layer(tuple(weight_of(layer.module).shape), 1, gen)
                        for layer in tb.plan.layers)
        out["check"] = {"blocks": args.check_blocks, "layers": len(tb.plan.layers),
                        "update_s": real, "sum_s": predicted}
        print(f"\ncheck: real update of a {args.check_blocks}-block model ({len(tb.plan.layers)} "
              f"layers): {real:.1f} s; per-layer sum: {predicted:.1f} s")
        del small, tb

    if args.full:
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_tempbalance import TempBalance

        with torch.device("meta"):
            big = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **TINYLLAMA))
        big = big.to_empty(device="cpu")
        with torch.no_grad():
            for p in big.parameters():
                p.normal_(0.0, 0.02, generator=gen)
        tb = TempBalance(big, steps_per_epoch=10**9)
        t0 = time.perf_counter()
        tb.update()
        real = time.perf_counter() - t0
        out["1.1b"]["measured_update_s"] = real
        print(f"\nmeasured: one TempBalance.update() of the whole {params / 1e9:.2f}B model "
              f"({len(tb.plan.layers)} layers): {real:.1f} s (per-layer sum above: {total:.1f} s)")
        del big, tb

    if args.skip_7b:
        print(json.dumps(out) if args.json is None else "")
        return
    # 2. 7B: per-matrix costs from eigvalsh(4096) and the Gram rate measured here
    model7 = meta_llama(**LLAMA7B)
    params7 = sum(p.numel() for p in model7.parameters())
    layers7 = balanced_shapes(model7)
    w = torch.randn(4096, 4096, generator=gen)
    gram = (w.T @ w).contiguous()
    from hf_tempbalance.spectral.esd import one_intra_op_thread

    with one_intra_op_thread():  # as in an update: one matrix per thread
        t0 = time.perf_counter()
        torch.linalg.eigvalsh(gram)
        eig4096 = time.perf_counter() - t0
    a = torch.randn(11008, 4096, generator=gen)
    t0 = time.perf_counter()
    torch.mm(a.T, a)
    gram_rate = gram_flops(11008, 4096) / (time.perf_counter() - t0)
    del w, gram, a
    costs_cpu = [gram_flops(*s) / gram_rate + eig4096 for _, s in layers7]
    assert all(min(s) == 4096 and stack_shape(torch.empty(0), s)[0] == 1 for _, s in layers7)

    def sharded(costs, parts):
        return max(sum(costs[i] for i in b) for b in partition_by_cost(costs, parts))

    cpu1, cpu8 = sum(costs_cpu), sharded(costs_cpu, 8)
    rows = [("this CPU (measured per-matrix cost)", eig4096, cpu1, cpu8)]
    if device.type != "cpu":
        eig_dev, rate_dev = device_costs(device, args.repeats)
        costs = [gram_flops(*s) / rate_dev + eig_dev for _, s in layers7]
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        rows.append((f"{label}, eigvalsh(4096) = {eig_dev:.3g} s (measured), Gram at "
                     f"{rate_dev / 1e12:.0f} TFLOP/s", eig_dev, sum(costs), sharded(costs, 8)))
    for g in args.gpu_eig_s:
        costs = [gram_flops(*s) / (args.gpu_gram_tflops * 1e12) + g for _, s in layers7]
        rows.append((f"GPU, eigvalsh(4096) = {g:g} s (assumed), Gram at "
                     f"{args.gpu_gram_tflops:g} TFLOP/s", g, sum(costs), sharded(costs, 8)))
    out["7b"] = {"params": params7, "balanced_layers": len(layers7), "eigvalsh_4096_cpu_s": eig4096,
                 "gram_gflops_cpu": gram_rate / 1e9,
                 "rows": [{"device": r[0], "eig_s": r[1], "update_1": r[2], "update_8": r[3]} for r in rows]}
    print(f"\nLlama-2-7B shape ({params7 / 1e9:.2f}B), {len(layers7)} balanced matrices, all with a "
          f"4096 x 4096 Gram; this CPU: eigvalsh(4096) {eig4096:.1f} s, Gram {gram_rate / 1e9:.0f} GFLOP/s")
    print("| per-matrix cost from | eigvalsh (s) | update, 1 device (s) | update, 8 devices sharded (s) |")
    print("|---|---|---|---|")
    for name, g, one, eight in rows:
        print(f"| {name} | {g:.2f} | {one:.1f} | {eight:.1f} |")

    # 3. interval for < 2 % overhead: K >= 49 U / S
    print("\nsmallest interval K (steps) with overhead U / (K·S + U) < 2%:")
    steps = [0.5, 1.0, 2.0, 5.0]
    print("| update U | " + " | ".join(f"step S = {s:g} s" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, _, one, eight in rows[1:]:
        for label, u in ((f"{one:.0f} s (1 GPU, {name.split(',')[1].strip()})", one),
                         (f"{eight:.1f} s (8 GPUs)", eight)):
            print(f"| {label} | " + " | ".join(str(math.floor(49 * u / s) + 1) for s in steps) + " |")
    out["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
