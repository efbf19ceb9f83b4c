r"""Streaming analysis of a sharded safetensors checkpoint, one weight tensor at a time.

``hf-tempbalance analyze DIR`` on a ``save_pretrained`` folder with a
``model.safetensors.index.json`` never builds the model with its weights:

1. The index and the header of every shard are read and checked first (a missing shard, a
   truncated shard or an index naming a tensor its shard does not hold stops with one line
   naming the file, before any work).
2. The module structure comes from ``config.json``: the Transformers class is built on the
   ``meta`` device (no weight memory), and :func:`~hf_tempbalance.layers.discover_layers` finds
   the layers exactly as for the loaded model: the same names, kinds, ``balanced`` flags, tied
   weights counted once (by parameter identity, which the meta model shares too).
3. Each layer is mapped to the checkpoint tensors it is made of with Transformers' own
   checkpoint conversion rules (``get_model_conversion_mapping``): a renamed key, a tied weight
   stored under its other name (``lm_head`` = ``embed_tokens``), or several tensors fused into
   one parameter (Mixtral's per-expert ``w1``/``w3``/``w2`` into the ``gate_up_proj`` /
   ``down_proj`` expert stacks, by the same conversion operations). A packed q/k/v projection is
   one tensor in the checkpoint and one matrix here, as in memory.
4. Layers are read in groups of equal Gram size, each group at most as many bytes as the largest
   single weight (a bigger weight alone) and several matrices large (one per worker thread on
   CPU), with plain ``pread``-style reads into tensors of the
   stored dtype (no memory map, so no shard stays resident), and go through the same
   :func:`~hf_tempbalance.spectral.batched_esd` + metric code as the in-memory path
   (``analysis._chunk_results``). Each group is dropped before the next is read.

Peak memory is therefore the fixed overhead (Python, torch, Transformers) plus about one largest
weight's worth of tensors plus the eigensolver's float32 working copy of one group: it does not
grow with the number of layers (``benchmarks/analyze_scale.py`` measures it).

A ``.bin``/``.pt`` checkpoint is not streamed: it goes through
:func:`hf_tempbalance.loading.load_state_dict` (``torch.load(weights_only=True)``) as before.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import ModelAnalysis, _chunk_results, _Item, _selected
from .config import TempBalanceConfig
from .distributed import world
from .layers import discover_layers
from .loading import ModelLoadError, _natural_key, _read_json
from .spectral import resolve_dtype
from .spectral.esd import gram_eig_cost
from .spectral.matrices import ExpertStack, is_transposed_conv1d, stack_shape, weight_name

__all__ = ["INDEX_FILE", "is_streamable", "ShardedCheckpoint", "analyze_checkpoint"]

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes (the floating-point ones hold weights).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
# Flops (distributed.layer_cost) per group at most: keeps the progress bar moving. Larger than the
# in-memory path's chunks (2e10, one big LLM matrix each) on purpose: on CPU a group of several
# matrices runs one matrix per worker thread, where a lone matrix runs LAPACK's own threading,
# which stalls when the cores are shared (spectral/esd.py). The byte budget bounds the memory.
_GROUP_FLOPS = 4e11


def is_streamable(path: str | os.PathLike) -> bool:
    """A ``save_pretrained`` directory with a sharded safetensors index and a Transformers
    ``config.json`` (``model_type``)."""
    path = Path(path)
    if not (path / INDEX_FILE).is_file() or not (path / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


@dataclass
class _TensorInfo:
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(shard: Path) -> dict[str, _TensorInfo]:
    """The tensors a safetensors file declares, checked against its size."""
    fix = "re-download or re-save the checkpoint"
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"shard {shard} is truncated ({size} bytes, not even a "
                                     f"safetensors header); {fix}")
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                raise ModelLoadError(f"shard {shard} is truncated: its header needs {8 + length} "
                                     f"bytes, the file has {size}; {fix}")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"shard {shard} is not a readable safetensors file ({err}); {fix}") from err
    if not isinstance(header, dict):
        raise ModelLoadError(f"shard {shard} has a malformed safetensors header; {fix}")
    start = 8 + length
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = meta["data_offsets"]
            dtype = _DTYPES.get(meta["dtype"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"shard {shard}: tensor {name!r} has a malformed header entry; "
                                 f"{fix}") from err
        if start + hi > size:
            raise ModelLoadError(f"shard {shard} is truncated: tensor {name!r} ends at byte "
                                 f"{start + hi}, the file has {size}; {fix}")
        if dtype is not None:
            out[name] = _TensorInfo(shard, dtype, shape, start + lo, start + hi)
    return out


class ShardedCheckpoint:
    """The tensors of a sharded safetensors checkpoint, read one at a time on demand.

    Opening checks the index and every shard's header (missing shard, truncated shard, index
    naming a tensor its shard lacks: :class:`~hf_tempbalance.loading.ModelLoadError` naming the
    file). :meth:`read` returns a fresh tensor in the stored dtype; nothing else is kept.

    Args:
        path: the checkpoint directory (with ``model.safetensors.index.json``).
        on_read: called with each tensor read (tests count the tensors alive at once).
    """

    def __init__(self, path: str | os.PathLike,
                 on_read: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        index = _read_json(index_file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_file} has no weight_map; re-save the checkpoint "
                                 "(save_pretrained) or restore the file")
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key, shard in weight_map.items():
            by_shard[str(shard)].append(key)
        self.tensors: dict[str, _TensorInfo] = {}
        for shard_name, keys in sorted(by_shard.items()):
            shard = self.path / shard_name
            if not shard.is_file():
                raise ModelLoadError(f"shard {shard} is missing ({index_file.name} names it for "
                                     f"{len(keys)} tensor(s)); re-download or copy it there")
            header = _read_header(shard)
            absent = [k for k in keys if k not in header]
            if absent:
                raise ModelLoadError(
                    f"{index_file} maps {len(absent)} tensor(s) to {shard}, which does not hold "
                    f"them (e.g. {absent[0]!r}); the index and the shards come from different "
                    "saves: re-save or re-download the checkpoint")
            for key in keys:
                self.tensors[key] = header[key]
        self.on_read = on_read

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read from its shard into a new CPU tensor of the stored dtype."""
        info = self.tensors[key]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        view = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        if view is not None:
            try:
                with open(info.shard, "rb") as fh:
                    fh.seek(info.begin)
                    got = fh.readinto(memoryview(view))
            except OSError as err:
                raise ModelLoadError(f"could not read tensor {key!r} from {info.shard}: {err}") from err
            if got != info.nbytes:
                raise ModelLoadError(f"shard {info.shard} is truncated: tensor {key!r} is short "
                                     f"({got} of {info.nbytes} bytes); re-download or re-save it")
        if tensor.is_floating_point() and tensor.element_size() == 1:
            tensor = tensor.float()  # FP8, as loading._checked_tensors does
        if self.on_read is not None:
            self.on_read(key, tensor)
        return tensor


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


