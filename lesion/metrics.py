"""Classification metrics as functions of ``(y_true, y_prob)``, in the style of scikit-learn.

``y_true`` holds class indices (N,) in ``lesion.labels.class_names(task)`` order; ``y_prob`` holds probabilities
(N, C). The predicted class is the arg-max of ``y_prob``. A metric that is undefined for the data at hand (the recall
of a class absent from ``y_true``, the precision of a class never predicted, an AUC with one class only) is NaN in
the functions here and ``None`` (JSON null) in ``classification_report``; averages skip undefined values, as
scikit-learn does with ``zero_division=np.nan``.

The binary view (malignant vs benign) is derived from any task by summing the probabilities of
``lesion.labels.malignant_indices(task)``, unless a malignant probability is passed as ``p_malignant`` (an
ensemble's: ``lesion.ensemble.malignant_probability``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from lesion.labels import class_names, malignant_indices

AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75+"))
SUBGROUP_COLUMNS = ("sex", "age_band", "localization")


def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_true.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(f"expected y_true (N,) and y_prob (N, C); got {y_true.shape} and {y_prob.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= y_prob.shape[1]):
        raise ValueError(f"y_true holds labels outside 0..{y_prob.shape[1] - 1}")
    return y_true, y_prob


def _div(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def confusion_matrix(y_true, y_prob) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted classes (arg-max)."""
    y_true, y_prob = _check(y_true, y_prob)
    c = y_prob.shape[1]
    pred = y_prob.argmax(axis=1)
    return np.bincount(y_true * c + pred, minlength=c * c).reshape(c, c)


def accuracy(y_true, y_prob) -> float:
    """Share of images whose arg-max class is the true class."""
    y_true, y_prob = _check(y_true, y_prob)
    return float(np.mean(y_prob.argmax(axis=1) == y_true)) if len(y_true) else math.nan


def per_class(y_true, y_prob) -> dict[str, np.ndarray]:
    """Per-class arrays (C,): precision, recall (= sensitivity), f1, specificity, support."""
    cm = confusion_matrix(y_true, y_prob)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fp, fn = predicted - tp, support - tp
    tn = cm.sum() - tp - fp - fn
    return {
        "precision": _div(tp, predicted),
        "recall": _div(tp, support),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "specificity": _div(tn, tn + fp),
        "support": support,
    }


def balanced_accuracy(y_true, y_prob) -> float:
    """Mean recall over the classes present in ``y_true`` (the ISIC 2018 Task 3 main metric)."""
    recall = per_class(y_true, y_prob)["recall"]
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else math.nan


def precision_recall_f1(y_true, y_prob) -> dict[str, Any]:
    """Per-class arrays plus ``macro`` (unweighted mean of defined values) and ``weighted`` (by support) averages."""
    stats = per_class(y_true, y_prob)
    support = stats["support"].astype(np.float64)
    out: dict[str, Any] = {k: stats[k] for k in ("precision", "recall", "f1")}
    out["macro"] = {k: _nanmean(stats[k]) for k in ("precision", "recall", "f1")}
    out["weighted"] = {k: _weighted(stats[k], support) for k in ("precision", "recall", "f1")}
    return out


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _weighted(values, weights) -> float:
    keep = np.isfinite(values) & (weights > 0)
    return float(np.average(values[keep], weights=weights[keep])) if keep.any() else math.nan


def binary_auc(y_binary, score) -> float:
    """ROC-AUC of a 0/1 target against a score (Mann-Whitney, ties counted half); NaN with one class only."""
    y_binary = np.asarray(y_binary, dtype=bool)
    n_pos = int(y_binary.sum())
    n_neg = len(y_binary) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y_binary].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(y_true, y_prob) -> dict[str, Any]:
    """One-vs-rest ROC-AUC per class (C,) and their ``macro`` mean over classes where it is defined."""
    y_true, y_prob = _check(y_true, y_prob)
    per = np.array([binary_auc(y_true == k, y_prob[:, k]) for k in range(y_prob.shape[1])])
    return {"per_class": per, "macro": _nanmean(per)}


def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """ECE of the top-label confidence: sum over equal-width bins of |accuracy - confidence| x share of images."""
    y_true, y_prob = _check(y_true, y_prob)
    if not len(y_true):
        return math.nan
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / count.sum())


