"""Sharing the ESD work across processes (DDP under ``accelerate launch`` or ``torchrun``).

Each rank computes the metrics of its share of the layers, balanced by estimated cost (not by
count), then one ``all_reduce`` of a float64 vector, where every rank wrote only its own entries
and zeros elsewhere, gives every rank the same, bit-identical values (``x + 0 == x`` exactly).

A single process never touches ``torch.distributed`` beyond asking whether it is initialised.
Sharded weights (FSDP, DeepSpeed ZeRO-3) are refused: their local tensors are shards, and the
spectrum of a shard is not the spectrum of the layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .spectral.matrices import weight_matrices

__all__ = ["world", "layer_cost", "partition_by_cost", "sharded_metrics", "check_unsharded"]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def layer_cost(module: nn.Module | torch.Tensor) -> float:
    """Flops of the Gram + eigvalsh path for one layer: k · (2·r·d² + 4/3·d³), d = min side."""
    mats = weight_matrices(module)
    k, m, n = mats.shape
    d, r = min(m, n), max(m, n)
    return k * (2.0 * r * d * d + 4.0 / 3.0 * d ** 3)


def partition_by_cost(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Greedy longest-processing-time split of item indices into ``parts`` balanced bins.

    Deterministic (ties broken by index), so every rank computes the same partition.
    """
    bins: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, b) for b in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return [sorted(b) for b in bins]


def check_unsharded(modules: Sequence[nn.Module]) -> None:
    """Refuse weights that are shards (FSDP / ZeRO-3) with an error naming what is supported."""
    for module in modules:
        weight = module.weight
        cls = type(weight).__name__
        if cls in ("DTensor", "FlatParameter") or hasattr(weight, "ds_id") or hasattr(weight, "_sharded_size") \
                or (weight.numel() == 0 and hasattr(module, "weight")):
            raise RuntimeError(
                f"{type(module).__name__} weights are sharded ({cls}); TempBalance needs whole weight "
                "matrices. Supported: single device, DDP (accelerate launch / torchrun, multi-GPU), "
                "DeepSpeed ZeRO-1/2. Not supported: FSDP and DeepSpeed ZeRO-3 (use ZeRO-2 or DDP)."
            )


def sharded_metrics(
    modules: Sequence[nn.Module],
    compute: Callable[[Sequence[nn.Module]], list[list[float]]],
    num_values: int,
    device: torch.device,
) -> tuple[list[list[float]], list[int]]:
    """Compute ``compute(subset)`` on this rank's share and gather all rows on every rank.

    Returns ``(rows, mine)``: ``rows[i]`` the ``num_values`` floats of layer ``i``, and the
    indices this rank computed itself.
    """
    rank, size = world()
    if size == 1:
        return compute(modules), list(range(len(modules)))
    mine = partition_by_cost([layer_cost(m) for m in modules], size)[rank]
    buffer = torch.zeros(len(modules), num_values, dtype=torch.float64, device=device)
    if mine:
        local = compute([modules[i] for i in mine])
        buffer[mine] = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return buffer.cpu().tolist(), mine
