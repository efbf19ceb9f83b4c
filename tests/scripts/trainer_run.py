"""A tiny Trainer run with TempBalanceCallback (launched by tests/test_distributed.py).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... trainer_run.py OUT

``trainer_run.py OUT --gpu-args`` leaves ``use_cpu`` unset: launched without
``ACCELERATE_USE_CPU`` on a machine without GPUs, the Trainer then trains one copy per process.

6 optimizer steps, linear schedule from BASE_LR without warm-up, TempBalance every 2 steps. A
second callback, placed after TempBalanceCallback, registers the LR recorder (tb_record.Recorder)
on the Trainer's optimizer once the engine is attached; each rank writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from tb_record import BASE_LR, INTERVAL, Recorder, TinyClassifier, TinyData
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_tempbalance import TempBalanceCallback

STEPS = 6


class RecordLRs(TrainerCallback):
    def __init__(self, tempbalance: TempBalanceCallback, out_dir: str) -> None:
        self.tempbalance, self.out_dir, self.recorder = tempbalance, out_dir, None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.recorder = Recorder(self.tempbalance.engine, optimizer, self.out_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.dump(optimizer_steps=state.global_step, world_size=args.world_size)


def main(out_dir: str, use_cpu: bool = True) -> None:
    args = TrainingArguments(
        output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=8, learning_rate=BASE_LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=5e-4, optim="sgd",
        use_cpu=use_cpu, report_to=[], save_strategy="no", logging_steps=2, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    tempbalance = TempBalanceCallback(interval=INTERVAL)
    trainer = Trainer(model=TinyClassifier(), args=args, train_dataset=TinyData(),
                      callbacks=[tempbalance, RecordLRs(tempbalance, out_dir)])
    trainer.train()
    # Tear the gloo group down before interpreter exit: left to the exit handlers, its threads
    # sometimes abort rank 0 ("terminate called without an active exception") after training.
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], use_cpu="--gpu-args" not in sys.argv[2:])
