"""A torch FSDP2 (``fully_shard``) loop with TempBalance, launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 fsdp2_loop.py OUT

Every weight becomes a DTensor sharded over the 2 ranks; each update gathers each layer on its
owner only. 6 optimizer steps, ``lr = BASE_LR · GAMMA**t`` (a plain LambdaLR, stepped once per
step), TempBalance every 2 steps. Also checks an engine built on the sharded model, and
that FSDP1 and SNR on DTensor weights are refused at attach. Writes ``OUT/rank{r}.json`` (see
tb_record.Recorder) plus those checks.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from tb_record import BASE_LR, INTERVAL, Recorder, TinyClassifier, TinyData
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from hf_tempbalance import TempBalance, TempBalanceConfig

GAMMA = 0.9
STEPS = 6


def fsdp1_refusals() -> list[str]:
    """Messages of the errors tb.attach raises under FSDP1, both use_orig_params settings."""
    messages = []
    for use_orig_params in (False, True):
        model = TinyClassifier()
        tb = TempBalance(model, TempBalanceConfig(interval=INTERVAL))
        wrapped = FullyShardedDataParallel(model, use_orig_params=use_orig_params,
                                           device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=BASE_LR)
        try:
            tb.attach(optimizer)
            messages.append("")
        except RuntimeError as err:
            messages.append(str(err))
    return messages


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = TinyClassifier()
    tb = TempBalance(model, TempBalanceConfig(interval=INTERVAL))
    for module in model.net:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR, weight_decay=5e-4), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: GAMMA ** k)
    tb.attach(optimizer)
    recorder = Recorder(tb, optimizer, out_dir)
    data = TinyData()
    for step in range(STEPS):
        batch = data[[(step * size + rank) * 8 + i for i in range(8)]]
        model(**batch)["loss"].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    weight_type = type(model.net[2].weight).__name__
    # An engine built on the already sharded model finds the same layers and the same metrics
    # (compute_metrics is a collective: both ranks call it, in the same order).
    late = TempBalance(model, TempBalanceConfig(interval=INTERVAL))
    late_same_metrics = late.compute_metrics() == tb.compute_metrics()
    try:
        TempBalance(model, snr_strength=1e-3).attach(optimizer)
        snr_refusal = ""
    except RuntimeError as err:
        snr_refusal = str(err)
    recorder.dump(weight_type=weight_type, optimizer_steps=tb.num_steps,
                  fsdp1_refusals=fsdp1_refusals(), late_layers=late.plan.names,
                  late_same_metrics=late_same_metrics, snr_refusal=snr_refusal)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
