"""Site profiles: a trained ensemble adapted to another clinic's dermatoscope (``lesion calibrate``).

A profile lives in ``MODELS/sites/NAME/site.json`` (MODELS: a run directory or an export bundle). It holds:

- ``colour_gains``: per-channel gains that move the site's mean colour (of its preprocessed images) onto the training
  images' mean colour, applied to every preprocessed image before the models (a site-level white balance; what
  unlabelled images of a new device allow without retraining);
- ``spec``: what labelled images refit in the ensemble spec: the ensemble temperature, the malignancy threshold
  for the run's target sensitivity and, with diagnosis labels, the class prior (``prior_shift``);
- ``distance``: how far the site's images lie from the training data; ``figures``: the labelled images' scores from
  repeated splits (fit on one part, score on the rest).

``Inference.with_site`` applies a profile; without one, inference is as trained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lesion import calibration, ensemble
from lesion.labels import malignant_indices
from lesion.rundir import write_atomic

SITES_DIR = "sites"
PROFILE_FILE = "site.json"
PROFILE_VERSION = 1


@dataclass
class SiteProfile:
    """What ``lesion calibrate`` learnt about one site (see the module docstring)."""

    name: str
    made_for: dict[str, str]  # member name -> checkpoint sha256 the profile was made with
    tta: bool  # the inference mode of the spec it refits
    images: int  # site images read
    labelled: int = 0  # of them with a label
    labels: str | None = None  # "dx" (diagnoses) or "binary" (benign / malignant), None without labels
    colour_gains: list[float] | None = None  # R, G, B gains applied to preprocessed images
    spec: dict[str, Any] = field(default_factory=dict)  # ensemble spec fields refitted on labelled images
    distance: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    root: str = ""  # the site's image folder
    created: str = ""
    version: int = PROFILE_VERSION
    folder: str = ""  # where it was read from (not saved)

    def adjust(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed uint8 images (N, S, S, 3) with the site's colour gains (unchanged without gains)."""
        if self.colour_gains is None:
            return images
        return apply_gains(images, self.colour_gains)

    def summary(self) -> dict[str, Any]:
        """What answers and reports say about the profile used."""
        return {"name": self.name, "labelled": self.labelled, "colour_gains": self.colour_gains,
                "refitted": sorted(self.spec), "created": self.created}


def site_folder(models_root: str | Path, name: str) -> Path:
    """``MODELS/sites/NAME``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"site name {name!r}: use letters, digits, '-', '_' or '.', not a path")
    return Path(models_root) / SITES_DIR / name


def list_sites(models_root: str | Path) -> list[str]:
    """The names of the sites calibrated for the models at ``models_root``."""
    folder = Path(models_root) / SITES_DIR
    return sorted(p.name for p in folder.iterdir() if (p / PROFILE_FILE).is_file()) if folder.is_dir() else []


def load_site(models_root: str | Path, name: str) -> SiteProfile:
    """Read the profile ``name`` of the models at ``models_root``, naming the calibrated sites when it is absent."""
    path = site_folder(models_root, name) / PROFILE_FILE
    if not path.is_file():
        known = ", ".join(list_sites(models_root)) or "none"
        raise FileNotFoundError(f"no site profile {name!r} for {models_root} (calibrated sites: {known}); make one "
                                f"with `lesion calibrate --run RUN --site {name} --root IMAGES`")
    values = json.loads(path.read_text())
    known_fields = {f.name for f in dataclasses.fields(SiteProfile)}
    if values.get("version") != PROFILE_VERSION or set(values) - known_fields:
        raise ValueError(f"{path}: not a site profile of version {PROFILE_VERSION}")
    return SiteProfile(**values, folder=str(path.parent))


def save_site(profile: SiteProfile, models_root: str | Path) -> Path:
    """Write ``profile`` to ``MODELS/sites/NAME/site.json``; returns the folder."""
    folder = site_folder(models_root, profile.name)
    folder.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in dataclasses.asdict(profile).items() if k != "folder"}
    write_atomic(folder / PROFILE_FILE, json.dumps(values, indent=2))
    profile.folder = str(folder)
    return folder


def check_site(profile: SiteProfile, versions: dict[str, dict], tta: bool) -> None:
    """Refuse a profile made for other checkpoints or another inference mode than the core's."""
    made_with = {name: v.get("checkpoint_sha256") for name, v in versions.items()}
    if made_with != profile.made_for:
        raise ValueError(f"site {profile.name!r} was calibrated for other models ({', '.join(profile.made_for)}; "
                         f"checkpoints differ): calibrate it again with `lesion calibrate`")
    if profile.spec and profile.tta != tta:
        raise ValueError(f"site {profile.name!r} was calibrated for {'flip TTA' if profile.tta else 'a single pass'}")


