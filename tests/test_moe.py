"""Mixture-of-experts blocks as Transformers 5 writes them: the experts of a layer live in 3-D
parameters of one ``...Experts`` module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``).
Each such stack is balanced as one layer whose ESD pools its experts' eigenvalues."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hf_tempbalance import SpectralNormRegularizer, TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd
from hf_tempbalance.spectral.hill_reference import hill_alpha_reference

transformers = pytest.importorskip("transformers")


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=80,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config)


def pooled(stack: torch.Tensor) -> torch.Tensor:
    """Independent ESD of a (k, m, n) stack: every expert's squared singular values, pooled."""
    return torch.cat([torch.linalg.svdvals(w.double()).pow(2) for w in stack]).sort().values


def test_expert_stacks_are_balanced_with_pooled_spectra():
    model = tiny_mixtral()
    tb = TempBalance(model, TempBalanceConfig(dtype="float64", norm_follow="previous"))
    for i in (0, 1):
        experts = f"model.layers.{i}.mlp.experts"
        assert f"{experts}.gate_up_proj" in tb.plan.names and f"{experts}.down_proj" in tb.plan.names
    layer = next(la for la in tb.plan.layers if la.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert layer.param_names == ["model.layers.0.mlp.experts.gate_up_proj"]
    assert layer.num_eigs == 4 * 64  # 4 experts of (160, 64)
    weight = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    torch.testing.assert_close(esd(layer.module, dtype=torch.float64), pooled(weight))
    tb.update()
    assert tb.metrics[layer.name] == pytest.approx(hill_alpha_reference(pooled(weight).numpy()), rel=1e-9)
    # The router (a 2-D weight, 4 experts x 64) is a candidate like an nn.Linear gate would be;
    # with 4 eigenvalues it is skipped by min_eigs, with the reason.
    assert tb.plan.skipped["model.layers.0.mlp.gate"] == "4 eigenvalues < min_eigs=50"
    # The layer norms after the experts follow the last expert stack registered before them.
    down = next(la for la in tb.plan.layers if la.name == "model.layers.0.mlp.experts.down_proj")
    assert "model.layers.0.post_attention_layernorm.weight" in down.param_names


def test_trainer_applies_the_multiplier_to_the_expert_parameters(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_tempbalance import TempBalanceCallback

    model = tiny_mixtral()
    seen: list[dict[str, float]] = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            names = {id(p): n for n, p in model.named_parameters()}
            optimizer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(
                {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}))

    tempbalance = TempBalanceCallback(interval=1)
    data = [{"input_ids": torch.randint(0, 128, (16,)), "labels": torch.randint(0, 128, (16,))}
            for _ in range(8)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, lr_scheduler_type="constant", use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[tempbalance, Record()]).train()
    m = tempbalance.engine.multipliers
    assert len(seen) == 2
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert seen[-1][name] == pytest.approx(1e-3 * m[name])
    assert len(set(m.values())) > 2


class SwappedExperts(nn.Module):
    """GPT-OSS-style layout: (E, in, out) weights with (E, out) biases named ``<weight>_bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 32, 96))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(3, 96))
        self.down_proj = nn.Parameter(torch.randn(3, 48, 32))
        self.down_proj_bias = nn.Parameter(torch.zeros(3, 32))


def test_biases_follow_their_stack_and_orientation_does_not_matter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), SwappedExperts(), nn.Linear(32, 32), nn.Linear(32, 2))
    tb = TempBalance(model, TempBalanceConfig(min_eigs=10))
    layers = {la.name: la for la in tb.plan.layers}
    assert list(layers) == ["1.gate_up_proj", "1.down_proj", "2"]
    assert layers["1.gate_up_proj"].param_names == ["1.gate_up_proj", "1.gate_up_proj_bias"]
    assert layers["1.down_proj"].param_names == ["1.down_proj", "1.down_proj_bias"]
    assert layers["1.gate_up_proj"].num_eigs == 3 * 32
    torch.testing.assert_close(esd(layers["1.down_proj"].module, dtype=torch.float64),
                               pooled(model[1].down_proj.detach()))


def test_snr_penalises_each_expert_matrix():
    torch.manual_seed(0)
    experts = SwappedExperts()
    strength = 0.01
    w = experts.down_proj.detach().clone().requires_grad_()
    (0.5 * strength * torch.linalg.matrix_norm(w, ord=2).pow(2).sum()).backward()  # per expert
    stack = TempBalance(nn.Sequential(nn.Linear(8, 48), experts, nn.Linear(32, 2)),
                        TempBalanceConfig(min_eigs=10)).plan.layers[1].module
    experts.down_proj.grad = torch.zeros_like(experts.down_proj)
    regularizer = SpectralNormRegularizer([stack], strength, iterations=300)
    regularizer.apply_()
    np.testing.assert_allclose(experts.down_proj.grad.numpy(), w.grad.numpy(), rtol=1e-3, atol=1e-6)
    expected_penalty = 0.5 * strength * torch.linalg.matrix_norm(w.detach(), ord=2).pow(2).sum()
    assert float(regularizer.penalty()) == pytest.approx(float(expected_penalty), rel=1e-4)


class WideRouter(nn.Module):
    """A 64-expert router in Transformers 5's style: a plain (experts, hidden) weight and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 96))
        self.bias = nn.Parameter(torch.zeros(64))


def test_a_wide_router_is_balanced_like_a_linear_gate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 96), WideRouter(), nn.Linear(64, 64), nn.Linear(64, 2))
    tb = TempBalance(model, TempBalanceConfig(dtype="float64"))
    layers = {la.name: la for la in tb.plan.layers}
    assert layers["1"].param_names == ["1.weight", "1.bias"] and layers["1"].num_eigs == 64
    expected = torch.linalg.svdvals(model[1].weight.detach().double()).pow(2).sort().values
    torch.testing.assert_close(esd(layers["1"].module, dtype=torch.float64), expected)


def test_an_expert_stack_costs_its_matrices_for_the_rank_split():
    from hf_tempbalance.distributed import layer_cost

    experts = SwappedExperts()  # gate_up_proj: 3 experts of 32 x 96
    stack = TempBalance(nn.Sequential(nn.Linear(8, 32), experts, nn.Linear(32, 2)),
                        TempBalanceConfig(min_eigs=10)).plan.layers[0].module
    d, r = 32, 96
    assert layer_cost(stack) == pytest.approx(3 * (2 * r * d * d + 4 / 3 * d ** 3))


def test_analysis_counts_each_stacks_eigenvalues():
    from hf_tempbalance import analyze_model

    report = analyze_model(tiny_mixtral(), layers="all", keep_esds=True, progress=False)
    down = report["model.layers.0.mlp.experts.down_proj"]  # 4 experts of (64, 80)
    assert down.num_eigs == len(down.eigs) == 4 * 64
