"""`hf-tempbalance analyze` at LLM scale: streaming vs loading the model vs weightwatcher.

    python benchmarks/analyze_scale.py [--sizes 0.25 0.5 1.0] [--ww-sizes 0.25 0.5]
                                       [--modes stream memory ww] [--shard-mb 500]
                                       [--layout safetensors|bin] [--malloc command|default]
                                       [--tmp DIR] [--json FILE]

For each size (billions of parameters) a Llama-shaped checkpoint is synthesised into a temporary
directory and deleted afterwards: the TinyLlama-1.1B block (width 2048, MLP 5632, 32 heads, 4 KV
heads, vocabulary 32000, untied ``lm_head``) with as many blocks as make the size, seeded random
bf16 weights (N(0, 0.02²)), sharded like ``save_pretrained`` (``model-0000i-of-0000n.safetensors``
of about ``--shard-mb`` MB and ``model.safetensors.index.json``). Every block has the same shapes,
so the largest weight (the 32000 x 2048 embedding / ``lm_head``, 125 MiB in bf16) is the same at
every size and only the number of layers grows.

Each measurement runs in a fresh child process (``python this_file --child MODE DIR``) that
reports its wall time (from before loading to the finished report, imports excluded) and its
peak resident set (``VmHWM`` from ``/proc/self/status``). Our two modes first make the process
setting the command makes (``streaming.return_large_frees``: freed large blocks go back to the
OS at once); ``--malloc default`` leaves glibc's adaptive mmap threshold instead (what a library
call in a process of one's own gets), to measure what that setting saves. A third child, ``overhead``, measures the fixed cost: it imports everything and
plans the streaming analysis (checkpoint headers, meta model) but analyses no layer; the second
table gives each mode's peak minus that, as a multiple of the largest weight tensor.

* ``stream``: :func:`hf_tempbalance.streaming.analyze_checkpoint` (what ``hf-tempbalance analyze
  DIR`` runs on such a directory);
* ``memory``: the in-memory path, ``hf-tempbalance analyze DIR --no-stream``
  (``resolve_model`` = Transformers ``from_pretrained``, then ``analyze_model``);
``--select REGEX`` analyses only the matching layers in our two modes (``analyze --layers``): the
loading is the same, so memory and load time are measured at sizes where a full analysis would
take too long on a small machine (weightwatcher, which has no such filter here, is left out).

* ``ww``: weightwatcher (``pip install weightwatcher``, or ``--ww-path DIR`` for a ``--target``
  install):
  ``from_pretrained(dtype=float32)`` (weightwatcher works on numpy arrays, which have no bf16)
  then ``WeightWatcher(model).analyze(randomize=False, plot=False)``. Skipped if not importable.

Both of ours compute the same rows; the benchmark reports how far their alphas differ (float32
rounding: streaming sums each Gram block by block). The machine's
load average is printed with the table: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, MLP, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def llama_shapes(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the Llama-shaped model, in save order."""
    head = WIDTH // HEADS
    kv = KV_HEADS * head
    out = [("model.embed_tokens.weight", (VOCAB, WIDTH))]
    for i in range(blocks):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (WIDTH, WIDTH)),
                (p + "self_attn.k_proj.weight", (kv, WIDTH)),
                (p + "self_attn.v_proj.weight", (kv, WIDTH)),
                (p + "self_attn.o_proj.weight", (WIDTH, WIDTH)),
                (p + "mlp.gate_proj.weight", (MLP, WIDTH)),
                (p + "mlp.up_proj.weight", (MLP, WIDTH)),
                (p + "mlp.down_proj.weight", (WIDTH, MLP)),
                (p + "input_layernorm.weight", (WIDTH,)),
                (p + "post_attention_layernorm.weight", (WIDTH,))]
    out += [("model.norm.weight", (WIDTH,)), ("lm_head.weight", (VOCAB, WIDTH))]
    return out


def blocks_for(billions: float) -> int:
    per_block = sum(math.prod(s) for _, s in llama_shapes(1)) - sum(math.prod(s) for _, s in llama_shapes(0))
    fixed = sum(math.prod(s) for _, s in llama_shapes(0))
    return max(1, round((billions * 1e9 - fixed) / per_block))


def llama_config(blocks: int):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, num_hidden_layers=blocks, vocab_size=VOCAB,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config


