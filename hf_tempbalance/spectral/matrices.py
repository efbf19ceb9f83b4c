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
* A LoRA-adapted linear layer (PEFT's ``lora.Linear``) is seen through :class:`LoraAdapted` as
  its effective weight ``W0 + Σ (α/r)·B·A`` over its active, unmerged adapters (DoRA's row
  rescaling included): one ``out x in`` matrix, the size of the base weight. It is computed on
  demand, one layer at a time (:meth:`LoraAdapted.effective_weight`), never stored.

Nothing here imports Transformers or PEFT: ``Conv1D`` is recognised by its class name and ``nf``
attribute, a LoRA layer by its ``base_layer`` / ``lora_A`` / ``lora_B`` / ``scaling`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["weight_of", "weight_name", "weight_matrices", "is_transposed_conv1d", "num_eigs",
           "stack_shape", "eval_parametrization", "ExpertStack", "LoraAdapted", "is_lora_layer",
           "layer_device"]

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


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (``lora.Linear``, ``lora.Embedding``, ``lora.Conv2d``, bitsandbytes'
    ``lora.Linear4bit``, ...), recognised by structure: a ``base_layer`` module, ``lora_A`` /
    ``lora_B`` module dicts keyed by adapter name, and a ``scaling`` dict."""
    return (isinstance(getattr(module, "base_layer", None), nn.Module)
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


# Base-layer and weight classes whose stored weight is quantized (bitsandbytes, HQQ, torchao, ...).
_QUANTIZED_MODULES = ("Linear4bit", "Linear8bitLt", "HQQLinear", "QuantLinear")
_QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")


class LoraAdapted(nn.Module):
    """A LoRA-adapted linear layer presented as one layer whose weight is the effective one.

    For the active, unmerged adapters ``j`` of ``owner`` (PEFT's ``lora.Linear``) the layer
    computes ``x @ Wᵀ`` with ``W = W0 + Σ_j s_j·B_j·A_j`` (``s_j = owner.scaling[j]``, i.e.
    ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA). A DoRA adapter (an entry in
    ``owner.lora_magnitude_vector``) contributes ``(c_j - 1)·W0 + c_j·s_j·B_j·A_j`` with the
    per-output-row factor ``c_j = m_j / ‖W0 + s_j·B_j·A_j‖_row``, exactly what its forward adds (for
    one adapter: ``W = diag(c)·(W0 + s·B·A)``). Adapters already merged into ``W0``, inactive ones,
    and all of them while ``owner.disable_adapters`` is set contribute nothing, as in the forward.

    ``weight`` is that matrix, ``out x in`` whatever the base stores (GPT-2's ``Conv1D`` base,
    ``fan_in_fan_out``, is ``in x out``), computed on every read (differentiable in ``A``, ``B``
    and ``m``); :meth:`effective_weight` computes it without autograd into a fresh tensor of the
    requested dtype. The owner is referenced, not registered: this wrapper owns no parameters.
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # bypass nn.Module.__setattr__: not a submodule

    # -------------------------------------------------------------- structure
    @property
    def base(self) -> nn.Module:
        """The innermost base layer (PEFT may nest ``base_layer`` wrappers)."""
        base = self.owner.base_layer
        for _ in range(8):
            inner = getattr(base, "base_layer", None)
            if not isinstance(inner, nn.Module):
                break
            base = inner
        return base

    @property
    def transposed(self) -> bool:
        """Whether the base stores its weight ``in x out`` (``fan_in_fan_out``, GPT-2 ``Conv1D``)."""
        return bool(getattr(self.owner, "fan_in_fan_out", False)) or is_transposed_conv1d(self.base)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the effective weight, from the base weight's shape (no computation)."""
        out_in = tuple(self.base.weight.shape)
        return (out_in[1], out_in[0]) if self.transposed else out_in  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    def adapter_names(self) -> list[str]:
        """Every adapter the layer holds (active or not), in registration order."""
        return list(self.owner.lora_A.keys())

    def active_adapters(self) -> list[str]:
        """Adapters that contribute to the forward: active, present here, not merged into ``W0``."""
        if getattr(self.owner, "disable_adapters", False):
            return []
        active = getattr(self.owner, "active_adapters", None)
        if active is None:
            active = self.adapter_names()
        elif isinstance(active, str):
            active = [active]
        merged = set(getattr(self.owner, "merged_adapters", ()))
        return [name for name in active if name in self.owner.lora_A and name not in merged]

    def _magnitude(self, adapter: str) -> nn.Parameter | None:
        vectors = getattr(self.owner, "lora_magnitude_vector", None)
        if isinstance(vectors, nn.ModuleDict) and adapter in vectors:
            return vectors[adapter].weight
        return None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters the adapters train (``A``, ``B`` and DoRA's magnitude ``m`` of every
        adapter, in that order), whose LR follows this layer."""
        params = []
        for name in self.adapter_names():
            params += [self.owner.lora_A[name].weight, self.owner.lora_B[name].weight]
            magnitude = self._magnitude(name)
            if magnitude is not None:
                params.append(magnitude)
        return params

    def companion_parameters(self) -> list[nn.Parameter]:
        """The adapters' other parameters (``lora_B`` bias with ``lora_bias=True``)."""
        main = {id(p) for p in self.adapter_parameters()}
        return [p for name in self.adapter_names()
                for module in (self.owner.lora_A[name], self.owner.lora_B[name])
                for p in module.parameters() if id(p) not in main]

    def unsupported(self) -> str | None:
        """Why this layer's effective weight is not ``W0 + Σ s·B·A`` (None when it is)."""
        base = self.base
        weight = getattr(base, "weight", None)
        if not (isinstance(base, nn.Linear) or is_transposed_conv1d(base)
                or type(base).__name__ in _QUANTIZED_MODULES):
            return (f"LoRA on a {type(base).__name__} (only LoRA on linear layers is balanced; "
                    "exclude it or adapt linear layers only)")
        if not isinstance(weight, torch.Tensor) or (weight.ndim != 2 and not self.quantized()):
            return f"LoRA base layer {type(base).__name__} has no 2-D weight"
        for name in self.adapter_names():
            a, b = self.owner.lora_A[name], self.owner.lora_B[name]
            if not (isinstance(getattr(a, "weight", None), torch.Tensor) and a.weight.ndim == 2
                    and isinstance(getattr(b, "weight", None), torch.Tensor) and b.weight.ndim == 2):
                return f"LoRA adapter {name!r} is not a pair of linear maps"
            variant = getattr(self.owner, "lora_variant", {}).get(name)
            if variant is not None and not type(variant).__name__.startswith("Dora"):
                return (f"LoRA variant {type(variant).__name__} of adapter {name!r} (its weight is "
                        "not W0 + s·B·A; plain LoRA and DoRA are supported)")
        return None

    def quantized(self) -> str | None:
        """The class name of a quantized base layer or weight (bitsandbytes 4/8-bit, HQQ, ...)."""
        base = self.base
        weight = getattr(base, "weight", None)
        if type(base).__name__ in _QUANTIZED_MODULES:
            return type(base).__name__
        if type(weight).__name__ in _QUANTIZED_WEIGHTS or hasattr(base, "W_q") \
                or type(weight).__module__.startswith("torchao."):
            return type(weight).__name__
        return None

    # -------------------------------------------------------------- the matrix
    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W0 + Σ_j ΔW_j`` as a new ``out x in`` tensor in ``dtype`` (default: the promoted
        dtype of the base and adapter weights); differentiable when grad mode is on."""
        stored = self.base.weight
        active = self.active_adapters()
        if dtype is None:
            dtype = stored.dtype
            for name in active:
                dtype = torch.promote_types(dtype, self.owner.lora_A[name].weight.dtype)
        w0 = (stored.t() if self.transposed else stored).to(dtype)
        weight = w0
        if not torch.is_grad_enabled() and (
                w0.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
                or any(self._magnitude(name) is not None for name in active)):
            # The in-place sums below must not write into W0: the first one writes a new tensor.
            weight = None
        for name in active:
            a = self.owner.lora_A[name].weight.to(dtype)
            b = self.owner.lora_B[name].weight.to(dtype)
            scaling = float(self.owner.scaling[name])
            magnitude = self._magnitude(name)
            if magnitude is None:
                if torch.is_grad_enabled() or weight is None:
                    weight = torch.addmm(w0 if weight is None else weight, b, a, alpha=scaling)
                else:
                    weight.addmm_(b, a, alpha=scaling)
                continue
            # DoRA: adds (c - 1)·W0 + c·s·B·A, c = m / ‖W0 + s·B·A‖ per output row (the norm is
            # treated as a constant, as in its forward).
            adapted = torch.addmm(w0, b, a, alpha=scaling)
            factor = magnitude.to(dtype) / torch.linalg.vector_norm(adapted, dim=1).detach()
            contribution = factor[:, None] * adapted - w0
            if torch.is_grad_enabled() or weight is None:
                weight = (w0 if weight is None else weight) + contribution
            else:
                weight.add_(contribution)
        return w0.clone() if weight is None else weight  # (no active adapter: W0 itself)

    def delta_factors(self, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, R)`` with ``ΔW = W - W0 = L·R`` over the active adapters: ``L = [s_1·B_1, ...]``
        (``out x Σr``), ``R = [A_1; ...]`` (``Σr x in``), so ``ΔW`` has rank ``≤ Σr``. None
        when a DoRA adapter is active (its row rescaling makes ``W - W0`` full rank) or when
        no adapter is active (``ΔW = 0``)."""
        active = self.active_adapters()
        if not active or any(self._magnitude(name) is not None for name in active):
            return None
        if dtype is None:
            dtype = self.owner.lora_A[active[0]].weight.dtype
        with torch.no_grad():
            left = torch.cat([float(self.owner.scaling[name]) * self.owner.lora_B[name].weight.to(dtype)
                              for name in active], dim=1)
            right = torch.cat([self.owner.lora_A[name].weight.to(dtype) for name in active], dim=0)
        return left, right

    @property
    def weight(self) -> torch.Tensor:
        return self.effective_weight()

    def extra_repr(self) -> str:
        out, inp = self.shape
        return f"{type(self.owner).__name__}, W0 + Σ s·B·A over {self.active_adapters()}, ({out}, {inp})"


def layer_device(layer: nn.Module | torch.Tensor) -> torch.device:
    """Where a layer's weight lives, without computing it (a :class:`LoraAdapted` weight is)."""
    if isinstance(layer, LoraAdapted):
        return layer.device
    return (layer if isinstance(layer, torch.Tensor) else weight_of(layer)).device


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
    if isinstance(layer, LoraAdapted):
        with torch.no_grad():
            return layer.effective_weight().unsqueeze(0)
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
    if isinstance(layer, LoraAdapted):
        out, inp = layer.shape if shape is None else shape
        return 1, out, inp
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
