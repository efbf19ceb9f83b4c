r"""Streaming analysis of a ``save_pretrained`` checkpoint, one block of one weight at a time.

``hf-tempbalance analyze DIR`` on a ``save_pretrained`` folder (sharded or single-file
safetensors, sharded or single ``pytorch_model.bin``) never builds the model with its weights:

1. The files are opened and checked first (:mod:`hf_tempbalance.checkpoint_files`: a missing
   shard, a truncated shard or an index naming a tensor its shard does not hold stops with one
   line naming the file, before any work). ``.bin`` shards are only ever read with
   ``torch.load(weights_only=True, mmap=True)``.
2. The module structure comes from ``config.json``: the Transformers class is built on the
   ``meta`` device (no weight memory), and :func:`~hf_tempbalance.layers.discover_layers` finds
   the layers exactly as for the loaded model: the same names, kinds, ``balanced`` flags, tied
   weights counted once (by parameter identity, which the meta model shares too).
3. Each layer is mapped to the checkpoint tensors it is made of with Transformers' own
   checkpoint conversion rules (``get_model_conversion_mapping``): a renamed key, a tied weight
   stored under its other name (``lm_head`` = ``embed_tokens``), or several tensors fused into
   one parameter (Mixtral's per-expert ``w1``/``w3``/``w2`` into the ``gate_up_proj`` /
   ``down_proj`` expert stacks). A packed q/k/v projection is one tensor in the checkpoint and
   one matrix here, as in memory.
4. The conversion is not run on the data: its operations (stack the experts, concatenate gate
   and up) are read as a layout, so that every matrix of a layer is a
   :class:`~hf_tempbalance.spectral.gram_blocks.BlockMatrix` of stored pieces. Its Gram is
   accumulated from row (or column) blocks read straight from the files, in the engine's
   precision, and solved by the engine's ``eigvalsh``
   (:func:`~hf_tempbalance.spectral.gram_blocks.block_eigvals`): no weight is ever held whole,
   not even in its stored dtype. A layout this reading does not know (another conversion
   operation, a convolution kernel) falls back to building that one parameter whole and
   running :func:`~hf_tempbalance.spectral.batched_esd` on it, as the in-memory path does.
5. Matrices run on worker threads (one per torch thread on CPU, each single-threaded, as in the
   engine), as many at once as fit in a byte budget of one largest stored tensor (a bigger
   matrix alone). The eigenvalues go through the same metric code as the in-memory path
   (``analysis._rows``).

Peak memory is therefore the fixed overhead (Python, torch, Transformers) plus at most about one
largest stored tensor's worth of working sets (each: one block, a ``d x d`` Gram and
``eigvalsh``'s copy of it): it does not grow with the number of layers
(``benchmarks/analyze_scale.py`` measures it).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import ModelAnalysis, _Item, _rows, _selected
from .checkpoint_files import (
    LAYOUTS,
    SAFETENSORS_INDEX,
    CheckpointFiles,
    find_layout,
    open_checkpoint,
)
from .config import TempBalanceConfig
from .distributed import world
from .layers import discover_layers
from .loading import ModelLoadError, _natural_key
from .spectral import batched_esd, resolve_dtype
from .spectral.esd import gram_eig_cost, one_intra_op_thread
from .spectral.gram_blocks import BLOCK_ELEMENTS, BlockMatrix, block_eigvals, block_working_bytes
from .spectral.matrices import ExpertStack, is_transposed_conv1d, stack_shape, weight_name

__all__ = ["INDEX_FILE", "is_streamable", "analyze_checkpoint", "return_large_frees"]

#: The sharded safetensors index (the other streamable layouts: ``checkpoint_files.LAYOUTS``).
INDEX_FILE = SAFETENSORS_INDEX


def is_streamable(path: str | os.PathLike) -> bool:
    """A ``save_pretrained`` directory: a Transformers ``config.json`` (``model_type``) and one of
    ``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json``,
    ``pytorch_model.bin``."""
    path = Path(path)
    if find_layout(path) is None or not (path / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """Make glibc give every freed allocation of ``threshold`` bytes or more back to the OS at
    once (``mallopt(M_MMAP_THRESHOLD)``); True if it was set.

    By default glibc raises its mmap threshold each time a large block is freed, so that later
    blocks up to 32 MiB come from per-thread heaps, which keep freed space instead of returning
    it. Streaming frees a block or a Gram (megabytes) many times per matrix on several threads:
    measured on a 0.26B Llama checkpoint, that held ~220 MiB more at the peak than the working
    set (``docs/performance.md``). The setting is process-wide and permanent (glibc has no way
    back to its adaptive threshold), so the command line sets it for its own process
    (``hf-tempbalance analyze``) and a library call never does; set ``MALLOC_MMAP_THRESHOLD_=
    1048576`` in the environment for the same effect in your own program. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


