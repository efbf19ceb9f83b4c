"""UpdateSchedule against a direct simulation of its rule, and the epoch length."""

from __future__ import annotations

import pytest

from hf_tempbalance.schedule import UpdateSchedule, steps_per_epoch


def simulate(every: int, start: int, reached: set[int], steps: int) -> list[int]:
    """Steps with an update when only the steps in ``reached`` run the optimizer: the first
    reached step of each window of ``every`` steps from ``start``."""
    done, out = set(), []
    for t in range(steps):
        if t >= start and t in reached and (t - start) // every not in done:
            done.add((t - start) // every)
            out.append(t)
    return out


@pytest.mark.parametrize("every,start", [(1, 0), (3, 0), (4, 2), (5, 7)])
@pytest.mark.parametrize("skipped", [(), (2, 6), (0, 1, 2, 3, 9)])
def test_windows_match_the_rule(every, start, skipped):
    schedule = UpdateSchedule(every, start)
    reached = set(range(30)) - set(skipped)
    updates = []
    for t in range(30):
        if t in reached and schedule.due(t):
            schedule.served(t)
            updates.append(t)
    assert updates == simulate(every, start, reached, 30)
    assert [t for t in range(30) if schedule.planned(t)] == list(range(start, 30, every))


def test_epoch_without_length_updates_only_on_request():
    schedule = UpdateSchedule("epoch")
    assert schedule.every is None and not schedule.due(0)
    schedule.request()
    assert schedule.due(5)
    schedule.served(5)
    assert not schedule.due(6)
    schedule.steps_per_epoch = 4
    assert schedule.every == 4 and schedule.due(8)


def test_state_round_trip_keeps_the_windows():
    schedule = UpdateSchedule(4)
    schedule.served(4)
    again = UpdateSchedule(4)
    again.load_state_dict(schedule.state_dict(), next_step=6)
    assert [again.due(t) for t in (6, 7, 8)] == [False, False, True]


@pytest.mark.parametrize("batches,accumulation", [(10, 1), (10, 3), (9, 3), (1, 8), (0, 2)])
def test_steps_per_epoch_counts_a_partial_accumulation(batches, accumulation):
    # as Trainer.set_initial_training_values writes it
    trainer = batches // accumulation + int(batches % accumulation > 0)
    assert steps_per_epoch(batches, accumulation) == max(trainer, 1)