def synthesise(path: Path, blocks: int, shard_mb: float, seed: int = 0, layout: str = "safetensors") -> int:
    """Write the sharded bf16 checkpoint (``layout`` ``bin``: the older pickled shards,
    ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``); returns its
    parameter count."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    llama_config(blocks).save_pretrained(path)
    shapes = llama_shapes(blocks)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    shape_of = dict(shapes)
    weight_map = {}
    for i, names in enumerate(shards):
        if layout == "bin":
            file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        else:
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shape_of[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        if layout == "bin":
            torch.save(tensors, path / file)
        else:
            save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    total = sum(math.prod(s) for _, s in shapes)
    index = "pytorch_model.bin.index.json" if layout == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps(
        {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=2))
    return total


# ---------------------------------------------------------------------------- children
def _peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


def child(mode: str, path: str, select: str | None = None, malloc: str = "command") -> dict:
    import torch

    if mode == "overhead":
        # Everything streaming does before it reads a weight: imports (Python, torch,
        # Transformers, this package), opening the checkpoint, the meta model and the plan; a
        # regex that matches no layer stops it there.
        from hf_tempbalance.streaming import analyze_checkpoint

        start = time.perf_counter()
        analyze_checkpoint(path, progress=False, select=r"(?!)")  # (matches nothing)
        return {"mode": mode, "seconds": time.perf_counter() - start,
                "peak_rss_mib": _peak_rss_mib(), "layers": 0, "alphas": []}
    if mode in ("stream", "memory") and malloc == "command":
        # What `hf-tempbalance analyze` does for its own process (cli.main): freed large blocks
        # go straight back to the OS (streaming.return_large_frees).
        from hf_tempbalance.streaming import return_large_frees

        return_large_frees()
    if mode == "stream":
        from hf_tempbalance.streaming import analyze_checkpoint

        start = time.perf_counter()
        report = analyze_checkpoint(path, progress=False, select=select)
        alphas = [r.alpha for r in report.layers]
    elif mode == "memory":
        from hf_tempbalance.analysis import analyze_model
        from hf_tempbalance.loading import resolve_model

        start = time.perf_counter()
        model = resolve_model(path).model
        report = analyze_model(model, progress=False, select=select)
        alphas = [r.alpha for r in report.layers]
    elif mode == "ww":
        import logging

        if os.environ.get("TB_WW_PATH"):
            # After everything else: a --target install brings its own numpy, safetensors, ...
            sys.path.append(os.environ["TB_WW_PATH"])
        import weightwatcher as ww
        from transformers import LlamaForCausalLM

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        start = time.perf_counter()
        if select is not None:
            raise SystemExit("weightwatcher has no --select here: run it without --select")
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        details = ww.WeightWatcher(model=model).analyze(randomize=False, plot=False)
        alphas = [float(a) for a in details["alpha"]]
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "peak_rss_mib": _peak_rss_mib(),
            "layers": len(alphas), "alphas": alphas}


def run_child(mode: str, path: Path, select: str | None = None,
              malloc: str = "command") -> dict | None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    extra = (["--select", select] if select is not None else []) + ["--malloc", malloc]
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(path), *extra], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {mode}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ww_available() -> bool:
    extra = os.environ.get("TB_WW_PATH")
    code = (f"import sys; sys.path.append({extra!r}); " if extra else "") + "import weightwatcher"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--ww-sizes", type=float, nargs="*", default=None,
                        help="sizes at which to run weightwatcher (default: all)")
    parser.add_argument("--modes", nargs="+", default=["stream", "memory", "ww"])
    parser.add_argument("--shard-mb", type=float, default=500)
    parser.add_argument("--layout", choices=["safetensors", "bin"], default="safetensors",
                        help="shard format (bin: pickled shards, read with weights_only=True)")
    parser.add_argument("--tmp", default=None, help="where the checkpoints are written (deleted)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--ww-path", default=None, metavar="DIR",
                        help="a `pip install --target DIR weightwatcher`, appended to sys.path "
                             "of the weightwatcher child only")
    parser.add_argument("--select", default=None, metavar="REGEX",
                        help="analyse only these layers (`analyze --layers`); loading is the same")
    parser.add_argument("--malloc", choices=["command", "default"], default="command",
                        help="our modes with `hf-tempbalance analyze`'s malloc setting (freed large "
                             "blocks go back to the OS) or glibc's default")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ww_path:
        os.environ["TB_WW_PATH"] = args.ww_path
    if args.child:
        print(json.dumps(child(*args.child, select=args.select, malloc=args.malloc)))
        return
    modes = [m for m in args.modes if m != "ww" or (ww_available() and args.select is None)]
    if "ww" in args.modes and "ww" not in modes:
        print("weightwatcher is not importable: its column is left out", file=sys.stderr)
    results = []
    for size in args.sizes:
        blocks = blocks_for(size)
        root = Path(tempfile.mkdtemp(prefix="tb_analyze_scale_", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            params = synthesise(root / "ckpt", blocks, args.shard_mb, layout=args.layout)
            files = sorted((root / "ckpt").glob("*.safetensors" if args.layout != "bin" else "*.bin"))
            print(f"{params / 1e9:.2f}B params, {blocks} blocks, {len(files)} shards, "
                  f"{sum(f.stat().st_size for f in files) / 2**30:.2f} GiB "
                  f"(written in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            row = {"size": size, "params": params, "blocks": blocks, "shards": len(files),
                   "largest_tensor_mib": 2 * VOCAB * WIDTH / 2**20}
            overhead = run_child("overhead", root / "ckpt")
            if overhead is not None:
                row["overhead_mib"] = overhead["peak_rss_mib"]
                print(f"  fixed overhead (imports, checkpoint headers, meta model, plan): "
                      f"{overhead['peak_rss_mib']:.0f} MiB", file=sys.stderr)
            for mode in modes:
                if mode == "ww" and args.ww_sizes is not None and size not in args.ww_sizes:
                    continue
                out = run_child(mode, root / "ckpt", args.select, args.malloc)
                if out is not None:
                    print(f"  {mode}: {out['seconds']:.1f} s, peak RSS {out['peak_rss_mib']:.0f} "
                          f"MiB, {out['layers']} layers", file=sys.stderr)
                    row[mode] = out
            if "stream" in row and "memory" in row:
                a, b = row["stream"]["alphas"], row["memory"]["alphas"]
                row["alphas_equal"] = len(a) == len(b) and all(
                    x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))
                row["alpha_max_rel_diff"] = max(
                    (abs(x - y) / abs(y) for x, y in zip(a, b) if math.isfinite(x) and y), default=0.0)
            results.append(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"({os.cpu_count()} CPUs); malloc: "
          + ("glibc's default (--malloc default)" if args.malloc == "default" else
             "as `hf-tempbalance analyze` (freed large blocks back to the OS)"))
    print_table(results, modes)
    print()
    print_working_set(results, modes)
    if args.json:
        for row in results:
            for mode in modes:
                if mode in row:
                    row[mode].pop("alphas", None)
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: list[dict], modes: list[str]) -> None:
    head = ["params", "layers"]
    for m in modes:
        head += [f"{m} time (s)", f"{m} peak RSS (MiB)"]
    head += ["stream/memory time", "stream/memory RSS"]
    if "ww" in modes:
        head += ["stream/ww time", "stream/ww RSS"]
    head += ["alphas stream vs memory (max rel. diff)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in results:
        cells = [f"{row['params'] / 1e9:.2f}B", str(row.get("stream", row.get("memory", {})).get("layers", "-"))]
        for m in modes:
            r = row.get(m)
            cells += [f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:.0f}"] if r else ["-", "-"]

        def ratio(a, b, key, row=row):
            return f"{row[a][key] / row[b][key]:.2f}" if a in row and b in row else "-"

        cells += [ratio("stream", "memory", "seconds"), ratio("stream", "memory", "peak_rss_mib")]
        if "ww" in modes:
            cells += [ratio("stream", "ww", "seconds"), ratio("stream", "ww", "peak_rss_mib")]
        diff = row.get("alpha_max_rel_diff")
        cells += ["-" if diff is None else ("identical" if row["alphas_equal"] else f"{diff:.1e}")]
        print("| " + " | ".join(cells) + " |")


def print_working_set(results: list[dict], modes: list[str]) -> None:
    """Peak RSS minus the fixed overhead, as a multiple of the largest weight tensor."""
    ours = [m for m in modes if m != "ww"]
    head = ["params", "largest tensor (MiB)", "fixed overhead (MiB)"]
    for m in ours:
        head += [f"{m} peak - overhead (MiB)", f"{m} (peak - overhead) / largest"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in results:
        over = row.get("overhead_mib")
        cells = [f"{row['params'] / 1e9:.2f}B", f"{row['largest_tensor_mib']:.0f}",
                 "-" if over is None else f"{over:.0f}"]
        for m in ours:
            if m in row and over is not None:
                extra = row[m]["peak_rss_mib"] - over
                cells += [f"{extra:.0f}", f"{extra / row['largest_tensor_mib']:.2f}"]
            else:
                cells += ["-", "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
