"""Shared by the launched scripts: a tiny model, its data, and a recorder of the LRs really used.

The recorder is an optimizer step pre-hook registered AFTER ``tb.attach``, so it runs after the
engine's hook and sees each group's LR exactly as ``optimizer.step()`` uses it. At every update
it also keeps the layers this rank computed, the multipliers, and (main process) the whole
weights the update saw, so the test can recompute the update in a single process.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from hf_tempbalance.binding import unwrap_optimizer
from hf_tempbalance.distributed import world
from hf_tempbalance.groups import GROUP_KEY

INTERVAL = 2  # TempBalance update every 2 optimizer steps
BASE_LR = 0.1


class TinyClassifier(nn.Module):
    """Seven Linears: five are balanced (first/last excluded), with different costs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        widths = [24, 96, 96, 80, 64, 112, 64]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 5))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 24, generator=gen)
        self.y = torch.randint(0, 5, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight (a collective for DTensor weights: every rank must call it)."""
    weight = weight.detach()
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


class Recorder:
    """Records ``(label, lr)`` of every group at every optimizer step, and every update."""

    def __init__(self, tb, optimizer, out_dir: str) -> None:
        self.tb, self.out_dir = tb, out_dir
        self.rank, self.size = world()
        self.steps: list[dict] = []
        self.updates: list[dict] = []
        self._seen = tb.num_updates
        self.handle = unwrap_optimizer(optimizer).register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        tb = self.tb
        self.steps.append({"t": tb.num_steps, "groups": [[g.get(GROUP_KEY), g["lr"]]
                                                         for g in optimizer.param_groups]})
        if tb.num_updates != self._seen:
            self._seen = tb.num_updates
            update = tb.num_updates - 1
            weights = {layer.name: _full(layer.module.weight).cpu().clone() for layer in tb.plan.layers}
            if self.rank == 0:
                torch.save(weights, os.path.join(self.out_dir, f"weights_u{update}.pt"))
            self.updates.append({"t": tb.num_steps, "update": update,
                                 "computed": list(tb.last_computed),
                                 "multipliers": dict(tb.multipliers)})

    def dump(self, **extra) -> None:
        data = {"rank": self.rank, "world": self.size, "layers": self.tb.plan.names,
                "dist_initialized": torch.distributed.is_initialized(),
                "steps": self.steps, "updates": self.updates, **extra}
        with open(os.path.join(self.out_dir, f"rank{self.rank}.json"), "w") as fh:
            json.dump(data, fh)
