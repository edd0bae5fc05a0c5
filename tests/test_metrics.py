"""Metrics against scikit-learn on hand-made arrays, the binary view, grouped bootstrap and subgroups."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from lesion import metrics

# 7 classes; class 5 (df) appears nowhere, class 6 (vasc) is true twice but never predicted.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 6, 6, 1, 0])
Y_PRED = np.array([0, 1, 1, 1, 2, 0, 2, 3, 0, 4, 4, 4, 1, 2])


def _probs(y_pred, seed=0):
    """Probabilities whose arg-max is ``y_pred``, with varied (non-tied) scores for AUC."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 0.3, (len(y_pred), 7))
    p[np.arange(len(y_pred)), y_pred] = 1.0
    return p / p.sum(axis=1, keepdims=True)


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_counts_and_rates_match_sklearn_with_missing_classes():
    p = _probs(Y_PRED)
    labels = list(range(7))
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, p),
                                  skm.confusion_matrix(Y_TRUE, Y_PRED, labels=labels))
    assert metrics.accuracy(Y_TRUE, p) == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert metrics.balanced_accuracy(Y_TRUE, p) == pytest.approx(_sk(skm.balanced_accuracy_score, Y_TRUE, Y_PRED))
    ours = metrics.precision_recall_f1(Y_TRUE, p)
    sk = _sk(skm.precision_recall_fscore_support, Y_TRUE, Y_PRED, labels=labels, zero_division=np.nan)
    for k, name in enumerate(("precision", "recall", "f1")):
        np.testing.assert_allclose(ours[name], sk[k], equal_nan=True)
    for average in ("macro", "weighted"):
        sk = _sk(skm.precision_recall_fscore_support, Y_TRUE, Y_PRED, labels=labels, zero_division=np.nan,
                 average=average)
        for k, name in enumerate(("precision", "recall", "f1")):
            assert ours[average][name] == pytest.approx(sk[k]), (average, name)
    # specificity of class k = recall of "not k"
    spec = metrics.per_class(Y_TRUE, p)["specificity"]
    for k in range(7):
        assert spec[k] == pytest.approx(skm.recall_score(Y_TRUE != k, Y_PRED != k))


def test_roc_auc_per_class_and_macro():
    p = _probs(Y_PRED)
    auc = metrics.roc_auc(Y_TRUE, p)
    for k in range(7):
        if k == 5:
            assert np.isnan(auc["per_class"][k])  # df absent from y_true: undefined, not a crash
        else:
            assert auc["per_class"][k] == pytest.approx(skm.roc_auc_score(Y_TRUE == k, p[:, k]))
    assert auc["macro"] == pytest.approx(np.mean([skm.roc_auc_score(Y_TRUE == k, p[:, k]) for k in range(7) if k != 5]))
    # with every class present, our macro equals scikit-learn's one-vs-rest macro
    rng = np.random.default_rng(1)
    y = np.tile(np.arange(7), 6)
    q = rng.dirichlet(np.ones(7), len(y))
    assert metrics.roc_auc(y, q)["macro"] == pytest.approx(skm.roc_auc_score(y, q, multi_class="ovr", average="macro"))


def test_binary_view_sums_malignant_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 300)
    p = rng.dirichlet(np.ones(7), 300)
    p[np.isin(y, [0, 2, 3]), 0] += 0.5  # informative for malignant (mel, bcc, akiec)
    p /= p.sum(axis=1, keepdims=True)
    y_mal, p_mal = metrics.malignant_view(y, p, "multiclass")
    np.testing.assert_array_equal(y_mal, np.isin(y, [0, 2, 3]))
    np.testing.assert_allclose(p_mal, p[:, 0] + p[:, 2] + p[:, 3])
    b = metrics.binary_metrics(y, p, "multiclass", threshold=0.6)
    assert b["auc"] == pytest.approx(skm.roc_auc_score(y_mal, p_mal))
    fpr, tpr, _ = skm.roc_curve(y_mal, p_mal)
    for spec, key in ((0.90, "sensitivity_at_90_specificity"), (0.95, "sensitivity_at_95_specificity")):
        assert b[key] == pytest.approx(tpr[fpr <= 1 - spec].max())
    assert b["sensitivity"] == pytest.approx(np.mean(p_mal[y_mal] >= 0.6))
    assert b["specificity"] == pytest.approx(np.mean(p_mal[~y_mal] < 0.6))
    # the binary task: column 1 is the malignant probability
    pb = np.stack([1 - p_mal, p_mal], axis=1)
    assert metrics.binary_metrics(y_mal.astype(int), pb, "binary")["auc"] == pytest.approx(b["auc"])


