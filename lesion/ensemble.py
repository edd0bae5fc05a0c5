"""The ensemble: soft voting over trained models, with per-model and ensemble temperatures, the malignancy threshold
and the out-of-distribution threshold, all fitted on the validation split only.

``combine(probs_by_model, spec)`` turns the members' probabilities into the ensemble's calibrated probabilities:
each member's probabilities are temperature-scaled (``softmax(log p / T_m)``), averaged with the weights, the
mixture is scaled by the ensemble temperature, moved to a calibrated site's class mix (``prior_shift``, from
``lesion.sites``) and, when fitted, adjusted for the class prior (``prior_bias``: logit
adjustment towards balanced classes, which trades calibration to the data's class mix for balanced accuracy).
The adjustment serves the class decision only: ``malignant_probability`` undoes it, so the malignant probability
(thresholded, ranked by the malignant AUC, returned by the API) is the calibrated posterior at the data's class mix.
``decide`` turns those into "malignant", "benign" or "uncertain".
``fit`` fits a spec on validation probabilities; ``lesion.inference`` owns when and for which inference mode.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from lesion import calibration
from lesion.labels import class_names, malignant_indices
from lesion.metrics import balanced_accuracy, expected_calibration_error, log_loss
from lesion.rundir import write_atomic


@dataclass
class EnsembleSpec:
    """Everything needed to combine members' probabilities and decide, as fitted on the validation split."""

    models: list[str]  # member names, in order
    weights: dict[str, float]  # soft-voting weights, summing to 1
    temperature: float  # ensemble temperature, applied to the weighted mixture
    temperatures: dict[str, float]  # per-member temperatures, applied before mixing
    malignant_threshold: float  # call malignant when the ensemble's malignant probability >= this
    ood_threshold: float  # flag as unlike the data when calibration.ood_score > this
    uncertain_margin: float  # abstain when the top-2 ensemble probabilities differ by less than this
    task: str
    classes: list[str]
    target_sensitivity: float  # validation sensitivity the malignancy threshold was chosen for
    ood_quantile: float  # validation quantile the OOD threshold was set at
    weighting: str = "fit"  # fit (NLL on validation over the simplex) or equal
    tta: bool = False  # the inference mode it was fitted for: flip test-time augmentation (True) or a single pass
    fitted_on: str = "val"
    fingerprint: str = ""  # of checkpoints, data and the fitting options; a mismatch triggers a refit
    model_versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> checkpoint_sha256, run_id
    validation: dict[str, Any] = field(default_factory=dict)  # n images and NLL/ECE before and after calibration
    prior_tau: float = 0.0  # logit adjustment strength chosen on validation (0: none)
    prior_bias: list[float] = field(default_factory=list)  # per-class log offsets, -prior_tau x log(class prior)
    # per-class log offsets to another site's class mix (lesion.sites, ``lesion calibrate`` with diagnoses)
    prior_shift: list[float] = field(default_factory=list)


