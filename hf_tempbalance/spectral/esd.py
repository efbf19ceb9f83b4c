"""Empirical spectral densities: the eigenvalues of WᵀW, fast and exact.

For a matrix W of shape ``m x n`` the ESD is the set of ``min(m, n)`` eigenvalues of the smaller
Gram matrix (``WᵀW`` when ``m >= n``, else ``WWᵀ``), i.e. the squared singular values σᵢ² of W.
Forming the ``d x d`` Gram (``d = min(m, n)``) and calling ``eigvalsh`` costs ``2·max·d² + O(d³)``
flops and batches well, where an SVD of W costs more and does not (reference-notes §6).

:func:`esd` is the one-layer entry point; :func:`batched_esd` computes many layers at once:

* every slice whose Gram has the same size goes into one batched ``eigvalsh``, on the device
  where the weights live, with no host synchronisation on accelerators;
* only the lower triangle of each Gram is formed (``eigvalsh`` reads nothing else), in
  blocks, which saves a quarter to a third of the matrix products;
* on CPU, row-major fp32 weights of ordinary magnitude go into the matrix product as they are;
  the others (conv kernel slices, which are strided, half precision, huge, tiny, NaN/Inf) are
  copied once, upcast and divided by their largest |w| on the way, and NaN/Inf layers get an
  all-zero spectrum;
* on CPU the work is split across ``torch.get_num_threads()`` worker threads, each running its
  share single-threaded. LAPACK's own threading of one tridiagonal reduction synchronises its
  threads once per column and stalls badly when the cores are shared (other processes, data
  loaders); whole matrices per thread scale with the cores and do not stall.

float32 eigenvalues are accurate to ~1e-7·λ_max, so the top half of a spectrum (what the median
Hill fit reads) is accurate to a few 1e-6 relative; the bottom of a square slice is rounding
noise, which the fits never read (see :data:`~hf_tempbalance.spectral.hill.NOISE_FLOOR`).

The plain per-slice SVD it must agree with lives in :mod:`hf_tempbalance.spectral.esd_reference`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from .matrices import LoraAdapted, weight_matrices

__all__ = ["esd", "batched_esd", "resolve_dtype", "gram_eig_cost"]

# Upper bound on the elements one piece of work holds at once (its Grams and normalised slices;
# 256 Mi elements = 1 GiB in fp32): larger groups are split into pieces.
_MAX_BATCH_ELEMENTS = 1 << 28
# On CPU, fp32 weights whose largest |w| lies in this range are used without normalising: their
# Gram entries (<= rows·max|w|², rows < 2^31) neither overflow nor reach subnormal fp32 values.
_DIRECT_RANGE = (1e-8, 1e8)
# Below this much work (flops, ~50 ms on one core) starting worker threads costs more than it saves.
_MIN_PARALLEL_FLOPS = 1e9
# Smallest block of a Gram formed by one matrix product (smaller blocks run below GEMM speed).
_GRAM_BLOCK = 256

# A segment of a piece: (layer index, first slice, end slice).
_Segment = tuple[int, int, int]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map ``"float32"``/``"float64"`` (or a torch dtype) to the dtype the spectra are computed in."""
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32,
                     "float64": torch.float64, "fp64": torch.float64}[dtype]
        except KeyError:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"spectra are computed in float32 or float64, got {dtype}; half-precision weights are "
            "upcast automatically (no half-precision eigensolver exists)."
        )
    return dtype


def gram_eig_cost(rows: int, cols: int) -> float:
    """Flops of one ``rows x cols`` slice on the Gram path: ``2·r·d² + 4/3·d³``, ``d = min``."""
    d, r = min(rows, cols), max(rows, cols)
    return 2.0 * r * d * d + 4.0 / 3.0 * d ** 3


