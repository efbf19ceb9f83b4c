"""Turn a layer (or a weight tensor) into the stack of matrices whose spectra form its ESD.

Conventions (the TempBalance authors', reference-notes §1):

* ``nn.Linear`` weight ``(out, in)`` is one matrix.
* ``nn.Conv{1,2,3}d`` weight ``(out, in/groups, *kernel)`` is split into ``prod(kernel)`` slices of
  shape ``out x in/groups``, one per kernel position; their eigenvalues are pooled into one ESD.
  ``nn.ConvTranspose{1,2,3}d`` stores ``(in, out/groups, *kernel)``: the same split gives the
  transposed slices, with the same singular values.
* Transformers' GPT-2 ``Conv1D`` stores its weight as ``(in, out)``; it is transposed to
  ``(out, in)`` (this changes nothing in the spectrum but keeps shapes comparable).
* ``nn.Embedding`` weight ``(num_embeddings, dim)`` is one matrix (opt-in in layer discovery).
* ``nn.MultiheadAttention``'s packed input projection ``in_proj_weight`` ``(3·embed_dim,
  embed_dim)`` (the q, k and v projections stacked) is one matrix, like the ``nn.Linear`` that
  most attention implementations use for it.
* A stack of matrices kept in one ``(k, m, n)`` parameter, such as the fused experts of
  Transformers' mixture-of-experts blocks (``gate_up_proj`` ``(num_experts, 2·intermediate,
  hidden)``), is seen through :class:`ExpertStack` as ``k`` matrices whose eigenvalues are pooled,
  as for a convolution's kernel positions.
* A weight computed by a ``torch.nn.utils.parametrize`` parametrization (weight norm, spectral
  norm, ...) is analysed as the effective weight the layer uses, read as in eval mode
  (:func:`eval_parametrization`) so that reading it changes nothing.

Nothing here imports Transformers: ``Conv1D`` is recognised by its class name and ``nf`` attribute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["weight_of", "weight_name", "weight_matrices", "is_transposed_conv1d", "num_eigs",
           "stack_shape", "eval_parametrization", "ExpertStack"]

def is_transposed_conv1d(module: nn.Module) -> bool:
    """True for Transformers' ``Conv1D`` (GPT-2 family), whose weight is stored ``in x out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class ExpertStack(nn.Module):
    """One ``(k, m, n)`` parameter of another module (``owner.<name>``) presented as a layer.

    Transformers keeps the experts of a mixture-of-experts block as 3-D parameters of one
    ``...Experts`` module (``gate_up_proj``, ``down_proj``). Each is a stack of ``k`` expert
    matrices sharing one LR, so TempBalance treats it as one layer whose ESD pools the experts'
    eigenvalues. ``weight`` is the owner's parameter itself; the owner is referenced, not
    registered, so this wrapper owns no parameters.

    Args:
        owner: the module holding the parameter (anything with that attribute).
        name: the parameter's attribute name on ``owner``.
    """

    def __init__(self, owner: nn.Module | object, name: str) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # bypass nn.Module.__setattr__: not a submodule
        self.param_name = name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.param_name)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.param_name}, shape={tuple(self.weight.shape)}"


def weight_name(layer: nn.Module) -> str:
    """The attribute holding a layer's weight matrix: ``in_proj_weight`` for
    ``nn.MultiheadAttention``, ``weight`` for everything else."""
    return "in_proj_weight" if isinstance(layer, nn.MultiheadAttention) else "weight"


@contextmanager
def eval_parametrization(layer: nn.Module) -> Iterator[None]:
    """Within the body, a parametrized ``layer.weight`` is computed as in eval mode.

    In training mode ``spectral_norm`` runs a power-iteration step and updates its vectors on
    every read of the weight, so an analysis would change the training state (and, under DDP,
    make ranks differ). Eval mode reads the weight the last forward used. No-op for plain weights.
    """
    name = weight_name(layer)
    if not parametrize.is_parametrized(layer, name):
        yield
        return
    modules = list(layer.parametrizations[name].modules())
    modes = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight of a supported layer (the effective one if parametrized), with a clear error
    for anything else."""
    with eval_parametrization(layer):
        weight = getattr(layer, weight_name(layer), None)
    if isinstance(layer, nn.MultiheadAttention) and weight is None:
        raise TypeError("this nn.MultiheadAttention keeps separate q, k and v projection weights "
                        "(kdim or vdim differ from embed_dim); only the packed in_proj_weight is "
                        "supported")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{type(layer).__name__} has no tensor `weight`; pass a module with a weight matrix "
            "(nn.Linear, nn.Conv1d/2d/3d, transformers' Conv1D, nn.Embedding) or the tensor itself."
        )
    return weight


def weight_matrices(layer: nn.Module | torch.Tensor) -> torch.Tensor:
    """Return the ``(k, m, n)`` stack of matrices whose squared singular values form the ESD.

    Args:
        layer: a module (see the module docstring for the supported kinds) or a weight tensor.
            A 2-D tensor is one matrix; a tensor with ``d >= 3`` dims is read as a convolution
            weight ``(out, in, *kernel)``.

    Returns:
        A view or copy of the weight, detached, in its own dtype and on its own device.
    """
    if isinstance(layer, ExpertStack):
        weight = layer.weight.detach()
        if weight.ndim != 3:
            raise ValueError(f"an ExpertStack holds a (k, m, n) stack, got shape {tuple(weight.shape)}")
        return weight
    if isinstance(layer, nn.Module):
        weight = weight_of(layer).detach()
        if is_transposed_conv1d(layer):
            weight = weight.t()
    elif isinstance(layer, torch.Tensor):
        weight = layer.detach()
    else:
        raise TypeError(f"expected an nn.Module or a torch.Tensor, got {type(layer).__name__}")

    if weight.ndim == 2:
        return weight.unsqueeze(0)
    if weight.ndim >= 3:
        out_ch, in_ch = weight.shape[:2]
        # (out, in, *k) -> (*k, out, in) -> (prod(k), out, in): one slice per kernel position.
        perm = tuple(range(2, weight.ndim)) + (0, 1)
        return weight.permute(perm).reshape(-1, out_ch, in_ch)
    raise ValueError(
        f"a weight with {weight.ndim} dimension(s) has no matrix spectrum; "
        "pass a 2-D matrix or a convolution weight (out, in, *kernel)."
    )


def stack_shape(layer: nn.Module | torch.Tensor,
                shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """``(k, m, n)``: the layer's ESD comes from ``k`` matrices of ``m x n`` (as
    :func:`weight_matrices` slices it, up to the orientation of each matrix).

    Computed from the weight's shape alone, so it costs nothing and needs no data: ``shape``
    (default: the weight's own) may be a declared full shape of a sharded weight. A weight of
    fewer than two dimensions holds no matrix: ``(0, 0, 0)``.
    """
    if shape is None:
        shape = (layer if isinstance(layer, torch.Tensor) else weight_of(layer)).shape
    shape = tuple(shape)
    if isinstance(layer, ExpertStack):
        k, m, n = shape
        return k, m, n
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) >= 3:
        return math.prod(shape[2:]), shape[0], shape[1]
    return 0, 0, 0  # no matrix at all (e.g. the empty placeholder DeepSpeed ZeRO-3 leaves)


def num_eigs(layer: nn.Module | torch.Tensor) -> int:
    """Number of eigenvalues in the pooled ESD of a layer (or weight tensor): ``k · min(m, n)``."""
    k, m, n = stack_shape(layer)
    return k * min(m, n)
