"""A tiny Trainer run with TempBalanceCallback, shared by tests/test_integrity.py and launched by it.

    python integrity_run.py OUT THREADS --tear-at-update K

trains like :func:`make_trainer` (8 optimizer steps, an update every 2, a checkpoint every 4) and,
while appending the history rows of update ``K``, writes half of them and kills its own process
with SIGKILL: what ``kill -9`` in the middle of an append leaves behind.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from tb_record import TinyClassifier, TinyData
from transformers import Trainer, TrainingArguments

from hf_tempbalance import TempBalanceCallback
from hf_tempbalance import history as history_module

STEPS, INTERVAL, SAVE_EVERY = 8, 2, 4


def make_trainer(out_dir: str, callback: TempBalanceCallback | None = None, *, tb: dict | None = None,
                 no_callback: bool = False, **args) -> Trainer:
    """The run: TinyClassifier, TempBalance every INTERVAL steps, float64-free and CPU-only."""
    base = dict(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=8,
                learning_rate=0.05, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=5e-4,
                optim="sgd", use_cpu=True, report_to=[], save_strategy="steps",
                save_steps=SAVE_EVERY, logging_steps=1, disable_tqdm=True,
                remove_unused_columns=False, dataloader_num_workers=0, seed=3)
    base.update(args)
    if callback is None and not no_callback:
        callback = TempBalanceCallback(**{"interval": INTERVAL, "min_eigs": 10, **(tb or {})})
    return Trainer(model=TinyClassifier(), args=TrainingArguments(**base), train_dataset=TinyData(),
                   callbacks=[callback] if callback is not None else [])


def tear_at_update(update: int) -> None:
    """Make the append of ``update``'s rows stop half-way through and SIGKILL the process."""
    append = history_module.append_history

    def torn_append(rows, path):
        rows = list(rows)
        if rows and rows[0]["update"] == update:
            data = history_module._encode(rows)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        append(rows, path)

    history_module.append_history = torn_append


if __name__ == "__main__":
    out, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)  # the same arithmetic as the test process that compares
    if "--tear-at-update" in sys.argv:
        tear_at_update(int(sys.argv[sys.argv.index("--tear-at-update") + 1]))
    make_trainer(out).train()
