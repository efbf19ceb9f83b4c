"""The tensors of a ``save_pretrained`` checkpoint on disk, read in pieces without loading it.

:func:`open_checkpoint` recognises the four layouts Transformers writes, in the order it prefers
them, and returns a reader whose :attr:`~CheckpointFiles.tensors` lists every tensor (dtype,
shape, file) and which reads either a whole tensor or a block of rows or columns of one matrix:

* ``model.safetensors.index.json`` + shards, or one ``model.safetensors``
  (:class:`SafetensorsFiles`): the headers are parsed here; data is read with plain positioned
  reads into fresh tensors, never memory-mapped, so nothing but the block asked for is resident.
  A row block of a row-major matrix is one contiguous read; a column block is one read per row.
* ``pytorch_model.bin.index.json`` + shards, or one ``pytorch_model.bin`` (:class:`TorchBinFiles`):
  pickles, read only with ``torch.load(weights_only=True, mmap=True)``, one shard open at a time.
  The mapping pages in only the bytes a block touches; after copying a block out, those pages are
  handed back to the kernel (``madvise(MADV_DONTNEED)`` on the read-only private mapping), so they
  do not pile up in the resident set either.

Opening checks everything before any work: a missing shard, a truncated shard, or an index that
names a tensor its shard does not hold raise :class:`~hf_tempbalance.loading.ModelLoadError` with
one line naming the file.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import struct
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .loading import ModelLoadError, _read_json

__all__ = ["SAFETENSORS_INDEX", "SAFETENSORS_FILE", "BIN_INDEX", "BIN_FILE", "LAYOUTS",
           "TensorInfo", "CheckpointFiles", "SafetensorsFiles", "TorchBinFiles", "find_layout",
           "open_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
#: The files that make a directory streamable, in Transformers' order of preference.
LAYOUTS = (SAFETENSORS_INDEX, SAFETENSORS_FILE, BIN_INDEX, BIN_FILE)

_FIX = "re-download or re-save the checkpoint"

# safetensors dtype names -> torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def find_layout(path: str | os.PathLike) -> str | None:
    """The first of :data:`LAYOUTS` present in directory ``path``, or None."""
    path = Path(path)
    return next((name for name in LAYOUTS if (path / name).is_file()), None)


def open_checkpoint(path: str | os.PathLike,
                    on_read: Callable[[str, torch.Tensor], None] | None = None) -> CheckpointFiles:
    """The reader for the checkpoint in directory ``path`` (see the module docstring)."""
    path = Path(path)
    layout = find_layout(path)
    if layout is None:
        raise ModelLoadError(f"{path} holds none of {', '.join(LAYOUTS)}: not a save_pretrained "
                             "checkpoint that can be streamed")
    cls = SafetensorsFiles if layout.startswith("model.safetensors") else TorchBinFiles
    return cls(path, layout, on_read=on_read)


@dataclass
class TensorInfo:
    """Where one stored tensor is: its file and, for safetensors, its absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


def _weight_map(path: Path, layout: str) -> dict[str, list[str]]:
    """Shard file name -> the tensor keys the index maps to it (None for a single file)."""
    index_file = path / layout
    index = _read_json(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_file} has no weight_map; re-save the checkpoint "
                             "(save_pretrained) or restore the file")
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in weight_map.items():
        by_shard[str(shard)].append(key)
    return dict(sorted(by_shard.items()))


def _check_listed(index_file: Path, shard: Path, keys: list[str], held: set[str]) -> None:
    absent = [k for k in keys if k not in held]
    if absent:
        raise ModelLoadError(
            f"{index_file} maps {len(absent)} tensor(s) to {shard}, which does not hold them "
            f"(e.g. {absent[0]!r}); the index and the shards come from different saves: re-save "
            "or re-download the checkpoint")


def _missing(shard: Path, index_file: Path, count: int) -> ModelLoadError:
    return ModelLoadError(f"shard {shard} is missing ({index_file.name} names it for {count} "
                          "tensor(s)); re-download or copy it there")


