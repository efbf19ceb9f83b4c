"""TempBalanceArguments: the config from a command line, a YAML or a JSON file (HfArgumentParser)."""

from __future__ import annotations

import dataclasses
import json

import pytest

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from hf_tempbalance import TempBalanceConfig  # noqa: E402
from hf_tempbalance.arguments import TempBalanceArguments  # noqa: E402
from hf_tempbalance.integrations.transformers import TempBalanceCallback  # noqa: E402

FLAGS = ["--use_tempbalance", "--tb_interval", "100", "--tb_s1", "0.6", "--tb_s2", "1.4",
         "--tb_exclude", "lm_head", r"\.r_net$", "--tb_eig_rtol", "1e-6", "--tb_norm_follow", "next",
         "--no_tb_exclude_first_last"]
EXPECTED = TempBalanceConfig(interval=100, s1=0.6, s2=1.4, exclude=("lm_head", r"\.r_net$"),
                             eig_rtol=1e-6, norm_follow="next", exclude_first_last=False)


def test_one_argument_per_config_field_with_its_default_and_help():
    names = {f.name for f in dataclasses.fields(TempBalanceArguments)}
    assert names == {"use_tempbalance"} | {f"tb_{f.name}" for f in dataclasses.fields(TempBalanceConfig)}
    (args,) = HfArgumentParser(TempBalanceArguments).parse_args_into_dataclasses(args=[])
    assert args.config() == TempBalanceConfig() and args.callbacks() == []
    for f in dataclasses.fields(TempBalanceArguments):
        assert len(f.metadata["help"]) > 20, f.name  # the config docstring's text, not a stub


def test_command_line_with_training_arguments_like_run_clm():
    parser = HfArgumentParser((TrainingArguments, TempBalanceArguments))
    training, tb = parser.parse_args_into_dataclasses(args=["--output_dir", "out", *FLAGS])
    assert training.output_dir == "out"
    assert tb.config() == EXPECTED
    (callback,) = tb.callbacks()
    assert isinstance(callback, TempBalanceCallback) and callback.config == EXPECTED


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_from_a_file(tmp_path, kind):
    values = {"use_tempbalance": True, "tb_interval": "100", "tb_s1": 0.6, "tb_s2": 1.4,
              "tb_exclude": ["lm_head", r"\.r_net$"], "tb_eig_rtol": 1e-6,
              "tb_norm_follow": "next", "tb_exclude_first_last": False}
    path = tmp_path / f"tb.{kind}"
    if kind == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
        (tb,) = HfArgumentParser(TempBalanceArguments).parse_yaml_file(str(path))
    else:
        path.write_text(json.dumps(values))
        (tb,) = HfArgumentParser(TempBalanceArguments).parse_json_file(str(path))
    assert tb.config() == EXPECTED


@pytest.mark.parametrize("flags,flag", [(["--tb_interval", "often"], "--tb_interval='often'"),
                                        (["--tb_interval", "0"], "--tb_interval=0"),
                                        (["--tb_s1", "-1"], "--tb_s1=-1.0"),
                                        (["--tb_s1", "2", "--tb_s2", "1"], "--tb_s2=1.0")])
def test_bad_values_name_the_flag(flags, flag):
    """The message names the flag as typed (the config's field names are not the command's)."""
    (tb,) = HfArgumentParser(TempBalanceArguments).parse_args_into_dataclasses(args=flags)
    with pytest.raises(ValueError) as err:
        tb.config()
    assert str(err.value).startswith(flag + ": ") and "TempBalanceConfig" not in str(err.value)
