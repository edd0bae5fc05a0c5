"""Calibration and decision support fitted on the validation split: temperature scaling, an out-of-distribution
score with its threshold, and the malignancy threshold for a target sensitivity.

Temperatures act on log-probabilities: ``softmax(log(p) / T)`` equals ``softmax(logits / T)`` for a softmax model and
``sigmoid(z / T)`` for a one-logit binary model, so a temperature fitted on logits applies unchanged to the
probabilities a model (or a served replica) returns.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

log = logging.getLogger(__name__)

EPS = 1e-12
TEMPERATURE_RANGE = (0.05, 20.0)


def to_log_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities (N, C) -> log-probabilities, clipped away from log(0)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities (N, C) by a temperature: ``softmax(log(p) / T)``; T > 1 softens, T < 1 sharpens."""
    return softmax(to_log_probs(probs) / temperature, axis=1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the validation NLL of ``softmax(logits / T)`` (bounded scalar search on log T).

    ``logits`` may be any per-row shift of the logits, e.g. log-probabilities from ``to_log_probs``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected logits (N, C) and labels (N,) with N > 0; got {logits.shape} and {labels.shape}")
    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(lambda t: nll(logits, labels, np.exp(t)), bounds=(low, high), method="bounded",
                             options={"xatol": 1e-4})
    temperature = float(np.exp(result.x))
    log.debug("temperature %.3f: NLL %.4f -> %.4f", temperature, nll(logits, labels), result.fun)
    return temperature


def ood_score(probs: np.ndarray) -> np.ndarray:
    """Out-of-distribution score per image: entropy of the ensemble's probabilities / log(C), in [0, 1].

    Computed on the combined (mixture) probabilities, it rises both when each model is unsure and when the models
    disagree, which is typical of images unlike the training data. Higher = less like the validation images.
    """
    probs = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return -(probs * np.log(probs)).sum(axis=1) / np.log(probs.shape[1])


def ood_threshold(val_scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the validation OOD scores: images scoring above it are flagged as unlike the data."""
    val_scores = np.asarray(val_scores, dtype=np.float64)
    if not len(val_scores):
        raise ValueError("no validation scores to calibrate the OOD threshold on")
    if not 0 < quantile <= 1:
        raise ValueError(f"ood quantile must be in (0, 1], got {quantile}")
    return float(np.quantile(val_scores, quantile))


def malignant_threshold(is_malignant: np.ndarray, p_malignant: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold t such that calling ``p_malignant >= t`` malignant reaches ``target_sensitivity``.

    Chosen on validation; the achieved test sensitivity is reported by evaluation. Raises ValueError when the
    validation images include no malignant lesion (no threshold can be chosen).
    """
    is_malignant = np.asarray(is_malignant, dtype=bool)
    scores = np.sort(np.asarray(p_malignant, dtype=np.float64)[is_malignant])[::-1]
    if not len(scores):
        raise ValueError("the validation split has no malignant images: cannot choose a malignancy threshold")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    needed = int(np.ceil(target_sensitivity * len(scores) - 1e-9))
    return float(scores[max(needed, 1) - 1])