def _parameter_sources(model: nn.Module, checkpoint: ShardedCheckpoint) -> dict[str, _Source]:
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


def _build(source: _Source, checkpoint: ShardedCheckpoint, name: str) -> torch.Tensor:
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

    def gram_key(self) -> tuple[int, int]:
        k, m, n = stack_shape(torch.empty(0), self.shape) if self.kind != "experts" else self.shape
        return (max(m, n), min(m, n))

    def cost(self) -> float:
        if self.kind == "experts":
            k, m, n = self.shape
        else:
            k, m, n = stack_shape(torch.empty(0), self.shape)
        return k * gram_eig_cost(m, n)


def _plan(model: nn.Module, config: TempBalanceConfig, layers: str, select: str | None,
          sources: dict[str, _Source], checkpoint: ShardedCheckpoint) -> list[_Planned]:
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
                f"{checkpoint.path / INDEX_FILE} lists no tensor for layer {layer.name} (looked "
                f"for {', '.join(names)}); the checkpoint does not match its config.json, or "
                "its format needs the full loader: analyse it with --no-stream")
        source = sources[stored]
        nbytes = sum(checkpoint.tensors[k].nbytes for k in source.keys)
        planned.append(_Planned(layer.name, type_name, stored, tuple(param.shape), kind,
                                layer.name in balanced, nbytes))
    return planned


