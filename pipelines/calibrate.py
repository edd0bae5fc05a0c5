"""``lesion calibrate``: adapt a trained ensemble to another site's dermatoscope and say how far that site lies.

    lesion calibrate --run RUN --site NAME --root IMAGES [--labels CSV] [--adapt colour]

Every image under ``--root`` is read and preprocessed as the run's own images were (an image that cannot be used is
listed with the reason and left out). The profile (``lesion.sites``) goes to ``RUN/sites/NAME/`` (or an export
bundle's ``sites/NAME/``) and is used by ``--site NAME`` on predict, evaluate, explain and serve, and by
``lesion.load(..., site=NAME)``:

- always: the site's distance from the training data (out-of-distribution share, colour difference);
- ``--adapt colour``: a site white balance from the site's unlabelled images (``lesion.sites.colour_gains``);
- ``--labels CSV`` (``image_id`` and ``dx`` or ``binary``; image_id = the file name without its suffix): the
  temperature, the malignancy threshold for the run's target sensitivity and, with diagnoses, the class prior
  refitted on the labelled images, and the figures this gives from repeated splits of them (``--fit-share`` fitted,
  the rest scored, ``--repeats`` times; an adaptation is then also estimated from the fitting part only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lesion import calibration, sites
from lesion.data.sources import parse_label
from lesion.inference import Inference
from lesion.labels import class_names
from lesion.resolve import is_bundle, load_inference
from pipelines.common import model_uri_of, models_config
from pipelines.predict import collect_files, read_image

log = logging.getLogger(__name__)

ADAPTATIONS = ("colour",)
TRAINING_SAMPLE = 2000  # training images whose mean colour stands for the training data


@dataclasses.dataclass
class SiteImages:
    """A site's usable images, preprocessed as the run's, with what could not be used."""

    image_ids: list[str]
    images: np.ndarray  # uint8 (N, S, S, 3)
    rejected: list[tuple[str, str]]  # (file, reason)


def read_site_images(root: str | Path, core: Inference) -> SiteImages:
    """Every image file under ``root`` (a folder or one file), preprocessed with the core's preprocessing."""
    files = collect_files([str(root)])
    if not files:
        raise FileNotFoundError(f"no image files under {root}")
    ids, pixels, rejected = [], [], []
    for path in files:
        try:
            pixels.append(core.preprocess(read_image(str(path))))
            ids.append(path.stem)
        except (ValueError, OSError) as exc:
            rejected.append((str(path), str(exc)))
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{root}: several files share the image id(s) {', '.join(sorted(duplicates)[:5])}; "
                         "labels name an image by its file name without the suffix")
    if not pixels:
        raise ValueError(f"none of the {len(files)} files under {root} could be used: {rejected[0][1]}")
    return SiteImages(ids, np.stack(pixels), rejected)


def read_site_labels(path: str | Path, image_ids: list[str], task: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Labels of a site's images from a CSV with ``image_id`` and ``dx`` (a diagnosis, any spelling
    ``lesion.data.sources.parse_label`` knows) or ``binary`` (benign / malignant): (per image the class index for
    "dx", 1 / 0 for "binary", -1 when unlabelled; malignant per image; "dx" or "binary"). Rows that name no site image, or a label it cannot
    read, are a ValueError listing them."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "image_id" not in table.columns or not {"dx", "binary"} & set(table.columns):
        raise ValueError(f"{path}: a labels CSV needs an image_id column and a dx or binary column; found "
                         f"{', '.join(table.columns)}")
    kind = "dx" if "dx" in table.columns and task == "multiclass" else "binary"
    column = "dx" if "dx" in table.columns else "binary"
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    labels = np.full(len(image_ids), -1, dtype=np.int64)
    malignant = np.zeros(len(image_ids), dtype=bool)
    names, problems = class_names(task), []
    for row, (image_id, value) in enumerate(zip(table["image_id"].str.strip(), table[column]), start=2):
        parsed = parse_label(value)
        if image_id not in position:
            problems.append(f"line {row}: no site image {image_id!r}")
        elif parsed is None or (kind == "dx" and parsed[0] is None):
            problems.append(f"line {row}: {column} {value!r} is not a known label")
        else:
            k = position[image_id]
            labels[k] = names.index(parsed[0]) if kind == "dx" else int(parsed[1] == "malignant")
            malignant[k] = parsed[1] == "malignant"
    if problems:
        raise ValueError(f"{path}: {len(problems)} row(s) cannot be used: " + "; ".join(problems[:10]))
    if not (labels >= 0).any():
        raise ValueError(f"{path}: labels no site image")
    return labels, malignant, kind


