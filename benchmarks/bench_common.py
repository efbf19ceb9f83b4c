"""Shared pieces of the performance benchmarks: the models, the device, timers, memory probes.

Models (random initialisation, nothing is downloaded):

=========== ==========================================================================
name        model
=========== ==========================================================================
resnet18    CIFAR ResNet18 (3x3 stride-1 stem, no max-pool; ``recipes/models/cifar_timm``)
resnet34    CIFAR ResNet34
vgg16       CIFAR VGG16 with BatchNorm and one linear classifier
gpt2        GPT-2 small shape: ``GPT2Config()`` defaults (12 layers, width 768, 124M params)
llama       Llama-style decoder blocks: width 2048, MLP 5632, 32 heads, 4 KV heads (the
            TinyLlama-1.1B block shape), ``--llama-layers`` blocks (default 2), vocabulary 1024
mixtral     mixture-of-experts decoder blocks as Transformers 5 stores them (fused expert
            stacks): width 1024, 8 experts with MLP 1408, 16 heads, 4 KV heads,
            ``--llama-layers`` blocks (default 2), vocabulary 1024
toy         a 3-conv + 2-linear CNN for smoke tests (seconds on any machine)
yolov8n     Ultralytics' YOLOv8n detector (``yolov8n.yaml``, 20 classes as VOC; needs the
            ``ultralytics`` extra): the ESD work of the YOLO recipe's updates; no training
            step here (``TRAINABLE`` lists the models that have one)
=========== ==========================================================================

The device is ``--device`` or the ``TB_BENCH_DEVICE`` environment variable (``cpu``, ``cuda``,
``cuda:1``...); the default is ``cpu``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TRAINABLE = ("resnet18", "resnet34", "vgg16", "gpt2", "llama", "mixtral", "toy")
MODELS = (*TRAINABLE, "yolov8n")
VISION = ("resnet18", "resnet34", "vgg16", "toy")


def default_device() -> str:
    return os.environ.get("TB_BENCH_DEVICE", "cpu")


def resolve_device(name: str) -> torch.device:
    """The benchmark device, with a clear error when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; run on a GPU machine "
                         "or pass --device cpu")
    return device


def build_model(name: str, *, llama_layers: int = 2, seed: int = 0) -> nn.Module:
    """A randomly initialised model by name (see the module docstring)."""
    torch.manual_seed(seed)
    if name in ("resnet18", "resnet34", "vgg16"):
        if str(RECIPES) not in sys.path:
            sys.path.insert(0, str(RECIPES))
        import timm
        from models import cifar_timm  # noqa: F401  (registers the CIFAR models in timm)

        return timm.create_model(f"cifar_{name}", num_classes=100)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config())
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                             num_key_value_heads=4, num_hidden_layers=llama_layers,
                             vocab_size=1024, max_position_embeddings=512)
        return LlamaForCausalLM(config)
    if name == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(hidden_size=1024, intermediate_size=1408, num_attention_heads=16,
                               num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                               num_hidden_layers=llama_layers, vocab_size=1024,
                               max_position_embeddings=512)
        return MixtralForCausalLM(config)
    if name == "toy":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(512, 96), nn.ReLU(), nn.Linear(96, 10),
        )
    if name == "yolov8n":
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", nc=20, verbose=False)
    raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")


def make_batch(name: str, model: nn.Module, batch_size: int, seq_len: int,
               device: torch.device) -> tuple[dict[str, torch.Tensor], Callable[[Any], torch.Tensor]]:
    """Random inputs of the model's kind and the function that turns outputs into a loss."""
    if name in VISION:
        images = torch.randn(batch_size, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (batch_size,), device=device)
        return {"x": images}, lambda out: nn.functional.cross_entropy(out, labels)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    return {"input_ids": ids, "labels": ids}, lambda out: out.loss


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    if "x" in batch:
        return model(batch["x"])
    return model(**batch)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--json``, shared by the benchmark scripts."""
    parser.add_argument("--device", default=default_device(),
                        help="cpu, cuda, cuda:N (default: $TB_BENCH_DEVICE or cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run_with_threads(args: argparse.Namespace, run: Callable[[argparse.Namespace], Any]) -> Any:
    """``run(args)`` with ``args.threads`` torch threads, then the caller's setting back."""
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def start(args: argparse.Namespace, benchmark: str) -> torch.device:
    """The device of ``--device``, announced with the machine it runs on."""
    device = resolve_device(args.device)
    print(f"# {benchmark} on {machine(device)}", flush=True)
    return device


def report(args: argparse.Namespace, device: torch.device, title: str, headers: list[str],
           rows: list[list[Any]], **data: Any) -> None:
    """Print the results table under ``title``; write them to ``--json`` if given."""
    print(f"\n{title}:\n")
    print(markdown_table(headers, rows))
    write_json(args.json, device, **data)


def write_json(path: Path | None, device: torch.device, **data: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine(device), "device": str(device), **data},
                                   indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of ``fn()`` (device work included) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes the C heap has handed out (glibc ``mallinfo2``: in-use + mmapped), or None."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Peak extra memory while the ``with`` body runs, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at entry (exact for
    tensors). CPU: the C heap's bytes in use (glibc ``mallinfo2``, where torch's CPU tensors
    live; freed memory that the allocator keeps does not count) above the value at entry,
    sampled every millisecond by a thread, so allocations shorter than that can be missed.
    Without glibc it falls back to the growth of the resident set size (psutil), which misses
    memory the process already held.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        probe = _heap_in_use()
        if probe is None:
            import psutil

            process = psutil.Process()
            probe = lambda: process.memory_info().rss  # noqa: E731
        self._probe = probe
        self._base = self._max = probe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._probe())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._probe()) - self._base


def machine(device: torch.device) -> str:
    """One line naming the processor (or GPU), the threads and the load when this ran."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
             f"{torch.get_num_threads()} intra-op threads"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f}")
    return "; ".join(parts)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
