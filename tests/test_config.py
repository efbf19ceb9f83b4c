"""TempBalanceConfig: paper defaults, validation errors that name the field, replace/to_dict."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_tempbalance import TempBalanceConfig


def test_paper_defaults():
    cfg = TempBalanceConfig()
    assert (cfg.s1, cfg.s2) == (0.5, 1.5)  # Section 3 / App. C: best around (0.5, 1.5)
    assert cfg.metric == "alpha_hill" and cfg.xmin == "median" and cfg.assign == "linear"
    assert cfg.interval == "epoch"  # Algorithm 1: once per epoch
    assert cfg.exclude_first_last and cfg.min_eigs == 50 and cfg.norm_follow == "authors"
    assert cfg.layer_types == ("linear", "conv") and cfg.include_xmin


BAD = [
    ("s1", {"s1": 0.0}),
    ("s1", {"s1": -0.5}),
    ("s1", {"s1": "0.5"}),
    ("s1", {"s1": float("nan")}),
    ("s1", {"s1": True}),
    ("s1", {"s1": float("inf"), "s2": float("inf")}),
    ("s2", {"s1": 1.2, "s2": 0.8}),
    ("s2", {"s2": float("inf")}),
    ("s2", {"s2": float("nan")}),
    ("metric", {"metric": "alpha_magic"}),
    ("xmin", {"xmin": "peak"}),
    ("assign", {"assign": "cubic"}),
    ("interval", {"interval": 0}),
    ("interval", {"interval": -3}),
    ("interval", {"interval": "foo"}),
    ("interval", {"interval": 2.5}),
    ("interval", {"interval": True}),
    ("start_step", {"start_step": -1}),
    ("layer_types", {"layer_types": ("linear", "attention")}),
    ("layer_types", {"layer_types": ()}),
    ("layer_types", {"layer_types": "lin"}),
    ("include", {"include": ("layer(",)}),
    ("exclude", {"exclude": ["*fc"]}),
    ("min_eigs", {"min_eigs": -1}),
    ("min_eigs", {"min_eigs": 2.5}),
    ("norm_follow", {"norm_follow": "following"}),
    ("dtype", {"dtype": "float16"}),
    ("eig_rtol", {"eig_rtol": 1.0}),
    ("eig_rtol", {"eig_rtol": -1e-6}),
    ("snr_strength", {"snr_strength": -0.01}),
    ("snr_strength", {"snr_strength": float("inf")}),
    ("snr_iterations", {"snr_iterations": 0}),
    ("snr_iterations", {"snr_iterations": True}),
    ("eig_rtol", {"eig_rtol": "x"}),
    ("min_eigs", {"min_eigs": True}),
    ("start_step", {"start_step": True}),
    # a string is truthy: a quoted 'no' in a YAML or JSON file must not mean "on"
    ("balance_lr", {"balance_lr": "no"}),
    ("exclude_first_last", {"exclude_first_last": "False"}),
    ("include_xmin", {"include_xmin": 0}),
    ("log_layers", {"log_layers": None}),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}={list(k.values())[-1]!r}" for f, k in BAD])
def test_bad_field_raises_naming_it(field, kwargs):
    with pytest.raises(ValueError, match=rf"TempBalanceConfig\.{field}="):
        TempBalanceConfig(**kwargs)
    # replace() validates too
    with pytest.raises(ValueError, match=rf"TempBalanceConfig\.{field}="):
        TempBalanceConfig().replace(**kwargs)


@pytest.mark.parametrize("interval", [1, 390, "epoch"])
def test_good_intervals(interval):
    assert TempBalanceConfig(interval=interval).interval == interval


def test_a_lone_string_is_one_item_not_its_letters():
    cfg = TempBalanceConfig(include=r"layer\d", exclude="fc", layer_types="conv")
    assert cfg.include == (r"layer\d",)
    assert cfg.exclude == ("fc",)
    assert cfg.layer_types == ("conv",)


def test_replace_unknown_field_is_a_type_error():
    with pytest.raises(TypeError, match="s3"):
        TempBalanceConfig().replace(s3=2.0)


def test_replace_returns_a_validated_copy():
    cfg = TempBalanceConfig()
    other = cfg.replace(s1=0.6, s2=1.4, interval=100)
    assert (other.s1, other.s2, other.interval) == (0.6, 1.4, 100)
    assert (cfg.s1, cfg.s2, cfg.interval) == (0.5, 1.5, "epoch")


def test_to_dict_is_json_and_round_trips():
    cfg = TempBalanceConfig(s1=0.6, s2=1.4, interval=25, include=("blocks",), exclude=(r"head$",),
                            layer_types=("linear", "conv", "embedding"), eig_rtol=1e-7)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert set(data) == {f.name for f in dataclasses.fields(TempBalanceConfig)}
    assert TempBalanceConfig.from_dict(data) == cfg


def test_numpy_scalars_become_python_values_and_the_config_stays_json_able():
    import json

    import numpy as np

    cfg = TempBalanceConfig(s1=np.float32(0.25), s2=np.float64(1.75), min_eigs=np.int64(40),
                            interval=np.int32(7), balance_lr=np.bool_(False))
    assert (cfg.s1, cfg.s2, cfg.min_eigs, cfg.interval, cfg.balance_lr) == (0.25, 1.75, 40, 7, False)
    assert [type(v) for v in (cfg.s1, cfg.min_eigs, cfg.interval, cfg.balance_lr)] == [float, int, int, bool]
    assert TempBalanceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_error_carries_the_field_value_and_fix():
    from hf_tempbalance.config import ConfigError

    with pytest.raises(ConfigError) as err:
        TempBalanceConfig(s1=2.0, s2=1.0)
    assert (err.value.field, err.value.value) == ("s2", 1.0)
    assert err.value.why.startswith("must be a finite number >= s1=2.0")
    assert str(err.value) == f"TempBalanceConfig.s2=1.0: {err.value.why}"
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
