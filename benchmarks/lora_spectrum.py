#!/usr/bin/env python
"""Which spectrum should rank the layers of a LoRA fine-tune: W0 + ΔW or ΔW alone?

    python benchmarks/lora_spectrum.py [--pretrain-steps 600] [--finetune-steps 400] [--every 25]
                                       [--seeds 0] [--json FILE]

A small but real fine-tune, offline: a tiny Llama (width 128, 4 blocks, vocabulary 2,000) built
from a config is pre-trained on Shakespeare's plays (``recipes/data/make_shakespeare_ptb.py``, the
training split), then LoRA-fine-tuned (r=8, alpha 16, q/k/v/o/up/down, AdamW, no TempBalance) on
three other plays (the validation split). Every ``--every`` fine-tuning steps it records, for each
of the 24 adapted modules, the Hill alpha (median xmin, as the engine) of

* ``effective``: the ESD of ``W0 + s·B·A`` (128 eigenvalues; what the engine uses),
* ``delta``: the ``r`` non-zero eigenvalues of ``ΔW = s·B·A`` alone (its other eigenvalues are 0),
* ``base``: ``W0`` (fixed during the fine-tune),

and reports per record: how many ``delta`` alphas are defined; the Spearman correlation of the
rankings (effective vs delta, effective vs base, delta vs base); each ranking's Spearman
correlation with its own previous record (stability across updates); and the mean |alpha change|
of the effective alphas from the base ones.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import add_common_args, median, report, run_with_threads, start  # noqa: E402

from hf_tempbalance import TempBalance, TempBalanceConfig  # noqa: E402
from hf_tempbalance.spectral import compute_metric  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
VOCAB, SEQ, BATCH = 2000, 64, 16


def corpus(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-training ids, fine-tuning ids) as 1-D tensors: training plays, then three others."""
    sys.path.insert(0, str(RECIPES / "data"))
    import make_shakespeare_ptb

    make_shakespeare_ptb.main(["--out", str(tmp), "--vocab_size", str(VOCAB)])
    words = {name: (tmp / f"ptb.{name}.txt").read_text().replace("\n", " <eos> ").split()
             for name in ("train", "valid")}
    vocab = {w: i for i, w in enumerate(sorted(set(words["train"]) | {"<unk>", "<eos>"}))}
    unk = vocab["<unk>"]
    return tuple(torch.tensor([vocab.get(w, unk) for w in words[n]]) for n in ("train", "valid"))


def batches(ids: torch.Tensor, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=gen)
        yield torch.stack([ids[s:s + SEQ] for s in starts.tolist()])


def train(model, ids: torch.Tensor, steps: int, lr: float, seed: int, on_step=None) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = batches(ids, torch.Generator().manual_seed(seed))
    last = math.nan
    for step in range(steps + 1):
        if on_step is not None:
            on_step(step)
        if step == steps:
            break
        batch = next(data)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = loss.item()
    return last


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def spearman(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    return float(np.corrcoef(ranks(a[ok]), ranks(b[ok]))[0, 1])


def delta_alpha(module) -> float:
    """Hill alpha of the r non-zero eigenvalues of s·B·A (float64)."""
    b = module.lora_B["default"].weight.detach().double()
    a = module.lora_A["default"].weight.detach().double()
    eigs = torch.linalg.svdvals(module.scaling["default"] * b @ a)[: a.shape[0]].pow(2)
    return float(compute_metric(eigs, "alpha_hill"))


def study(seed: int, args, ids_pre: torch.Tensor, ids_ft: torch.Tensor) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    pre_loss = train(model, ids_pre, args.pretrain_steps, 3e-3, seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                             lora_dropout=0.0))
    tb = TempBalance(model, TempBalanceConfig(exclude_first_last=False, min_eigs=1))
    names = tb.plan.names
    base = [float(compute_metric(torch.linalg.svdvals(
        model.get_submodule(n).base_layer.weight.detach().double()).pow(2), "alpha_hill"))
        for n in names]
    records: list[dict] = []

    def record(step: int) -> None:
        if step % args.every:
            return
        effective = tb.compute_metrics()
        delta = [delta_alpha(model.get_submodule(n)) for n in names]
        row = {"step": step, "effective": effective, "delta": delta}
        if records:
            row["stability_effective"] = spearman(effective, records[-1]["effective"])
            row["stability_delta"] = spearman(delta, records[-1]["delta"])
        records.append(row)

    ft_loss = train(model, ids_ft, args.finetune_steps, 2e-3, seed + 1, on_step=record)
    return {"seed": seed, "pretrain_loss": pre_loss, "finetune_loss": ft_loss, "layers": names,
            "base": base, "records": records}


def summarise(result: dict) -> list[list]:
    rows = []
    base = result["base"]
    for r in result["records"]:
        eff, delta = r["effective"], r["delta"]
        defined = sum(math.isfinite(v) for v in delta)
        rows.append([result["seed"], r["step"], f"{defined}/{len(delta)}",
                     f"{spearman(eff, delta):.2f}", f"{spearman(eff, base):.3f}",
                     f"{spearman(delta, base):.2f}",
                     f"{r.get('stability_effective', math.nan):.3f}",
                     f"{r.get('stability_delta', math.nan):.2f}",
                     f"{np.mean(np.abs(np.asarray(eff) - np.asarray(base))):.4f}"])
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    device = start(args, "lora_spectrum")
    with tempfile.TemporaryDirectory() as tmp:
        ids_pre, ids_ft = corpus(Path(tmp))
    results = [study(seed, args, ids_pre, ids_ft) for seed in args.seeds]
    rows = [row for result in results for row in summarise(result)]
    for result in results:
        later = [r for r in result["records"] if r["step"] > 0]
        print(f"seed {result['seed']}: pre-training loss {result['pretrain_loss']:.2f}, "
              f"fine-tuning loss {result['finetune_loss']:.2f}; median stability after step 0: "
              f"effective {median([r['stability_effective'] for r in later[1:]]):.3f}, "
              f"delta {median([r['stability_delta'] for r in later[1:]]):.2f}")
    report(args, device, "Rankings of the 24 adapted modules during a LoRA fine-tune",
           ["seed", "step", "ΔW alphas defined", "ρ(eff, ΔW)", "ρ(eff, W0)", "ρ(ΔW, W0)",
            "ρ(eff, previous)", "ρ(ΔW, previous)", "mean |α_eff - α_W0|"], rows, results=results)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25, help="fine-tuning steps between records")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_common_args(parser)
    return run_with_threads(parser.parse_args(argv), run)


if __name__ == "__main__":
    main()