def esd(layer: nn.Module | torch.Tensor, dtype: torch.dtype | str = torch.float32) -> torch.Tensor:
    """Ascending eigenvalues of WᵀW (the squared singular values of W) of one layer.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (one ``out x in`` slice per kernel position,
            eigenvalues pooled), Transformers' ``Conv1D``, ``nn.Embedding``, or a weight tensor.
            fp16/bf16 weights are upcast.
        dtype: ``float32`` (default; accurate to ~1e-6 relative on the top half of the spectrum)
            or ``float64``.

    Returns:
        1-D tensor of ``k · min(out, in)`` eigenvalues (units: squared weight units), sorted
        ascending, clamped at 0, on the layer's device, in ``dtype``.
    """
    return batched_esd([layer], dtype=dtype)[0]


def batched_esd(
    layers: Sequence[nn.Module | torch.Tensor],
    dtype: torch.dtype | str = torch.float32,
) -> list[torch.Tensor]:
    """:func:`esd` of many layers, batching every slice with the same Gram size.

    Same numbers as calling :func:`esd` on each layer (to floating-point rounding of the batched
    kernels). Peak extra memory: per worker, one piece of work (its Grams, plus normalised
    copies of the slices that need one), capped at 1 GiB per piece.

    Args:
        layers: modules or weight tensors (see :func:`esd`).
        dtype: ``float32`` or ``float64``.
    """
    dtype = resolve_dtype(dtype)
    # A LoRA-adapted layer's effective weight is computed inside the piece of work that needs it
    # and dropped once its Gram is formed: one such weight per worker at a time, never all.
    stacks = [_Deferred(layer) if isinstance(layer, LoraAdapted) else _row_major(weight_matrices(layer))
              for layer in layers]
    scales = [torch.ones((), dtype=dtype) if isinstance(mats, _Deferred) else _max_abs(mats, dtype)
              for mats in stacks]
    on_cpu = all(mats.device.type == "cpu" for mats in stacks)
    # On CPU reading a scale is free; on an accelerator it would be a host sync per layer, and
    # normalising every layer there costs one cheap elementwise pass instead. Strided slices (a
    # conv weight's kernel positions) are copied anyway, so they are normalised in that copy.
    host = [float(s) for s in scales] if on_cpu else [math.nan] * len(scales)
    direct = [on_cpu and not isinstance(mats, _Deferred) and mats.dtype == dtype
              and mats[:1].is_contiguous() and _DIRECT_RANGE[0] <= s <= _DIRECT_RANGE[1]
              for mats, s in zip(stacks, host)]
    # Known finite (on CPU): no NaN to clear from the normalised copy.
    finite = [math.isfinite(s) and s > 0 for s in host]
    out_rows = [torch.empty(m.shape[0], min(m.shape[-2:]), dtype=dtype, device=m.device)
                for m in stacks]

    groups: dict[tuple[torch.device, int], list[int]] = defaultdict(list)
    for i, mats in enumerate(stacks):
        if min(mats.shape[-2:]) > 0:
            groups[(mats.device, min(mats.shape[-2:]))].append(i)

    workers = _cpu_workers(stacks) if on_cpu else 1
    tasks: list[tuple[float, int, list[_Segment]]] = []
    for (_, d), members in groups.items():
        costs = [gram_eig_cost(*stacks[i].shape[-2:]) for i in members]
        per_matrix = d * d + max(max(stacks[i].shape[-2:]) for i in members) * d
        limit = max(1, _MAX_BATCH_ELEMENTS // per_matrix)
        for cost, segments in _pieces(members, [stacks[i].shape[0] for i in members], costs,
                                      limit, workers):
            tasks.append((cost, d, segments))

    def run(task: tuple[float, int, list[_Segment]]) -> None:
        _, d, segments = task
        count = sum(hi - lo for _, lo, hi in segments)
        device = stacks[segments[0][0]].device
        blocks = _gram_blocks(d)
        grams = torch.empty(count, d, d, dtype=dtype, device=device)
        pos = 0
        for i, lo, hi in segments:
            if isinstance(stacks[i], _Deferred):
                mats, scales[i] = stacks[i].normalised(dtype)
                _lower_gram(mats, grams[pos:pos + hi - lo], blocks)
                del mats
                pos += hi - lo
                continue
            mats = stacks[i][lo:hi]
            if not direct[i]:
                # One pass: upcast and normalise into a contiguous copy. A NaN/Inf layer has a
                # factor of 0 and holds 0 or NaN (0·inf) here: zeros give it a zero spectrum.
                factor = torch.where(_finite(scales[i]), 1.0 / scales[i], torch.zeros_like(scales[i]))
                mats = torch.mul(mats.to(dtype), factor,
                                 out=torch.empty(mats.shape, dtype=dtype, device=device))
                if not finite[i]:
                    mats.nan_to_num_(0.0, 0.0, 0.0)
            _lower_gram(mats, grams[pos:pos + hi - lo], blocks)
            pos += hi - lo
        # grams.mT is column-major, as LAPACK wants it, so eigvalsh copies it without a transpose;
        # its upper triangle is the lower one formed here. (MKL's upper-triangle reduction is
        # also ~15% faster for d = 512..768; the eigenvalues are the same.)
        eigs = torch.linalg.eigvalsh(grams.mT, UPLO="U")
        pos = 0
        for i, lo, hi in segments:
            out_rows[i][lo:hi].copy_(eigs[pos:pos + hi - lo])
            pos += hi - lo

    if workers > 1 and len(tasks) > 1 and sum(t[0] for t in tasks) >= _MIN_PARALLEL_FLOPS:
        _run_parallel(tasks, run, workers)
    else:
        for task in tasks:
            run(task)

    results = []
    for rows, scale, is_direct in zip(out_rows, scales, direct):
        # eigvalsh may return tiny negatives for a PSD matrix; the ESD is non-negative.
        values = torch.sort(rows.reshape(-1).clamp_min_(0.0)).values
        if not is_direct:
            values = values * torch.where(_finite(scale), scale, torch.ones_like(scale)) ** 2
        results.append(values)
    return results


class _Deferred:
    """A layer whose one matrix is computed when its piece of work runs (a LoRA-adapted layer:
    ``W0 + s·B·A`` exists only while its Gram is formed). Has the ``shape``/``device`` that the
    planning of :func:`batched_esd` reads."""

    def __init__(self, layer: LoraAdapted) -> None:
        self.layer = layer
        self.shape = torch.Size((1, *layer.shape))
        self.device = layer.device

    def normalised(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W / max|W|, max|W|)``: the matrix as a ``(1, m, n)`` row-major stack, normalised in
        place (an all-zero or non-finite weight gives zeros, hence a zero spectrum), and its scale.
        On CPU a matrix of ordinary magnitude is used as it is, with scale 1 (as the direct path
        of :func:`batched_esd`: reading the scale is free there)."""
        with torch.no_grad():
            mats = _row_major(self.layer.effective_weight(dtype).unsqueeze(0))
        scale = _max_abs(mats, dtype)
        if mats.device.type == "cpu" and _DIRECT_RANGE[0] <= float(scale) <= _DIRECT_RANGE[1]:
            return mats, torch.ones_like(scale)
        factor = torch.where(_finite(scale), 1.0 / scale, torch.zeros_like(scale))
        mats.mul_(factor).nan_to_num_(0.0, 0.0, 0.0)
        return mats, scale


def _row_major(mats: torch.Tensor) -> torch.Tensor:
    """The slices, transposed if that makes them row-major (same spectrum, cheaper to read)."""
    if mats.ndim == 3 and mats.stride(-1) != 1 and mats.stride(-2) == 1:
        return mats.mT
    return mats


def _max_abs(mats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max |w| as a 0-dim ``dtype`` tensor (NaN if any weight is NaN, 1 for an empty weight)."""
    if mats.numel() == 0:
        return torch.ones((), dtype=dtype, device=mats.device)
    # The same elements in memory order (a conv weight's slices are a strided view), so that
    # the reduction streams through memory.
    dense = mats.permute(sorted(range(mats.ndim), key=lambda dim: -mats.stride(dim)))
    lo, hi = torch.aminmax(dense if dense.is_contiguous() else mats)
    return torch.maximum(hi, -lo).to(dtype)


def _finite(scale: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(scale) & (scale > 0)


def _gram_blocks(d: int) -> list[tuple[int, int]]:
    """Row/column blocks of a ``d x d`` Gram: up to 4, none smaller than :data:`_GRAM_BLOCK`."""
    n = max(1, min(4, d // _GRAM_BLOCK))
    bounds = [round(b * d / n) for b in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _lower_gram(mats: torch.Tensor, out: torch.Tensor, blocks: list[tuple[int, int]]) -> None:
    """Write the lower-triangle blocks of the smaller Gram of ``(k, m, n)`` slices into ``out``."""
    # Express the Gram as X Xᵀ with X (k, d, r): rows of X are the d columns (or rows) of W.
    x = mats.mT if mats.shape[-2] >= mats.shape[-1] else mats
    if len(blocks) == 1:
        torch.matmul(x, x.mT, out=out)
        return
    for bi, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[:bi + 1]:
            torch.matmul(x[:, r0:r1], x[:, c0:c1].mT, out=out[:, r0:r1, c0:c1])
        # eigvalsh reads only the lower triangle; zeros keep the rest well defined.
        out[:, r0:r1, r1:].zero_()


def _pieces(members: list[int], counts: list[int], costs: list[float], limit: int,
            workers: int) -> list[tuple[float, list[_Segment]]]:
    """Split a group's slices into contiguous pieces of similar cost: ``(cost, segments)``.

    At most ``limit`` slices per piece (memory), and with several threads about four pieces per
    thread (when there are that many slices), so that the threads can balance their loads.
    """
    total_count = sum(counts)
    n = max(math.ceil(total_count / limit), min(total_count, 4 * workers if workers > 1 else 1), 1)
    flat = [(i, j, cost) for i, k, cost in zip(members, counts, costs) for j in range(k)]
    total = sum(c for _, _, c in flat)
    pieces: list[tuple[float, list[_Segment]]] = []
    current: list[_Segment] = []
    size, acc, start = 0, 0.0, 0.0
    for pos, (i, j, cost) in enumerate(flat):
        if current and current[-1][0] == i and current[-1][2] == j:
            current[-1] = (i, current[-1][1], j + 1)
        else:
            current.append((i, j, j + 1))
        size += 1
        acc += cost
        last = pos == len(flat) - 1
        if last or size >= limit or (len(pieces) < n - 1 and acc >= total * (len(pieces) + 1) / n):
            pieces.append((acc - start, current))
            current, size, start = [], 0, acc
    return pieces


def _cpu_workers(stacks: Sequence[torch.Tensor]) -> int:
    """Worker threads on CPU: torch's intra-op threads, at most one per slice."""
    return max(1, min(torch.get_num_threads(), sum(s.shape[0] for s in stacks)))


def _run_parallel(tasks: list, run: Callable[[tuple], None], workers: int) -> None:
    """Run ``tasks`` on ``workers`` threads with one BLAS thread each, largest cost first.

    Each thread takes the next task when it is free, so the flop estimates only order the work
    and the load balances itself (small eigensolves run at far fewer flops per second).
    """
    with one_intra_op_thread(), ThreadPoolExecutor(workers, thread_name_prefix="tempbalance-esd") as pool:
        for future in [pool.submit(run, task) for task in sorted(tasks, key=lambda t: -t[0])]:
            future.result()


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the body with one torch intra-op thread (process-wide), then restore the count.

    The spectra are small, independent problems: parallelism across them (worker threads) beats
    parallelism inside each op, whose per-op thread barriers stall on shared cores. The update
    runs between optimizer steps, so no other torch work of this process is slowed meanwhile.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
