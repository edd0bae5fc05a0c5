"""Evaluation figures, the one-page offline HTML report and the model card.

Figures are drawn on ``matplotlib.figure.Figure`` objects (rendered by the Agg canvas; pyplot and its global
backend are never touched, so this is thread-safe and works headless). They are written as PNG files;
``render_html`` embeds them as base64 so ``report.html`` opens anywhere, offline, without the folder beside it.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lesion import metrics
from lesion.labels import DX_NAMES
from lesion.rundir import atomic_path, write_atomic

LICENCE_NOTE = (
    "Research software, not a medical device: not for diagnosis or treatment decisions. Models trained on HAM10000 "
    "inherit its licence, CC BY-NC 4.0 (non-commercial use, with attribution to Tschandl, Rosendahl & Kittler, "
    "Sci. Data 5:180161, 2018)."
)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight")
    return path


def plot_learning_curves(histories: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Loss and balanced accuracy per epoch, train and validation, one row per model (from history.csv)."""
    fig = Figure(figsize=(10, 3.2 * len(histories)))
    axes = np.atleast_2d(fig.subplots(len(histories), 2, squeeze=False))
    for row, (name, history) in enumerate(histories.items()):
        epochs = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
        for ax, metric in zip(axes[row], ("loss", "balanced_accuracy")):
            for part in ("train", "val"):
                column = f"{part}_{metric}"
                if column in history:
                    ax.plot(epochs, history[column], marker="o", label="validation" if part == "val" else part)
            if "best" in history and history["best"].astype(bool).any():
                ax.axvline(np.asarray(epochs)[history["best"].astype(bool).to_numpy()][-1], color="grey", ls=":")
            ax.set_title(f"{name}: {metric.replace('_', ' ')}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrices(matrices: dict[str, Any], classes: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrices side by side (colour = share of the true class, text = count)."""
    fig = Figure(figsize=(3.6 * len(matrices), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(matrices), squeeze=False)[0])
    for ax, (name, cm) in zip(axes, matrices.items()):
        cm = np.asarray(cm)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_curves(y_true, probs_by_model: dict[str, np.ndarray], task: str, path: str | Path,
                    p_malignant: dict[str, np.ndarray] | None = None) -> Path:
    """Malignant-vs-benign ROC curves of every model on one chart, AUC in the legend; ``p_malignant`` holds the
    malignant probability of models whose class probabilities do not sum to it (``metrics.malignant_view``)."""
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for name, probs in probs_by_model.items():
        y_mal, p_mal = metrics.malignant_view(y_true, probs, task, (p_malignant or {}).get(name))
        if y_mal.all() or not y_mal.any():
            continue
        fpr, tpr, _ = roc_curve(y_mal, p_mal)
        ax.plot(fpr, tpr, lw=2.5 if name == "ensemble" else 1.5,
                label=f"{name} (AUC {metrics.binary_auc(y_mal, p_mal):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC: malignant vs benign")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(y_true, probs_by_model: dict[str, np.ndarray], path: str | Path, n_bins: int = 10) -> Path:
    """Reliability diagrams (accuracy vs confidence per bin), one panel per model, ECE in the title."""
    fig = Figure(figsize=(3.4 * len(probs_by_model), 3.4))
    axes = fig.subplots(1, len(probs_by_model), squeeze=False)[0]
    for ax, (name, probs) in zip(axes, probs_by_model.items()):
        bins = metrics.reliability_bins(y_true, probs, n_bins)
        centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        ax.bar(centers, np.nan_to_num(bins["accuracy"]), width=1 / n_bins, edgecolor="black", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE {metrics.expected_calibration_error(y_true, probs, n_bins):.3f}", fontsize=9)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    return _save(fig, path)


def plot_cam_grid(images: np.ndarray, overlays: dict[str, np.ndarray], path: str | Path,
                  row_labels: list[str] | None = None) -> Path:
    """Grad-CAM comparison: one row per image, the image then one column per model (and the ensemble).

    ``overlays`` maps a column title to uint8 (N, H, W, 3) overlays of the same N images.
    """
    columns = {"image": images, **overlays}
    n = len(images)
    fig = Figure(figsize=(1.8 * len(columns), 1.9 * n))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for j, (title, pictures) in enumerate(columns.items()):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(pictures[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ HTML


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _ci(model: dict, key: str, point: Any) -> str:
    interval = (model.get("bootstrap") or {}).get(key)
    if not interval or interval.get("low") is None:
        return _fmt(point)
    return f"{_fmt(point)} <small>[{_fmt(interval['low'])}, {_fmt(interval['high'])}]</small>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(results: dict[str, dict]) -> list[list[str]]:
    """One row per model: the headline metrics with their bootstrap intervals."""
    rows = []
    for name, m in results.items():
        calib = m.get("calibration", {})
        rows.append([
            f"<b>{html.escape(name)}</b>", _fmt(m.get("pretrained", "–")), _fmt(m["accuracy"]),
            _ci(m, "balanced_accuracy", m["balanced_accuracy"]), _ci(m, "macro_auc", m["macro"]["auc"]),
            _ci(m, "malignant_auc", m["binary"]["auc"]), _fmt(m["binary"]["sensitivity_at_90_specificity"]),
            _fmt(m["binary"]["sensitivity_at_95_specificity"]), _fmt(m["macro"]["f1"]),
            f"{_fmt(calib.get('ece_before'))} → {_fmt(calib.get('ece_after'))}",
        ])
    return rows


SUMMARY_HEADER = ["model", "initial weights", "accuracy", "balanced accuracy [95% CI]", "macro AUC [95% CI]",
                  "malignant AUC [95% CI]", "sens. @90% spec.", "sens. @95% spec.", "macro F1",
                  "ECE before → after T"]


def class_table(model: dict) -> str:
    """Per-class precision, recall, F1, specificity, AUC and support, then macro and weighted averages."""
    rows = []
    for cls, s in model["per_class"].items():
        label = f"{html.escape(cls)} <small>{html.escape(DX_NAMES.get(cls, ''))}</small>"
        rows.append([label, _fmt(s["precision"]), _fmt(s["recall"]), _fmt(s["f1"]), _fmt(s["specificity"]),
                     _fmt(s["auc"]), str(s["support"])])
    for avg in ("macro", "weighted"):
        a = model[avg]
        rows.append([f"<i>{avg} avg</i>", _fmt(a["precision"]), _fmt(a["recall"]), _fmt(a["f1"]), "",
                     _fmt(a.get("auc")), str(model["n"])])
    return _table(["class", "precision", "recall", "F1", "specificity", "AUC", "support"], rows)


def subgroup_table(model: dict) -> str:
    """Balanced accuracy and malignant AUC per subgroup, with counts."""
    rows = []
    for column, groups in (model.get("subgroups") or {}).items():
        for group, s in groups.items():
            rows.append([html.escape(column), html.escape(group), str(s["n"]), str(s["n_malignant"]),
                         _fmt(s["balanced_accuracy"]), _fmt(s["malignant_auc"])])
    return _table(["attribute", "group", "images", "malignant", "balanced accuracy", "malignant AUC"], rows)


def explanation_table(explanations: dict) -> str:
    """Explanation quality per model and method: CAM energy inside the lesion mask, pointing game, faithfulness."""
    rows = []
    for name, by_method in explanations.get("models", {}).items():
        for method, s in by_method.items():
            rows.append([html.escape(name), html.escape(method), _fmt(s.get("energy_inside")),
                         _fmt(s.get("pointing_game")), _fmt(s.get("mask_share")), _fmt(s.get("road"), 4),
                         _fmt(s.get("confidence_change"), 4), _fmt(s.get("n_images"))])
    return _table(["model", "method", "energy inside mask", "pointing game", "chance (mask share)",
                   "ROAD (higher = more faithful)", "confidence change, CAM x image", "images"], rows)


def _interval_cell(entry: dict | None) -> str:
    """``estimate [low, high]`` of one paired-bootstrap entry."""
    if not entry:
        return "–"
    if entry.get("low") is None:
        return _fmt(entry.get("estimate"))
    return f"{_fmt(entry.get('estimate'))} <small>[{_fmt(entry['low'])}, {_fmt(entry['high'])}]</small>"


def _metric_label(metric: str) -> str:
    if metric.startswith("recall:"):
        cls = metric.split(":", 1)[1]
        return f"recall {html.escape(cls)} <small>{html.escape(DX_NAMES.get(cls, ''))}</small>"
    return html.escape(metric.replace("_", " ").replace("auc", "AUC").replace("f1", "F1"))


def comparison_table(arch: str, section: dict) -> str:
    """One architecture's variants side by side: each metric with its lesion-bootstrap interval per variant, and the
    paired difference of each pair with its interval (bold when the interval excludes 0)."""
    variants = list(section["models"])
    header = ["metric", *(f"{html.escape(v)} <small>({html.escape(str(section['variants'][v].get('balance')))})"
                          f"</small>" for v in variants), *(html.escape(pair) for pair in section["differences"])]
    rows = []
    for metric in section["models"][variants[0]]:
        cells = [_interval_cell(section["models"][v][metric]) for v in variants]
        for diff in section["differences"].values():
            d = diff[metric]
            real = d.get("low") is not None and (d["low"] > 0 or d["high"] < 0)
            cells.append(f"<b>{_interval_cell(d)}</b>" if real else _interval_cell(d))
        rows.append([_metric_label(metric), *cells])
    return f"<h3>{html.escape(arch)}</h3>" + _table(header, rows)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>' \
           f"{html.escape(alt)}</figcaption></figure>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}
figcaption{color:#555;font-size:13px}.note{background:#fff6e0;border-left:4px solid #e0a000;padding:.6em 1em}
small{color:#666}"""


def render_html(result: dict, figures: dict[str, Path], path: str | Path) -> Path:
    """Write the offline one-page report: summary, variant comparison, figures, per-class tables, subgroups and
    explanations.

    ``result`` is the content of metrics.json; ``figures`` maps a caption to a PNG file (embedded as base64).
    """
    models = result["models"]
    parts = [
        f"<h1>lesion evaluation: {html.escape(str(result.get('split')))} split</h1>",
        f"<p>Data: {html.escape(str(result['data'].get('source')))}, {result['data'].get('n_images')} images "
        f"({result['data'].get('n_lesions')} lesions), task {html.escape(result['task'])}. Ensemble weights and "
        f"temperatures fitted on the validation split only. Intervals: 95% bootstrap over lesions.</p>",
        f'<p class="note">{html.escape(LICENCE_NOTE)}</p>',
        "<h2>Summary</h2>", _table(SUMMARY_HEADER, summary_rows(models)),
    ]
    ens = models.get("ensemble", {})
    if ens.get("decision"):
        d = ens["decision"]
        parts.append(
            "<p>Ensemble decision rule (from validation): malignant when p(malignant) ≥ "
            f"{_fmt(d['malignant_threshold'])}"
            f" (target sensitivity {_fmt(d['target_sensitivity'], 2)}); on this split sensitivity "
            f"{_fmt(ens['binary'].get('sensitivity'))}, specificity {_fmt(ens['binary'].get('specificity'))}; "
            f"uncertain (abstained) for {_fmt(d['share_uncertain'])} of images.</p>")
    if result.get("comparison"):
        parts += ["<h2>Variants compared (same architecture)</h2>",
                  "<p>Each metric with its 95% bootstrap interval over lesions; the differences are paired (the same "
                  "resampled lesions for both variants): an interval that excludes 0 (bold) is a real difference.</p>"]
        parts += [comparison_table(arch, section) for arch, section in result["comparison"].items()]
    for caption, fig_path in figures.items():
        parts.append(_img(fig_path, caption))
    parts.append("<h2>Per-class report</h2>")
    for name, m in models.items():
        parts += [f"<h3>{html.escape(name)}</h3>", class_table(m)]
    if ens.get("subgroups"):
        parts += ["<h2>Subgroups (ensemble)</h2>", subgroup_table(ens)]
    if result.get("explanations", {}).get("models"):
        parts += ["<h2>Explanation quality</h2>", explanation_table(result["explanations"])]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lesion evaluation</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return write_atomic(path, page)


# ------------------------------------------------------------------------------------------- model card


def _md_ci(m: dict, key: str, point: Any) -> str:
    interval = (m.get("bootstrap") or {}).get(key)
    if not interval or interval.get("low") is None:
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(interval['low'])}, {_fmt(interval['high'])}]"


def render_model_card(result: dict, path: str | Path) -> Path:
    """Write model_card.md: data, splits, metrics with intervals, subgroups, known limits, licence."""
    data, models = result["data"], result["models"]
    lines = [
        "# Model card: lesion ensemble",
        "",
        "## Intended use",
        "Research on dermoscopic skin-lesion classification (7 HAM10000 diagnoses or malignant vs benign). "
        + LICENCE_NOTE,
        "",
        "## Data",
        f"- Source: {data.get('source')} (fingerprint {data.get('fingerprint')}), "
        f"images at {data.get('image_size')} px.",
        f"- Evaluated split: {result.get('split')}, {data.get('n_images')} images of {data.get('n_lesions')} lesions.",
        "- Splits are by lesion_id (all images of a lesion in one split), stratified by class; ensemble weights, "
        "temperatures and thresholds were fitted on the validation split only.",
    ]
    for split, counts in (data.get("counts") or {}).items():
        lines.append(f"- {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    lines += ["", "## Models", "| model | weights | balanced accuracy [95% CI] | macro AUC [95% CI] | "
              "malignant AUC [95% CI] | sens. @95% spec. | ECE before -> after |", "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        c = m.get("calibration", {})
        lines.append(f"| {name} | {m.get('pretrained', '–')} | {_md_ci(m, 'balanced_accuracy', m['balanced_accuracy'])}"
                     f" | {_md_ci(m, 'macro_auc', m['macro']['auc'])}"
                     f" | {_md_ci(m, 'malignant_auc', m['binary']['auc'])}"
                     f" | {_fmt(m['binary']['sensitivity_at_95_specificity'])} | {_fmt(c.get('ece_before'))} -> "
                     f"{_fmt(c.get('ece_after'))} |")
    ens = models.get("ensemble", {})
    if ens.get("decision"):
        d = ens["decision"]
        lines += ["", "## Decision rule",
                  f"Malignant when the ensemble's malignant probability >= {_fmt(d['malignant_threshold'])} (chosen on "
                  f"validation for {_fmt(d['target_sensitivity'], 2)} sensitivity); on this split sensitivity "
                  f"{_fmt(ens['binary'].get('sensitivity'))} and specificity {_fmt(ens['binary'].get('specificity'))}. "
                  f"The system abstains (\"uncertain\") when the OOD score exceeds {_fmt(d['ood_threshold'])} or the "
                  f"top-2 margin is below {_fmt(d['uncertain_margin'], 2)}: {_fmt(d['share_uncertain'])} of "
                  "images here."]
    if ens.get("subgroups"):
        lines += ["", "## Subgroups (ensemble)", "| attribute | group | images | malignant | balanced accuracy | "
                  "malignant AUC |", "|---|---|---|---|---|---|"]
        for column, groups in ens["subgroups"].items():
            for group, s in groups.items():
                lines.append(f"| {column} | {group} | {s['n']} | {s['n_malignant']} | {_fmt(s['balanced_accuracy'])} | "
                             f"{_fmt(s['malignant_auc'])} |")
    lines += ["", "## Known limits"]
    if data.get("source") == "synthetic":
        lines.append("- Evaluated on SYNTHETIC images drawn by the built-in generator: these numbers say nothing about "
                     "real lesions; they only show that the workflow runs.")
    lines += [
        "- HAM10000 comes from two sites (Vienna, Queensland) and mostly light skin types: performance on other "
        "populations, devices and clinical (non-dermoscopic) photographs is unknown.",
        "- Small classes (df, vasc, akiec) have wide intervals; subgroup results with few images are not reliable.",
        "- The decision threshold and OOD threshold are fitted on the validation split of the same source; re-fit them "
        "(lesion evaluate on local validation data) before use elsewhere.",
        "- Models marked 'scratch' were trained without ImageNet weights and are expected to trail pretrained ones.",
        "- Grad-CAM maps show where the models look, not why; see the explanation-quality scores in metrics.json.",
        "",
        "## Licence",
        "HAM10000 is licensed CC BY-NC 4.0; trained weights derived from it carry the non-commercial restriction. "
        "This is research software and not a medical device.",
        "",
    ]
    return write_atomic(path, "\n".join(lines))
