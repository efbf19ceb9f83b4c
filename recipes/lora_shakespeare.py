#!/usr/bin/env python
"""LoRA fine-tuning of a small causal LM on held-out Shakespeare plays, with or without TempBalance.

Two stages, one run each (``recipes/studies/lora_finetune.py`` runs the grid)::

    python recipes/lora_shakespeare.py pretrain --output_dir BASE        # full training, no LoRA
    python recipes/lora_shakespeare.py finetune --base BASE --method tb --learning_rate 3e-3 \
        --seed 43 --output_dir RUN                                        # LoRA (+ TempBalance)

Data: the offline PTB-format Shakespeare corpus (``recipes/data/make_shakespeare_ptb.py``, read
with ``recipes/ptb_lm.py``'s reader from ``--data_dir``). Pre-training reads the 32 training
plays; fine-tuning reads the three validation-split plays (Hamlet, The Tempest, Twelfth Night),
which pre-training never saw: their text is cut into blocks of ``--block`` tokens and every
tenth block (0-based index ≡ 8 mod 10) is the fine-tuning validation set, every tenth (≡ 9) its
test set, the rest its training set, so each play is in all three. The vocabulary is the
``--vocab_size - 1`` most frequent pre-training words plus ``<unk>`` (ties in order of first
appearance), shared by both stages.

Model: a Llama built from a config (``--width``, ``--layers``, ``--heads``; MLP 8/3 x width),
trained with the Transformers ``Trainer`` on windows of ``--seq_len`` tokens (each predicts its
next tokens), AdamW, cosine LR. Fine-tuning wraps the saved base with PEFT LoRA (r=8, alpha 16, no
dropout, on q/k/v/o/up/down: the base stays frozen) and, for ``--method tb``, adds
``TempBalanceCallback()`` with its defaults (once per epoch, (s1, s2) = (0.5, 1.5), each adapted
module balanced by the ESD of W0 + s·B·A). ``--method lora`` is the same run without it. The same
seed gives both methods the same adapter initialisation and data order.

Outputs in ``--output_dir``: ``results.json`` (validation perplexity after every epoch, test
perplexity after the last one, the base model's perplexities before fine-tuning, and for ``tb``
the TempBalance history), the adapter (``adapter/``) or the base model, and
``tempbalance_history.jsonl`` (``tb``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from ptb_lm import UNK, DataArguments, corpus_record, read_splits  # noqa: E402
from run_records import write_whole  # noqa: E402

from hf_tempbalance import TempBalanceCallback  # noqa: E402
from hf_tempbalance.history import HISTORY_FILE  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
VOCAB_FILE = "vocab.json"


# ------------------------------------------------------------------------------------ data
def build_vocab(tokens: Sequence[str], size: int) -> dict[str, int]:
    """The ``size - 1`` most frequent words (ties: first appearance first) and ``<unk>``."""
    counts = Counter(tokens)
    words = [w for w, _ in counts.most_common() if w != UNK][: size - 1]
    return {w: i for i, w in enumerate([UNK, *words])}


def encode(tokens: Sequence[str], vocab: dict[str, int]) -> torch.Tensor:
    unk = vocab[UNK]
    return torch.tensor([vocab.get(t, unk) for t in tokens], dtype=torch.long)


def split_blocks(ids: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Fine-tuning train / valid / test: blocks ``i`` with ``i mod 10`` in 0-7 / 8 / 9."""
    blocks = list(torch.split(ids, block))
    part = {"train": [], "valid": [], "test": []}
    for i, b in enumerate(blocks):
        part["valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"].append(b)
    return {k: torch.cat(v) for k, v in part.items()}