def test_a_given_malignant_probability_replaces_the_sum_everywhere_the_report_uses_it():
    # An ensemble's class probabilities are prior-adjusted but its malignant probability is not: the report's
    # binary view, its bootstrap interval and its subgroups must all rank by the one it is given.
    rng = np.random.default_rng(5)
    y = rng.integers(0, 7, 240)
    p = rng.dirichlet(np.ones(7), 240)
    score = np.isin(y, [0, 2, 3]) + rng.normal(0, 0.8, 240)  # informative, unlike p's malignant columns
    meta = pd.DataFrame({"sex": rng.choice(["female", "male"], 240)})
    report = metrics.classification_report(y, p, "multiclass", groups=np.arange(240), n_bootstrap=50, meta=meta,
                                           p_malignant=score)
    expected = skm.roc_auc_score(np.isin(y, [0, 2, 3]), score)
    assert report["binary"]["auc"] == pytest.approx(expected)
    assert report["bootstrap"]["malignant_auc"]["estimate"] == pytest.approx(expected)
    female = meta["sex"].to_numpy() == "female"
    assert report["subgroups"]["sex"]["female"]["malignant_auc"] == pytest.approx(
        skm.roc_auc_score(np.isin(y[female], [0, 2, 3]), score[female]))
    assert report["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(y, p))  # classes still from p
    with pytest.raises(ValueError, match="p_malignant has shape"):
        metrics.binary_metrics(y, p, "multiclass", p_malignant=score[:10])


def test_ece_by_hand():
    # bins of width 1/15: confidences 0.95 (2 images, 1 right) and 0.55 (2 images, 2 right)
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert metrics.expected_calibration_error(y, p) == pytest.approx(expected)


def test_bootstrap_resamples_lesions_not_images():
    # 20 lesions x 10 images; all images of a lesion share label and correctness, so the evidence is 20 lesions.
    rng = np.random.default_rng(3)
    lesion_labels = np.repeat([0, 1], 10)
    lesion_correct = rng.random(20) < 0.7
    y = np.repeat(lesion_labels, 10)
    pred = np.where(np.repeat(lesion_correct, 10), y, 1 - y)
    p = np.eye(2)[pred] * 0.8 + 0.1
    lesions = np.repeat([f"L{i}" for i in range(20)], 10)
    grouped = metrics.bootstrap_ci(y, p, lesions, "binary", n_resamples=300, seed=0)
    per_image = metrics.bootstrap_ci(y, p, np.arange(200), "binary", n_resamples=300, seed=0)
    assert grouped["n_groups"] == 20 and per_image["n_groups"] == 200
    width = lambda r: r["balanced_accuracy"]["high"] - r["balanced_accuracy"]["low"]  # noqa: E731
    assert width(grouped) > 2 * width(per_image)
    ci = grouped["balanced_accuracy"]
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert ci["estimate"] == pytest.approx(metrics.balanced_accuracy(y, p))


def test_vectorised_resamples_equal_the_metrics_of_the_repeated_images():
    # Each resample's weights stand for the images repeated that often: every bootstrap metric must equal the plain
    # metric of those repeated images, ties in the scores and classes missing from a resample included.
    rng = np.random.default_rng(5)
    y = rng.integers(0, 7, 120)
    p = np.round(rng.dirichlet(np.ones(7), 120), 1) + 1e-3  # rounded: many tied scores
    p /= p.sum(axis=1, keepdims=True)
    groups = rng.integers(0, 40, 120)
    weights = metrics.lesion_resample_weights(groups, 25, seed=1)
    assert weights.shape == (25, 120) and np.all(weights.sum(axis=1) > 0)
    assert all(len(set(weights[r, groups == g])) == 1 for r in range(25) for g in np.unique(groups))  # per lesion
    summary = metrics._resampled_summary(y, p, "multiclass", weights)
    comparison = metrics._resampled_comparison(y, p, "multiclass", weights)
    for r in range(25):
        idx = np.repeat(np.arange(120), weights[r].astype(int))
        for name, value in metrics._summary(y[idx], p[idx], "multiclass").items():
            assert summary[name][r] == pytest.approx(value, abs=1e-12, nan_ok=True), (r, name)
        for name, value in metrics.comparison_metrics(y[idx], p[idx], "multiclass").items():
            assert comparison[name][r] == pytest.approx(value, abs=1e-12, nan_ok=True), (r, name)


def test_subgroups_count_every_image():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 7, 40)
    p = rng.dirichlet(np.ones(7), 40)
    meta = pd.DataFrame({
        "sex": ["male", "female", None, "male"] * 10,
        "age": [25.0, 50.0, np.nan, 80.0] * 10,
        "localization": ["back", "face", "back", ""] * 10,
    })
    sub = metrics.subgroup_metrics(y, p, meta, "multiclass")
    assert set(sub) == {"sex", "age_band", "localization"}
    assert {k: v["n"] for k, v in sub["sex"].items()} == {"female": 10, "male": 20, "unknown": 10}
    assert set(sub["age_band"]) == {"<30", "45-59", "75+", "unknown"}
    assert sum(v["n"] for v in sub["localization"].values()) == 40
    male = (meta["sex"] == "male").to_numpy()
    assert sub["sex"]["male"]["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy(y[male], p[male]))


def test_classification_report_is_strict_json_with_nulls_for_undefined():
    p = _probs(Y_PRED)
    groups = [f"L{i // 2}" for i in range(len(Y_TRUE))]
    report = metrics.classification_report(Y_TRUE, p, "multiclass", groups=groups, n_bootstrap=20,
                                           malignant_threshold=0.5)
    text = json.dumps(report, allow_nan=False)  # NaN would make invalid JSON
    assert json.loads(text) == report
    assert report["per_class"]["df"]["auc"] is None and report["per_class"]["df"]["recall"] is None
    assert report["per_class"]["vasc"]["precision"] is None and report["per_class"]["vasc"]["recall"] == 0.0
    assert report["per_class"]["nv"]["support"] == 3
    assert report["confusion_matrix"][6][4] == 2
    assert set(report["bootstrap"]) >= {"balanced_accuracy", "macro_auc", "malignant_auc", "n_groups"}
    assert report["binary"]["threshold"] == 0.5
    with pytest.raises(ValueError, match="2 columns"):
        metrics.classification_report(np.array([0, 1]), p[:2, :2], "multiclass")
