#!/usr/bin/env python
"""Regenerate the pictures of docs/diagnostics.md from a real (small) training run.

Trains an 8-conv BatchNorm CNN on a Fashion-MNIST subset twice, with the same seed and data order:
CAL (SGD, cosine LR) and TempBalance (same, plus the engine). Each run directory gets what a
training script leaves behind: the TempBalance history (``tempbalance_history.jsonl``, TB only)
and the final weights (``model.safetensors``). The pictures are then made by the CLI itself::

    hf-tempbalance plot RUNS/tb RUNS/cal --arch tensors --out docs/
    hf-tempbalance analyze RUNS/tb/model.safetensors --arch tensors --plots ESD_DIR

Needs Fashion-MNIST (``python recipes/image_data/fashion_mnist.py``, offline through apt).
About 5 minutes on 2 CPU cores::

    python docs/make_figures.py --runs /tmp/diag_runs
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hf_tempbalance import TempBalance
from hf_tempbalance.analysis import read_analysis_csv
from hf_tempbalance.cli import esd_plot_name
from hf_tempbalance.cli import main as cli
from hf_tempbalance.history import HISTORY_FILE, append_history

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "image_data"))
from fashion_mnist import FILES, find_idx_dir, obtain, read_idx  # noqa: E402


def cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 32), nn.MaxPool2d(2), *block(32, 48), *block(48, 64),
                         *block(64, 64), nn.MaxPool2d(2), *block(64, 96), *block(96, 96),
                         *block(96, 128), *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


def load(data_dir: Path, n_train: int) -> tuple[torch.Tensor, ...]:
    folder = find_idx_dir(data_dir) or obtain(data_dir)
    out = []
    for split, n in (("train", n_train), ("test", 2000)):
        images, labels = (read_idx(folder / f) for f in FILES[split])
        x = torch.tensor(images[:n], dtype=torch.float32).unsqueeze(1) / 255.0
        out += [(x - 0.286) / 0.353, torch.tensor(labels[:n], dtype=torch.long)]
    return tuple(out)


def train(run: Path, use_tb: bool, data: tuple[torch.Tensor, ...], epochs: int,
          interval: int) -> float:
    x, y, x_test, y_test = data
    torch.manual_seed(43)
    model = cnn()
    batch, steps_per_epoch = 128, len(x) // 128
    # The same optimizer for both runs (every parameter decays in both): TempBalance attaches to it
    # as it is, so the runs differ by TempBalance alone.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tb = TempBalance(model, interval=interval) if use_tb else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    if tb:
        tb.attach(opt)
    gen = torch.Generator().manual_seed(0)
    written = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=gen) < 0.5, xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if tb and len(tb.history) > written:
                rows = tb.history[written:]
                for row in rows:
                    row["epoch"] = epoch + i / steps_per_epoch
                append_history(rows, run / HISTORY_FILE)
                written = len(tb.history)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    save_file(model.state_dict(), run / "model.safetensors")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/tmp/diag_runs", help="where the two runs go")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--interval", type=int, default=10, help="TempBalance update every N steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = Path(args.runs)
    marker = runs / ".made_by_make_figures"
    if runs.exists() and not marker.exists() and (not runs.is_dir() or any(runs.iterdir())):
        print(f"--runs {runs} is not an empty folder, nor one this script marked as its own "
              f"({marker.name}), and it deletes what it finds there; pass an empty or new folder",
              file=sys.stderr)
        sys.exit(2)
    shutil.rmtree(runs, ignore_errors=True)  # only this script's own earlier runs
    runs.mkdir(parents=True)
    marker.touch()
    data = load(Path(args.data_dir), args.train_samples)
    for name, use_tb in (("tb", True), ("cal", False)):
        (runs / name).mkdir(parents=True)
        acc = train(runs / name, use_tb, data, args.epochs, args.interval)
        print(f"{name}: test accuracy {acc:.4f} on 2000 test images")
    out = Path(args.out)
    assert cli(["plot", str(runs / "tb"), str(runs / "cal"), "--arch", "tensors",
                "--out", str(out), "--device", "cpu"]) == 0
    esd_dir, table = runs / "esd", runs / "tb_layers.csv"
    assert cli(["analyze", str(runs / "tb" / "model.safetensors"), "--arch", "tensors",
                "--csv", str(table), "--plots", str(esd_dir), "--device", "cpu"]) == 0
    largest = max(read_analysis_csv(table), key=lambda row: row["num_eigs"])["name"]
    shutil.copy(esd_dir / esd_plot_name(largest), out / "esd_example.png")
    (out / "tb_layer_curves.png").unlink()  # docs/diagnostics.md shows the heatmaps and distributions
    for png in sorted(out.glob("*.png")):
        print(f"{png}: {png.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
