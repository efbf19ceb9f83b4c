"""The calibrated estimator (``xmin="ks"``, ``analyze --xmin ks``) against weightwatcher from PyPI.

weightwatcher is not a dependency. ``tests/ww_fixture/`` holds three small models' weights and
weightwatcher 0.7.7's fit of each (``python benchmarks/weightwatcher_check.py --write-fixture
tests/ww_fixture``, in an environment with weightwatcher): ours is checked against those
numbers everywhere. Where weightwatcher is importable, the tests marked ``live`` below also run
it now (on the same models, on the fixture's weights, and on a random ResNet18). The settings
(weightwatcher's defaults, which ours match) are listed in ``benchmarks/weightwatcher_check.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_tempbalance.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import weightwatcher_check as check  # noqa: E402

FIXTURE = Path(__file__).parent / "ww_fixture"
RECORDED = json.loads((FIXTURE / check.FIXTURE_FITS).read_text())
live = pytest.mark.skipif(importlib.util.find_spec("weightwatcher") is None,
                          reason="weightwatcher is not installed (pip install weightwatcher to run "
                                 "it now; its recorded fits are checked without it)")

# float64 eigenvalues: the same numbers to rounding. float32 (the default): the eigensolver's
# ~1e-7·λ_max error moves alpha by up to ~1e-4 relative (1e-3 on a spectrum spanning decades).
REL_TOL = {"float64": 1e-9, "float32": 2e-3}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """The fixture's models, with the weights weightwatcher fitted."""
    return {name: check.fixture_model(name, FIXTURE) for name in check.FIXTURE_MODELS}


def test_the_fixture_holds_the_benchmarks_models_and_weightwatchers_call(models):
    """Recorded by weightwatcher 0.7.7 with its defaults, on the weights of the models the
    benchmark builds (seeded; rebuilt here to rounding: another BLAS may move the last bits)."""
    assert RECORDED["weightwatcher"] == "0.7.7"
    assert RECORDED["call"] == "WeightWatcher(model=model).analyze(randomize=False, plot=False)"
    assert set(RECORDED["models"]) == set(check.FIXTURE_MODELS)
    for name in ("toy", "heavy"):  # no training: the seeded construction alone
        rebuilt = check.build(name).state_dict()
        for key, value in models[name].state_dict().items():
            torch.testing.assert_close(value, rebuilt[key], rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, layers", [("toy", 5), ("trained", 5), ("heavy", 4)])
def test_ks_alpha_matches_weightwatcher_per_layer(models, name, layers, dtype):
    res = check.compare(models[name], dtype, theirs=RECORDED["models"][name])
    # every layer but the 10-class head (10 eigenvalues: weightwatcher's small-sample fit)
    assert res["layers"] == layers and res["left_out"] == ([] if name == "heavy" else ["head.5"])
    for row in res["rows"]:
        assert row["ours"] == pytest.approx(row["weightwatcher"], rel=REL_TOL[dtype]), row
        assert row["verdict"] == row["ww_warning"], row


def test_all_three_verdicts_occur_and_agree(models):
    rows = check.compare(models["heavy"], "float64", theirs=RECORDED["models"]["heavy"])["rows"]
    assert [r["ww_warning"] for r in rows] == ["over-trained", "", "", "under-trained"]
    assert [r["verdict"] for r in rows] == ["over-trained", "", "", "under-trained"]


def test_cli_ks_on_a_state_dict_matches_weightwatcher(models, tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = models["trained"]
    safetensors_torch.save_file(model.state_dict(), tmp_path / "w.safetensors")
    assert main(["analyze", str(tmp_path / "w.safetensors"), "--arch", "tensors", "--xmin", "ks",
                 "--json", "-", "--device", "cpu", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    ours = {row["name"]: row for row in data["layers"]}
    theirs = {n: r for n, r in RECORDED["models"]["trained"].items()
              if r["num_evals"] >= check.SMALL_N}
    assert len(theirs) == 5
    for name, ref in theirs.items():
        assert ours[name]["alpha"] == pytest.approx(ref["alpha"], rel=REL_TOL["float32"]), name
        assert ours[name]["verdict"] == ref["warning"], name


@live
@pytest.mark.parametrize("name", check.FIXTURE_MODELS)
def test_weightwatcher_now_gives_the_recorded_fit(models, name):
    """The installed weightwatcher on the fixture's weights gives the recorded numbers (another
    version that changed them would need a new fixture)."""
    now = check.ww_details(models[name])
    recorded = RECORDED["models"][name]
    assert set(now) == set(recorded)
    for layer, ref in recorded.items():
        assert now[layer]["alpha"] == pytest.approx(ref["alpha"], rel=1e-9), layer
        assert (now[layer]["warning"], now[layer]["num_evals"]) == (ref["warning"], ref["num_evals"])


@live
@pytest.mark.parametrize("name", ["toy", "heavy"])
def test_ks_alpha_matches_weightwatcher_run_now(name):
    res = check.compare(check.build(name), "float64")
    assert res["layers"] >= 4 and res["same_verdicts"], res
    assert res["max_rel_diff"] < REL_TOL["float64"], res


@live
@pytest.mark.slow
def test_random_resnet18_reads_as_weightwatcher_reads_it(tmp_path, capsys):
    """The issue's measurement: `analyze resnet18 --xmin ks` on timm's random init gives what
    weightwatcher gives (mean alpha ~20, under-trained), where the median alpha of 20 of the 21
    layers lies in [2, 4], HT-SR's well-trained range."""
    pytest.importorskip("timm")
    assert main(["analyze", "resnet18", "--xmin", "ks", "--json", str(tmp_path / "ks.json"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["analyze", "resnet18", "--json", str(tmp_path / "median.json"), "--device", "cpu",
                 "--no-progress"]) == 0
    ks = json.loads((tmp_path / "ks.json").read_text())
    median = json.loads((tmp_path / "median.json").read_text())
    assert ks["random_weights"] and median["random_weights"]
    theirs = check.ww_details(check.resnet18())
    assert len(theirs) == len(ks["layers"]) == 21
    for row in ks["layers"]:
        assert row["alpha"] == pytest.approx(theirs[row["name"]]["alpha"], rel=2e-4), row["name"]
        assert row["verdict"] == theirs[row["name"]]["warning"], row["name"]
    ww_mean = np.mean([r["alpha"] for r in theirs.values()])
    assert ks["summary"]["alpha_mean"] == pytest.approx(ww_mean, rel=1e-4) and ww_mean > 6
    assert sum(2 <= row["alpha"] <= 4 for row in median["layers"]) == 20
    assert median["summary"]["num_under_trained"] is None  # no verdict from the ranking
