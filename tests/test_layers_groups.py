"""Layer discovery and labelled param groups on real architectures (timm, GPT-2, BERT, Llama).

Expected plans are written out from each architecture's known structure, not derived from the
discovery code.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from hf_tempbalance import TempBalance
from hf_tempbalance.groups import GROUP_KEY

WD = 5e-4


# ----------------------------------------------------------------------------- models
def resnet18():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", num_classes=10, pretrained=False)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                         n_positions=32, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100,
                                     max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=32, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def mlp():
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(),       # 0: first, excluded
        nn.Linear(64, 64), nn.LayerNorm(64),  # 2, 3
        nn.Linear(64, 64), nn.BatchNorm1d(64),  # 4, 5
        nn.Linear(64, 64), nn.ReLU(),       # 6
        nn.Linear(64, 40), nn.LayerNorm(40),  # 8: 40 eigenvalues < min_eigs=50; 9
        nn.Linear(40, 5),                   # 10: last, excluded
    )


# ----------------------------------------------------------------------------- checks
def expected_owners(model: nn.Module, balanced: list[str], norm_owner: dict[str, str | None],
                    extra: dict[str, str] | None = None) -> dict[str, str | None]:
    """Param name -> the balanced layer it must follow (None: base LR), trainable params only."""
    owners = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = pname.rsplit(".", 1)[0]
        if module in balanced:
            owners[pname] = module
        else:
            owners[pname] = norm_owner.get(module)
    owners.update(extra or {})
    return owners


def check_groups(model: nn.Module, tb: TempBalance, owners: dict[str, str | None]) -> list[dict]:
    """param_groups: every trainable param once, frozen ones never, labels and decay right."""
    groups = tb.param_groups(lr=0.1, weight_decay=WD, momentum=0.9)
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter appears in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable
    for group in groups:
        assert group["lr"] == 0.1 and group["momentum"] == 0.9
        label = group[GROUP_KEY]
        assert label is None or label in tb.plan.names
        decays = {group["weight_decay"] == WD}
        for param in group["params"]:
            name = name_of[id(param)]
            assert owners[name] == label, f"{name} labelled {label}, expected {owners[name]}"
            # Transformers' split: matrices decay; biases and norm weights (1-D) do not.
            decays.add(param.ndim >= 2)
        assert len(decays) == 1, f"group {label} mixes decay and no-decay parameters"
    return groups


# ----------------------------------------------------------------------------- timm
def test_resnet18_discovery_and_groups():
    model = resnet18()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    tb = TempBalance(model)
    assert tb.plan.names == convs[1:]  # stem conv1 first -> excluded, fc last -> excluded
    assert "conv1" in tb.plan.skipped and "fc" in tb.plan.skipped
    for layer in tb.plan.layers:
        w = layer.module.weight
        assert layer.num_eigs == w.shape[2] * w.shape[3] * min(w.shape[0], w.shape[1])

    # The authors' rule: a BN follows the conv named like it (bn -> conv); downsample BNs have no
    # such conv and stay at the base LR, as their ResNets' shortcut BNs do.
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    renamed = {n: re.sub(r"bn(\d)$", r"conv\1", n) for n in norms}
    norm_owner = {n: c if c in tb.plan.names else None for n, c in renamed.items()}
    assert norm_owner["bn1"] is None and norm_owner["layer1.0.bn2"] == "layer1.0.conv2"
    assert norm_owner["layer3.0.downsample.1"] is None
    check_groups(model, tb, expected_owners(model, tb.plan.names, norm_owner))

    # "previous": every BN follows the conv registered just before it, downsample BNs included.
    previous = TempBalance(model, norm_follow="previous")
    norm_owner = {n: c if c in tb.plan.names else None for n, c in renamed.items()}
    norm_owner.update({n: n[:-1] + "0" for n in norms if n.endswith("downsample.1")})
    check_groups(model, previous, expected_owners(model, previous.plan.names, norm_owner))


def test_resnet18_min_eigs_and_norm_follow_none():
    model = resnet18()
    tb = TempBalance(model, min_eigs=100, norm_follow="previous")
    # 1x1 downsample convs: 128x64 -> 64 eigenvalues (skipped), 256x128 -> 128, 512x256 -> 256.
    assert "layer2.0.downsample.0" not in tb.plan.names
    assert "min_eigs" in tb.plan.skipped["layer2.0.downsample.0"]
    assert {"layer3.0.downsample.0", "layer4.0.downsample.0"} <= set(tb.plan.names)
    assert all(layer.num_eigs >= 100 for layer in tb.plan.layers)
    owners = tb.plan.owner_of()
    assert "layer2.0.downsample.1.weight" not in owners  # its conv is not balanced
    assert owners["layer3.0.downsample.1.weight"] == "layer3.0.downsample.0"

    plain = TempBalance(model, norm_follow="none")
    for layer in plain.plan.layers:
        assert layer.param_names == [f"{layer.name}.weight"]  # timm convs have no bias
    check_groups(model, plain, expected_owners(model, plain.plan.names, {}))


# ----------------------------------------------------------------------------- GPT-2
GPT2_LINEARS = [f"transformer.h.{i}.{m}" for i in (0, 1)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_conv1d_tied_head():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    tb = TempBalance(model)
    assert tb.plan.names == GPT2_LINEARS[1:]  # c_attn of block 0 first; lm_head last
    assert all(isinstance(layer.module, Conv1D) for layer in tb.plan.layers)
    assert all(layer.num_eigs == 64 for layer in tb.plan.layers)
    norm_owner = {
        "transformer.h.0.ln_1": None,  # nothing balanced before it
        "transformer.h.0.ln_2": "transformer.h.0.attn.c_proj",
        "transformer.h.1.ln_1": "transformer.h.0.mlp.c_proj",
        "transformer.h.1.ln_2": "transformer.h.1.attn.c_proj",
        "transformer.ln_f": "transformer.h.1.mlp.c_proj",
    }
    owners = expected_owners(model, tb.plan.names, norm_owner)
    assert owners["transformer.h.0.attn.c_proj.bias"] == "transformer.h.0.attn.c_proj"
    check_groups(model, tb, owners)


def test_gpt2_head_balanced_shares_the_embedding_once():
    model = tiny_gpt2()
    tb = TempBalance(model, exclude_first_last=False)
    assert tb.plan.names == [*GPT2_LINEARS, "lm_head"]
    head = tb.plan.layers[-1]
    assert head.param_names == ["transformer.wte.weight"]  # one tensor, its first (canonical) name
    owners = expected_owners(model, tb.plan.names, {
        "transformer.h.0.ln_1": None,
        "transformer.h.0.ln_2": "transformer.h.0.attn.c_proj",
        "transformer.h.1.ln_1": "transformer.h.0.mlp.c_proj",
        "transformer.h.1.ln_2": "transformer.h.1.attn.c_proj",
        "transformer.ln_f": "transformer.h.1.mlp.c_proj",
    }, extra={"transformer.wte.weight": "lm_head"})
    check_groups(model, tb, owners)


def test_gpt2_embeddings_balanced_tied_head_skipped():
    model = tiny_gpt2()
    tb = TempBalance(model, layer_types=("linear", "embedding"), exclude_first_last=False,
                     min_eigs=0)
    assert tb.plan.names == ["transformer.wte", "transformer.wpe", *GPT2_LINEARS]
    assert "tied" in tb.plan.skipped["lm_head"]
    owners = expected_owners(model, tb.plan.names, {
        "transformer.h.0.ln_1": "transformer.wpe",  # the embedding is the previous balanced module
        "transformer.h.0.ln_2": "transformer.h.0.attn.c_proj",
        "transformer.h.1.ln_1": "transformer.h.0.mlp.c_proj",
        "transformer.h.1.ln_2": "transformer.h.1.attn.c_proj",
        "transformer.ln_f": "transformer.h.1.mlp.c_proj",
    })
    check_groups(model, tb, owners)


def test_gpt2_norms_follow_the_next_layer_they_feed():
    # GPT-2 is pre-LN: ln_1 feeds attn.c_attn and ln_2 feeds mlp.c_fc, registered right after
    # them. ln_f feeds the (tied, skipped) head: nothing balanced follows it.
    model = tiny_gpt2()
    tb = TempBalance(model, exclude_first_last=False, norm_follow="next")
    assert tb.plan.names == [*GPT2_LINEARS, "lm_head"]
    owners = expected_owners(model, tb.plan.names, {
        "transformer.h.0.ln_1": "transformer.h.0.attn.c_attn",
        "transformer.h.0.ln_2": "transformer.h.0.mlp.c_fc",
        "transformer.h.1.ln_1": "transformer.h.1.attn.c_attn",
        "transformer.h.1.ln_2": "transformer.h.1.mlp.c_fc",
        "transformer.ln_f": "lm_head",
    }, extra={"transformer.wte.weight": "lm_head"})
    check_groups(model, tb, owners)


def test_norm_follow_next_takes_the_first_of_several_candidates_in_a_module():
    class Experts(nn.Module):  # two expert stacks in one module: a norm before it feeds the first
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 128, 64))
            self.down_proj = nn.Parameter(torch.randn(2, 64, 64))

    model = nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), Experts(), nn.LayerNorm(64),
                          nn.Linear(64, 64), nn.Linear(64, 2))
    nxt = TempBalance(model, norm_follow="next").plan
    owner = {p: la.name for la in nxt.layers for p in la.param_names}
    assert owner["1.weight"] == "2.gate_up_proj" and owner["3.weight"] == "4"
    prev = TempBalance(model, norm_follow="previous").plan
    owner = {p: la.name for la in prev.layers for p in la.param_names}
    assert "1.weight" not in owner and owner["3.weight"] == "2.down_proj"  # layer 0 is excluded


def test_frozen_parameters_are_excluded():
    model = tiny_gpt2()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    for p in model.transformer.h[1].attn.parameters():
        p.requires_grad_(False)
    tb = TempBalance(model)
    assert tb.plan.skipped["transformer.h.0.mlp.c_fc"] == "frozen weight"
    assert tb.plan.skipped["transformer.h.1.attn.c_attn"] == "frozen weight"
    assert "transformer.h.1.attn.c_proj" not in tb.plan.names
    assert tb.plan.names == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                             "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    owners = expected_owners(model, tb.plan.names, {
        "transformer.h.0.ln_2": "transformer.h.0.attn.c_proj",
        "transformer.h.1.ln_1": "transformer.h.0.mlp.c_proj",
        # previous candidate is the frozen attn.c_proj of block 1: base LR
        "transformer.ln_f": "transformer.h.1.mlp.c_proj",
    })
    assert owners["transformer.h.0.mlp.c_fc.bias"] is None  # trainable bias of a frozen weight
    check_groups(model, tb, owners)


# ----------------------------------------------------------------------------- BERT
def test_bert_discovery_and_groups():
    model = tiny_bert()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears[0].endswith("layer.0.attention.self.query") and linears[-1] == "classifier"
    tb = TempBalance(model)
    assert tb.plan.names == linears[1:-1]  # includes the pooler
    assert "bert.pooler.dense" in tb.plan.names
    norm_owner = {"bert.embeddings.LayerNorm": None}
    for i in (0, 1):
        p = f"bert.encoder.layer.{i}"
        norm_owner[f"{p}.attention.output.LayerNorm"] = f"{p}.attention.output.dense"
        norm_owner[f"{p}.output.LayerNorm"] = f"{p}.output.dense"
    check_groups(model, tb, expected_owners(model, tb.plan.names, norm_owner))


# ----------------------------------------------------------------------------- Llama
LLAMA_LINEARS = [f"model.layers.{i}.{m}" for i in (0, 1) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def llama_norms() -> dict[str, str | None]:
    # LlamaDecoderLayer registers its RMSNorms after the MLP: both follow that block's down_proj.
    out = {}
    for i in (0, 1):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}"] = f"model.layers.{i}.mlp.down_proj"
    out["model.norm"] = "model.layers.1.mlp.down_proj"
    return out


def test_llama_rmsnorm_and_tied_embeddings():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tb = TempBalance(model, norm_follow="previous")
    assert tb.plan.names == LLAMA_LINEARS[1:]
    assert "lm_head" in tb.plan.skipped
    owners = expected_owners(model, tb.plan.names, llama_norms())
    assert owners["model.layers.0.input_layernorm.weight"] == "model.layers.0.mlp.down_proj"
    check_groups(model, tb, owners)
    # The default (authors' LM rule): a norm right after another norm follows nothing.
    authors = TempBalance(model)
    second = {n: None for n in llama_norms() if n.endswith(("post_attention_layernorm", "model.norm"))}
    check_groups(model, authors, expected_owners(model, authors.plan.names,
                                                 {**llama_norms(), **second}))

    with_emb = TempBalance(model, layer_types=("linear", "embedding"), exclude_first_last=False,
                           norm_follow="previous")
    assert with_emb.plan.names == ["model.embed_tokens", *LLAMA_LINEARS]
    assert "tied" in with_emb.plan.skipped["lm_head"]
    check_groups(model, with_emb, expected_owners(model, with_emb.plan.names, llama_norms()))


# ----------------------------------------------------------------------------- plain modules
def test_plain_sequential():
    model = mlp()
    # Default (authors'): BatchNorm 5 has no conv named like it (bn -> conv), so it stays at the
    # base LR; LayerNorm 3 follows 2; LayerNorm 9 follows 8, which is not balanced.
    authors = TempBalance(model)
    check_groups(model, authors, expected_owners(model, authors.plan.names,
                                                 {"3": "2", "5": None, "9": None}))
    tb = TempBalance(model, norm_follow="previous")
    assert tb.plan.names == ["2", "4", "6"]
    assert "min_eigs" in tb.plan.skipped["8"]
    assert "first/last" in tb.plan.skipped["0"] and "first/last" in tb.plan.skipped["10"]
    # "previous": BatchNorm 5 follows 4.
    owners = expected_owners(model, tb.plan.names, {"3": "2", "5": "4", "9": None})
    assert owners["2.bias"] == "2" and owners["5.weight"] == "4" and owners["0.weight"] is None
    groups = check_groups(model, tb, owners)
    # one decay + one no-decay group per balanced layer, then the shared pair
    labels = [(g[GROUP_KEY], g["weight_decay"] > 0) for g in groups]
    assert labels == [("2", True), ("2", False), ("4", True), ("4", False), ("6", True),
                      ("6", False), (None, True), (None, False)]

    everything = TempBalance(model, exclude_first_last=False, min_eigs=0, norm_follow="none")
    assert everything.plan.names == ["0", "2", "4", "6", "8", "10"]
    check_groups(model, everything, expected_owners(model, everything.plan.names, {}))


def test_include_exclude_patterns():
    model = tiny_gpt2()
    tb = TempBalance(model, include=(r"\.mlp\.",), exclude=(r"h\.1\.mlp\.c_proj$",),
                     exclude_first_last=False)
    assert tb.plan.names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                             "transformer.h.1.mlp.c_fc"]
    assert tb.plan.skipped["transformer.h.0.attn.c_attn"] == "not matched by include"
    assert tb.plan.skipped["transformer.h.1.mlp.c_proj"] == "matched by exclude"


def test_decay_names_override():
    model = mlp()
    tb = TempBalance(model)
    decay = {"2.weight", "6.weight", "10.weight"}
    groups = tb.param_groups(lr=0.1, weight_decay=WD, decay_names=decay)
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for param in group["params"]:
            assert (group["weight_decay"] == WD) == (name_of[id(param)] in decay)


def test_no_balanced_layer_warns():
    with pytest.warns(UserWarning, match="no layer to balance"):
        tb = TempBalance(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    assert tb.plan.names == []
    groups = tb.param_groups(lr=0.1)
    assert all(g[GROUP_KEY] is None for g in groups)
    assert sum(len(g["params"]) for g in groups) == 4


def test_groups_work_with_torch_optimizers():
    model = tiny_gpt2().double()
    tb = TempBalance(model, interval=1)
    opt = torch.optim.AdamW(tb.param_groups(lr=1e-3, weight_decay=0.01))
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    # One AdamW step, read from outside: the first step moves p to p·(1 - lr·wd) - lr·g/(|g| + eps),
    # so lr = Δp / (wd·p + g/(|g| + eps)) for every element with a gradient well above eps.
    tb.attach(opt)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    opt.step()
    assert tb.num_updates == 1 and len({round(m, 6) for m in tb.multipliers.values()}) > 2
    owner = tb.plan.owner_of()
    for name, p in named.items():
        g = p.grad
        mask = g.abs() > 1e-4
        if not mask.any():
            continue
        moved = before[name] - p.detach()
        direction = wd[id(p)] * before[name] + g / (g.abs() + opt.defaults["eps"])
        lr = (moved[mask] / direction[mask]).median().item()
        want = 1e-3 * (tb.multipliers[owner[name]] if name in owner else 1.0)
        assert lr == pytest.approx(want, rel=1e-6), name