# ---------------------------------------------------------------------------- model structure
def _meta_model(path: Path, trust_remote_code: bool) -> nn.Module:
    """The model of ``path/config.json`` on the meta device (structure only, no weights)."""
    from .loading import _hf_class, _hf_config

    config = _hf_config(str(path), trust_remote_code=trust_remote_code, revision=None)
    cls = _hf_class(config)
    try:
        with torch.device("meta"):
            if cls.__name__.startswith("Auto"):
                model = cls.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = cls(config)
    except Exception as err:
        raise ModelLoadError(f"could not build the structure of {path} from its config.json "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                             "analyse it in memory with --no-stream") from err
    return model.eval()


@dataclass
class _Source:
    """How one model parameter is made from checkpoint tensors."""

    keys: list[str]
    converter: Any = None  # a transformers WeightConverter, or None for one tensor as it is
    patterns: dict[str, str] = field(default_factory=dict)  # checkpoint key -> source pattern


def _parameter_sources(model: nn.Module, checkpoint: CheckpointFiles) -> dict[str, _Source]:
    """Model parameter name -> the checkpoint tensors it is made of (Transformers' rules)."""
    renamings: list = []
    converters: list = []
    rename = None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        rename = rename_source_key
    except ImportError:  # Transformers 4: checkpoint keys are the parameter names
        pass
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    sources: dict[str, _Source] = {}
    for key in sorted(checkpoint.tensors, key=_natural_key):
        pattern = None
        target = key
        if rename is not None:
            target, pattern = rename(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and prefix and f"{prefix}.{target}" in meta_state:
            target = f"{prefix}.{target}"
        source = sources.setdefault(target, _Source([]))
        source.keys.append(key)
        if pattern is not None:
            source.converter = next(c for c in converters if pattern in c.source_patterns)
            source.patterns[key] = pattern
    return sources


def _build(source: _Source, checkpoint: CheckpointFiles, name: str) -> torch.Tensor:
    """The parameter ``name`` from its checkpoint tensors (read now, converted as on loading)."""
    if source.converter is None:
        return checkpoint.read(source.keys[0])
    grouped: dict[str, list[torch.Tensor]] = {p: [] for p in source.converter.source_patterns}
    for key in source.keys:  # natural order: expert 0, 1, ..., 10
        grouped[source.patterns[key]].append(checkpoint.read(key))
    tensors: dict[str, Any] = grouped
    for op in source.converter.operations:
        tensors = op.convert(tensors, source_patterns=source.converter.source_patterns,
                             target_patterns=source.converter.target_patterns,
                             full_layer_name=name)
    (out,) = tensors.values()
    return out


class _Holder:
    """Stands in for an experts module: ``ExpertStack(holder, name)`` reads ``holder.name``."""


@dataclass
class _Planned:
    name: str
    type: str
    param: str  # the model parameter the layer's weight is
    shape: tuple[int, ...]  # full weight shape as stored in the model
    kind: str  # "plain", "conv1d" (transposed), "experts"
    balanced: bool
    nbytes: int = 0

    def cost(self) -> float:
        if self.kind == "experts":
            k, m, n = self.shape
        else:
            k, m, n = stack_shape(torch.empty(0), self.shape)
        return k * gram_eig_cost(m, n)


def _plan(model: nn.Module, config: TempBalanceConfig, layers: str, select: str | None,
          sources: dict[str, _Source], checkpoint: CheckpointFiles) -> list[_Planned]:
    balanced = set(discover_layers(model, config).names)
    plan = discover_layers(model, config if layers == "balanced"
                           else config.replace(exclude_first_last=False, min_eigs=0))
    # Every name of every parameter (tied weights have several), to find the one stored.
    aliases: dict[int, list[str]] = defaultdict(list)
    for pname, param in model.named_parameters(remove_duplicate=False):
        aliases[id(param)].append(pname)
    module_names = {id(m): n for n, m in model.named_modules()}
    planned = []
    for layer in plan.layers:
        if not _selected(layer.name, select):
            continue
        module = layer.module
        if isinstance(module, ExpertStack):
            param = getattr(module.owner, module.param_name)
            kind, type_name = "experts", "ExpertStack"
        else:
            param = getattr(module, weight_name(module))
            kind = "conv1d" if is_transposed_conv1d(module) else "plain"
            type_name = type(module).__name__
        names = aliases.get(id(param)) or [f"{module_names.get(id(module), layer.name)}.{weight_name(module)}"]
        stored = next((n for n in names if n in sources), None)
        if stored is None:
            raise ModelLoadError(
                f"{checkpoint.path / checkpoint.layout} lists no tensor for layer {layer.name} (looked "
                f"for {', '.join(names)}); the checkpoint does not match its config.json, or "
                "its format needs the full loader: analyse it with --no-stream")
        source = sources[stored]
        nbytes = sum(checkpoint.tensors[k].nbytes for k in source.keys)
        planned.append(_Planned(layer.name, type_name, stored, tuple(param.shape), kind,
                                layer.name in balanced, nbytes))
    return planned


def _layer_of(p: _Planned, weight: torch.Tensor) -> nn.Module | torch.Tensor:
    """What :func:`~hf_tempbalance.spectral.batched_esd` reads, sliced as in memory."""
    if p.kind == "experts":
        holder = _Holder()
        holder.weight = weight
        return ExpertStack(holder, "weight")
    if p.kind == "conv1d":
        return weight.t()  # Conv1D stores (in, out); the in-memory path transposes too
    return weight


def _item_shape(p: _Planned) -> tuple[int, ...]:
    return p.shape[::-1] if p.kind == "conv1d" else p.shape


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Leaf:
    key: str
    index: int | None = None  # one matrix of a stored 3-D stack


@dataclass(frozen=True)
class _Stack:  # MergeModulelist(dim=0): the items stacked along a new first axis
    items: tuple


@dataclass(frozen=True)
class _Cat:  # Concatenate(dim): the items joined along an existing axis
    items: tuple
    dim: int


class _FilePiece:
    """One stored matrix (``key``, or ``key[index]`` of a 3-D stack), read in blocks."""

    def __init__(self, checkpoint: CheckpointFiles, leaf: _Leaf) -> None:
        self.checkpoint, self.key, self.index = checkpoint, leaf.key, leaf.index
        self.rows, self.cols = checkpoint.tensors[leaf.key].shape[-2:]

    def read(self, axis: int, lo: int, hi: int) -> torch.Tensor:
        return self.checkpoint.read_block(self.key, self.index, axis, lo, hi)


def _ndim(sym: Any, checkpoint: CheckpointFiles) -> int:
    if isinstance(sym, _Leaf):
        return len(checkpoint.tensors[sym.key].shape) - (sym.index is not None)
    if isinstance(sym, _Stack):
        return 1 + _ndim(sym.items[0], checkpoint)
    return _ndim(sym.items[0], checkpoint)


def _layout(source: _Source, checkpoint: CheckpointFiles) -> Any:
    """The parameter as a tree of stored tensors, read from the conversion's operations (None
    for an operation other than stacking experts and concatenating)."""
    if source.converter is None:
        return _Leaf(source.keys[0]) if len(source.keys) == 1 else None
    patterns = source.converter.source_patterns
    values: dict[str, Any] = {p: [] for p in patterns}
    for key in source.keys:  # natural order: expert 0, 1, ..., 10
        values[source.patterns[key]].append(_Leaf(key))
    for op in source.converter.operations:
        kind = type(op).__name__
        if kind == "MergeModulelist" and getattr(op, "dim", None) == 0:
            values = {p: _Stack(tuple(v)) if isinstance(v, list) else v for p, v in values.items()}
        elif kind == "Concatenate":
            items: list = []
            for p in patterns:  # the order of the source patterns, as the operation keeps it
                if p in values:
                    v = values.pop(p)
                    items += v if isinstance(v, list) else [v]
            if not items or values:
                return None
            ndim = _ndim(items[0], checkpoint)
            values = {"out": _Cat(tuple(items), op.dim % ndim)}
        else:
            return None
    if len(values) != 1:
        return None
    (value,) = values.values()
    if isinstance(value, list):
        return value[0] if len(value) == 1 else None
    return value


def _index(sym: Any, e: int, checkpoint: CheckpointFiles) -> Any:
    """Matrix ``e`` of a 3-D layout (None if it is not a union of whole stored pieces)."""
    if isinstance(sym, _Stack):
        return sym.items[e]
    if isinstance(sym, _Leaf) and sym.index is None and len(checkpoint.tensors[sym.key].shape) == 3:
        return _Leaf(sym.key, e)
    if isinstance(sym, _Cat) and sym.dim >= 1:
        parts = [_index(item, e, checkpoint) for item in sym.items]
        return None if any(p is None for p in parts) else _Cat(tuple(parts), sym.dim - 1)
    return None


def _matrix(sym: Any, checkpoint: CheckpointFiles) -> BlockMatrix | None:
    """A 2-D layout as pieces joined along one axis (None for anything else)."""
    if isinstance(sym, _Leaf) and _ndim(sym, checkpoint) == 2:
        return BlockMatrix((_FilePiece(checkpoint, sym),))
    if isinstance(sym, _Cat) and sym.dim in (0, 1):
        leaves: list[_Leaf] = []
        for item in sym.items:
            if isinstance(item, _Cat) and item.dim == sym.dim:
                item_matrix = _matrix(item, checkpoint)
                if item_matrix is None:
                    return None
                leaves += [_Leaf(p.key, p.index) for p in item_matrix.pieces]
            elif isinstance(item, _Leaf) and _ndim(item, checkpoint) == 2:
                leaves.append(item)
            else:
                return None
        try:
            return BlockMatrix(tuple(_FilePiece(checkpoint, leaf) for leaf in leaves), sym.dim)
        except ValueError:
            return None
    return None


def _block_matrices(p: _Planned, source: _Source,
                    checkpoint: CheckpointFiles) -> list[BlockMatrix] | None:
    """The matrices of a planned layer as stored pieces, or None: build it whole instead."""
    layout = _layout(source, checkpoint)
    if layout is None:
        return None
    if p.kind == "experts":
        matrices = []
        for e in range(p.shape[0]):
            sub = _index(layout, e, checkpoint)
            matrices.append(None if sub is None else _matrix(sub, checkpoint))
    elif len(p.shape) == 2:
        matrices = [_matrix(layout, checkpoint)]
    else:  # a convolution kernel: its slices are not rows of the file
        return None
    if any(m is None or m.shape != tuple(p.shape[-2:]) for m in matrices):
        return None
    return matrices  # type: ignore[return-value]


# ---------------------------------------------------------------------------- running
@dataclass
class _Task:
    layer: int  # index into the plan
    slot: int  # which matrix of the layer
    matrix: BlockMatrix | None  # None: the whole layer, built and run through batched_esd
    cost: float  # flops, for the progress bar
    nbytes: int  # working set while it runs
    order: tuple  # file position of its first piece: read the files front to back


def _tasks(planned: list[_Planned], sources: dict[str, _Source], checkpoint: CheckpointFiles,
           dtype: torch.dtype, block_elements: int) -> list[_Task]:
    item = torch.empty((), dtype=dtype).element_size()
    tasks = []
    for i, p in enumerate(planned):
        source = sources[p.param]
        first = checkpoint.tensors[source.keys[0]]
        order = (str(first.file), first.begin, _natural_key(source.keys[0]))
        matrices = _block_matrices(p, source, checkpoint)
        if matrices is None:
            k, m, n = p.shape if p.kind == "experts" else stack_shape(torch.empty(0), p.shape)
            d = min(m, n)
            working = p.nbytes + k * m * n * item + 2 * k * d * d * item
            tasks.append(_Task(i, 0, None, p.cost(), working, order))
            continue
        stored = first.dtype.itemsize
        for slot, matrix in enumerate(matrices):
            working = block_working_bytes(matrix.shape, stored, dtype, block_elements)
            tasks.append(_Task(i, slot, matrix, gram_eig_cost(*matrix.shape), working, order))
    tasks.sort(key=lambda t: (t.order, t.layer, t.slot))
    return tasks


def _run_bounded(tasks: list[_Task], run: Callable[[_Task], torch.Tensor], workers: int,
                 budget: int, done: Callable[[_Task], None]) -> list[torch.Tensor]:
    """``run`` every task on ``workers`` threads, never more than ``budget`` working bytes at
    once (a task larger than the budget runs alone); the first error stops the submissions and
    is raised."""
    if workers <= 1:
        out = []
        for task in tasks:
            out.append(run(task))
            done(task)
        return out
    cond = threading.Condition()
    state = {"bytes": 0, "running": 0, "failed": False}

    def finish(task: _Task, future: Future) -> None:
        with cond:
            state["bytes"] -= task.nbytes
            state["running"] -= 1
            if future.cancelled() or future.exception() is not None:
                state["failed"] = True
            cond.notify_all()
        if not state["failed"]:
            done(task)

    futures: list[Future] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="tempbalance-stream") as pool:
        for task in tasks:
            with cond:
                cond.wait_for(lambda t=task: state["failed"] or state["running"] == 0 or (
                    state["running"] < workers and state["bytes"] + t.nbytes <= budget))
                if state["failed"]:
                    break
                state["bytes"] += task.nbytes
                state["running"] += 1
            future = pool.submit(run, task)
            future.add_done_callback(functools.partial(finish, task))
            futures.append(future)
    return [f.result() for f in futures]


