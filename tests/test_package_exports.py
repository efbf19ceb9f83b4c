"""The top-level namespace: every name in ``__all__`` is the object its module defines, and the
framework glue is imported only when it is asked for."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import hf_tempbalance

HOMES = {
    "TempBalance": "hf_tempbalance.engine",
    "TempBalanceConfig": "hf_tempbalance.config",
    "TempBalanceArguments": "hf_tempbalance.arguments",
    "SpectralNormRegularizer": "hf_tempbalance.snr",
    "analyze_model": "hf_tempbalance.analysis",
    "analyze_state_dict": "hf_tempbalance.analysis",
    "TempBalanceCallback": "hf_tempbalance.integrations.transformers",
    "TempBalanceTrainer": "hf_tempbalance.integrations.transformers",
    "tempbalance_optimizer_cls_and_kwargs": "hf_tempbalance.integrations.transformers",
    "AcceleratedTempBalance": "hf_tempbalance.integrations.accelerate",
    "TempBalanceDetectionTrainer": "hf_tempbalance.integrations.ultralytics",
    "add_tempbalance": "hf_tempbalance.integrations.ultralytics",
}


def test_all_lists_exactly_the_documented_names():
    assert sorted(hf_tempbalance.__all__) == sorted(HOMES)


@pytest.mark.parametrize("name", sorted(HOMES))
def test_each_export_is_its_modules_object(name):
    if HOMES[name].endswith("ultralytics"):
        pytest.importorskip("ultralytics")
    assert getattr(hf_tempbalance, name) is getattr(importlib.import_module(HOMES[name]), name)


def test_unknown_attribute_names_the_module():
    with pytest.raises(AttributeError, match="hf_tempbalance.*no_such_thing"):
        hf_tempbalance.no_such_thing  # noqa: B018


def test_plain_import_loads_no_framework():
    code = ("import sys, hf_tempbalance; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'ultralytics', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
