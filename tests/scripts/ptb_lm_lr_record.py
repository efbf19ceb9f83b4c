"""Run recipes/ptb_lm.py and record, on every rank, the LR of every param group at every step.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... \\
        tests/scripts/ptb_lm_lr_record.py RECORD_DIR [ptb_lm.py arguments]

After ``tb.attach`` a second step pre-hook is registered on the optimizer; it runs after the
engine's hook, so it sees each group's LR exactly as ``optimizer.step()`` uses it, and appends
them to ``RECORD_DIR/lrs_rank{rank}.jsonl`` (one JSON list per step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

import ptb_lm  # noqa: E402

from hf_tempbalance.binding import unwrap_optimizer  # noqa: E402
from hf_tempbalance.distributed import world  # noqa: E402
from hf_tempbalance.engine import TempBalance  # noqa: E402

record_dir = Path(sys.argv[1])
original_attach = TempBalance.attach


def attach_and_record(self, optimizer):
    result = original_attach(self, optimizer)

    def record(opt, args, kwargs):
        path = record_dir / f"lrs_rank{world()[0]}.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps([group["lr"] for group in opt.param_groups]) + "\n")

    unwrap_optimizer(optimizer).register_step_pre_hook(record)
    return result


TempBalance.attach = attach_and_record

if __name__ == "__main__":
    ptb_lm.main(sys.argv[2:])
