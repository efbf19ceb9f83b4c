"""A custom Accelerate loop resumed with ``accelerator.save_state`` / ``load_state``: the resumed
run applies the uninterrupted run's LRs, its checkpoint carries no history, and its history file
is the uninterrupted run's, whether it resumes in the same directory or another one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tb_record import BASE_LR, TinyClassifier, TinyData  # noqa: E402

from hf_tempbalance import TempBalance, TempBalanceConfig  # noqa: E402
from hf_tempbalance.history import HISTORY_FILE, read_history  # noqa: E402
from hf_tempbalance.integrations.accelerate import AcceleratedTempBalance  # noqa: E402

STEPS, SAVE_AT, GAMMA = 8, 4, 0.9


def train(out: Path, *, resume: Path | None = None, attach_after_load: bool = False,
          stop_at: int = STEPS) -> list[list[float]]:
    """Run the loop up to ``stop_at`` optimizer steps; returns the LRs each step really used."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = TinyClassifier()
    tb = TempBalance(model, TempBalanceConfig(interval=2, dtype="float64"))
    optimizer = torch.optim.SGD(tb.param_groups(lr=BASE_LR, weight_decay=5e-4), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: GAMMA ** k)
    loader = torch.utils.data.DataLoader(TinyData(), batch_size=8, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    tempbalance = AcceleratedTempBalance(tb, accelerator, output_dir=str(out))
    accelerator.register_for_checkpointing(tempbalance)
    if not attach_after_load:
        tempbalance.attach(optimizer)
    if resume is not None:
        accelerator.load_state(str(resume))
    if attach_after_load:
        tempbalance.attach(optimizer)
    used: list[list[float]] = []
    optimizer.optimizer.register_step_pre_hook(  # after the engine's: sees the LRs step() uses
        lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    batches = list(loader)
    while tb.num_steps < stop_at:
        batch = batches[tb.num_steps % len(batches)]
        accelerator.backward(model(**batch)["loss"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        tempbalance.log()
        if tb.num_steps == SAVE_AT and resume is None:
            accelerator.save_state(str(out / "checkpoint"))
    accelerator.end_training()
    return used


def history_key(path: Path) -> list[tuple]:
    return [(r["step"], r["update"], r["layer"], r["multiplier"]) for r in read_history(path)]


@pytest.mark.parametrize("attach_after_load", [False, True], ids=["attach_first", "load_first"])
def test_resume_in_the_same_directory(tmp_path, fresh_accelerate, attach_after_load):
    straight = train(tmp_path / "a")
    expected = history_key(tmp_path / "a")
    assert sorted({k[0] for k in expected}) == [0, 2, 4, 6]
    # plain data: loads with torch's safe unpickler
    saved = torch.load(tmp_path / "a" / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=True)
    assert "history" not in saved["engine"] and saved["engine"]["num_updates"] == 2
    assert saved["history_path"] == str((tmp_path / "a" / HISTORY_FILE).resolve())

    # The directory holds the whole earlier run; the resumed run cuts it back and regrows it.
    resumed = train(tmp_path / "a", resume=tmp_path / "a" / "checkpoint",
                    attach_after_load=attach_after_load)
    np.testing.assert_allclose(resumed, straight[SAVE_AT:], rtol=1e-12)
    assert history_key(tmp_path / "a") == expected


def test_resume_in_another_directory_reads_the_checkpointed_runs_file(tmp_path, fresh_accelerate):
    train(tmp_path / "a")
    expected = history_key(tmp_path / "a")
    train(tmp_path / "b", resume=tmp_path / "a" / "checkpoint")
    assert history_key(tmp_path / "b") == expected

    (tmp_path / "a" / HISTORY_FILE).unlink()
    with pytest.warns(UserWarning, match="follows 2 TempBalance updates"):
        train(tmp_path / "c", resume=tmp_path / "a" / "checkpoint")
    assert history_key(tmp_path / "c") == [k for k in expected if k[0] >= SAVE_AT]


def test_without_output_dir_the_checkpoint_carries_the_history(tmp_path, fresh_accelerate):
    accelerator = Accelerator(cpu=True)
    tb = TempBalance(TinyClassifier(), TempBalanceConfig(interval=1))
    tb.update()
    tempbalance = AcceleratedTempBalance(tb, accelerator)
    state = tempbalance.state_dict()
    assert state["history_path"] is None and len(state["engine"]["history"]) == len(tb.plan.names)
    other = AcceleratedTempBalance(TempBalance(TinyClassifier(), TempBalanceConfig(interval=1)),
                                   accelerator)
    other.load_state_dict(state)
    assert other.tb.history == tb.history and other.tb.multipliers == tb.multipliers
    # a bare engine state (what older checkpoints registered) is accepted too
    other.load_state_dict(tb.state_dict())
    assert other.tb.num_updates == 1