def _groups(planned: list[_Planned]) -> list[list[int]]:
    """Indices in groups of one Gram size, each at most the largest weight's bytes (one bigger
    weight alone) and about ``_GROUP_FLOPS``; order as the in-memory path's chunks."""
    budget = max((p.nbytes for p in planned), default=0)
    order = sorted(range(len(planned)), key=lambda i: (planned[i].gram_key(), i))
    groups: list[list[int]] = []
    load = flops = 0.0
    key = None
    for i in order:
        p = planned[i]
        if (not groups or p.gram_key() != key or load + p.nbytes > budget
                or flops + p.cost() > _GROUP_FLOPS):
            groups.append([])
            load = flops = 0.0
            key = p.gram_key()
        groups[-1].append(i)
        load += p.nbytes
        flops += p.cost()
    return groups


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
) -> ModelAnalysis:
    """:func:`~hf_tempbalance.analysis.analyze_model` of a sharded safetensors checkpoint,
    streamed (see the module docstring): the same rows, in the same order, without loading it.

    Args:
        path: a ``save_pretrained`` directory with ``model.safetensors.index.json``.
        config, layers, dtype, keep_esds: as for :func:`~hf_tempbalance.analysis.analyze_model`.
        select: analyse only the layers whose name matches this regex (``re.search``).
        progress: progress bar with an ETA (default: on, on the main process).
        trust_remote_code: allow a config that needs code from the checkpoint's repository.
        device: where the spectra are computed (each group is moved there after reading).
        on_read: called with ``(key, tensor)`` for each tensor read (instrumentation).
    """
    config = TempBalanceConfig.build(config)
    if layers not in ("all", "balanced"):
        raise ValueError(f"layers must be 'all' or 'balanced', got {layers!r}")
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise ModelLoadError(f"{path} has no {INDEX_FILE}: not a sharded safetensors checkpoint")
    if select is not None:
        try:
            re.compile(select)
        except re.error as err:
            raise ModelLoadError(f"--layers {select!r} is not a regular expression ({err})") from err
    checkpoint = ShardedCheckpoint(path, on_read=on_read)
    model = _meta_model(path, trust_remote_code)
    sources = _parameter_sources(model, checkpoint)
    planned = _plan(model, config, layers, select, sources, checkpoint)
    del model
    dtype = resolve_dtype(dtype if dtype is not None else config.dtype)
    show = (True if progress is None else progress) and world()[0] == 0

    results: list[Any] = [None] * len(planned)
    # The bar advances by estimated flops (distributed.layer_cost), so its ETA weighs a big layer
    # more than a small one; the postfix counts layers.
    total = sum(p.cost() for p in planned) / 1e9
    with tqdm(total=total, unit="Gflop", desc="ESD (streaming)", disable=not show,
              bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]",
              dynamic_ncols=True) as bar:
        done = 0
        for group in _groups(planned):
            items = []
            for i in group:
                p = planned[i]
                weight = _build(sources[p.param], checkpoint, p.param).to(device)
                items.append(_Item(p.name, p.type, _item_shape(p), _layer_of(p, weight), p.balanced))
                del weight
            for i, row in zip(group, _chunk_results(items, config, dtype, keep_esds)):
                results[i] = row
            del items
            done += len(group)
            bar.set_postfix_str(f"{done}/{len(planned)} layers", refresh=False)
            bar.update(sum(planned[i].cost() for i in group) / 1e9)
    return ModelAnalysis([r for r in results if r is not None], config)