def mean_colour(images: np.ndarray) -> np.ndarray:
    """The mean R, G, B (0-255) of uint8 images (N, S, S, 3)."""
    return images.reshape(-1, 3).mean(axis=0, dtype=np.float64)


def colour_gains(site_images: np.ndarray, train_images: np.ndarray) -> list[float]:
    """Per-channel gains that move the site images' mean colour onto the training images' (a site white balance)."""
    return (mean_colour(train_images) / np.maximum(mean_colour(site_images), 1.0)).round(4).tolist()


def apply_gains(images: np.ndarray, gains) -> np.ndarray:
    """uint8 images times per-channel ``gains`` (rounded, clipped)."""
    out = images.astype(np.float32) * np.asarray(gains, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def lab_distance(site_images: np.ndarray, train_images: np.ndarray) -> float:
    """CIE76 colour difference (Delta E, in CIELAB) between the two sets' mean colours: about 2.3 is the smallest
    difference a person sees, above 10 two colours look different at a glance."""
    import cv2

    def lab(images):
        mean = mean_colour(images).reshape(1, 1, 3).astype(np.float32) / 255.0
        return cv2.cvtColor(mean, cv2.COLOR_RGB2LAB).reshape(3).astype(np.float64)

    return float(np.linalg.norm(lab(site_images) - lab(train_images)))


def prior_shift(labels: np.ndarray, probs: np.ndarray, alpha: float = 0.5) -> list[float]:
    """Per-class log ratio of the site's class prior (labelled counts, add-``alpha`` smoothed) to the ensemble's
    own mean probability on the same images: added to the log probabilities it moves the posterior to the site's
    class mix (``lesion.ensemble.combine``)."""
    classes = probs.shape[1]
    site = (np.bincount(labels, minlength=classes) + alpha) / (len(labels) + alpha * classes)
    model = np.clip(probs.mean(axis=0), 1e-6, None)
    return np.log(site / model).round(6).tolist()


def predictive_threshold(is_malignant: np.ndarray, p_malignant: np.ndarray, target_sensitivity: float) -> float:
    """The malignancy threshold a NEW malignant image of the site exceeds with probability ``target_sensitivity``:
    the lower prediction bound of a normal fitted to the malignant images' logits (Student t, n - 1 degrees of
    freedom). Unlike the rank threshold fitted on validation, it reaches below the lowest malignant score seen, as a
    few dozen labelled images need (the lowest of 8 malignant scores is exceeded by only 8/9 of new ones)."""
    from scipy.stats import t as student_t

    scores = np.asarray(p_malignant, dtype=np.float64)[np.asarray(is_malignant, dtype=bool)]
    if len(scores) < 3:
        raise ValueError(f"{len(scores)} malignant image(s) among the labelled ones: at least 3 are needed to fit "
                         "a malignancy threshold")
    logits = np.log(np.clip(scores, 1e-7, 1 - 1e-7) / np.clip(1 - scores, 1e-7, None))
    n, mean, sd = len(logits), logits.mean(), logits.std(ddof=1)
    bound = mean - student_t.ppf(target_sensitivity, n - 1) * sd * np.sqrt(1 + 1 / n)
    return float(1 / (1 + np.exp(-bound)))


def refit_spec(spec, probs_by_model: dict[str, np.ndarray], labels: np.ndarray, is_malignant: np.ndarray,
               with_diagnoses: bool) -> dict[str, Any]:
    """The ensemble spec fields a site's labelled images refit: with diagnoses the class prior (``prior_shift``),
    the ensemble temperature (by the NLL of the diagnoses, else of benign/malignant) and the malignancy threshold
    for the spec's target sensitivity (``predictive_threshold``)."""
    from scipy.optimize import minimize_scalar

    scaled = {n: calibration.apply_temperature(probs_by_model[n], spec.temperatures[n]) for n in spec.models}
    mixture = ensemble.mix(scaled, spec.weights)
    shift = prior_shift(labels, calibration.apply_temperature(mixture, spec.temperature)) if with_diagnoses else []
    is_malignant = np.asarray(is_malignant, dtype=bool)

    def probs_at(log_t: float) -> np.ndarray:
        return ensemble.adjust_prior(calibration.apply_temperature(mixture, float(np.exp(log_t))), shift)

    def nll(log_t: float) -> float:
        probs = probs_at(log_t)
        if with_diagnoses:
            return -float(np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], calibration.EPS, None))))
        p = np.clip(probs[:, list(malignant_indices(spec.task))].sum(axis=1), calibration.EPS, 1 - calibration.EPS)
        return -float(np.mean(np.where(is_malignant, np.log(p), np.log(1 - p))))

    temperature = float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))
    refitted = dataclasses.replace(spec, temperature=temperature, prior_shift=shift)
    p_mal = ensemble.malignant_probability(ensemble.combine(probs_by_model, refitted), refitted)
    threshold = predictive_threshold(is_malignant, p_mal, spec.target_sensitivity)
    return {"temperature": round(temperature, 6), "prior_shift": shift, "malignant_threshold": round(threshold, 6)}