def reliability_bins(y_true, y_prob, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy (NaN when empty) and count; for reliability diagrams."""
    y_true, y_prob = _check(y_true, y_prob)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    return {
        "edges": np.linspace(0, 1, n_bins + 1),
        "confidence": _div(np.bincount(bins, confidence, n_bins), count),
        "accuracy": _div(np.bincount(bins, correct, n_bins), count),
        "count": count,
    }


def log_loss(y_true, y_prob, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class."""
    y_true, y_prob = _check(y_true, y_prob)
    return float(-np.mean(np.log(np.clip(y_prob[np.arange(len(y_true)), y_true], eps, 1.0))))


def malignant_view(y_true, y_prob, task: str, p_malignant=None) -> tuple[np.ndarray, np.ndarray]:
    """(is_malignant (N,) bool, malignant probability (N,)) from class labels and class probabilities: the malignant
    classes' probabilities summed, or ``p_malignant`` (N,) where given (an ensemble's, whose class probabilities are
    adjusted to a balanced prior while its malignant probability stays the calibrated one)."""
    y_true, y_prob = _check(y_true, y_prob)
    idx = malignant_indices(task)
    if p_malignant is None:
        return np.isin(y_true, idx), y_prob[:, idx].sum(axis=1)
    p_malignant = np.asarray(p_malignant, dtype=np.float64)
    if p_malignant.shape != (len(y_true),):
        raise ValueError(f"p_malignant has shape {p_malignant.shape} for {len(y_true)} images")
    return np.isin(y_true, idx), p_malignant


def sensitivity_at_specificity(y_binary, score, specificity: float) -> float:
    """Highest sensitivity over thresholds whose specificity is at least ``specificity`` (NaN with one class)."""
    y_binary = np.asarray(y_binary, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    pos, neg = score[y_binary], score[~y_binary]
    if not len(pos) or not len(neg):
        return math.nan
    # A threshold t calls "malignant" when score >= t; candidates are the distinct scores plus +inf (call nothing).
    thresholds = np.append(np.unique(score), np.inf)
    spec = np.searchsorted(np.sort(neg), thresholds, side="left") / len(neg)
    sens = 1.0 - np.searchsorted(np.sort(pos), thresholds, side="left") / len(pos)
    return float(sens[spec >= specificity - 1e-12].max())


def binary_metrics(y_true, y_prob, task: str, threshold: float | None = None, p_malignant=None) -> dict[str, Any]:
    """Malignant-vs-benign view: AUC, sensitivity at 90% and 95% specificity, counts; at ``threshold`` if given."""
    y_mal, p_mal = malignant_view(y_true, y_prob, task, p_malignant)
    out = {
        "auc": binary_auc(y_mal, p_mal),
        "sensitivity_at_90_specificity": sensitivity_at_specificity(y_mal, p_mal, 0.90),
        "sensitivity_at_95_specificity": sensitivity_at_specificity(y_mal, p_mal, 0.95),
        "n_malignant": int(y_mal.sum()),
        "n_benign": int((~y_mal).sum()),
    }
    if threshold is not None:
        called = p_mal >= threshold
        out["threshold"] = float(threshold)
        out["sensitivity"] = float(_div(called[y_mal].sum(), y_mal.sum()))
        out["specificity"] = float(_div((~called[~y_mal]).sum(), (~y_mal).sum()))
    return out


def _summary(y_true, y_prob, task: str, p_malignant=None) -> dict[str, float]:
    y_mal, p_mal = malignant_view(y_true, y_prob, task, p_malignant)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_prob),
        "macro_auc": roc_auc(y_true, y_prob)["macro"],
        "malignant_auc": binary_auc(y_mal, p_mal),
    }


