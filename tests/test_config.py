"""The workflow configuration: YAML loading, per-model overrides, flag overrides, and every field checked where
it is read, with its path, the bad value and what was expected."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lesion import config as config_module
from lesion.config import Config, ConfigError, apply_overrides, config_from_dict, dump_yaml, load_config
from lesion.rundir import RunDir
from pipelines.cli import main
from pipelines.common import RUN_CONFIG, record_run_config, resolve_config, resolve_config_sources

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match=r"^train: unknown field\(s\) learning_rate"):
        config_from_dict({"train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"train\.models\.resnet50: unknown field\(s\) epochz"):
        config_from_dict({"train": {"models": {"resnet50": {"epochz": 3}}}})


def test_wrong_type_is_rejected_and_ints_widen_to_floats():
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected int, got 'ten'"):
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


# (config section, bad value, the path named, the allowed values named): one per enumerated field
CHOICE_FIELDS = [
    ({"data": {"source": "csv"}}, "data.source", "csv", "ham10000, isic-task3, isic-binary, folder, parquet, synthetic"),
    ({"data": {"task": "ternary"}}, "data.task", "ternary", "multiclass, binary"),
    ({"train": {"optimizer": "rmsprop"}}, "train.optimizer", "rmsprop", "adam, adamw, sgd"),
    ({"train": {"scheduler": "step"}}, "train.scheduler", "step", "plateau, cosine, none"),
    ({"train": {"balance": "both"}}, "train.balance", "both", "none, weights, oversample"),
    ({"train": {"monitor": "val_f1"}}, "train.monitor", "val_f1",
     "val_loss, val_accuracy, val_balanced_accuracy, val_macro_f1, val_roc_auc"),
    ({"train": {"models": {"resnet50": {"balance": "always"}}}}, "train.models.resnet50.balance", "always",
     "none, weights, oversample"),
    ({"train": {"models": {"scratch_cnn": {"optimizer": "lamb"}}}}, "train.models.scratch_cnn.optimizer", "lamb",
     "adam, adamw, sgd"),
    ({"tune": {"metric": "accuracy"}}, "tune.metric", "accuracy", "val_loss, val_accuracy"),
    ({"tune": {"mode": "maximise"}}, "tune.mode", "maximise", "min, max"),
    ({"tune": {"scheduler": "hyperband"}}, "tune.scheduler", "hyperband", "asha, none"),
    ({"tune": {"search_space": {"optimizer": {"type": "choice", "values": ["adam", "nadam"]}}}},
     "tune.search_space.optimizer.values[1]", "nadam", "adam, adamw, sgd"),
    ({"evaluate": {"split": "validation"}}, "evaluate.split", "validation", "train, val, test, all"),
    ({"evaluate": {"ensemble_weights": "mean"}}, "evaluate.ensemble_weights", "mean", "fit, equal"),
    ({"evaluate": {"cam_methods": ["gradcam", "saliency"]}}, "evaluate.cam_methods", "saliency",
     "gradcam, gradcam++, layercam, scorecam, eigencam"),
]


@pytest.mark.parametrize("values, path, bad, allowed", CHOICE_FIELDS, ids=[c[1] for c in CHOICE_FIELDS])
def test_every_enumerated_field_is_checked_when_read(values, path, bad, allowed, tmp_path):
    pattern = f"{re.escape(path)}: .*expected one of {re.escape(allowed)}.*got '{bad}'"
    with pytest.raises(ConfigError, match="^" + pattern):
        config_from_dict(values)
    file = tmp_path / "config.yaml"
    dump_yaml(values, file)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(file))}: {pattern}"):  # a file names itself, then the field
        load_config(file)
    flat = config_module.flatten(values)
    with pytest.raises(ConfigError, match="^" + pattern):  # a flag (--set) is checked as it is applied
        apply_overrides(Config(), flat)


@pytest.mark.parametrize("values, message", [
    ({"train": {"epochs": -1}}, r"^train\.epochs: expected >= 1; got -1"),
    ({"train": {"lr": 0}}, r"^train\.lr: expected > 0; got 0"),
    ({"train": {"dropout": [0.3, 1.5]}}, r"^train\.dropout: item 1: expected a number in \[0, 1\); got 1\.5"),
    ({"train": {"dropout": [0.3, "half"]}}, r"^train\.dropout\[1\]: expected float, got 'half'"),
    ({"train": {"models": {"resnet50": {"epochs": 0}}}}, r"^train\.models\.resnet50\.epochs: expected >= 1; got 0"),
    ({"train": {"models": {"resnet50": None}}}, r"^train\.models\.resnet50: expected a mapping, got None"),
    ({"data": {"split": [0.7, 0.3, 0.3]}}, r"^data\.split: split fractions must be three .* summing to 1"),
    ({"data": {"split": [0.7, -0.1, 0.4]}}, r"^data\.split: item 1: expected a number in \[0, 1\]; got -0\.1"),
    ({"data": {"image_size": 0}}, r"^data\.image_size: expected >= 1; got 0"),
    ({"data": {"min_image_side": 0}}, r"^data\.min_image_side: expected >= 1; got 0"),
    ({"tune": {"epochs": 2, "grace_period": 3}}, r"^tune\.grace_period: expected at most tune\.epochs \(2\); got 3"),
    ({"tune": {"search_space": {"lr": {"type": "loguniform", "low": 0, "high": 1}}}},
     r"^tune\.search_space\.lr\.low: expected > 0; got 0"),
    ({"tune": {"search_space": {"lr": {"type": "uniform", "low": 1e-2, "high": 1e-3}}}},
     r"^tune\.search_space\.lr: need 0 < low < high \(loguniform\) or low < high, got 0\.01, 0\.001"),
    ({"tune": {"search_space": {"learning_rate": {"type": "uniform", "low": 0, "high": 1}}}},
     r"^tune\.search_space\.learning_rate: not a train field"),
    ({"tune": {"search_space": {"dropout": {"type": "normal"}}}},
     r"^tune\.search_space\.dropout: expected a mapping with type one of loguniform, uniform, int, choice"),
    ({"tune": {"search_space": {"lr": {"type": "uniform", "low": 0.1}}}},
     r"^tune\.search_space\.lr: a uniform entry needs exactly type, low, high; missing \['high'\]"),
    ({"serve": {"port": 70000}}, r"^serve\.port: expected a number in \[1, 65535\]; got 70000"),
    ({"train": {"weights_dir": " "}}, r"^train\.weights_dir: expected a non-empty path; got ' '"),
    ({"train": {"weights_dir": 3}}, r"^train\.weights_dir: expected str or null, got 3"),
    ({"train": {"models": {"resnet50": {"weights_dir": ""}}}},
     r"^train\.models\.resnet50\.weights_dir: expected a non-empty path"),
    ({"serve": {"min_replicas": 3, "max_replicas": 2}}, r"^serve\.max_replicas: expected at least min_replicas \(3\)"),
    ({"serve": {"target_sensitivity": 0}}, r"^serve\.target_sensitivity: expected a number in \(0, 1\]; got 0"),
])
def test_ranges_and_cross_field_rules_name_the_field_and_value(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_cross_field_rules_see_every_flag_at_once():
    # raising both ends of a range in one command line must not trip over the intermediate state
    config = apply_overrides(Config(), {"serve.min_replicas": 3, "serve.max_replicas": 4})
    assert (config.serve.min_replicas, config.serve.max_replicas) == (3, 4)


def test_min_image_side_defaults_to_32_pixels():
    assert Config().data.min_image_side == 32
    assert config_from_dict({"data": {"min_image_side": 64}}).data.min_image_side == 64


def test_list_items_widen_and_defaults_are_valid():
    assert config_from_dict({"data": {"split": [1, 0, 0]}}).data.split == [1.0, 0.0, 0.0]
    assert config_from_dict(Config().to_dict()) == Config()  # every default passes its own check


def test_the_config_has_one_section_per_stage():
    assert [f.name for f in dataclasses.fields(Config)] == ["data", "train", "tune", "evaluate", "serve", "workflow",
                                                            "tracking", "inference"]


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_module.config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", sorted((ROOT / "cluster" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_schema_accepts_every_shipped_config(schema_validator, path):
    import yaml

    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in schema_validator.iter_errors(yaml.safe_load(path.read_text()) or {})]
    assert not errors


def test_the_schema_accepts_the_defaults_and_rejects_what_reading_rejects(schema_validator):
    assert schema_validator.is_valid(Config().to_dict())
    for values, *_ in CHOICE_FIELDS:  # every wrong enum value, in a section, a variant or a search space
        assert not schema_validator.is_valid(values), values
    for wrong in ({"train": {"epochs": 0}}, {"train": {"learning_rate": 1}}, {"train": {"models": {"a/b": {}}}},
                  {"train": {"models": {"x": {"arch": "vgg16"}}}}, {"serve": {"port": 70000}},
                  {"tune": {"search_space": {"learning_rate": {"type": "uniform", "low": 0, "high": 1}}}}):
        assert not schema_validator.is_valid(wrong), wrong
    assert schema_validator.is_valid({"train": {"models": {"r50-balanced": {"arch": "resnet50", "input_size": None}}}})


def test_config_schema_command_prints_the_schema(capsys):
    import json

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    balance = schema["properties"]["train"]["properties"]["balance"]
    assert balance["enum"] == ["none", "weights", "oversample"] and balance["default"] == "none"
    variant = schema["properties"]["train"]["properties"]["models"]["additionalProperties"]
    assert "arch" in variant["properties"] and "models" not in variant["properties"]


@pytest.fixture
def recorded_run(tmp_path) -> RunDir:
    """A run whose recorded config trains for 5 epochs."""
    run = RunDir(tmp_path / "run")
    record_run_config(run, apply_overrides(Config(), {"train.epochs": 5}))
    return run


def test_resolve_config_writes_nothing_unless_saved(recorded_run, tmp_path):
    saved = recorded_run.root / RUN_CONFIG
    before = saved.read_text()
    assert resolve_config(recorded_run, None, {"train.epochs": 2}).train.epochs == 2
    assert saved.read_text() == before  # a command's flags are its own
    assert resolve_config(recorded_run).train.epochs == 5
    resolve_config(recorded_run, None, {"train.epochs": 2}, save=True)  # --save-config
    assert load_config(saved).train.epochs == 2


def test_sources_name_default_run_config_file_and_flag(recorded_run, tmp_path):
    file = tmp_path / "study.yaml"
    dump_yaml({"train": {"lr": 0.01, "models": {"resnet50": {"balance": "weights"}}}}, file)
    config, sources = resolve_config_sources(recorded_run, None, {"evaluate.tta": True, "train.lr": None})
    assert config.train.epochs == 5 and sources["train.epochs"] == f"run config {recorded_run.root / RUN_CONFIG}"
    assert sources["evaluate.tta"] == "flag" and sources["train.lr"].startswith("run config")
    config, sources = resolve_config_sources(recorded_run, str(file), {"data.task": "binary"})
    assert (config.train.lr, config.train.epochs) == (0.01, 8)  # a --config file replaces the run's config
    assert sources["train.lr"] == f"--config {file}" and sources["train.epochs"] == "default"
    assert sources["train.models.resnet50.balance"] == f"--config {file}" and sources["data.task"] == "flag"
    assert set(sources) == set(config_module.flatten(config.to_dict()))


def test_config_show_prints_every_field_with_its_source(recorded_run, tmp_path, capsys):
    before = (recorded_run.root / RUN_CONFIG).read_text()
    assert main(["config", "show", "--run", str(recorded_run.root), "--set", "train.balance=weights"]) == 0
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(config_module.flatten(Config().to_dict()))
    assert rows["train.balance"] == ["weights", "flag"] and rows["train.epochs"][0] == "5"
    assert rows["train.epochs"][1] == f"run config {recorded_run.root / RUN_CONFIG}"
    assert (recorded_run.root / RUN_CONFIG).read_text() == before  # show writes nothing
    assert main(["config", "show", "--run", str(recorded_run.root), "--set", "train.balance=both"]) == 2
    assert re.search(r"train\.balance: expected one of none, weights, oversample; got 'both'",
                     capsys.readouterr().err)


def test_config_set_changes_the_recorded_config_and_says_what_changed(recorded_run, capsys):
    saved = recorded_run.root / RUN_CONFIG
    assert main(["config", "set", "--run", str(recorded_run.root), "train.epochs=3",
                 "train.models.resnet50.balance=oversample"]) == 0
    out = capsys.readouterr().out
    assert "2 field(s) changed" in out and "train.epochs: 5 -> 3" in out
    assert "train.models.resnet50.balance: (unset) -> oversample" in out
    config = load_config(saved)
    assert config.train.epochs == 3 and config.model_config("resnet50").balance == "oversample"
    assert main(["config", "set", "--run", str(recorded_run.root), "train.epochs=3"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    before = saved.read_text()
    assert main(["config", "set", "--run", str(recorded_run.root), "train.models.resnet50.monitor=auc"]) == 2
    err = capsys.readouterr().err
    assert "train.models.resnet50.monitor: expected one of val_loss, val_accuracy" in err and "got 'auc'" in err
    assert saved.read_text() == before  # a rejected value changes nothing


def test_config_set_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["config", "set", "--run", str(tmp_path / "typo"), "train.epochs=3"]) == 2
    assert "not a run directory" in capsys.readouterr().err and not (tmp_path / "typo" / RUN_CONFIG).exists()


def test_console_script_config_show_and_set(recorded_run):
    """The installed ``lesion`` entry point (this tree's code through PYTHONPATH) runs both actions."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lesion = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]
    script = Path(sys.executable).with_name("lesion")
    if script.exists():
        lesion = [str(script)]
    show = subprocess.run([*lesion, "config", "show", "--run", str(recorded_run.root), "--set", "data.task=binary"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert show.returncode == 0, show.stderr
    assert re.search(r"^data\.task +binary +flag$", show.stdout, re.M)
    change = subprocess.run([*lesion, "config", "set", "--run", str(recorded_run.root), "data.task=ternary"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert change.returncode == 2 and "data.task: expected one of multiclass, binary; got 'ternary'" in change.stderr


TRANSFER_ARCHS = {"resnet50", "densenet121", "mobilenetv2", "efficientnet_b0"}  # the studies fine-tuned these


@pytest.mark.parametrize("name", ["ham10000.yaml", "isic-binary.yaml"])
def test_the_study_configs_fine_tune_the_transfer_models_from_imagenet(name):
    """As the reference studies did: each transfer variant says `pretrained: true` itself (not a section default
    that a later edit could drop), and the CNNs start from scratch."""
    import yaml

    path = ROOT / "cluster" / "configs" / name
    written = yaml.safe_load(path.read_text())["train"]["models"]
    study = load_config(path)
    archs = {variant: study.model_config(variant).arch for variant in study.train.models}
    transfer = [variant for variant, arch in archs.items() if arch in TRANSFER_ARCHS]
    assert {archs[v] for v in transfer} == (TRANSFER_ARCHS if name == "ham10000.yaml"
                                            else {"mobilenetv2", "efficientnet_b0"})
    for variant in transfer:
        assert written[variant].get("pretrained") is True, variant
        assert study.model_config(variant).weights is None  # timm's hub weights, or train.weights_dir
    for variant, arch in archs.items():
        if arch in ("custom_cnn", "scratch_cnn"):
            assert not study.model_config(variant).pretrained, variant
    assert study.train.weights_dir is None  # set on an air-gapped cluster only


def test_weights_dir_is_in_the_schema_with_its_description():
    field = config_module.config_schema()["properties"]["train"]["properties"]["weights_dir"]
    assert field["type"] == ["string", "null"] and field["minLength"] == 1 and "pretrained" in field["description"]
    assert config_from_dict({"train": {"weights_dir": "/mnt/w"}}).train.weights_dir == "/mnt/w"
