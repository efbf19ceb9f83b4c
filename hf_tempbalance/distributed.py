"""Sharing the ESD work across processes (DDP, FSDP2 under ``accelerate launch`` or ``torchrun``).

Every rank holds the same balanced layers in the same order. An update then:

1. splits the layers into ``world_size`` bins of about equal estimated cost (:func:`layer_cost`,
   greedy longest-processing-time, :func:`partition_by_cost`); the split depends only on the
   layer shapes, so every rank computes the same one without talking to the others;
2. computes the metrics of its own bin only;
3. runs ONE ``all_reduce`` (sum) of a ``(layers, values)`` float64 buffer in which each rank wrote
   its own rows and zeros elsewhere. Each entry is then ``x + 0 + ... + 0``, which is exactly
   ``x`` in IEEE arithmetic (NaN and ±inf included) whatever the reduction order, so every rank
   ends up with bit-identical values and hence bit-identical multipliers.

A single process never touches ``torch.distributed`` beyond asking whether it is initialised.

Sharded weights. The spectrum of a shard is not the spectrum of the layer, so a local shard is
never analysed:

* FSDP2 (``fully_shard``; Accelerate ``fsdp_version: 2``) and other DTensor parameters: each
  layer is gathered with ``DTensor.full_tensor()`` (a collective every rank joins, one layer at a
  time, in the same order); the owner keeps the full weight for its computation, the others drop
  it at once. Extra memory on a rank: the full weights of its own bin (about 1/world of the
  balanced weights) plus one layer.
* FSDP1 (``FullyShardedDataParallel``) replaces the weights by views into flattened, sharded
  ``FlatParameter`` s, and DeepSpeed ZeRO-3 by empty placeholders (``ds_id``/``ds_numel``): both
  are refused by :func:`check_unsharded` with an error naming what is supported.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .spectral.esd import gram_eig_cost
from .spectral.matrices import (
    ExpertStack,
    LoraAdapted,
    eval_parametrization,
    is_transposed_conv1d,
    layer_device,
    stack_shape,
    weight_name,
    weight_of,
)

__all__ = ["world", "is_main_process", "check_launch", "declared_shape", "layer_cost", "partition_by_cost",
           "check_unsharded", "sharded_metrics", "collective_device", "UNSUPPORTED_SHARDING"]

#: What is and is not supported, quoted by every refusal.
UNSUPPORTED_SHARDING = (
    "Supported: one device; DDP (accelerate launch / torchrun); FSDP2 (torch fully_shard; "
    "Accelerate `fsdp_version: 2`; the Trainer's default FSDP); DeepSpeed ZeRO-1/2 (weights stay "
    "whole). Not supported: FSDP1 (FullyShardedDataParallel turns weights into views of flattened "
    "shards that mix layers) and DeepSpeed ZeRO-3 (weights become empty placeholders); switch to "
    "FSDP2 (Accelerate `--fsdp_version 2`) or ZeRO-2."
)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_launch(training_processes: int, framework: str, fix: str) -> None:
    """Refuse processes that train separate models while sharing a launch.

    ``accelerate launch --multi_gpu`` on a machine without GPUs (and without
    ``ACCELERATE_USE_CPU=true``) starts several processes and even a process group, yet the
    framework trains an independent copy of the model in each. The engine would then shard one
    update across different models and mix their layers' alphas, so it stops instead.

    Args:
        training_processes: how many processes the framework itself trains with.
        framework: what reported ``training_processes``, for the message.
        fix: how to launch correctly, for the message.
    """
    launched = max(int(os.environ.get("WORLD_SIZE", "1")), world()[1])
    if launched > 1 and training_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched but {framework} trains with one, so every process "
            f"trains its own copy of the model and TempBalance would mix their layers. {fix}")


def is_main_process() -> bool:
    """True on rank 0 and in a single process (where printing and file writing happen)."""
    return world()[0] == 0


def declared_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Full weight shape implied by the module's own attributes (None for unknown kinds).

    Independent of the weight tensor, so it tells a whole weight from a local shard.
    """
    if isinstance(module, LoraAdapted):
        return module.shape  # (its parts are checked one by one, see check_unsharded)
    if is_transposed_conv1d(module):
        nx = getattr(module, "nx", None)
        return (nx, module.nf) if nx is not None else None
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.MultiheadAttention):
        return (3 * module.embed_dim, module.embed_dim)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, nn.Embedding):
        return (module.num_embeddings, module.embedding_dim)
    return None


