"""Model variants: ``train.models`` keys are variant names with an ``arch``; tuning per architecture; the paired
lesion bootstrap; two variants of one architecture trained in one run and compared in metrics.json and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lesion import metrics
from lesion.config import ConfigError, config_from_dict, dump_yaml
from lesion.explain import Explainer
from lesion.inference import Inference
from lesion.labels import DX_CLASSES
from lesion.models import create_model, load_trained, save_checkpoint
from lesion.records import CheckpointRecord
from lesion.rundir import RunDir
from pipelines.tuned import apply_best

VARIANTS = {
    "cnn-balanced": {"arch": "custom_cnn", "balance": "oversample"},
    "cnn-imbalanced": {"arch": "custom_cnn", "balance": "none"},
}


def variant_config(**train):
    """tiny_config with two custom_cnn variants (small widths), balanced and imbalanced."""
    values = tiny_config().to_dict()
    values["train"]["models"] = {name: {**v, "conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]}
                                 for name, v in VARIANTS.items()}
    values["train"].update(train)
    return config_from_dict(values)


# --- configuration ---------------------------------------------------------------------------------------------


def test_variant_arch_resolves_and_is_checked():
    config = variant_config()
    assert config.model_config("cnn-balanced").arch == "custom_cnn"
    assert config.model_config("cnn-balanced").balance == "oversample"
    assert config.model_config("cnn-imbalanced").balance == "none"
    assert tiny_config().model_config("scratch_cnn").arch == "scratch_cnn"  # default: the key
    assert config.variants_of("custom_cnn") == ["cnn-balanced", "cnn-imbalanced"]

    with pytest.raises(ConfigError, match=r"train\.models\.wide\.arch: expected one of custom_cnn, .*got 'vgg16'"):
        config_from_dict({"train": {"models": {"wide": {"arch": "vgg16"}}}})
    with pytest.raises(ConfigError, match=r"train\.models\.mine\.arch: the variant name 'mine' is not an "
                                          r"architecture.*expected one of custom_cnn"):
        config_from_dict({"train": {"models": {"mine": {"balance": "none"}}}})
    with pytest.raises(ConfigError, match=r"train\.models\.a/b: .*letters, digits.*got 'a/b'"):
        config_from_dict({"train": {"models": {"a/b": {"arch": "resnet50"}}}})
    with pytest.raises(ConfigError, match=r"tune\.model: expected one of custom_cnn.*got 'cnn-balanced'"):
        config_from_dict({"tune": {"model": "cnn-balanced"}})


def test_tuned_settings_go_to_every_variant_of_the_arch_which_keeps_its_own_balance(tmp_path):
    run = RunDir(tmp_path / "run")
    run.tune.mkdir(parents=True)
    dump_yaml({"train": {"models": {"custom_cnn": {"lr": 3e-3, "balance": "weights", "fc_widths": [128, 64]}}}},
              run.tune / "best.yaml")
    values = variant_config().to_dict()
    values["train"]["models"]["cnn-balanced"]["lr"] = 5e-4  # the config's: the tuned lr beats it
    values["train"]["models"]["scratch_cnn"] = {}  # another architecture: untouched
    tuned = apply_best(config_from_dict(values), run)
    balanced, imbalanced = tuned.model_config("cnn-balanced"), tuned.model_config("cnn-imbalanced")
    assert (balanced.lr, imbalanced.lr) == (3e-3, 3e-3)
    assert (balanced.balance, imbalanced.balance) == ("oversample", "none")  # each keeps its own balance
    assert balanced.fc_widths == imbalanced.fc_widths == [128, 64]  # tuned
    assert tuned.model_config("scratch_cnn").lr == tiny_config().train.lr
    assert set(tuned.train.models) == {"cnn-balanced", "cnn-imbalanced", "scratch_cnn"}  # no variant added


def test_checkpoint_records_variant_and_arch_and_old_ones_load(tmp_path):
    net = create_model("scratch_cnn", 7, input_size=32)
    info = {"name": "scratch-balanced", "arch": "scratch_cnn", "task": "multiclass", "num_classes": 7,
            "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    save_checkpoint(tmp_path / "new" / "best.pt", net, CheckpointRecord.from_dict(info))
    model, loaded = load_trained(tmp_path / "new")
    assert (loaded.name, loaded.arch) == ("scratch-balanced", "scratch_cnn")
    assert json.loads((tmp_path / "new" / "model.json").read_text())["arch"] == "scratch_cnn"
    # before variants and records: no arch, no normalisation, no classes, "pretrained" for the weights origin
    old = {"name": "scratch_cnn", "task": "multiclass", "num_classes": 7, "input_size": 32, "pretrained": "scratch"}
    (tmp_path / "old").mkdir()
    torch.save({"state_dict": net.state_dict(), "info": old}, tmp_path / "old" / "best.pt")
    model, record = load_trained(tmp_path / "old")
    assert (record.arch, record.mean, record.std) == ("scratch_cnn", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert record.classes == DX_CLASSES and record.pretrained_origin == "scratch"
    x = torch.zeros(1, 3, 32, 32)
    assert torch.equal(model(x), load_trained(tmp_path / "new")[0](x))


# --- paired bootstrap ------------------------------------------------------------------------------------------


def _scores(rng, labels, accuracy, classes=7):
    """Probabilities whose arg-max is the true label with probability ``accuracy``."""
    probs = rng.random((len(labels), classes)) * 0.5
    right = rng.random(len(labels)) < accuracy
    wrong = (labels + 1 + rng.integers(0, classes - 1, len(labels))) % classes
    probs[np.arange(len(labels)), np.where(right, labels, wrong)] += 1.0
    return probs / probs.sum(axis=1, keepdims=True)


def test_paired_bootstrap_identical_variants_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 30)
    groups = np.arange(len(labels)) // 2  # two images per lesion
    probs = _scores(rng, labels, 0.7)
    out = metrics.paired_bootstrap(labels, {"a": probs, "b": probs.copy()}, groups, "multiclass", 200)
    assert out["unit"] == "lesion" and out["n_groups"] == len(labels) // 2
    diff = out["differences"]["a - b"]
    assert set(diff) == {"balanced_accuracy", "macro_f1", "malignant_auc",
                         *(f"recall:{c}" for c in ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"))}
    for metric, d in diff.items():
        assert d["estimate"] == d["low"] == d["high"] == 0.0, metric  # the same lesions for both: no noise
    a = out["models"]["a"]["balanced_accuracy"]
    assert a["low"] < a["estimate"] < a["high"]  # each variant's own interval is not degenerate


def test_paired_bootstrap_finds_a_real_difference_and_its_sign():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(7), 40)
    groups = np.arange(len(labels))
    good, poor = _scores(rng, labels, 0.9), _scores(rng, labels, 0.4)
    out = metrics.paired_bootstrap(labels, {"good": good, "poor": poor}, groups, "multiclass", 200)
    for metric in ("balanced_accuracy", "macro_f1"):
        d = out["differences"]["good - poor"][metric]
        assert 0 < d["low"] <= d["estimate"] <= d["high"], (metric, d)
        # paired: narrower than the gap the two separate intervals would suggest
        assert d["high"] - d["low"] < (out["models"]["good"][metric]["high"] - out["models"]["poor"][metric]["low"])


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_two_variants_train_in_one_run_and_appear_in_the_comparison(run, tmp_path):
    from pipelines.evaluate import evaluate
    from pipelines.train import train_all

    config = variant_config()
    summaries = train_all(config, run)
    assert {s["arch"] for s in summaries.values()} == {"custom_cnn"}
    assert run.trained_models() == ["cnn-balanced", "cnn-imbalanced"]
    for name, balance in (("cnn-balanced", "oversample"), ("cnn-imbalanced", "none")):
        info = json.loads((run.model_dir(name) / "model.json").read_text())
        assert (info["name"], info["arch"], info["balance"]) == (name, "custom_cnn", balance)

    result = evaluate(config, run)
    section = result["comparison"]["custom_cnn"]
    assert section["variants"] == {"cnn-balanced": {"balance": "oversample", "pretrained": "scratch"},
                                   "cnn-imbalanced": {"balance": "none", "pretrained": "scratch"}}
    assert section["n_resamples"] == config.evaluate.bootstrap and section["unit"] == "lesion"
    for name in ("cnn-balanced", "cnn-imbalanced"):
        bal = section["models"][name]["balanced_accuracy"]
        assert bal["estimate"] == pytest.approx(result["models"][name]["balanced_accuracy"])
        assert bal["low"] <= bal["estimate"] <= bal["high"]
        assert section["models"][name]["recall:nv"]["estimate"] == pytest.approx(
            result["models"][name]["per_class"]["nv"]["recall"])
    diff = section["differences"]["cnn-balanced - cnn-imbalanced"]["balanced_accuracy"]
    assert diff["estimate"] == pytest.approx(section["models"]["cnn-balanced"]["balanced_accuracy"]["estimate"]
                                             - section["models"]["cnn-imbalanced"]["balanced_accuracy"]["estimate"])
    assert diff["low"] <= diff["estimate"] <= diff["high"]
    assert json.loads((run.eval / "metrics.json").read_text())["comparison"] == result["comparison"]

    page = (run.eval / "report.html").read_text()
    assert "Variants compared" in page and "cnn-balanced - cnn-imbalanced" in page
    assert f"[{diff['low']:.3f}, {diff['high']:.3f}]" in page
    assert "maps of the custom_cnn variants" in page and (run.eval / "plots" / "cam_grid_custom_cnn.png").is_file()

    # every stage takes variant names: the inference core (serve, predict) and Grad-CAM (explain)
    core = Inference.from_run(run, config, ["cnn-balanced"])
    assert core.member("cnn-balanced").summary()["arch"] == "custom_cnn"
    image = np.zeros((32, 32, 3), np.uint8) + 128
    answer, picture = Explainer(core).explain_preprocessed(image, "cnn-balanced")
    assert set(answer["models"]) == {"cnn-balanced"} and picture.shape == (32, 32, 3)


def test_a_training_setting_added_later_at_its_default_leaves_trained_models_current():
    """Upgrading lesion must not retrain every model because a release added a setting: settings at their default
    stay out of the fingerprint; a changed setting, a version bump or other data change it."""
    import dataclasses
    from types import SimpleNamespace

    import pipelines.train
    from lesion.config import TrainConfig
    from pipelines.train import train_fingerprint

    info = SimpleNamespace(fingerprint="data-1")
    Later = dataclasses.make_dataclass("Later", [("new_option", float, dataclasses.field(default=0.0))],
                                       bases=(TrainConfig,))
    base = train_fingerprint(TrainConfig(epochs=5), info)
    assert train_fingerprint(Later(epochs=5), info) == base
    assert train_fingerprint(Later(epochs=5, new_option=0.5), info) != base
    assert train_fingerprint(TrainConfig(epochs=6), info) != base
    assert train_fingerprint(TrainConfig(epochs=5), SimpleNamespace(fingerprint="data-2")) != base
    original = pipelines.train.TRAIN_VERSION
    try:
        pipelines.train.TRAIN_VERSION = original + 1
        assert train_fingerprint(TrainConfig(epochs=5), info) != base
    finally:
        pipelines.train.TRAIN_VERSION = original