def windows(ids: torch.Tensor, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows of ``seq_len`` tokens (the remainder is dropped); the model
    shifts the labels, so each window scores ``seq_len - 1`` next-token predictions."""
    n = ids.numel() // seq_len
    rows = ids[: n * seq_len].view(n, seq_len)
    return [{"input_ids": r, "labels": r} for r in rows]


def corpus(data_dir: str, vocab_size: int,
           block: int) -> tuple[dict[str, int], dict[str, torch.Tensor], str]:
    """``(vocab, ids, sha256)``: ids ``pretrain`` (training plays) and fine-tuning ``train`` /
    ``valid`` / ``test`` (the validation-split plays, see :func:`split_blocks`); the digest of
    the text (:func:`ptb_lm.corpus_record`), which a base model records."""
    splits = read_splits(DataArguments(data_dir=data_dir))
    vocab = build_vocab(splits["train"], vocab_size)
    ids = {"pretrain": encode(splits["train"], vocab)}
    ids.update(split_blocks(encode(splits["valid"], vocab), block))
    return vocab, ids, corpus_record(splits, vocab, data_dir)["sha256"]


def token_counts(ids: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(stream.numel()) for name, stream in ids.items()}


def check_base_corpus(base: Path, vocab: dict[str, int], tokens: dict[str, int], sha256: str) -> None:
    """Refuse to fine-tune a base pre-trained on other text: the fine-tuning split comes from the
    same corpus, so the adapters would learn (and be scored on) text the base's numbers were not
    measured on. The token counts also hold the fine-tuning split (``--block``) to the one the
    base's perplexities were measured on; a base saved before the digest was recorded is held to
    its counts alone."""
    fix = "pass the --data_dir, --vocab_size and --block it was pre-trained with, or pre-train again"
    if json.loads((base / VOCAB_FILE).read_text(encoding="utf-8")) != vocab:
        raise SystemExit(f"{base} was pre-trained with another vocabulary; {fix}")
    saved = json.loads((base / "results.json").read_text(encoding="utf-8"))
    if saved.get("corpus_sha256", sha256) != sha256 or saved.get("tokens", tokens) != tokens:
        raise SystemExit(f"{base} was pre-trained on another corpus or --block split "
                         f"({saved.get('tokens')} tokens; here {tokens}); {fix}")


# ------------------------------------------------------------------------------------ runs
def training_args(out: Path, a: argparse.Namespace, *, lr: float, epochs: float, seed: int,
                  warmup: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        str(out), num_train_epochs=epochs, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=64, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=warmup, weight_decay=0.0, optim="adamw_torch", seed=seed, data_seed=seed,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)


def perplexity(trainer, dataset) -> float:
    return math.exp(trainer.evaluate(dataset)["eval_loss"])


def pretrain(a: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, set_seed

    out = Path(a.output_dir)
    vocab, ids, sha256 = corpus(a.data_dir, a.vocab_size, a.block)
    set_seed(a.seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=a.width,
                         intermediate_size=(8 * a.width // 3 + 7) // 8 * 8,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.heads, max_position_embeddings=a.seq_len)
    model = LlamaForCausalLM(config)
    trainer = Trainer(model=model, args=training_args(out, a, lr=a.learning_rate, epochs=a.epochs,
                                                      seed=a.seed, warmup=a.warmup_steps),
                      train_dataset=windows(ids["pretrain"], a.seq_len),
                      eval_dataset=windows(ids["valid"], a.seq_len))
    started = time.time()
    trainer.train()
    trainer.save_model(str(out))
    (out / VOCAB_FILE).write_text(json.dumps(vocab) + "\n", encoding="utf-8")
    results = {"stage": "pretrain", "parameters": sum(p.numel() for p in model.parameters()),
               "steps": trainer.state.global_step, "train_runtime_s": time.time() - started,
               "tokens": token_counts(ids), "corpus_sha256": sha256,
               "finetune_valid_ppl": perplexity(trainer, windows(ids["valid"], a.seq_len)),
               "finetune_test_ppl": perplexity(trainer, windows(ids["test"], a.seq_len))}
    write_whole(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results


def finetune(a: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, set_seed

    out = Path(a.output_dir)
    base = Path(a.base)
    vocab, ids, sha256 = corpus(a.data_dir, a.vocab_size, a.block)
    check_base_corpus(base, vocab, token_counts(ids), sha256)
    model = LlamaForCausalLM.from_pretrained(str(base))
    set_seed(a.seed)  # the adapters' initialisation (A random, B zero)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules=TARGETS))
    callbacks = [TempBalanceCallback()] if a.method == "tb" else []
    valid = windows(ids["valid"], a.seq_len)
    trainer = Trainer(model=model, args=training_args(out, a, lr=a.learning_rate, epochs=a.epochs,
                                                      seed=a.seed, warmup=a.warmup_steps),
                      train_dataset=windows(ids["train"], a.seq_len), eval_dataset=valid,
                      callbacks=callbacks)
    with model.disable_adapter():
        before = {"valid_ppl": perplexity(trainer, valid),
                  "test_ppl": perplexity(trainer, windows(ids["test"], a.seq_len))}
    started = time.time()
    trainer.train()
    runtime = time.time() - started
    evals = [{"epoch": round(e["epoch"]), "step": e["step"], "valid_ppl": math.exp(e["eval_loss"])}
             for e in trainer.state.log_history if "eval_loss" in e]
    losses = {round(e["epoch"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    for e in evals:
        e["train_loss"] = losses.get(e["epoch"])
    results = {"stage": "finetune", "method": a.method, "lr": a.learning_rate, "seed": a.seed,
               "epochs": a.epochs, "steps": trainer.state.global_step, "train_runtime_s": runtime,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "base": before, "evals": evals, "valid_ppl": evals[-1]["valid_ppl"],
               "test_ppl": perplexity(trainer, windows(ids["test"], a.seq_len))}
    if callbacks:
        engine = callbacks[0].engine
        history = out / HISTORY_FILE
        results["tempbalance"] = {
            "config": engine.config.to_dict(), "layers": engine.plan.names,
            "updates": engine.num_updates,
            "history": [json.loads(line) for line in history.read_text().splitlines() if line],
        }
    model.save_pretrained(str(out / "adapter"))
    write_whole(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("pretrain", "finetune"))
    parser.add_argument("--output_dir", required=True)
    cache = Path(os.environ.get("HF_TEMPBALANCE_CACHE", Path.home() / ".cache" / "hf_tempbalance"))
    parser.add_argument("--data_dir", default=str(cache / "data" / "shakespeare_ptb"),
                        help="ptb.{train,valid,test}.txt (recipes/data/make_shakespeare_ptb.py)")
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--block", type=int, default=650,
                        help="fine-tuning text is split train/valid/test in blocks of this many tokens")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=None,
                        help="default: 1 (pretrain), 6 (finetune)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default: 3e-3 (pretrain); required for finetune")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="default: 50 (pretrain), 0 (finetune)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="finetune: the pretrain stage's --output_dir")
    parser.add_argument("--method", choices=("lora", "tb"), default="lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    a = parser.parse_args(argv)
    pre = a.stage == "pretrain"
    a.epochs = a.epochs if a.epochs is not None else (1.0 if pre else 6.0)
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else (50 if pre else 0)
    if a.learning_rate is None:
        if not pre:
            parser.error("finetune needs --learning_rate")
        a.learning_rate = 3e-3
    if not pre and not a.base:
        parser.error("finetune needs --base (the pretrain stage's --output_dir)")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    results = pretrain(a) if a.stage == "pretrain" else finetune(a)
    print(json.dumps({k: v for k, v in results.items() if k not in ("tempbalance", "evals")}))
    return results


if __name__ == "__main__":
    main()
