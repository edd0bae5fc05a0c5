"""The workflow configuration: YAML loading, per-model overrides, flag overrides and clear errors."""

import pytest

from lesion.config import Config, ConfigError, apply_overrides, config_from_dict, dump_yaml, load_config
from pipelines.cli import main


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    dump_yaml(Config().to_dict(), path)
    assert load_config(path) == Config()


def test_model_overrides_apply_to_that_model_only():
    config = config_from_dict({"train": {"lr": 1e-3, "models": {"custom_cnn": {"lr": 5e-4, "conv_widths": [8, 16, 32, 64]}}}})
    custom = config.model_config("custom_cnn")
    assert custom.lr == 5e-4 and custom.conv_widths == [8, 16, 32, 64]
    assert config.model_config("resnet50").lr == 1e-3


def test_unknown_field_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"config\.train: unknown field\(s\) learning_rate"):
        config_from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"train\.models\.resnet50: unknown field\(s\) epochz"):
        config_from_dict({"train": {"models": {"resnet50": {"epochz": 3}}}})


def test_wrong_type_is_rejected_and_ints_widen_to_floats():
    with pytest.raises(ConfigError, match=r"config\.train\.epochs: expected int"):
        config_from_dict({"train": {"epochs": "ten"}})
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_flag_overrides_skip_unset_values():
    config = apply_overrides(Config(), {"train.epochs": 3, "train.lr": None, "data.task": "binary"})
    assert config.train.epochs == 3 and config.train.lr == Config().train.lr and config.data.task == "binary"


def test_missing_or_invalid_file_gives_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "ingest" in capsys.readouterr().out