def decision_scores(spec, probs_by_model: dict[str, np.ndarray], is_malignant: np.ndarray) -> dict[str, float]:
    """Sensitivity and specificity of the malignant decision (malignant probability against the threshold), and
    the malignant AUC, of ``spec`` on these images."""
    from sklearn.metrics import roc_auc_score

    is_malignant = np.asarray(is_malignant, dtype=bool)
    p_mal = ensemble.malignant_probability(ensemble.combine(probs_by_model, spec), spec)
    called = p_mal >= spec.malignant_threshold
    both = is_malignant.any() and not is_malignant.all()
    return {"sensitivity": float(called[is_malignant].mean()) if is_malignant.any() else float("nan"),
            "specificity": float((~called[~is_malignant]).mean()) if (~is_malignant).any() else float("nan"),
            "malignant_auc": float(roc_auc_score(is_malignant, p_mal)) if both else float("nan")}


def repeated_splits(spec, probs_for, labels: np.ndarray, is_malignant: np.ndarray, with_diagnoses: bool,
                    fit_count: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """What calibrating on ``fit_count`` labelled images gives on the others: ``repeats`` random splits, stratified
    by benign/malignant; per split the spec is refitted on the fitting part and the decision scored on the rest, next
    to the trained spec on the same rest. ``probs_for(fit_rows)``: the members' probabilities of every labelled image
    with whatever unlabelled adaptation the fitting rows give. Mean and 2.5-97.5 percentiles of each figure."""
    is_malignant = np.asarray(is_malignant, dtype=bool)
    n = len(is_malignant)
    if not 0 < fit_count < n:
        raise ValueError(f"the fitting part must hold between 1 and {n - 1} of the {n} labelled images, "
                         f"got {fit_count}")
    rng = np.random.default_rng(seed)
    malignant, benign = np.flatnonzero(is_malignant), np.flatnonzero(~is_malignant)
    fit_malignant = max(1, round(fit_count * len(malignant) / n))
    rows: dict[str, list[dict]] = {"calibrated": [], "trained": []}
    for _ in range(repeats):
        fit = np.concatenate([rng.choice(malignant, fit_malignant, replace=False),
                              rng.choice(benign, fit_count - fit_malignant, replace=False)])
        rest = np.setdiff1d(np.arange(n), fit)
        probs_by_model = probs_for(fit)
        part = {name: p[fit] for name, p in probs_by_model.items()}
        refitted = dataclasses.replace(spec, **refit_spec(spec, part, labels[fit], is_malignant[fit],
                                                          with_diagnoses))
        held_out = {name: p[rest] for name, p in probs_by_model.items()}
        rows["calibrated"].append(decision_scores(refitted, held_out, is_malignant[rest]))
        rows["trained"].append(decision_scores(spec, held_out, is_malignant[rest]))
    summary: dict[str, Any] = {"fit_count": fit_count, "scored_count": n - fit_count, "repeats": repeats,
                               "seed": seed}
    for which, scores in rows.items():
        for metric in scores[0]:
            values = np.array([s[metric] for s in scores])
            summary.setdefault(which, {})[metric] = {
                "mean": round(float(np.nanmean(values)), 4),
                "low": round(float(np.nanpercentile(values, 2.5)), 4),
                "high": round(float(np.nanpercentile(values, 97.5)), 4)}
    return summary


def copy_sites(models_root: str | Path, dest_root: str | Path) -> list[str]:
    """Copy every site profile of the models at ``models_root`` to ``dest_root/sites`` (an export bundle, a
    registered model's run); returns their names."""
    import shutil

    names = list_sites(models_root)
    for name in names:
        shutil.copytree(site_folder(models_root, name), site_folder(dest_root, name))
    return names
