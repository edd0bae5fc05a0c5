"""Temperature scaling, OOD and malignancy thresholds, and the ensemble, on synthetic probabilities."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.special import expit, softmax

from lesion import calibration, ensemble
from lesion.metrics import balanced_accuracy, binary_auc, expected_calibration_error, log_loss


def _sample(logits, rng):
    """Labels drawn from softmax(logits): a model whose logits are exactly right."""
    p = softmax(logits, axis=1)
    return (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)


def test_temperature_recovers_known_value_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (20000, 7))
    labels = _sample(true_logits, rng)
    overconfident = true_logits * 2.5  # a model that is right on ranking but 2.5x too sharp
    t = calibration.fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    raw = softmax(overconfident, axis=1)
    scaled = calibration.apply_temperature(raw, t)  # the same temperature acts on probabilities
    # (equal up to the 1e-12 floor that keeps log(p) finite)
    np.testing.assert_allclose(scaled, softmax(overconfident / t, axis=1), atol=1e-4)
    assert expected_calibration_error(labels, scaled) < 0.5 * expected_calibration_error(labels, raw)
    assert log_loss(labels, scaled) < log_loss(labels, raw)


def test_temperature_on_binary_probabilities_is_sigmoid_scaling():
    z = np.linspace(-6, 6, 25)
    p = np.stack([1 - expit(z), expit(z)], axis=1)
    np.testing.assert_allclose(calibration.apply_temperature(p, 3.0)[:, 1], expit(z / 3.0), atol=1e-9)


def test_fit_temperature_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        calibration.fit_temperature(np.zeros((3, 2)), np.zeros(4, int))


def test_malignant_threshold_reaches_target_sensitivity_and_no_lower():
    rng = np.random.default_rng(1)
    is_mal = rng.random(400) < 0.3
    p = np.clip(rng.normal(np.where(is_mal, 0.6, 0.3), 0.15), 0, 1)
    t = calibration.malignant_threshold(is_mal, p, 0.9)
    sens = np.mean(p[is_mal] >= t)
    assert sens >= 0.9
    assert np.mean(p[is_mal] >= np.nextafter(t, 1)) < 0.9  # the highest threshold that reaches it
    with pytest.raises(ValueError, match="no malignant"):
        calibration.malignant_threshold(np.zeros(5, bool), np.zeros(5), 0.9)


def test_ood_score_orders_confident_below_uniform():
    probs = np.array([[1.0, 0, 0, 0], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    s = calibration.ood_score(probs)
    assert s[0] < 1e-6 and s[0] < s[1] < s[2] and s[2] == pytest.approx(1.0)
    assert calibration.ood_threshold(np.arange(101) / 100, 0.99) == pytest.approx(0.99)


def _two_models(n=3000, seed=2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, 7))
    labels = _sample(logits, rng)
    good = softmax(logits, axis=1)
    noisy = softmax(rng.normal(0, 2.0, (n, 7)), axis=1)  # knows nothing
    return {"good": good, "noisy": noisy}, labels


def test_ensemble_weights_favour_the_better_model():
    probs, labels = _two_models()
    weights = ensemble.fit_weights(probs, labels)
    assert weights["good"] > 0.85 and sum(weights.values()) == pytest.approx(1.0)


def test_fit_then_combine_and_decide():
    probs, labels = _two_models()
    spec = ensemble.fit(probs, labels, task="multiclass", target_sensitivity=0.9, ood_quantile=0.95,
                        uncertain_margin=0.05)
    assert spec.fitted_on == "val" and spec.models == ["good", "noisy"]
    out = ensemble.combine(probs, spec)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    # the calibrated ensemble is no worse than the better member on the data it was fitted on
    assert log_loss(labels, out) <= log_loss(labels, probs["good"]) + 1e-3
    decisions, reasons = ensemble.decide(out, spec)
    assert set(decisions) <= {"malignant", "benign", "uncertain"} and len(reasons) == len(out)
    mal = np.isin(labels, [0, 2, 3])
    called = np.array([d == "malignant" for d in decisions])
    flagged = np.array([d == "uncertain" for d in decisions])
    assert 0 < flagged.mean() < 0.5
    # among decided images, malignant ones are mostly called malignant (threshold chosen for 90% sensitivity)
    assert called[mal & ~flagged].mean() > 0.8
    with pytest.raises(KeyError, match="noisy"):
        ensemble.combine({"good": probs["good"]}, spec)


def test_equal_weights_and_spec_round_trip(tmp_path):
    probs, labels = _two_models(n=500)
    spec = ensemble.fit(probs, labels, task="multiclass", weighting="equal")
    assert spec.weights == {"good": 0.5, "noisy": 0.5}
    path = ensemble.save(spec, tmp_path / "ensemble.json")
    again = ensemble.load(path)
    assert again == spec
    np.testing.assert_allclose(ensemble.combine(probs, again), ensemble.combine(probs, spec))
    (tmp_path / "bad.json").write_text('{"models": []}')
    with pytest.raises(ValueError, match="bad.json"):
        ensemble.load(tmp_path / "bad.json")


def test_prior_correction_raises_balanced_accuracy_on_imbalanced_classes_and_travels_with_the_spec(tmp_path):
    # A calibrated model of a data set where class 1 (nv) is 70%: its arg-max under-calls the rare classes. The
    # logit adjustment fitted on one half must raise balanced accuracy on the other half, which it never saw.
    rng = np.random.default_rng(7)
    n = 6000
    prior = np.array([0.05, 0.70, 0.05, 0.05, 0.05, 0.05, 0.05])
    labels = rng.choice(7, n, p=prior)
    evidence = rng.normal(0, 1.0, (n, 7))
    evidence[np.arange(n), labels] += 1.2
    probs = softmax(evidence + np.log(prior), axis=1)  # the Bayes posterior under the data's prior
    fit_half, test_half = slice(0, n // 2), slice(n // 2, n)
    plain = ensemble.fit({"m": probs[fit_half]}, labels[fit_half], task="multiclass")
    adjusted = ensemble.fit({"m": probs[fit_half]}, labels[fit_half], task="multiclass", prior_correction="fit")
    assert plain.prior_tau == 0.0 and plain.prior_bias == []
    assert 0.5 <= adjusted.prior_tau <= 1.5 and len(adjusted.prior_bias) == 7
    assert adjusted.prior_bias[1] < min(adjusted.prior_bias[k] for k in (0, 2, 3, 4, 5, 6))  # nv pushed down
    before = balanced_accuracy(labels[test_half], ensemble.combine({"m": probs[test_half]}, plain))
    after = balanced_accuracy(labels[test_half], ensemble.combine({"m": probs[test_half]}, adjusted))
    assert after > before + 0.05, (before, after)
    assert adjusted.validation["balanced_accuracy_after"] > adjusted.validation["balanced_accuracy_calibrated"]
    again = ensemble.load(ensemble.save(adjusted, tmp_path / "spec.json"))  # the inference core reads it back
    np.testing.assert_allclose(ensemble.combine({"m": probs}, again), ensemble.combine({"m": probs}, adjusted))
    with pytest.raises(ValueError, match="prior correction"):
        ensemble.fit({"m": probs}, labels, task="multiclass", prior_correction="balanced")


def test_malignant_probability_is_the_calibrated_posterior_before_the_prior_adjustment():
    # The logit adjustment raises every rare class, benign ones (df, vasc) too, so summing the adjusted
    # probabilities of mel, bcc and akiec would rank images by something else than their chance of malignancy.
    # With exact posteriors the calibrated malignant probability is the best possible ranking: it must rank better
    # than the adjusted sum, be what decide() thresholds, and reach the validation sensitivity it was chosen for.
    rng = np.random.default_rng(11)
    n = 8000
    prior = np.array([0.11, 0.67, 0.05, 0.03, 0.11, 0.015, 0.015])  # HAM10000's class mix
    labels = rng.choice(7, n, p=prior)
    evidence = rng.normal(0, 1.0, (n, 7))
    evidence[np.arange(n), labels] += 1.2
    probs = softmax(evidence + np.log(prior), axis=1)
    adjusted = ensemble.fit({"m": probs}, labels, task="multiclass", prior_correction="fit")
    assert adjusted.prior_tau > 0
    final = ensemble.combine({"m": probs}, adjusted)
    calibrated = ensemble.combine({"m": probs}, dataclasses.replace(adjusted, prior_bias=[]))
    p_mal = ensemble.malignant_probability(final, adjusted)
    np.testing.assert_allclose(p_mal, calibrated[:, [0, 2, 3]].sum(axis=1), atol=1e-9)
    is_mal = np.isin(labels, [0, 2, 3])
    assert binary_auc(is_mal, p_mal) > binary_auc(is_mal, final[:, [0, 2, 3]].sum(axis=1)) + 0.02
    assert np.mean(p_mal[is_mal] >= adjusted.malignant_threshold) >= adjusted.target_sensitivity
    decisions, _ = ensemble.decide(final, adjusted)
    decided = np.array([d != "uncertain" for d in decisions])
    assert decided.any()
    np.testing.assert_array_equal(np.array(decisions)[decided] == "malignant",
                                  p_mal[decided] >= adjusted.malignant_threshold)
