"""Where logged values go (hf_tempbalance.reporting): the summary to the console, per-layer values
to the reporters, everything to the history file; the same for the Accelerate and Ultralytics glue
(the Trainer's is tested with real TensorBoard event files in test_trainer_integration.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hf_tempbalance import TempBalance, TempBalanceConfig
from hf_tempbalance.history import HISTORY_FILE, read_history
from hf_tempbalance.reporting import LogValues, route_log_values, summary_line

SUMMARY = ("alpha_hill_mean", "alpha_hill_min", "alpha_hill_max", "multiplier_min", "multiplier_max")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    widths = [16, 48, 64, 40, 56, 8]
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])]).double()


def stepped_engine(log_layers: bool = True) -> tuple[TempBalance, torch.optim.Optimizer]:
    """An engine that made one update (layers '1', '2', '3' balanced)."""
    model = make_net()
    tb = TempBalance(model, TempBalanceConfig(interval=1, min_eigs=10, log_layers=log_layers))
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1), lr=0.1)
    tb.attach(optimizer)
    model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    optimizer.step()
    return tb, optimizer


def expected_values(tb: TempBalance, per_layer: bool) -> dict[str, float]:
    """The logged values computed here from the engine's history rows."""
    rows = [r for r in tb.history if r["update"] == tb.num_updates - 1]
    alphas = np.array([r["value"] for r in rows])
    mults = np.array([r["multiplier"] for r in rows])
    out = {"tempbalance/alpha_hill_mean": alphas.mean(), "tempbalance/alpha_hill_min": alphas.min(),
           "tempbalance/alpha_hill_max": alphas.max(), "tempbalance/multiplier_min": mults.min(),
           "tempbalance/multiplier_max": mults.max()}
    if per_layer:
        for r in rows:
            out[f"tempbalance/alpha_hill/{r['layer']}"] = r["value"]
            out[f"tempbalance/multiplier/{r['layer']}"] = r["multiplier"]
    return out


@pytest.mark.parametrize("log_layers", [True, False])
def test_summary_to_the_console_layers_to_the_reporters(log_layers):
    tb, _ = stepped_engine(log_layers)
    assert tb.plan.names == ["1", "2", "3"]
    values = route_log_values(tb)
    summary = expected_values(tb, per_layer=False)
    assert values.console.keys() == summary.keys()
    assert list(values.console.values()) == pytest.approx(list(summary.values()), rel=1e-12)
    reporters = expected_values(tb, per_layer=log_layers)
    assert values.reporters.keys() == reporters.keys()
    assert [values.reporters[k] for k in reporters] == pytest.approx(list(reporters.values()), rel=1e-12)
    assert set(values.reporters_only) == set(reporters) - set(summary)
    assert route_log_values(None) == LogValues()


def test_summary_line_is_one_line_of_the_console_values():
    console = {"tempbalance/multiplier_mean": 0.98, "tempbalance/alpha_hill_mean": 2.5312,
               "tempbalance/alpha_hill_min": 2.10549, "tempbalance/alpha_hill_max": 6.39712,
               "tempbalance/multiplier_min": 0.5, "tempbalance/multiplier_max": 1.5}
    assert summary_line(LogValues(console=console, reporters=dict(console))) == (
        "TempBalance: alpha_hill mean 2.531 (min 2.105, max 6.397), LR multipliers 0.5-1.5")
    # another metric names itself; the multipliers' own mean is not taken for the metric's
    spectral = {k.replace("alpha_hill", "spectral_norm"): v for k, v in console.items()}
    assert summary_line(LogValues(console=spectral)) == (
        "TempBalance: spectral_norm mean 2.531 (min 2.105, max 6.397), LR multipliers 0.5-1.5")
    # from an engine's own values: the one line printed of what route_log_values sends the console
    tb, _ = stepped_engine()
    line = summary_line(route_log_values(tb))
    assert line.startswith("TempBalance: alpha_hill mean ") and line.endswith("LR multipliers 0.5-1.5")
    assert summary_line(LogValues()) == ""


@pytest.mark.parametrize("log_layers", [True, False])
def test_accelerate_log_returns_the_reporters_values(tmp_path, log_layers, fresh_accelerate):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from hf_tempbalance.integrations.accelerate import AcceleratedTempBalance

    accelerator = Accelerator(cpu=True)
    model = make_net()
    tb = TempBalance(model, TempBalanceConfig(interval=2, min_eigs=10, log_layers=log_layers))
    optimizer = torch.optim.SGD(tb.param_groups(lr=0.1), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapper = AcceleratedTempBalance(tb, accelerator, output_dir=str(tmp_path))
    wrapper.attach(optimizer)
    assert wrapper.log() == {} and wrapper.summary_line() == ""  # before the first update
    sent = []
    for _ in range(3):
        model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        sent.append(wrapper.log())
    # updates at steps 0 and 2: the step between them has nothing new for the trackers
    assert [bool(values) for values in sent] == [True, False, True]
    logged = sent[-1]
    expected = expected_values(tb, per_layer=log_layers)
    assert logged.keys() == expected.keys()
    assert [logged[k] for k in expected] == pytest.approx(list(expected.values()), rel=1e-12)
    assert wrapper.summary_line().startswith("TempBalance: alpha_hill mean ")
    # the history file keeps every layer and update whatever log_layers says
    assert len(read_history(tmp_path / HISTORY_FILE)) == 2 * 3


@pytest.mark.parametrize("log_layers", [True, False])
def test_ultralytics_epoch_end_prints_the_summary_and_logs_the_reporters_values(
        tmp_path, log_layers, monkeypatch):
    pytest.importorskip("ultralytics")
    from hf_tempbalance.integrations import ultralytics as glue

    printed: list[str] = []
    monkeypatch.setattr(glue.LOGGER, "info", printed.append)
    hook = glue.TempBalanceHook(interval=1, min_eigs=10, log_layers=log_layers)
    trainer = SimpleNamespace(model=make_net(), save_dir=str(tmp_path), epoch=0,
                              lr={"lr/pg0": 0.1})
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    hook.attach(trainer, optimizer)
    trainer.model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    optimizer.step()
    printed.clear()
    hook.on_train_epoch_end(trainer)
    expected = expected_values(hook.tb, per_layer=log_layers)
    assert set(trainer.lr) == {"lr/pg0"} | set(expected)  # results.csv and Ultralytics' loggers
    assert [trainer.lr[k] for k in expected] == pytest.approx(list(expected.values()), rel=1e-12)
    assert printed == [summary_line(route_log_values(hook.tb))]
    assert len(read_history(tmp_path / HISTORY_FILE)) == 3