def analyze_checkpoint(
    path: str | os.PathLike,
    config: TempBalanceConfig | None = None,
    *,
    layers: str = "all",
    select: str | None = None,
    dtype: str | torch.dtype | None = None,
    keep_esds: bool = False,
    progress: bool | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    on_read: Callable[[str, torch.Tensor], None] | None = None,
    block_elements: int = BLOCK_ELEMENTS,
) -> ModelAnalysis:
    """:func:`~hf_tempbalance.analysis.analyze_model` of a ``save_pretrained`` checkpoint,
    streamed (see the module docstring): the same rows, in the same order, without loading it.

    Args:
        path: a ``save_pretrained`` directory (``model.safetensors.index.json``,
            ``model.safetensors``, ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``).
        config, layers, dtype, keep_esds: as for :func:`~hf_tempbalance.analysis.analyze_model`.
        select: analyse only the layers whose name matches this regex (``re.search``).
        progress: progress bar with an ETA (default: on, on the main process).
        trust_remote_code: allow a config that needs code from the checkpoint's repository.
        device: where the spectra are computed (each block is moved there after reading).
        on_read: called with ``(key, tensor)`` for each tensor or block read (instrumentation).
        block_elements: elements per block read (``gram_blocks.BLOCK_ELEMENTS``; tests make it
            small).
    """
    config = TempBalanceConfig.build(config)
    if layers not in ("all", "balanced"):
        raise ValueError(f"layers must be 'all' or 'balanced', got {layers!r}")
    path = Path(path)
    if find_layout(path) is None:
        raise ModelLoadError(f"{path} has none of {', '.join(LAYOUTS)}: not a save_pretrained "
                             "checkpoint")
    if select is not None:
        try:
            re.compile(select)
        except re.error as err:
            raise ModelLoadError(f"--layers {select!r} is not a regular expression ({err})") from err
    checkpoint = open_checkpoint(path, on_read=on_read)
    model = _meta_model(path, trust_remote_code)
    sources = _parameter_sources(model, checkpoint)
    planned = _plan(model, config, layers, select, sources, checkpoint)
    del model
    dtype = resolve_dtype(dtype if dtype is not None else config.dtype)
    device = torch.device(device)
    show = (True if progress is None else progress) and world()[0] == 0
    tasks = _tasks(planned, sources, checkpoint, dtype, block_elements)
    budget = max((p.nbytes for p in planned), default=0)
    workers = max(1, torch.get_num_threads()) if device.type == "cpu" else 1

    def run(task: _Task) -> torch.Tensor:
        if task.matrix is not None:
            return block_eigvals(task.matrix, dtype, device, block_elements)
        p = planned[task.layer]
        weight = _build(sources[p.param], checkpoint, p.param).to(device)
        return batched_esd([_layer_of(p, weight)], dtype=dtype)[0]

    # The bar advances by estimated flops, so its ETA weighs a big matrix more than a small
    # one; the postfix counts matrices.
    total = sum(t.cost for t in tasks) / 1e9
    lock = threading.Lock()
    with tqdm(total=total, unit="Gflop", desc="ESD (streaming)", disable=not show,
              bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]",
              dynamic_ncols=True) as bar:
        finished = [0]

        def done(task: _Task) -> None:
            with lock:
                finished[0] += 1
                bar.set_postfix_str(f"{finished[0]}/{len(tasks)} matrices", refresh=False)
                bar.update(task.cost / 1e9)

        # Whole matrices per thread, each single-threaded (see spectral/esd.py: LAPACK's own
        # threading of one eigensolver stalls on shared cores).
        with one_intra_op_thread() if workers > 1 else nullcontext():
            eigs = _run_bounded(tasks, run, workers, budget, done)
    close = getattr(checkpoint, "close", None)
    if close is not None:
        close()

    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for task, values in zip(tasks, eigs):
        by_layer[task.layer].append((task.slot, values))
    items, eig_list = [], []
    for i, p in enumerate(planned):
        parts = [v for _, v in sorted(by_layer[i], key=lambda sv: sv[0])]
        eig_list.append(parts[0] if len(parts) == 1 else torch.sort(torch.cat(parts)).values)
        meta = torch.empty(p.shape, device="meta")
        items.append(_Item(p.name, p.type, _item_shape(p), _layer_of(p, meta), p.balanced))
    return ModelAnalysis(_rows(items, eig_list, config, keep_esds), config)
