"""Shared test settings: offline hubs, deterministic torch, few threads (CI boxes are small)."""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
# OpenMP threads otherwise spin-wait between ops; on a small, shared CI box that makes 2 threads
# ~200x slower per tiny op than 1 (measured). Set before torch loads its OpenMP runtime; inherited
# by the processes the multi-process tests launch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps its process state in class-level singletons: start and end clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