def training_sample(models_root: Path) -> np.ndarray | None:
    """Up to ``TRAINING_SAMPLE`` of a run's training images (None for a bundle: it carries no training data)."""
    from lesion.data.shards import load_split

    if is_bundle(models_root) or not (models_root / "data").is_dir():
        return None
    images = load_split(models_root, "train").images
    pick = np.random.default_rng(0).choice(len(images), min(TRAINING_SAMPLE, len(images)), replace=False)
    return images[np.sort(pick)]


def site_distance(core: Inference, images: np.ndarray, probs: dict[str, np.ndarray],
                  train: np.ndarray | None) -> dict:
    """How far the site lies from the training data: the share of its images the ensemble flags as out of
    distribution (by construction ``1 - ood_quantile`` of the validation images) and, where the training images
    are at hand, the CIELAB colour difference of the two sets' mean colours."""
    spec = core.spec
    ood = calibration.ood_score(core.combine(probs))
    distance = {"ood_share": round(float(np.mean(ood > spec.ood_threshold)), 4),
                "ood_share_on_validation": round(1 - spec.ood_quantile, 4)}
    if train is not None:
        distance["colour_delta_e"] = round(sites.lab_distance(images, train), 2)
    return distance


def calibrate(uri: str | Path, site: str, root: str | Path, labels: str | Path | None = None, config=None, *,
              adapt: tuple[str, ...] = (), target_sensitivity: float | None = None, fit_share: float = 0.4,
              repeats: int = 100, seed: int = 0) -> sites.SiteProfile:
    """Make and save the site profile ``site`` of the models at ``uri`` (a run directory or an export bundle) from
    the images under ``root`` (see the module docstring); returns it. ``target_sensitivity``: the sensitivity the
    site's malignancy threshold is fitted for (default: the run's, ``serve.target_sensitivity``)."""
    unknown = sorted(set(adapt) - set(ADAPTATIONS))
    if unknown:
        raise ValueError(f"--adapt: unknown adaptation(s) {', '.join(unknown)}; expected {', '.join(ADAPTATIONS)}")
    if str(uri).startswith("models:/"):
        raise ValueError("calibrate a run directory or an export bundle (a registered model is read-only): "
                         "calibrate its run, then register it again")
    core = load_inference(uri, config, engine="torch", site="")  # the models as trained, whatever inference.site says
    if target_sensitivity is not None:
        core.spec = dataclasses.replace(core.spec, target_sensitivity=target_sensitivity)
    models_root = Path(uri)
    train = training_sample(models_root)
    if "colour" in adapt and train is None:
        raise ValueError(f"{uri}: --adapt colour needs the training images (a run directory, not a bundle)")
    found = read_site_images(root, core)
    for file, reason in found.rejected:
        log.warning("%s: left out: %s", file, reason)

    gains_from = (lambda rows: sites.colour_gains(found.images[rows], train)) if "colour" in adapt else None
    gains = gains_from(np.arange(len(found.images))) if gains_from else None
    probs = core.probabilities(found.images if gains is None else sites.apply_gains(found.images, gains))
    profile = sites.SiteProfile(
        name=site, made_for={n: v.get("checkpoint_sha256") for n, v in core.versions().items()}, tta=core.tta,
        images=len(found.images), colour_gains=gains, root=str(Path(root).resolve()),
        distance=site_distance(core, found.images, probs if gains is None else core.probabilities(found.images),
                               train),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if labels is not None:
        y, malignant, kind = read_site_labels(labels, found.image_ids, core.spec.task)
        known = y >= 0
        profile.labelled, profile.labels = int(known.sum()), kind
        labelled = {name: p[known] for name, p in probs.items()}
        profile.spec = {**sites.refit_spec(core.spec, labelled, y[known], malignant[known], kind == "dx"),
                        "target_sensitivity": core.spec.target_sensitivity,
                        "fitted_on": f"the labelled images of site {site}"}
        profile.figures = labelled_figures(core, found.images, known, y, malignant, kind, labelled, gains_from,
                                           fit_share=fit_share, repeats=repeats, seed=seed)
    sites.save_site(profile, models_root)
    return profile


def labelled_figures(core: Inference, images: np.ndarray, known: np.ndarray, y: np.ndarray, malignant: np.ndarray,
                     kind: str, labelled: dict[str, np.ndarray], gains_from, *, fit_share: float, repeats: int,
                     seed: int) -> dict:
    """``lesion.sites.repeated_splits`` over the labelled images (``labelled``: the members' probabilities of them);
    with a colour adaptation (``gains_from(rows)``) the gains come from each split's fitting part only, so the
    scored part never informs them."""
    rows = np.flatnonzero(known)

    def probs_for(fit: np.ndarray) -> dict[str, np.ndarray]:
        if gains_from is None:
            return labelled
        return core.probabilities(sites.apply_gains(images[rows], gains_from(rows[fit])))

    return sites.repeated_splits(core.spec, probs_for, y[rows], malignant[rows], kind == "dx",
                                 int(round(fit_share * len(rows))), repeats, seed)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``lesion calibrate``."""
    parser.add_argument("--run", help="run directory with trained models")
    parser.add_argument("--model-uri", metavar="URI", help="an export bundle (instead of --run)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--site", required=True, help="name of the site profile (RUN/sites/NAME)")
    parser.add_argument("--root", required=True, help="folder of the site's images (searched recursively)")
    parser.add_argument("--labels", help="CSV of image_id and dx or binary for some or all of the site's images")
    parser.add_argument("--adapt", nargs="*", default=[], choices=ADAPTATIONS,
                        help="unlabelled adaptations: colour (a site white balance)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="sensitivity the site's malignancy threshold is fitted for (default: the run's "
                             "serve.target_sensitivity)")
    parser.add_argument("--fit-share", type=float, default=0.4,
                        help="share of the labelled images each repeated split fits on (default 0.4)")
    parser.add_argument("--repeats", type=int, default=100, help="repeated splits of the labelled images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the repeated splits")


def _interval(block: dict) -> str:
    return f"{block['mean']:.3f} [{block['low']:.3f}, {block['high']:.3f}]"


def run_command(name: str, args: argparse.Namespace) -> int:
    """``lesion calibrate``: write the site profile and print what it found."""
    uri = model_uri_of(args)
    config = models_config(args)
    profile = calibrate(uri, args.site, args.root, args.labels, config, adapt=tuple(args.adapt),
                        target_sensitivity=args.target_sensitivity, fit_share=args.fit_share,
                        repeats=args.repeats, seed=args.seed)
    distance = profile.distance
    print(f"site {profile.name}: {profile.images} images, {profile.labelled} labelled -> {profile.folder}")
    print(f"  out of distribution: {distance['ood_share']:.1%} of the site's images "
          f"({distance['ood_share_on_validation']:.1%} of validation images)"
          + (f"; colour difference Delta E {distance['colour_delta_e']:.1f}" if "colour_delta_e" in distance else ""))
    if profile.colour_gains:
        print(f"  colour gains R, G, B: {', '.join(f'{g:.3f}' for g in profile.colour_gains)}")
    if profile.spec:
        print(f"  refitted: temperature {profile.spec['temperature']:.3f}, malignancy threshold "
              f"{profile.spec['malignant_threshold']:.4f} (for {profile.spec['target_sensitivity']:.0%} sensitivity)" + (", class prior" if profile.spec["prior_shift"] else ""))
        figures = profile.figures
        print(f"  {figures['repeats']} splits, fitted on {figures['fit_count']}, scored on {figures['scored_count']} "
              "(mean [2.5%, 97.5%]):")
        for which in ("trained", "calibrated"):
            block = figures[which]
            print(f"    {which:<10} sensitivity {_interval(block['sensitivity'])}  specificity "
                  f"{_interval(block['specificity'])}  malignant AUC {_interval(block['malignant_auc'])}")
    print(f"use it with --site {profile.name} (predict, evaluate, explain, serve)")
    return 0
