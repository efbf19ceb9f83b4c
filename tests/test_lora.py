"""LoRA / PEFT models: each adapted module is one balanced layer whose ESD is that of its effective
weight W0 + s·B·A, and whose multiplier goes to its adapter parameters (A, B, DoRA's magnitude).

Expectations are computed here from the parameters in float64 (``svdvals²`` of the effective
weight, the LR each parameter really stepped with under plain SGD), never by the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expected import numpy_hill
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.spectral import esd

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def lora_llama(seed: int = 0, *, move_b: bool = True, **lora) -> nn.Module:
    model = get_peft_model(tiny_llama(seed), LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, **lora))
    if move_b:  # as after some training: B away from its zero start
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def effective(module, adapters=("default",)) -> torch.Tensor:
    """W0 + Σ s·B·A in float64, from the peft module's parameters."""
    w = module.base_layer.weight.detach().double().clone()
    for name in adapters:
        b = module.lora_B[name].weight.detach().double()
        a = module.lora_A[name].weight.detach().double()
        w += module.scaling[name] * b @ a
    return w


def eigs(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix).pow(2).sort().values


def config(**kw) -> TempBalanceConfig:
    return TempBalanceConfig(**{"exclude_first_last": False, "dtype": "float64", **kw})


def test_each_adapted_module_is_one_layer_with_the_spectrum_of_its_effective_weight():
    model = lora_llama()
    tb = TempBalance(model, config())
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A")
               and isinstance(m.lora_A, nn.ModuleDict)]
    assert tb.plan.names == adapted and len(adapted) == 2 * len(TARGETS)
    # Neither the frozen base layers nor the r-sized lora_A / lora_B are layers of their own.
    assert not any("lora_" in name or "base_layer" in name
                   for name in [*tb.plan.skipped, *(n for n, _ in tb.plan.candidates)])
    for layer in tb.plan.layers:
        owner = model.get_submodule(layer.name)
        assert layer.param_names == [f"{layer.name}.lora_A.default.weight",
                                     f"{layer.name}.lora_B.default.weight"]
        assert layer.num_eigs == min(owner.base_layer.weight.shape)
        torch.testing.assert_close(esd(layer.module, dtype=torch.float64), eigs(effective(owner)))
    rows = tb.update()
    expected = [numpy_hill(eigs(effective(model.get_submodule(name)))) for name in tb.plan.names]
    assert [r["value"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert all(r["valid"] for r in rows)


def test_step_zero_has_a_full_spectrum_while_every_b_is_zero():
    model = lora_llama(move_b=False)
    tb = TempBalance(model, config())
    with torch.no_grad():  # nothing zero-sized: the effective weight is W0 itself
        rows = tb.update()
    expected = [numpy_hill(eigs(model.get_submodule(n).base_layer.weight.detach().double()))
                for n in tb.plan.names]
    assert [r["value"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert all(r["valid"] for r in rows)
    assert min(tb.multipliers.values()) < 1 < max(tb.multipliers.values())


def test_a_non_finite_adapter_leaves_its_layer_invalid_and_the_rest_balanced():
    model = lora_llama()
    tb = TempBalance(model, config())
    broken = tb.plan.names[3]
    with torch.no_grad():
        model.get_submodule(broken).lora_B["default"].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"no valid alpha_hill for 1 layer"):
        rows = tb.update()
    assert [r["layer"] for r in rows if not r["valid"]] == [broken]
    assert tb.multipliers[broken] == 1.0
    assert (min(tb.multipliers.values()), max(tb.multipliers.values())) == pytest.approx((0.5, 1.5))


def test_sgd_steps_each_adapter_with_base_lr_times_its_multiplier_and_base_weights_stay():
    model = lora_llama().double()  # float64: (before - after) / grad is exact enough to compare
    tb = TempBalance(model, config(interval=1))
    lr = 0.05
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    tb.attach(optimizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    owner = tb.plan.owner_of()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()
                  if p.requires_grad}
        optimizer.step()
        assert len(set(tb.multipliers.values())) > 2  # a real spread, not all 1
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            start, grad = before[name]
            used = (start - p.detach()).double() / grad.double()
            mask = grad.abs() > 1e-6
            assert mask.any()
            expected = lr * tb.multipliers[owner[name]]
            torch.testing.assert_close(used[mask], torch.full_like(used[mask], expected),
                                       rtol=1e-6, atol=0, msg=name)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_dora_rescales_rows_and_its_magnitude_follows_the_layer():
    model = lora_llama(use_dora=True)
    with torch.no_grad():  # magnitudes away from their init (the row norms of W0)
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    tb = TempBalance(model, config())
    for layer in tb.plan.layers:
        owner = model.get_submodule(layer.name)
        assert layer.param_names[-1] == f"{layer.name}.lora_magnitude_vector.default.weight"
        w = effective(owner)
        m = owner.lora_magnitude_vector["default"].weight.detach().double()
        torch.testing.assert_close(esd(layer.module, dtype=torch.float64),
                                   eigs((m / w.norm(dim=1))[:, None] * w))
    # The effective weight is what the DoRA forward computes: check it on one module.
    owner = model.get_submodule(tb.plan.names[0])
    x = torch.randn(5, owner.base_layer.in_features)
    with torch.no_grad():
        out = owner(x)
        mine = x @ tb.plan.layers[0].module.weight.T
    torch.testing.assert_close(out, mine, rtol=1e-5, atol=1e-5)


def test_only_active_unmerged_adapters_count():
    model = lora_llama()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.normal_(0, 0.1)
    tb = TempBalance(model, config())
    layer = tb.plan.layers[0]
    owner = model.get_submodule(layer.name)
    # "default" is active, "second" is not (peft froze it): only default's A and B follow.
    assert layer.param_names == [f"{layer.name}.lora_{ab}.default.weight" for ab in "AB"]
    torch.testing.assert_close(esd(layer.module, dtype=torch.float64), eigs(effective(owner)))
    model.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(esd(layer.module, dtype=torch.float64),
                               eigs(effective(owner, ("default", "second"))))
    with model.disable_adapter():
        torch.testing.assert_close(esd(layer.module, dtype=torch.float64),
                                   eigs(owner.base_layer.weight.detach().double()))
    model.base_model.set_adapter("default")
    owner.merge(adapter_names=["default"])  # now W0 holds ΔW: it must not be added twice
    torch.testing.assert_close(esd(layer.module, dtype=torch.float64),
                               eigs(owner.base_layer.weight.detach().double()))


def test_gpt2_conv1d_base_is_read_out_by_in():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=97, n_positions=16)
    torch.manual_seed(0)
    model = get_peft_model(transformers.GPT2LMHeadModel(cfg), LoraConfig(
        r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tb = TempBalance(model, config())
    assert len(tb.plan.names) == 4
    for layer in tb.plan.layers:
        owner = model.get_submodule(layer.name)
        w0 = owner.base_layer.weight.detach().double().T  # Conv1D stores (in, out)
        b, a = owner.lora_B["default"].weight.double(), owner.lora_A["default"].weight.double()
        assert tuple(layer.module.weight.shape) == tuple(w0.shape)
        torch.testing.assert_close(esd(layer.module, dtype=torch.float64),
                                   eigs(w0 + owner.scaling["default"] * b.detach() @ a.detach()))


def test_lora_on_an_embedding_is_skipped_with_the_reason():
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["embed_tokens", "q_proj"]))
    tb = TempBalance(model, config())
    embed = next(name for name in tb.plan.skipped if name.endswith("embed_tokens"))
    assert "only LoRA on linear layers" in tb.plan.skipped[embed]
    assert all(name.endswith("q_proj") for name in tb.plan.names) and len(tb.plan.names) == 2


def test_snr_gradient_reaches_a_and_b_through_the_effective_weight():
    model = lora_llama().double()
    strength = 0.1
    tb = TempBalance(model, config(snr_strength=strength, snr_iterations=200, balance_lr=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    tb.snr.apply_()
    got = [p.grad.clone() for p in trainable]
    # Independently: autograd of (λ/2)·σ_max(W0 + s·B·A)² summed over the adapted modules.
    for p in trainable:
        p.grad = None
    penalty = 0.0
    for name in tb.plan.names:
        owner = model.get_submodule(name)
        w = owner.base_layer.weight + owner.scaling["default"] * (
            owner.lora_B["default"].weight @ owner.lora_A["default"].weight)
        penalty = penalty + 0.5 * strength * torch.linalg.matrix_norm(w, 2) ** 2
    penalty.backward()
    for p, g in zip(trainable, got):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)  # SNR runs in float32
    assert all(g.abs().sum() > 0 for g in got)


def test_fsdp2_sharded_lora_layers_are_refused_naming_ddp(monkeypatch):
    import hf_tempbalance.distributed as distributed

    tb = TempBalance(lora_llama(), config())
    monkeypatch.setattr(distributed, "_is_dtensor", lambda tensor: True)  # as under fully_shard
    with pytest.raises(RuntimeError, match="does not gather FSDP2.*train LoRA with DDP"):
        tb.update()


class Linear4bit(nn.Module):
    """Stands in for bitsandbytes' 4-bit linear (the class name is what is recognised)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out * d_in // 2, 1, dtype=torch.uint8),
                                   requires_grad=False)


class FakeQLoraLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base_layer = Linear4bit(64, 64)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(64, 8, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(8, 64, bias=False)})
        self.scaling = {"default": 2.0}


def test_quantized_base_weights_are_refused_naming_the_fix():
    model = nn.Sequential(FakeQLoraLayer(), FakeQLoraLayer())
    with pytest.raises(ValueError, match=r"0: the LoRA base weight is quantized \(Linear4bit.*"
                                         r"Load the base model in bf16.*exclude"):
        TempBalance(model, config())
    # Left out by name, the rest (nothing here) is balanced without touching them.
    with pytest.warns(UserWarning, match="found no layer"):
        TempBalance(model, config(exclude=[r"^\d$"]))


# --------------------------------------------------------------------------- Trainer
def lm_data(n: int) -> list[dict]:
    ids = torch.randint(0, 97, (n, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(out: Path, *, stop: int | None = None, resume: str | None = None):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_tempbalance import TempBalanceCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop is not None and state.global_step == stop:
                control.should_training_stop = True

    args = TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=5e-3, optim="sgd", lr_scheduler_type="linear",
                             save_strategy="steps", save_steps=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=7, dataloader_num_workers=0,
                             logging_steps=1000)
    callback = TempBalanceCallback(interval=2, dtype="float64")
    trainer = Trainer(model=lora_llama(move_b=False), args=args, train_dataset=lm_data(32),
                      callbacks=[callback, StopAt()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.mark.slow
def test_trainer_balances_a_peft_model_with_defaults_and_resumes_identically(tmp_path):
    straight, cb = train(tmp_path / "a")
    engine = cb.engine
    # Defaults (min_eigs=50, exclude_first_last): the adapted modules are balanced from step 0.
    assert len(engine.plan.names) == 2 * len(TARGETS) - 1
    assert all(row["valid"] for row in engine.history)
    assert engine.num_updates == 4 and len(set(engine.multipliers.values())) > 2
    train(tmp_path / "b", stop=4)
    resumed, cb_b = train(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"))
    assert cb_b.engine.multipliers == engine.multipliers
    for (name, a), (_, b) in zip(straight.model.named_parameters(),
                                 resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_ddp_two_cpu_processes_share_the_lora_update(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONWARNINGS="ignore::DeprecationWarning", WANDB_DISABLED="true")
    from launching import free_port, run_launcher

    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(REPO / "tests" / "scripts" / "lora_trainer_run.py"), str(tmp_path)]
    proc = run_launcher(cmd, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["multipliers"] == ranks[1]["multipliers"]  # bit-identical
    assert ranks[0]["updates"] == ranks[1]["updates"] == 3
    mine = [set(r["computed"]) for r in ranks]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(ranks[0]["multipliers"])
    # Each rank's multipliers are those of the single-process update of the final weights.
    model = lora_llama(move_b=False)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(model, state)
    tb = TempBalance(model, dtype="float64")
    tb.update()
    assert tb.multipliers == pytest.approx(ranks[0]["final_multipliers"], rel=1e-9)


PEFT_LAYOUT_WITHOUT_PEFT = """
import json, sys
import torch
from torch import nn
from hf_tempbalance import TempBalance

class Lora(nn.Module):  # PEFT's lora.Linear layout, built by hand
    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(64, 64).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(64, 8, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(8, 64, bias=False)})
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]

torch.manual_seed(0)
model = nn.Sequential(*(Lora() for _ in range(3)))
tb = TempBalance(model, exclude_first_last=False)
tb.update()
print(json.dumps({"names": tb.plan.names, "kinds": [type(l.module).__name__ for l in tb.plan.layers],
                  "updates": tb.num_updates, "peft_imported": "peft" in sys.modules}))
"""


def test_peft_models_are_found_without_importing_peft_in_the_library():
    out = subprocess.run([sys.executable, "-c", PEFT_LAYOUT_WITHOUT_PEFT], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # found as LoRA layers (one candidate each, the adapted weight), updated, and peft never imported
    assert got == {"names": ["0", "1", "2"], "kinds": ["LoraAdapted"] * 3, "updates": 1,
                   "peft_imported": False}