def mix(probs_by_model: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of the members' probabilities."""
    return sum(weights[name] * np.asarray(probs_by_model[name], dtype=np.float64) for name in weights)


def combine(probs_by_model: dict[str, np.ndarray], spec: EnsembleSpec) -> np.ndarray:
    """The ensemble's calibrated probabilities (N, C) from each member's raw probabilities (N, C)."""
    missing = [name for name in spec.models if name not in probs_by_model]
    if missing:
        raise KeyError(f"combine: no probabilities for ensemble member(s) {', '.join(missing)}")
    scaled = {name: calibration.apply_temperature(probs_by_model[name], spec.temperatures[name])
              for name in spec.models}
    calibrated = calibration.apply_temperature(mix(scaled, spec.weights), spec.temperature)
    return adjust_prior(adjust_prior(calibrated, spec.prior_shift), spec.prior_bias)


def adjust_prior(probs: np.ndarray, bias: list[float] | np.ndarray) -> np.ndarray:
    """``softmax(log p + bias)`` per row: the probabilities under another class prior (no-op for an empty bias)."""
    if len(bias) == 0:
        return probs
    return softmax(calibration.to_log_probs(probs) + np.asarray(bias, dtype=np.float64), axis=1)


def malignant_probability(probs: np.ndarray, spec: EnsembleSpec) -> np.ndarray:
    """The malignant probability (N,) of the ensemble's probabilities (``combine``'s, N x C): its malignant classes
    summed in the calibrated posterior, before the class-prior adjustment."""
    calibrated = adjust_prior(np.asarray(probs, dtype=np.float64), -np.asarray(spec.prior_bias, dtype=np.float64))
    return calibrated[:, malignant_indices(spec.task)].sum(axis=1)


def fit_prior_tau(probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray) -> float:
    """The logit-adjustment strength tau in [0, 2] (steps of 0.05) whose ``log p - tau x log_prior`` has the best
    balanced accuracy on these (validation) probabilities; the smallest such tau on ties."""
    log_p = calibration.to_log_probs(probs)
    taus = np.round(np.arange(0, 2.0001, 0.05), 2)
    scores = [balanced_accuracy(labels, softmax(log_p - tau * log_prior, axis=1)) for tau in taus]
    return float(taus[int(np.argmax(scores))])


def decide(probs: np.ndarray, spec: EnsembleSpec) -> tuple[list[str], list[str]]:
    """Decision per image from the ensemble's calibrated probabilities (N, C): (decisions, reasons).

    In order: "uncertain" when the OOD score exceeds ``spec.ood_threshold`` (the image looks unlike the validation
    images) or when the two most probable classes differ by less than ``spec.uncertain_margin``; else "malignant"
    when the malignant probability reaches ``spec.malignant_threshold``; else "benign".
    """
    probs = np.asarray(probs, dtype=np.float64)
    ood = calibration.ood_score(probs)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    p_mal = malignant_probability(probs, spec)
    decisions, reasons = [], []
    for k in range(len(probs)):
        if ood[k] > spec.ood_threshold:
            decisions.append("uncertain")
            reasons.append(f"out of distribution: OOD score {ood[k]:.3f} > {spec.ood_threshold:.3f} "
                           f"(the {spec.ood_quantile:.0%} quantile on validation)")
        elif margin[k] < spec.uncertain_margin:
            decisions.append("uncertain")
            reasons.append(f"ambiguous: top-2 classes differ by {margin[k]:.3f} < {spec.uncertain_margin:.3f}")
        elif p_mal[k] >= spec.malignant_threshold:
            decisions.append("malignant")
            reasons.append(f"malignant probability {p_mal[k]:.3f} >= threshold {spec.malignant_threshold:.3f} "
                           f"(chosen for {spec.target_sensitivity:.0%} sensitivity on "
                           f"{'validation' if spec.fitted_on == 'val' else spec.fitted_on})")
        else:
            decisions.append("benign")
            reasons.append(f"malignant probability {p_mal[k]:.3f} < threshold {spec.malignant_threshold:.3f}")
    return decisions, reasons


def fit_weights(probs_by_model: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Soft-voting weights on the simplex minimising the NLL of the mixture (softmax-parametrised L-BFGS)."""
    names = list(probs_by_model)
    if len(names) == 1:
        return {names[0]: 1.0}
    stack = np.stack([np.asarray(probs_by_model[n], dtype=np.float64) for n in names])  # (M, N, C)
    picked = stack[:, np.arange(len(labels)), np.asarray(labels)]  # (M, N) probability of the true class

    def objective(a):
        return -np.mean(np.log(np.clip(softmax(a) @ picked, calibration.EPS, None)))

    result = minimize(objective, np.zeros(len(names)), method="L-BFGS-B")
    return {n: float(w) for n, w in zip(names, softmax(result.x))}


def fit(probs_by_model: dict[str, np.ndarray], labels: np.ndarray, *, task: str, weighting: str = "fit",
        target_sensitivity: float = 0.95, ood_quantile: float = 0.99, uncertain_margin: float = 0.1,
        tta: bool = False, prior_correction: str = "none") -> EnsembleSpec:
    """Fit temperatures, weights, the class-prior adjustment (``prior_correction`` "fit") and thresholds on
    VALIDATION probabilities (members' raw probabilities, N x C)."""
    labels = np.asarray(labels, dtype=np.int64)
    if weighting not in ("fit", "equal"):
        raise ValueError(f"ensemble weighting must be 'fit' or 'equal', got {weighting!r}")
    if prior_correction not in ("none", "fit"):
        raise ValueError(f"prior correction must be 'none' or 'fit', got {prior_correction!r}")
    names = list(probs_by_model)
    temperatures = {n: calibration.fit_temperature(calibration.to_log_probs(probs_by_model[n]), labels) for n in names}
    scaled = {n: calibration.apply_temperature(probs_by_model[n], temperatures[n]) for n in names}
    weights = fit_weights(scaled, labels) if weighting == "fit" else {n: 1.0 / len(names) for n in names}
    mixture = mix(scaled, weights)
    temperature = calibration.fit_temperature(calibration.to_log_probs(mixture), labels)
    calibrated = calibration.apply_temperature(mixture, temperature)
    prior = np.bincount(labels, minlength=mixture.shape[1]) / max(len(labels), 1)
    log_prior = np.log(np.clip(prior, calibration.EPS, None))
    tau = fit_prior_tau(calibrated, labels, log_prior) if prior_correction == "fit" else 0.0
    bias = (-tau * log_prior).tolist() if tau > 0 else []
    final = adjust_prior(calibrated, bias)
    is_mal = np.isin(labels, malignant_indices(task))
    p_mal = calibrated[:, malignant_indices(task)].sum(axis=1)  # malignant_probability: before the adjustment
    uncalibrated = mix(probs_by_model, weights)
    validation = {
        "n": int(len(labels)),
        "nll_before": log_loss(labels, uncalibrated),
        "nll_after": log_loss(labels, final),
        "ece_before": expected_calibration_error(labels, uncalibrated),
        "ece_after": expected_calibration_error(labels, final),
        "balanced_accuracy_calibrated": balanced_accuracy(labels, calibrated),
        "balanced_accuracy_after": balanced_accuracy(labels, final),
        "members": {
            n: {"ece_before": expected_calibration_error(labels, probs_by_model[n]),
                "ece_after": expected_calibration_error(labels, scaled[n])}
            for n in names
        },
    }
    return EnsembleSpec(
        models=names,
        weights=weights,
        temperature=temperature,
        temperatures=temperatures,
        malignant_threshold=calibration.malignant_threshold(is_mal, p_mal, target_sensitivity),
        ood_threshold=calibration.ood_threshold(calibration.ood_score(final), ood_quantile),
        uncertain_margin=uncertain_margin,
        task=task,
        classes=list(class_names(task)),
        target_sensitivity=target_sensitivity,
        ood_quantile=ood_quantile,
        weighting=weighting,
        tta=tta,
        validation=validation,
        prior_tau=tau,
        prior_bias=bias,
    )


def save(spec: EnsembleSpec, path: str | Path) -> Path:
    """Write the spec as JSON (atomically)."""
    return write_atomic(path, json.dumps(dataclasses.asdict(spec), indent=2))


def load(path: str | Path) -> EnsembleSpec:
    """Read a spec written by ``save``, naming the file and the fields when it does not match."""
    path = Path(path)
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(EnsembleSpec)}
    if not isinstance(values, dict) or set(values) - known:
        extra = sorted(set(values) - known) if isinstance(values, dict) else type(values).__name__
        raise ValueError(f"{path}: not an ensemble spec (expected its fields, got {extra})")
    try:
        return EnsembleSpec(**values)
    except TypeError as exc:
        raise ValueError(f"{path}: incomplete ensemble spec: {exc}") from exc
