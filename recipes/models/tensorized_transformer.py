r"""Tensorized Transformer language model, "core-1" (Ma et al., NeurIPS 2019), as a Transformers model.

The language model of the TempBalance paper's Appendix G: word embeddings scaled by
:math:`\sqrt{d}`, ``num_layers`` post-LN blocks of *multi-linear attention* and a ReLU FFN, and an
output layer tied to the embedding. Written from the published description (reference notes
§3); ``save_pretrained``/``from_pretrained``, the ``Trainer`` and ``generate`` work as for any
Transformers causal LM.

Multi-linear attention (one block term per core, diagonal core :math:`g \in \mathbb{R}^R`).
With :math:`q, k, v = x W^{qkv}` (each :math:`R` wide), a position term
:math:`r_j = \mathrm{PE}_j W^r` for window position :math:`j`, and biases :math:`u, w` shared by
all layers, each window of length :math:`L` gives a third-order tensor

.. math::
    T_{ijk} = \sum_h g_h \bigl[(q_i + u)_h k_{jh} + (q_i + w)_h r_{jh}\bigr] v_{kh},

and position :math:`i` outputs :math:`W^O \operatorname{vec}(T_{i\cdot\cdot})`, with
:math:`W^O \in \mathbb{R}^{d \times L_{max}^2}` (columns indexed by :math:`(j, k)`, row-major).
There is no softmax and no :math:`1/\sqrt{R}`. With ``num_cores = P`` the :math:`P` tensors (own
projections and cores) are averaged. Causal (default): :math:`T_{ijk} = 0` unless
:math:`j \le i` and :math:`k \le i`, so no position sees a later token. ``causal=False`` is the
published model, whose positions read the whole window including later tokens; it exists only
to compare with published perplexities and warns when built.

Both terms are one trilinear form of rank :math:`H = 2PR`:
:math:`a = [q+u;\, q+w]`, :math:`\kappa = [k;\, r]`, :math:`\nu = [v;\, v]`,
:math:`c = [g;\, g]/P`, so :math:`T_{ijk} = \sum_h c_h a_{ih} \kappa_{jh} \nu_{kh}`.
:func:`multilinear_attention` evaluates :math:`W^O\operatorname{vec}(T_i)` two ways:

* ``dense``: build :math:`T` (:math:`L^3` per window) and project: :math:`L^3 (H + d)`
  multiply-adds.
* ``factored``: never builds :math:`T`. Non-causal:
  :math:`\mathrm{out}_i = \sum_h c_h a_{ih} M_{\cdot h}` with
  :math:`M_{dh} = \sum_{jk} W^O_{d,jk} \kappa_{jh} \nu_{kh}` (:math:`d L^2 H`). Causal: the sum
  over the square :math:`\{j, k \le i\}` grows by one row and one column per position, so
  :math:`M^{(i)} = \sum_{s \le i} \bigl[\kappa_s \circ \sum_{k \le s} W^O_{\cdot,sk}\nu_k +
  \nu_s \circ \sum_{j < s} W^O_{\cdot,js}\kappa_j\bigr]` is a cumulative sum
  (:math:`2 d L^2 H`, intermediate :math:`d L H`).

The factored form is :math:`O(L^2)` instead of :math:`O(L^3)`, but its intermediates are
larger (:math:`dLH` against :math:`L^3` per window), and at the published size (:math:`L = 32`,
:math:`H = 80`, :math:`d = 256`) the dense form is faster: 4.3x (causal) and 2.5x (non-causal)
forward + backward on CPU (``benchmarks/ptb_attention.py``; factored wins only from about
:math:`L = 128`, non-causal). So ``auto`` takes the factored form only when it needs fewer than
half the multiply-adds of the dense one, which keeps the dense form for every window up to 128.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

try:  # Transformers 5: init functions that leave weights loaded by from_pretrained alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - Transformers 4
    from torch.nn import init

__all__ = [
    "TensorizedTransformerConfig",
    "TensorizedTransformerModel",
    "TensorizedTransformerForCausalLM",
    "multilinear_attention",
    "contraction_cost",
    "auto_contraction",
]

CONTRACTIONS = ("auto", "dense", "factored")

NON_CAUSAL_WARNING = (
    "TensorizedTransformer built with causal=False: every position reads the whole window, "
    "including later tokens (the published model). Its perplexity is not a language-model "
    "perplexity; use it only to compare with published numbers, and causal=True otherwise."
)


class TensorizedTransformerConfig(PreTrainedConfig):
    """Configuration of the tensorized transformer; defaults are the TempBalance PTB model.

    Args:
        vocab_size: words in the vocabulary (PTB: 10,000 including ``<eos>`` and ``<unk>``).
        d_model: width of embeddings and blocks.
        num_layers: number of blocks.
        num_cores: block terms per attention (1 = "core-1"); each has its own q/k/v/r
            projections and core vector, and their tensors are averaged.
        d_head: rank ``R`` of each core (size of q, k, v, r per core).
        d_inner: FFN hidden width (ReLU).
        dropout: dropout on embeddings, the position encoding, attention and FFN outputs and
            the final hidden state.
        max_len: longest window (BPTT length); the output projection has ``max_len**2`` inputs.
        causal: mask every later token (default). ``False`` is the published, read-ahead model.
        contraction: ``auto``, ``dense`` or ``factored`` (see the module docstring).
        init_std: std of the normal init of embeddings, Linear weights and shared biases.
        layer_norm_eps: LayerNorm epsilon.
    """

    model_type = "tensorized_transformer"

    def __init__(self, vocab_size: int = 10000, d_model: int = 256, num_layers: int = 3,
                 num_cores: int = 1, d_head: int = 40, d_inner: int = 2100, dropout: float = 0.3,
                 max_len: int = 32, causal: bool = True, contraction: str = "auto",
                 init_std: float = 0.02, layer_norm_eps: float = 1e-5,
                 tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("num_layers", num_layers), ("num_cores", num_cores),
                            ("d_head", d_head), ("d_inner", d_inner), ("max_len", max_len)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"TensorizedTransformerConfig.{name}={value!r}: must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TensorizedTransformerConfig.dropout={dropout!r}: must be in [0, 1)")
        if contraction not in CONTRACTIONS:
            raise ValueError(f"TensorizedTransformerConfig.contraction={contraction!r}: choose from {CONTRACTIONS}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_cores = num_cores
        self.d_head = d_head
        self.d_inner = d_inner
        self.dropout = dropout
        self.max_len = max_len
        self.causal = bool(causal)
        self.contraction = contraction
        self.init_std = init_std
        self.layer_norm_eps = layer_norm_eps
        kwargs.setdefault("use_cache", False)  # no KV cache: each step re-reads the window
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Names the Trainer and generic tooling look for.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers


# ---------------------------------------------------------------------------------- contraction
def contraction_cost(length: int, rank: int, d_model: int, causal: bool) -> dict[str, int]:
    """Multiply-adds per window of each contraction (``rank`` = H = 2·cores·d_head)."""
    return {"dense": length ** 3 * (rank + d_model),
            "factored": d_model * length ** 2 * rank * (2 if causal else 1)}


def auto_contraction(length: int, rank: int, d_model: int, causal: bool) -> str:
    """``factored`` when it needs under half the dense multiply-adds (its larger intermediates
    cost about that much in memory traffic, see ``benchmarks/ptb_attention.py``), else ``dense``."""
    cost = contraction_cost(length, rank, d_model, causal)
    return "factored" if 2 * cost["factored"] < cost["dense"] else "dense"


def multilinear_attention(a: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          core: torch.Tensor, weight: torch.Tensor, causal: bool = True,
                          contraction: str = "auto") -> torch.Tensor:
    r"""``out[b, i] = W · vec(T[b, i])`` with ``T[b,i,j,k] = Σ_h core_h a[b,i,h] key[b,j,h] value[b,k,h]``.

    Args:
        a, key, value: ``(B, L, H)`` factors (``key`` may be broadcast from ``(1, L, H)``).
        core: ``(H,)`` diagonal of the core tensor.
        weight: ``(d, L, L)``: the output projection with its input index split into ``(j, k)``.
        causal: zero ``T[b,i,j,k]`` unless ``j <= i`` and ``k <= i``.
        contraction: ``dense`` (build ``T``), ``factored`` (never build it) or ``auto``.

    Returns:
        ``(B, L, d)``.
    """
    batch, length, rank = a.shape
    d_model = weight.shape[0]
    if weight.shape[1:] != (length, length):
        raise ValueError(f"weight must be (d, {length}, {length}) for windows of {length} tokens, "
                         f"got {tuple(weight.shape)}")
    if contraction == "auto":
        contraction = auto_contraction(length, rank, d_model, causal)
    key = key.expand(batch, -1, -1)
    scaled = a * core
    if contraction == "dense":
        kv = (key.unsqueeze(2) * value.unsqueeze(1)).reshape(batch, length * length, rank)
        tensor = torch.matmul(scaled, kv.transpose(1, 2))  # (B, L, L²): T[b, i, (j, k)]
        if causal:
            pos = torch.arange(length, device=a.device)
            seen = torch.maximum(pos[:, None], pos[None, :]).reshape(1, -1) <= pos[:, None]
            tensor = tensor * seen.to(tensor.dtype)
        return torch.matmul(tensor, weight.reshape(d_model, length * length).t())
    if contraction != "factored":
        raise ValueError(f"contraction={contraction!r}: choose from {CONTRACTIONS}")
    if not causal:
        kv = (key.unsqueeze(2) * value.unsqueeze(1)).reshape(batch, length * length, rank)
        summed = torch.matmul(weight.reshape(d_model, length * length), kv)  # (B, d, H)
        return torch.matmul(scaled, summed.transpose(1, 2))
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    # row s of the square: Σ_{k<=s} W[:, s, k] value_k ; column s: Σ_{j<s} W[:, j, s] key_j
    rows = torch.matmul((weight * lower).reshape(d_model * length, length), value)
    cols = torch.matmul((weight * ~lower).transpose(1, 2).reshape(d_model * length, length), key)
    rows = rows.view(batch, d_model, length, rank)
    cols = cols.view(batch, d_model, length, rank)
    grown = (key.unsqueeze(1) * rows + value.unsqueeze(1) * cols).cumsum(dim=2)  # M^(i): (B, d, L, H)
    return torch.einsum("bih,bdih->bid", scaled, grown)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(length, dim)`` encoding ``[sin(p·f), cos(p·f)]`` with ``f_i = 10000^(-2i/dim)``."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angle = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)[:, :dim].to(dtype)


# ---------------------------------------------------------------------------------- modules
class MultiLinearAttention(nn.Module):
    """Multi-linear attention with ``num_cores`` diagonal cores, residual and post-LayerNorm."""

    def __init__(self, config: TensorizedTransformerConfig) -> None:
        super().__init__()
        width = config.num_cores * config.d_head
        self.config = config
        # Registration order matters to TempBalance: the LayerNorm follows o_proj's multiplier.
        self.qkv = nn.Linear(config.d_model, 3 * width, bias=False)
        self.r_net = nn.Linear(config.d_model, width, bias=False)
        self.core = nn.Parameter(torch.empty(config.num_cores, config.d_head))
        self.o_proj = nn.Linear(config.max_len ** 2, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, content_bias: torch.Tensor,
                position_bias: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        length = hidden.shape[1]
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        r = self.r_net(positions).unsqueeze(0)  # (1, L, P·R): shared by the batch
        a = torch.cat([q + content_bias.flatten(), q + position_bias.flatten()], dim=-1)
        key = torch.cat([k, r.expand_as(k)], dim=-1)
        value = torch.cat([v, v], dim=-1)
        core = self.core.flatten().repeat(2) / cfg.num_cores
        weight = self.o_proj.weight.view(cfg.d_model, cfg.max_len, cfg.max_len)[:, :length, :length]
        out = multilinear_attention(a, key, value, core, weight, cfg.causal, cfg.contraction)
        return self.norm(hidden + self.dropout(out))


class PositionwiseFeedForward(nn.Module):
    """``LayerNorm(x + Dropout(fc2(Dropout(ReLU(fc1(x))))))``."""

    def __init__(self, config: TensorizedTransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_inner)
        self.fc2 = nn.Linear(config.d_inner, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(torch.relu(self.fc1(hidden)))
        return self.norm(hidden + self.dropout(self.fc2(inner)))


class TensorizedBlock(nn.Module):
    def __init__(self, config: TensorizedTransformerConfig) -> None:
        super().__init__()
        self.attn = MultiLinearAttention(config)
        self.ffn = PositionwiseFeedForward(config)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, content_bias: torch.Tensor,
                position_bias: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attn(hidden, positions, content_bias, position_bias))


class TensorizedTransformerPreTrainedModel(PreTrainedModel):
    config_class = TensorizedTransformerConfig
    base_model_prefix = "model"
    _no_split_modules = ["TensorizedBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MultiLinearAttention):
            # Each core starts as a probability vector over its R components (softmax of N(0, 1)).
            start = torch.softmax(torch.randn_like(module.core), dim=-1)
            if hasattr(init, "copy_"):
                init.copy_(module.core, start)
            else:  # pragma: no cover - Transformers 4
                with torch.no_grad():
                    module.core.copy_(start)
        elif isinstance(module, TensorizedTransformerModel):
            init.normal_(module.content_bias, mean=0.0, std=std)
            init.normal_(module.position_bias, mean=0.0, std=std)


class TensorizedTransformerModel(TensorizedTransformerPreTrainedModel):
    """Embedding (scaled by sqrt(d_model)), blocks, final dropout; returns hidden states."""

    def __init__(self, config: TensorizedTransformerConfig) -> None:
        super().__init__(config)
        if not config.causal:
            warnings.warn(NON_CAUSAL_WARNING, UserWarning, stacklevel=2)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_scale = math.sqrt(config.d_model)
        # u and w of the module docstring, shared by every layer.
        self.content_bias = nn.Parameter(torch.empty(config.num_cores, config.d_head))
        self.position_bias = nn.Parameter(torch.empty(config.num_cores, config.d_head))
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TensorizedBlock(config) for _ in range(config.num_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> BaseModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "TensorizedTransformer reads windows of contiguous text and has no padding: "
                "attention_mask must be all ones (batch windows of equal length instead).")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        length = inputs_embeds.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"sequence length {length} exceeds config.max_len={self.config.max_len}: the "
                f"output projection takes max_len² inputs. Feed windows of at most "
                f"{self.config.max_len} tokens (BPTT), or build the model with a larger max_len.")
        hidden = self.dropout(inputs_embeds * self.embed_scale)
        positions = sinusoidal_positions(length, self.config.d_model, hidden.device, hidden.dtype)
        positions = self.dropout(positions)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, positions, self.content_bias, self.position_bias)
            if all_hidden is not None:
                all_hidden.append(hidden)
        hidden = self.dropout(hidden)
        out = BaseModelOutput(last_hidden_state=hidden,
                              hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()


class TensorizedTransformerForCausalLM(TensorizedTransformerPreTrainedModel, GenerationMixin):
    """The language model: :class:`TensorizedTransformerModel` and an output layer tied to the
    embedding (with its own bias). ``labels`` follow the Transformers convention (shifted inside,
    ``-100`` ignored); the PTB recipe computes its loss from ``logits`` and explicit targets."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TensorizedTransformerConfig) -> None:
        super().__init__(config)
        self.model = TensorizedTransformerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutput | tuple:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                ignore_index=-100)
        result = CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict:
        # No cache: every step re-reads the last max_len tokens (a sliding window, as in training).
        return {"input_ids": input_ids[:, -self.config.max_len:]}


# save_pretrained copies this file next to the weights, so a saved model loads anywhere with
# AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) (the file needs only torch
# and transformers).
TensorizedTransformerConfig.register_for_auto_class()
TensorizedTransformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