def _full_shape(module: nn.Module) -> tuple[int, ...]:
    shape = declared_shape(module)
    return shape if shape is not None else tuple(weight_of(module).shape)


def layer_cost(module: nn.Module | torch.Tensor) -> float:
    """Estimated flops of one layer's ESD: ``k · (2·r·d² + 4/3·d³)``.

    ``k`` matrices (kernel positions) of ``r x d`` with ``d = min side``: the Gram product costs
    ``2·r·d²``, the symmetric eigensolver about ``4/3·d³``. Computed from the full (declared) shape,
    so sharded weights cost the same on every rank.
    """
    shape = tuple(module.shape) if isinstance(module, torch.Tensor) else _full_shape(module)
    k, m, n = stack_shape(module, shape)
    return k * gram_eig_cost(m, n)


def partition_by_cost(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Greedy longest-processing-time split of item indices into ``parts`` bins of similar cost.

    Items go, most expensive first, to the bin with the least cost so far; the largest bin is at
    most ``4/3 - 1/(3·parts)`` times the best possible (Graham 1969). Deterministic (ties broken
    by index, then by bin number), so every rank computes the same partition. Returns each bin's
    indices, ascending.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    bins: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, b) for b in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + float(costs[i]), b))
    return [sorted(b) for b in bins]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(tensor, DTensor)


def _refuse(what: str, module_name: str) -> RuntimeError:
    return RuntimeError(f"TempBalance cannot analyse {module_name}: {what}. {UNSUPPORTED_SHARDING}")


def check_unsharded(modules: Sequence[nn.Module] | Mapping[str, nn.Module],
                    model: nn.Module | None = None, *, allow_dtensor: bool = True) -> None:
    """Refuse weights whose local tensor is a shard that cannot be gathered here.

    Raises ``RuntimeError`` (naming what is supported) for DeepSpeed ZeRO-3 parameters
    (``ds_id``/``ds_numel``), FSDP1 ``FlatParameter`` s and the views FSDP1 leaves in their place,
    and any weight whose shape differs from the shape its module declares. DTensor (FSDP2)
    weights pass when ``allow_dtensor`` (they are gathered by :func:`sharded_metrics`).
    ``modules`` may map layer names to modules (the names then appear in the error). ``model``, if
    given, is scanned too, so a model wrapped before discovery (where every layer looks too small)
    is refused instead of silently balancing nothing.
    """
    named = (list(modules.items()) if isinstance(modules, Mapping)
             else [(type(m).__name__, m) for m in modules])
    # A LoRA-adapted layer is checked through its parts: the base layer and each adapter's A / B.
    named = [part for label, module in named for part in (
        [(f"{label}.base_layer", module.base)] + [
            (f"{label}.lora_{ab}.{adapter}", getattr(module.owner, f"lora_{ab}")[adapter])
            for adapter in module.adapter_names() for ab in "AB"]
        if isinstance(module, LoraAdapted) else [(label, module)])]
    if model is not None:
        for pname, param in model.named_parameters():
            if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
                raise _refuse("its parameters are partitioned by DeepSpeed ZeRO-3", pname)
            if type(param).__name__ == "FlatParameter" or getattr(param, "_fsdp_flattened", False):
                raise _refuse("its parameters are flattened and sharded by FSDP1", pname)
    for label, module in named:
        name = weight_name(module)
        with eval_parametrization(module):  # reading a spectral-norm weight must change nothing
            weight = getattr(module, name, None)
        if weight is None:
            continue
        if hasattr(weight, "ds_id") or hasattr(weight, "ds_numel"):
            raise _refuse("its weight is partitioned by DeepSpeed ZeRO-3", label)
        # A weight is a parameter or the output of a parametrization; FSDP1 (without
        # use_orig_params) leaves a plain tensor view of its flat shard in its place.
        registered = isinstance(weight, nn.Parameter)
        parametrized = parametrize.is_parametrized(module, name)
        if type(weight).__name__ == "FlatParameter" or getattr(weight, "_fsdp_flattened", False) \
                or not (registered or parametrized):
            raise _refuse("its weight is a view into an FSDP1 FlatParameter shard", label)
        if _is_dtensor(weight):
            if not allow_dtensor:
                raise RuntimeError(
                    f"{label} has a DTensor (FSDP2/tensor-parallel) weight, which spectral-norm "
                    "regularisation (snr_strength > 0) does not support; run SNR under DDP.")
            continue
        expected = declared_shape(module)
        if expected is not None and tuple(weight.shape) != expected:
            raise _refuse(f"its weight has local shape {tuple(weight.shape)} but the layer is "
                          f"{expected}, so it is a shard", label)


