"""The figures, the offline HTML report (opened in headless Chromium) and the model card, from synthetic results."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesion import metrics, report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _result(rng) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """A metrics.json-like result for two models and the ensemble on 120 synthetic images."""
    y = np.repeat(np.arange(7), 18)[:120]
    meta = pd.DataFrame({"sex": rng.choice(["male", "female"], 120), "age": rng.uniform(20, 85, 120),
                         "localization": rng.choice(["back", "face"], 120)})
    groups = [f"L{i // 2}" for i in range(120)]
    probs = {}
    for name, skill in (("custom_cnn", 2.0), ("scratch_cnn", 0.5), ("ensemble", 2.5)):
        logits = rng.normal(0, 1, (120, 7))
        logits[np.arange(120), y] += skill
        probs[name] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    models = {}
    for name, p in probs.items():
        models[name] = metrics.classification_report(y, p, "multiclass", groups=groups, meta=meta, n_bootstrap=30)
        models[name]["calibration"] = {"temperature": 1.3, "ece_before": 0.12, "ece_after": 0.05}
        models[name]["pretrained"] = "scratch"
    models["ensemble"]["decision"] = {"malignant_threshold": 0.31, "target_sensitivity": 0.95, "ood_threshold": 0.9,
                                      "uncertain_margin": 0.1, "share_uncertain": 0.2}
    result = {
        "split": "test", "task": "multiclass", "classes": list(metrics.class_names("multiclass")),
        "data": {"source": "synthetic", "fingerprint": "abc", "image_size": 32, "n_images": 120, "n_lesions": 60,
                 "counts": {"test": {"mel": 18, "nv": 18}}},
        "models": models,
        "explanations": {"models": {"custom_cnn": {"gradcam": {"energy_inside": 0.6, "pointing_game": 0.8,
                                                               "mask_share": 0.2, "road": 0.01, "n_images": 8}}}},
    }
    return result, y, probs


def _figures(tmp_path, rng, y, probs) -> dict[str, Path]:
    plots = tmp_path / "plots"
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2], "val_loss": [1.9, 1.6, 1.4],
                            "train_balanced_accuracy": [0.2, 0.3, 0.4], "val_balanced_accuracy": [0.2, 0.25, 0.3],
                            "best": [False, False, True]})
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    return {
        "learning curves": report.plot_learning_curves({"custom_cnn": history, "scratch_cnn": history},
                                                       plots / "learning.png"),
        "confusion": report.plot_confusion_matrices({n: metrics.confusion_matrix(y, p) for n, p in probs.items()},
                                                    list(metrics.class_names("multiclass")), plots / "cm.png"),
        "roc": report.plot_roc_curves(y, probs, "multiclass", plots / "roc.png"),
        "reliability": report.plot_reliability(y, probs, plots / "rel.png"),
        "cam grid": report.plot_cam_grid(images, {"custom_cnn": images, "ensemble": images[:, ::-1]},
                                         plots / "cam.png", ["a", "b", "c"]),
    }


def _image_states(page: Path, tmp_path: Path) -> list[list]:
    """(complete, naturalWidth) of every <img> of ``page`` as loaded by headless Chromium."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chr'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        driver.get(page.resolve().as_uri())
        return driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
    finally:
        driver.quit()


@pytest.mark.timeout(120)
def test_report_html_is_offline_and_every_image_loads_in_chromium(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("headless Chromium not installed (needs /usr/bin/chromium and /usr/bin/chromedriver)")
    rng = np.random.default_rng(0)
    result, y, probs = _result(rng)
    figures = _figures(tmp_path, rng, y, probs)
    page = report.render_html(result, figures, tmp_path / "eval" / "report.html")
    shutil.rmtree(tmp_path / "plots")  # the page must not need the PNG files beside it
    text = page.read_text()
    assert not re.search(r'src="(?!data:image/png;base64,)', text)  # nothing fetched from the network or disk
    states = _image_states(page, tmp_path)
    assert len(states) == len(figures)
    assert all(complete and width > 0 for complete, width in states), states
    for expected in ("balanced accuracy", "Per-class report", "Subgroups", "Explanation quality",
                     "not a medical device"):
        assert expected in text


def test_html_tables_show_intervals_and_undefined_values(tmp_path):
    rng = np.random.default_rng(1)
    result, y, probs = _result(rng)
    ci = result["models"]["ensemble"]["bootstrap"]["balanced_accuracy"]
    text = report.render_html(result, {}, tmp_path / "report.html").read_text()
    assert f"[{ci['low']:.3f}, {ci['high']:.3f}]" in text
    result["models"]["custom_cnn"]["per_class"]["df"]["auc"] = None
    assert "–" in report.class_table(result["models"]["custom_cnn"])


def test_model_card_has_data_metrics_subgroups_limits_and_licence(tmp_path):
    rng = np.random.default_rng(2)
    result, _, _ = _result(rng)
    card = report.render_model_card(result, tmp_path / "model_card.md").read_text()
    for section in ("## Data", "## Models", "## Decision rule", "## Subgroups", "## Known limits", "## Licence"):
        assert section in card
    assert "CC BY-NC 4.0" in card and "not a medical device" in card and "SYNTHETIC" in card
    ci = result["models"]["custom_cnn"]["bootstrap"]["macro_auc"]
    assert f"[{ci['low']:.3f}, {ci['high']:.3f}]" in card
    assert "| sex | female |" in card


def test_comparison_table_shows_intervals_and_marks_real_differences():
    labels = np.repeat(np.arange(7), 20)
    good = np.eye(7)[labels] * 0.9 + 0.1 / 7
    poor = np.full((len(labels), 7), 1 / 7) + np.eye(7)[(labels + 1) % 7] * 0.1
    section = {"variants": {"x-balanced": {"balance": "oversample"}, "x-imbalanced": {"balance": "none"}},
               **metrics.json_safe(metrics.paired_bootstrap(labels, {"x-balanced": good, "x-imbalanced": poor},
                                                            np.arange(len(labels)), "multiclass", 50))}
    table = report.comparison_table("x", section)
    d = section["differences"]["x-balanced - x-imbalanced"]["balanced_accuracy"]
    assert d["low"] > 0  # a real difference: bold
    assert f"<b>{d['estimate']:.3f} <small>[{d['low']:.3f}, {d['high']:.3f}]</small></b>" in table
    assert "x-balanced <small>(oversample)</small>" in table and "recall mel" in table
