"""A PEFT LoRA model trained by the Trainer under DDP (launched by tests/test_lora.py).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... lora_trainer_run.py OUT

6 SGD steps, TempBalance every 2 steps (3 updates). Each rank writes ``OUT/rank{r}.json``: the
multipliers, the layers it computed itself, and the multipliers of one more update of the final
weights; rank 0 saves the adapter to ``OUT/adapter``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_tempbalance import TempBalanceCallback


def main(out: str) -> None:
    torch.manual_seed(0)  # the same base weights as the test's reference (tests/test_lora.py)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, 97, (48, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(out, max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                             optim="sgd", use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=7, dataloader_num_workers=0)
    callback = TempBalanceCallback(interval=2, dtype="float64")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    engine = callback.engine
    result = {"multipliers": engine.multipliers, "updates": engine.num_updates,
              "computed": engine.last_computed, "world_size": args.world_size}
    engine.update()  # every rank joins: the final weights' multipliers
    result["final_multipliers"] = dict(engine.multipliers)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        trainer.model.save_pretrained(str(Path(out, "adapter")))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