class CheckpointFiles:
    """Common interface of the readers. ``tensors``: key -> :class:`TensorInfo` of every
    floating-point (and integer) tensor; ``on_read(key, tensor)`` is called with every tensor or
    block read (tests count what is alive at once)."""

    path: Path
    layout: str
    tensors: dict[str, TensorInfo]
    on_read: Callable[[str, torch.Tensor], None] | None

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` as a new CPU tensor of the stored dtype (FP8: float32)."""
        raise NotImplementedError

    def read_block(self, key: str, index: int | None, axis: int, lo: int, hi: int) -> torch.Tensor:
        """Rows (``axis=0``) or columns (``axis=1``) ``lo:hi`` of the 2-D matrix ``key`` (or of
        ``key[index]`` for a 3-D stack), as a new contiguous CPU tensor of the stored dtype."""
        raise NotImplementedError

    def _done(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() and tensor.element_size() == 1:
            tensor = tensor.float()  # FP8, as loading._checked_tensors does
        if self.on_read is not None:
            self.on_read(key, tensor)
        return tensor


# ---------------------------------------------------------------------------- safetensors
def _read_header(shard: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, checked against its size."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"shard {shard} is truncated ({size} bytes, not even a "
                                     f"safetensors header); {_FIX}")
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                raise ModelLoadError(f"shard {shard} is truncated: its header needs {8 + length} "
                                     f"bytes, the file has {size}; {_FIX}")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"shard {shard} is not a readable safetensors file ({err}); {_FIX}") from err
    if not isinstance(header, dict):
        raise ModelLoadError(f"shard {shard} has a malformed safetensors header; {_FIX}")
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
                                 f"{_FIX}") from err
        if start + hi > size:
            raise ModelLoadError(f"shard {shard} is truncated: tensor {name!r} ends at byte "
                                 f"{start + hi}, the file has {size}; {_FIX}")
        if dtype is not None:
            out[name] = TensorInfo(shard, dtype, shape, start + lo, start + hi)
    return out


class SafetensorsFiles(CheckpointFiles):
    """A sharded (``model.safetensors.index.json``) or single-file (``model.safetensors``)
    safetensors checkpoint, read with positioned reads (no memory map)."""

    def __init__(self, path: str | os.PathLike, layout: str = SAFETENSORS_INDEX,
                 on_read: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.path, self.layout, self.on_read = Path(path), layout, on_read
        self.tensors = {}
        if layout == SAFETENSORS_FILE:
            self.tensors = _read_header(self.path / layout)
            return
        index_file = self.path / layout
        for shard_name, keys in _weight_map(self.path, layout).items():
            shard = self.path / shard_name
            if not shard.is_file():
                raise _missing(shard, index_file, len(keys))
            header = _read_header(shard)
            _check_listed(index_file, shard, keys, set(header))
            for key in keys:
                self.tensors[key] = header[key]

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        tensor = torch.empty(info.shape, dtype=info.dtype)
        if tensor.numel():
            with open(info.file, "rb", buffering=0) as fh:
                _read_into(fh, info.begin, _bytes_of(tensor), key, info.file)
        return self._done(key, tensor)

    def read_block(self, key: str, index: int | None, axis: int, lo: int, hi: int) -> torch.Tensor:
        info = self.tensors[key]
        rows, cols = info.shape[-2:]
        item = info.dtype.itemsize
        base = info.begin + (index or 0) * rows * cols * item
        if axis == 0:  # contiguous rows: one read
            block = torch.empty(hi - lo, cols, dtype=info.dtype)
            if block.numel():
                with open(info.file, "rb", buffering=0) as fh:
                    _read_into(fh, base + lo * cols * item, _bytes_of(block), key, info.file)
            return self._done(key, block)
        block = torch.empty(rows, hi - lo, dtype=info.dtype)
        if block.numel():
            view = _bytes_of(block)
            width = (hi - lo) * item
            with open(info.file, "rb", buffering=0) as fh:
                for r in range(rows):  # one short read per row of the column block
                    _read_into(fh, base + (r * cols + lo) * item, view[r * width:(r + 1) * width],
                               key, info.file)
        return self._done(key, block)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def _read_into(fh, offset: int, view: memoryview, key: str, file: Path) -> None:
    """Fill ``view`` from byte ``offset`` of ``fh``; a short file is a truncated shard."""
    try:
        fh.seek(offset)
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
    except OSError as err:
        raise ModelLoadError(f"could not read tensor {key!r} from {file}: {err}") from err
    if got != len(view):
        raise ModelLoadError(f"shard {file} is truncated: tensor {key!r} is short ({got} of "
                             f"{len(view)} bytes); {_FIX}")


# ---------------------------------------------------------------------------- torch pickles
def _load_bin(shard: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True, mmap=True)`` of one shard: a dict of mapped tensors."""
    try:
        obj = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"refusing to load {shard}: it holds pickled Python objects beyond tensors, and "
            "unpickling them could run arbitrary code, so only torch.load(weights_only=True) is "
            "used; re-save the weights (save_pretrained) and try again") from err
    except Exception as err:  # zip errors of a truncated file, a legacy (non-zip) pickle, ...
        text = " ".join(str(err).split()) or type(err).__name__
        raise ModelLoadError(f"shard {shard} could not be read with torch.load(weights_only=True, "
                             f"mmap=True): {text}. Truncated? {_FIX}; a legacy (pre-zip) torch "
                             "save cannot be mapped: --no-stream reads it") from err
    if not isinstance(obj, dict):
        raise ModelLoadError(f"shard {shard} holds no state dict; {_FIX}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class TorchBinFiles(CheckpointFiles):
    """A sharded (``pytorch_model.bin.index.json``) or single ``pytorch_model.bin`` checkpoint.

    Each shard is opened with ``torch.load(weights_only=True, mmap=True)`` (never a plain
    unpickle); one shard stays open at a time (readers switch shards under a lock, so reading
    in shard order, as the streaming plan does, opens each once)."""

    def __init__(self, path: str | os.PathLike, layout: str = BIN_INDEX,
                 on_read: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.path, self.layout, self.on_read = Path(path), layout, on_read
        self.tensors = {}
        if layout == BIN_FILE:
            shards = {BIN_FILE: None}
        else:
            shards = _weight_map(self.path, layout)
        index_file = self.path / layout
        for shard_name, keys in shards.items():
            shard = self.path / shard_name
            if not shard.is_file():
                raise _missing(shard, index_file, len(keys or ()))
            state = _load_bin(shard)  # mapped, so checking costs no reads of the data
            if keys is not None:
                _check_listed(index_file, shard, keys, set(state))
            for key in keys if keys is not None else state:
                tensor = state[key]
                if tensor.is_meta:
                    raise ModelLoadError(f"shard {shard}: tensor {key!r} holds no data; {_FIX}")
                self.tensors[key] = TensorInfo(shard, tensor.dtype, tuple(tensor.shape))
            del state
        self._lock = threading.Lock()
        self._open: tuple[Path, dict[str, torch.Tensor]] | None = None

    def _tensor(self, key: str) -> torch.Tensor:
        """The mapped tensor ``key`` (its shard opened now if another one was open)."""
        file = self.tensors[key].file
        with self._lock:
            if self._open is None or self._open[0] != file:
                self._open = None  # drop the previous mapping before opening the next
                self._open = (file, _load_bin(file))
            return self._open[1][key]

    def close(self) -> None:
        with self._lock:
            self._open = None

    def read(self, key: str) -> torch.Tensor:
        source = self._tensor(key)
        tensor = source.clone(memory_format=torch.contiguous_format)
        _release(source)
        return self._done(key, tensor)

    def read_block(self, key: str, index: int | None, axis: int, lo: int, hi: int) -> torch.Tensor:
        source = self._tensor(key)
        matrix = source if index is None else source[index]
        part = matrix[lo:hi] if axis == 0 else matrix[:, lo:hi]
        block = part.clone(memory_format=torch.contiguous_format)
        _release(part if axis == 0 else matrix)
        return self._done(key, block)


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - no libc symbol
    _madvise = None
if _madvise is not None:
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int


def _release(view: torch.Tensor) -> None:
    """Drop the mapped pages wholly inside ``view``'s byte range from the resident set.

    The shard is mapped private and read-only in practice (nothing writes to it), so the pages
    are clean copies of the file: MADV_DONTNEED only forgets them, and a later read faults them
    in again from the file. Pages shared with a neighbouring tensor at either end are kept."""
    if _madvise is None or view.numel() == 0:
        return
    start = view.data_ptr()
    end = start + _span_bytes(view)
    first = -(-start // _PAGE) * _PAGE
    last = end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


def _span_bytes(view: torch.Tensor) -> int:
    """Bytes from the first to one past the last element of a strided view."""
    extent = 1 + sum((s - 1) * st for s, st in zip(view.shape, view.stride()))
    return extent * view.element_size()