def collective_device(hint: torch.device) -> torch.device:
    """Device for a tensor handed to a collective of the default process group.

    gloo/mpi reduce CPU tensors; nccl (and the other accelerator backends) only device tensors;
    a multi-device backend such as ``cpu:gloo,cuda:nccl`` takes either, so ``hint`` (where the
    weights live) is kept.
    """
    backend = str(dist.get_backend()).lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if ":" in backend:
        return hint
    if hint.type != "cpu":
        return hint
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return hint


def _gathered(module: nn.Module, keep: bool) -> nn.Module | torch.Tensor | None:
    """The whole weight of a DTensor layer (collective: every rank calls it), else the module."""
    if isinstance(module, LoraAdapted):
        if any(_is_dtensor(p) for p in (module.base.weight, *module.adapter_parameters())):
            raise RuntimeError(
                "TempBalance does not gather FSDP2/DTensor-sharded LoRA layers (W0 + s·B·A of a "
                "sharded base and adapters); train LoRA with DDP, or leave the adapted layers out "
                "with TempBalanceConfig(exclude=[...]).")
        return module if keep else None
    weight = weight_of(module)
    if not _is_dtensor(weight):
        return module if keep else None
    full = weight.detach().full_tensor()
    if not keep:
        return None
    if isinstance(module, ExpertStack):  # keep it a stack of matrices, not a conv weight
        return ExpertStack(SimpleNamespace(weight=full), "weight")
    # As weight_matrices(module) would see it: GPT-2 Conv1D stores (in, out).
    return full.t() if is_transposed_conv1d(module) else full


def sharded_metrics(
    modules: Sequence[nn.Module],
    compute: Callable[[Sequence[nn.Module | torch.Tensor], Sequence[int]], list[list[float]]],
    num_values: int,
    device: torch.device | None = None,
) -> tuple[list[list[float]], list[int]]:
    """Compute ``compute(subset)`` on this rank's share and give every rank all rows.

    Args:
        modules: the balanced layers, identical (and in the same order) on every rank.
        compute: ``compute(layers, indices)`` maps a list of layers (modules, or whole weight
            tensors for DTensor layers) and their indices in ``modules`` to one row of
            ``num_values`` floats per layer.
        num_values: floats per layer.
        device: where the weights live (a hint for the collective's device; default: the first
            layer's weight device).

    Returns:
        ``(rows, mine)``: ``rows[i]`` the floats of layer ``i`` (bit-identical on every rank)
        and the indices this rank computed itself (all of them in a single process).
    """
    rank, size = world()
    if size == 1:
        mine = list(range(len(modules)))
    else:
        mine = partition_by_cost([layer_cost(m) for m in modules], size)[rank]
    owned = set(mine)
    inputs = [_gathered(m, i in owned) for i, m in enumerate(modules)]
    local = compute([inputs[i] for i in mine], mine) if mine else []
    if size == 1:
        return [list(map(float, row)) for row in local], mine
    hint = device if device is not None else (layer_device(modules[0]) if modules else torch.device("cpu"))
    buffer = torch.zeros(len(modules), num_values, dtype=torch.float64)
    if mine:
        buffer[mine] = torch.tensor(local, dtype=torch.float64).reshape(len(mine), num_values)
    buffer = buffer.to(collective_device(hint))
    dist.all_reduce(buffer)
    return buffer.cpu().tolist(), mine
