"""A custom Accelerate training loop with TempBalance (launched by tests/test_distributed.py).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... accelerate_loop.py OUT

8 optimizer steps (2 micro-batches each, through ``accelerator.accumulate``), a LambdaLR with
``lr = BASE_LR · GAMMA**k`` behind ``AcceleratedScheduler``, TempBalance every 2 steps. Each rank
writes ``OUT/rank{r}.json`` (see tb_record.Recorder); the main process writes the history file.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from tb_record import BASE_LR, INTERVAL, Recorder, TinyClassifier, TinyData

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.integrations.accelerate import AcceleratedTempBalance

GAMMA = 0.9
STEPS = 8
ACCUMULATION = 2


def main(out_dir: str) -> None:
    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION)
    model = TinyClassifier()
    tb = TempBalance(model, TempBalanceConfig(interval=INTERVAL))
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR, weight_decay=5e-4), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: GAMMA ** k)
    loader = torch.utils.data.DataLoader(TinyData(), batch_size=8, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    tempbalance = AcceleratedTempBalance(tb, accelerator, output_dir=out_dir)
    tempbalance.attach(optimizer, loader)
    recorder = Recorder(tb, optimizer, out_dir)

    micro = 0
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        tempbalance.log()
        micro += 1
        if micro == STEPS * ACCUMULATION:
            break
    recorder.dump(num_processes=accelerator.num_processes,
                  distributed_type=str(accelerator.distributed_type), optimizer_steps=tb.num_steps)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