def lesion_resample_weights(groups, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, N) image weights of bootstrap resamples of LESIONS: each resample draws the groups (``groups``
    (N,): each image's lesion_id) with replacement and weighs every image by how often its group was drawn, which
    is the same as repeating the images, so several photographs of one lesion never count as independent evidence.
    Reusing the weights pairs the resamples across models."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    draws = np.random.default_rng(seed).integers(0, max(n_groups, 1), (n_resamples, n_groups))
    rows = np.arange(n_resamples)[:, None] * n_groups
    counts = np.bincount((draws + rows).ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    return counts[:, inverse].astype(np.float64)


def _rowwise_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the defined (finite) values of each row; NaN for a row with none."""
    defined = np.isfinite(values)
    total = np.where(defined, values, 0.0).sum(axis=1)
    return _div(total, defined.sum(axis=1))


def weighted_per_class(y_true, y_prob, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``per_class``'s recall and f1 under each row of image ``weights`` (R, N): arrays (R, C), NaN where undefined."""
    y_true, y_prob = _check(y_true, y_prob)
    classes = np.arange(y_prob.shape[1])
    truth = (y_true[:, None] == classes).astype(np.float64)
    called = (y_prob.argmax(axis=1)[:, None] == classes).astype(np.float64)
    tp, support, predicted = weights @ (truth * called), weights @ truth, weights @ called
    return {"recall": _div(tp, support), "f1": _div(2 * tp, support + predicted)}


def weighted_auc(y_binary, score, weights: np.ndarray) -> np.ndarray:
    """``binary_auc`` under each row of image ``weights`` (R, N) at once (Mann-Whitney, ties counted half): (R,)."""
    y_binary = np.asarray(y_binary, dtype=bool)
    order = np.argsort(np.asarray(score, dtype=np.float64), kind="stable")
    ranked = np.asarray(score, dtype=np.float64)[order]
    ties = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if len(ranked) else np.zeros(0, int)
    w = weights[:, order]
    pos = np.add.reduceat(w * y_binary[order], ties, axis=1) if len(ties) else np.zeros((len(w), 0))
    neg = np.add.reduceat(w * ~y_binary[order], ties, axis=1) if len(ties) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg
    return _div((pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def _resampled_summary(y_true, y_prob, task: str, weights: np.ndarray, p_malignant=None) -> dict[str, np.ndarray]:
    """``_summary`` of every resample in ``weights`` (R, N): {metric: (R,)}."""
    y_mal, p_mal = malignant_view(y_true, y_prob, task, p_malignant)
    per_class_auc = np.stack([weighted_auc(y_true == k, y_prob[:, k], weights) for k in range(y_prob.shape[1])],
                             axis=1)
    return {"balanced_accuracy": _rowwise_nanmean(weighted_per_class(y_true, y_prob, weights)["recall"]),
            "macro_auc": _rowwise_nanmean(per_class_auc),
            "malignant_auc": weighted_auc(y_mal, p_mal, weights)}


def _interval(estimate: float, values, confidence: float) -> dict[str, Any]:
    """Percentile interval of the finite ``values`` around ``estimate``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan)
    return {"estimate": estimate, "low": float(low), "high": float(high), "n_valid": int(len(values))}


def _check_groups(groups, n: int) -> np.ndarray:
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} images")
    return groups


def bootstrap_ci(
    y_true, y_prob, groups, task: str, n_resamples: int = 500, confidence: float = 0.95, seed: int = 0,
    p_malignant=None,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for balanced accuracy, macro AUC and malignant AUC, resampling GROUPS.

    ``groups`` (N,) holds each image's lesion_id (see ``lesion_resample_weights``). Resamples in which a metric is
    undefined are left out of that metric's interval (``n_valid`` says how many remained).
    """
    y_true, y_prob = _check(y_true, y_prob)
    groups = _check_groups(groups, len(y_true))
    samples = _resampled_summary(y_true, y_prob, task, lesion_resample_weights(groups, n_resamples, seed), p_malignant)
    estimate = _summary(y_true, y_prob, task, p_malignant)
    out: dict[str, Any] = {"n_resamples": n_resamples, "confidence": confidence, "unit": "lesion",
                           "n_groups": len(np.unique(groups))}
    for name, values in samples.items():
        out[name] = _interval(estimate[name], values, confidence)
    return out


def comparison_metrics(y_true, y_prob, task: str) -> dict[str, float]:
    """The metrics a variant comparison reports: balanced accuracy, macro F1, malignant AUC and ``recall:<class>``
    for each class (NaN where undefined)."""
    y_true, y_prob = _check(y_true, y_prob)
    y_mal, p_mal = malignant_view(y_true, y_prob, task)
    recall = per_class(y_true, y_prob)["recall"]
    return {"balanced_accuracy": balanced_accuracy(y_true, y_prob),
            "macro_f1": precision_recall_f1(y_true, y_prob)["macro"]["f1"],
            "malignant_auc": binary_auc(y_mal, p_mal),
            **{f"recall:{name}": float(recall[k]) for k, name in enumerate(class_names(task))}}


def _resampled_comparison(y_true, y_prob, task: str, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``comparison_metrics`` of every resample in ``weights`` (R, N): {metric: (R,)}."""
    y_true, y_prob = _check(y_true, y_prob)
    y_mal, p_mal = malignant_view(y_true, y_prob, task)
    stats = weighted_per_class(y_true, y_prob, weights)
    return {"balanced_accuracy": _rowwise_nanmean(stats["recall"]),
            "macro_f1": _rowwise_nanmean(stats["f1"]),
            "malignant_auc": weighted_auc(y_mal, p_mal, weights),
            **{f"recall:{name}": stats["recall"][:, k] for k, name in enumerate(class_names(task))}}


def paired_bootstrap(y_true, probs: dict[str, np.ndarray], groups, task: str, n_resamples: int = 500,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Compare models scored on the same images: each one's ``comparison_metrics`` with its lesion-bootstrap
    interval, and for each pair ``"a - b"`` the paired difference (the same resampled lesions for both) with its
    interval. An interval of the difference that excludes 0 says the difference is not resampling noise.

    Returns ``{n_resamples, confidence, unit: "lesion", n_groups, models: {name: {metric: {estimate, low, high,
    n_valid}}}, differences: {"a - b": {metric: {estimate, low, high, n_valid}}}}`` (pairs in ``probs`` order).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    groups = _check_groups(groups, len(y_true))
    names = list(probs)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    estimates = {name: comparison_metrics(y_true, probs[name], task) for name in names}
    metric_names = list(next(iter(estimates.values()))) if names else []
    weights = lesion_resample_weights(groups, n_resamples, seed)
    samples = {name: _resampled_comparison(y_true, probs[name], task, weights) for name in names}

    def difference(a: str, b: str, metric: str) -> dict[str, Any]:
        values = np.asarray(samples[a][metric]) - np.asarray(samples[b][metric])
        return _interval(estimates[a][metric] - estimates[b][metric], values, confidence)

    return {"n_resamples": n_resamples, "confidence": confidence, "unit": "lesion",
            "n_groups": int(len(np.unique(groups))),
            "models": {name: {m: _interval(estimates[name][m], samples[name][m], confidence) for m in metric_names}
                       for name in names},
            "differences": {f"{a} - {b}": {m: difference(a, b, m) for m in metric_names} for a, b in pairs}}


def age_band(age) -> str:
    """Age in years -> one of AGE_BANDS' labels, or 'unknown'."""
    if age is None or not np.isfinite(float(age)):
        return "unknown"
    return next(label for low, high, label in AGE_BANDS if low <= float(age) < high)


def subgroup_metrics(y_true, y_prob, meta: pd.DataFrame, task: str, p_malignant=None) -> dict[str, Any]:
    """Per subgroup of sex, age band and localization: counts, accuracy, balanced accuracy and malignant AUC.

    ``meta`` is row-aligned with ``y_true`` and may carry ``sex``, ``age``, ``localization`` (missing -> 'unknown').
    Result: ``{column: {group: {"n", "n_malignant", "accuracy", "balanced_accuracy", "malignant_auc"}}}``.
    """
    y_true, y_prob = _check(y_true, y_prob)
    if len(meta) != len(y_true):
        raise ValueError(f"meta has {len(meta)} rows for {len(y_true)} images")
    y_mal, p_mal = malignant_view(y_true, y_prob, task, p_malignant)
    columns = {}
    if "sex" in meta:
        columns["sex"] = meta["sex"]
    if "age" in meta:
        columns["age_band"] = pd.Series([age_band(a) for a in meta["age"]], index=meta.index)
    if "localization" in meta:
        columns["localization"] = meta["localization"]
    out: dict[str, Any] = {}
    for column, values in columns.items():
        values = values.fillna("unknown").astype(str).replace("", "unknown").to_numpy()
        out[column] = {}
        bands = [label for _, _, label in AGE_BANDS] + ["unknown"]
        order = bands if column == "age_band" else sorted(set(values))
        for group in (g for g in order if g in set(values)):
            keep = values == group
            out[column][group] = {
                "n": int(keep.sum()),
                "n_malignant": int(y_mal[keep].sum()),
                "accuracy": accuracy(y_true[keep], y_prob[keep]),
                "balanced_accuracy": balanced_accuracy(y_true[keep], y_prob[keep]),
                "malignant_auc": binary_auc(y_mal[keep], p_mal[keep]),
            }
    return out


def json_safe(value: Any) -> Any:
    """Nested metrics with numpy types -> plain Python, NaN/inf -> None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def classification_report(
    y_true, y_prob, task: str, *,
    groups=None,
    meta: pd.DataFrame | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    malignant_threshold: float | None = None,
    p_malignant=None,  # the malignant probability, where it is not the sum of y_prob's malignant classes
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every metric of one model on one split, as a JSON-ready dict (undefined values are None).

    ==================================  ===============================================================================
    field                               meaning
    ==================================  ===============================================================================
    ``n``                               number of images
    ``task``, ``classes``               task name and class names in label-index order
    ``accuracy``                        share of correct arg-max predictions
    ``balanced_accuracy``               mean per-class recall over classes present (ISIC 2018 Task 3 main metric)
    ``per_class.<cls>.precision``       TP / predicted as <cls> (None if never predicted)
    ``per_class.<cls>.recall``          TP / true <cls>, = ``sensitivity`` (None if absent from the labels)
    ``per_class.<cls>.f1``              2TP / (2TP + FP + FN)
    ``per_class.<cls>.specificity``     TN / (TN + FP), one-vs-rest
    ``per_class.<cls>.auc``             one-vs-rest ROC-AUC of the class probability (None if absent)
    ``per_class.<cls>.support``         number of true <cls> images
    ``macro.{precision,recall,f1,auc}`` unweighted mean over classes where defined
    ``weighted.{precision,recall,f1}``  mean weighted by support
    ``confusion_matrix``                C x C counts, rows = true class, columns = predicted class
    ``ece``                             expected calibration error of the top-label confidence (``n_bins`` bins)
    ``log_loss``                        mean negative log-likelihood of the true class
    ``binary.auc``                      malignant-vs-benign ROC-AUC of the malignant probability (``malignant_view``)
    ``binary.sensitivity_at_90_specificity``, ``binary.sensitivity_at_95_specificity``
    ``binary.n_malignant``, ``binary.n_benign``
    ``binary.threshold``, ``binary.sensitivity``, ``binary.specificity``   only with ``malignant_threshold``
    ``bootstrap``                       only with ``n_bootstrap`` > 0 and ``groups``: ``n_resamples``, ``confidence``,
                                        ``unit`` ("lesion"), ``n_groups``, and for ``balanced_accuracy``,
                                        ``macro_auc``, ``malignant_auc``: ``estimate``, ``low``, ``high``, ``n_valid``
    ``subgroups``                       only with ``meta``: ``{sex|age_band|localization: {group: {n, n_malignant,
                                        accuracy, balanced_accuracy, malignant_auc}}}``
    ==================================  ===============================================================================
    """
    y_true, y_prob = _check(y_true, y_prob)
    classes = class_names(task)
    if len(classes) != y_prob.shape[1]:
        raise ValueError(f"task {task!r} has {len(classes)} classes but y_prob has {y_prob.shape[1]} columns")
    stats = per_class(y_true, y_prob)
    prf = precision_recall_f1(y_true, y_prob)
    auc = roc_auc(y_true, y_prob)
    report: dict[str, Any] = {
        "n": int(len(y_true)),
        "task": task,
        "classes": list(classes),
        "accuracy": accuracy(y_true, y_prob),
        "balanced_accuracy": balanced_accuracy(y_true, y_prob),
        "per_class": {
            name: {
                "precision": stats["precision"][k],
                "recall": stats["recall"][k],
                "sensitivity": stats["recall"][k],
                "specificity": stats["specificity"][k],
                "f1": stats["f1"][k],
                "auc": auc["per_class"][k],
                "support": int(stats["support"][k]),
            }
            for k, name in enumerate(classes)
        },
        "macro": {**prf["macro"], "auc": auc["macro"]},
        "weighted": prf["weighted"],
        "confusion_matrix": confusion_matrix(y_true, y_prob),
        "ece": expected_calibration_error(y_true, y_prob, n_bins),
        "log_loss": log_loss(y_true, y_prob),
        "binary": binary_metrics(y_true, y_prob, task, malignant_threshold, p_malignant),
    }
    if n_bootstrap > 0 and groups is not None:
        report["bootstrap"] = bootstrap_ci(y_true, y_prob, groups, task, n_bootstrap, seed=seed,
                                           p_malignant=p_malignant)
    if meta is not None:
        report["subgroups"] = subgroup_metrics(y_true, y_prob, meta, task, p_malignant)
    return json_safe(report)
