"""``lesion evaluate``: batch inference with Ray Data for every trained model and the ensemble, then metrics,
calibration, explanation quality, predictions in the ISIC 2018 format, figures, ``report.html`` and the model card.

Evaluation never trains and never fits on the evaluated data: the models, the inference mode and the ensemble's
weights, temperatures and thresholds (fitted on the run's validation split) come from the run's inference core
(``lesion.inference.Inference``), which the Ray Data actors run too.

Output (``RUN/eval/``, or ``RUN/eval/external/<name>/`` for another data set):
``metrics.json`` (with ``comparison``: the variants of each architecture side by side), ``predictions/<model>.csv``
(ISIC 2018 Task 3: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``; binary task: ``image,malignant``), ``predictions_long.csv``, ``plots/*.png``, ``report.html``, ``model_card.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lesion import ensemble, explain, metrics, report
from lesion.calibration import apply_temperature
from lesion.config import Config, DataConfig, apply_overrides
from lesion.explain_quality import explanation_quality
from lesion.data.shards import SPLITS, decode_images, decode_masks, read_info, split_files
from lesion.inference import Inference, checkpoint_sha256, data_config_of, file_sha256
from lesion.labels import class_names
from lesion.models import read_model_record
from lesion.records import DataRecord
from lesion.resolve import load_inference
from lesion.rundir import RunDir, atomic_path, fingerprint, package_versions, write_atomic
from lesion.sites import PROFILE_FILE, site_folder
from lesion.vocabulary import SOURCES
from pipelines import capacity
from pipelines.common import (StageTimes, add_model_source_arguments, inference_actor_options, init_ray,
                              load_core_in_actor, model_uri_of, models_config)
from pipelines.stages import Stage

log = logging.getLogger(__name__)

META = ["image_id", "lesion_id", "label", "dx", "dx_type", "age", "sex", "localization"]
PREPROCESSING = ("image_size", "crop_border", "remove_hair", "resize", "color_constancy", "min_image_side",
                 "max_image_pixels")  # what an external set is ingested with: the run's own (data_config_of)
EVALUATE_VERSION = 5  # bump when evaluate's output changes for the same inputs (docs/decisions.md, "Stage versions")


class Predictor:
    """Ray Data actor: the inference core's members, loaded once, applied to batches of raw shard rows -> each
    member's class probabilities (N, members, C) in the core's inference mode."""

    def __init__(self, core: Inference, image_size: int, use_gpu: bool, threads: int | None = None):
        self.core, self.image_size = load_core_in_actor(core, use_gpu, threads), image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = decode_images(list(batch["image"]), self.image_size)
        probs = self.core.probabilities(images)
        return {"image_id": batch["image_id"], "probs": np.stack([probs[n] for n in self.core.names], axis=1)}


def evaluation_files(data_root: Path, split: str) -> list[str]:
    """Shards of ``split`` (or of every split for ``all``)."""
    splits = SPLITS if split == "all" else (split,)
    files = [f for s in splits for f in split_files(data_root, s)]
    if not files:
        raise FileNotFoundError(f"no shards for split {split!r} under {data_root / 'data'}")
    return files


def read_meta(files: list[str]) -> pd.DataFrame:
    """Labels and metadata of the shards, in file order, without the image bytes."""
    table = pa.concat_tables([pq.read_table(f, columns=META) for f in files])
    meta = table.to_pandas()
    duplicated = meta["image_id"][meta["image_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"image_id must be unique in the evaluated data; repeated: {', '.join(duplicated[:5])}")
    return meta


def read_rows(files: list[str], rows: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and masks, when every chosen row has one) of the given row positions of the concatenated shards."""
    images, masks, start = [], [], 0
    for f in files:
        table = pq.read_table(f, columns=["image", "mask"])
        local = rows[(rows >= start) & (rows < start + table.num_rows)] - start
        if len(local):
            picked = table.take(pa.array(local))
            images.append(decode_images(picked.column("image").to_pylist(), image_size))
            masks.append(decode_masks(picked.column("mask").to_pylist(), image_size))
        start += table.num_rows
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), None
    return np.concatenate(images), (None if any(m is None for m in masks) else np.concatenate(masks))


def batch_predict(files: list[str], core: Inference, image_size: int, config: Config
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ray Data batch inference: for each member of ``core``, (image_ids, raw probabilities (N, C)) over the
    shards, in one pass."""
    import ray

    ev = config.evaluate
    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    capacity.check("evaluate", capacity.evaluate_needs(config), cluster)  # before any actor starts
    ds = ray.data.read_parquet(files).select_columns(["image_id", "image"])
    scored = ds.map_batches(  # one pass, every member in each actor: one start-up of the read and the actors
        Predictor,
        fn_constructor_kwargs={"core": core.unloaded(), "image_size": image_size,
                               "use_gpu": ev.gpus_per_actor > 0, "threads": ev.threads_per_actor},
        batch_format="numpy",
        **inference_actor_options(config),
    )
    ids, probs = [], []
    with capacity.waiting_notice("evaluate"):
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            ids.extend(str(i) for i in batch["image_id"])
            probs.append(np.asarray(batch["probs"], dtype=np.float64))
    ids, probs = np.asarray(ids), np.concatenate(probs)
    log.info("scored %d images with %s", len(ids), ", ".join(core.names))
    return {name: (ids, probs[:, i]) for i, name in enumerate(core.names)}


def _aligned(image_ids: pd.Series, ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    position = pd.Series(np.arange(len(ids)), index=ids)
    missing = set(image_ids) - set(ids)
    if missing:
        raise RuntimeError(f"batch inference returned no result for {len(missing)} images, e.g. {sorted(missing)[:3]}")
    return probs[position.loc[image_ids.to_numpy()].to_numpy()]


def isic_table(image_ids, probs: np.ndarray, task: str) -> pd.DataFrame:
    """Predictions in the ISIC 2018 Task 3 format (``image`` + one upper-case column per class), or
    ``image,malignant`` for the binary task."""
    if task == "binary":
        return pd.DataFrame({"image": list(image_ids), "malignant": probs[:, 1]})
    table = pd.DataFrame(probs, columns=[c.upper() for c in class_names(task)])
    table.insert(0, "image", list(image_ids))
    return table


def _histories(model_dirs: dict[str, str]) -> dict[str, pd.DataFrame]:
    out = {}
    for name, folder in model_dirs.items():
        path = Path(folder) / "history.csv"
        if path.is_file():
            out[name] = pd.read_csv(path)
    return out


def output_dir(run: RunDir, data_run: RunDir | None, site: str | None = None) -> Path:
    """``RUN/eval`` for the run's own data, else ``RUN/eval/external/<name>``; with a site profile its
    ``site-<NAME>`` folder inside."""
    external = run.eval / "external"
    if data_run is None or data_run.root == run.root:
        base = run.eval
    elif data_run.root.parent == external:
        base = data_run.root
    else:
        base = external / data_run.root.name
    return base / f"site-{site}" if site else base


def evaluation_fingerprint(config: Config, run: RunDir, split: str, data_run: RunDir | None = None) -> str:
    """What an evaluation depends on: ``EVALUATE_VERSION``, the checkpoints, both data sets, the split, the evaluate
    section and the serve options that shape the ensemble's decisions."""
    data_run = data_run or run
    shas = {name: checkpoint_sha256(run.model_dir(name)) for name in run.trained_models()}
    sv = config.serve
    site = config.inference.site  # a site's profile only where one is used: other evaluations stay current
    profile = [file_sha256(site_folder(run.root, site) / PROFILE_FILE)] if site else []
    return fingerprint(EVALUATE_VERSION, shas, read_info(run.root).fingerprint,
                       read_info(data_run.root).fingerprint, split, config.to_dict()["evaluate"],
                       sv.target_sensitivity, sv.ood_quantile, sv.uncertain_margin, *profile)


def model_results(core: Inference, labels: np.ndarray, probs: dict[str, np.ndarray], report_kwargs: dict
                  ) -> dict[str, dict]:
    """metrics.json's entry of every member: metrics, calibration by its temperature, provenance, weight."""
    spec, results = core.spec, {}
    for name in core.names:
        record = read_model_record(core.model_dirs[name])
        calibrated = apply_temperature(probs[name], spec.temperatures[name])
        results[name] = {
            **metrics.classification_report(labels, probs[name], spec.task, **report_kwargs),
            "calibration": _calibration(labels, probs[name], calibrated, spec.temperatures[name]),
            "pretrained": record.pretrained_origin,
            "run_id": record.run_id,
            "checkpoint_sha256": spec.model_versions.get(name, {}).get("checkpoint_sha256"),
            "ensemble_weight": spec.weights[name],
        }
    return results


def variants_by_arch(model_dirs: dict[str, str]) -> dict[str, list[str]]:
    """The evaluated models (name -> model folder) grouped by architecture (``model.json``'s ``arch``; older runs:
    its name)."""
    groups: dict[str, list[str]] = {}
    for name, folder in model_dirs.items():
        groups.setdefault(read_model_record(folder).arch, []).append(name)
    return groups


def comparison(model_dirs: dict[str, str], task: str, labels: np.ndarray, probs: dict[str, np.ndarray],
               groups: np.ndarray, config: Config) -> dict[str, dict]:
    """metrics.json's ``comparison``: for each architecture with two or more variants, each variant's balance and
    weights origin, and ``lesion.metrics.paired_bootstrap`` of the variants (each one's balanced accuracy, macro F1,
    per-class recall, malignant AUC with intervals; the paired difference of each pair with its interval)."""
    out = {}
    for arch, variants in variants_by_arch({name: model_dirs[name] for name in probs}).items():
        if len(variants) < 2:
            continue
        records = {v: read_model_record(model_dirs[v]) for v in variants}
        out[arch] = {
            "variants": {v: {"balance": records[v].balance, "pretrained": records[v].pretrained_origin}
                         for v in variants},
            **metrics.paired_bootstrap(labels, {v: probs[v] for v in variants}, groups, task,
                                       config.evaluate.bootstrap, seed=config.data.seed),
        }
    return out


def malignant_of(answers: list[dict]) -> np.ndarray:
    """The ensemble's malignant probability (N,) as the core's answers give it (``ensemble.malignant_probability``)."""
    return np.array([a["malignant_probability"] for a in answers], dtype=np.float64)


def ensemble_result(core: Inference, labels: np.ndarray, probs: dict[str, np.ndarray], answers: list[dict],
                    report_kwargs: dict) -> dict:
    """metrics.json's ensemble entry from the core's answers: metrics, calibration, members and decisions."""
    spec = core.spec
    final = core.combine(probs)
    decisions = [a["decision"] for a in answers]
    return {
        **metrics.classification_report(labels, final, spec.task, malignant_threshold=spec.malignant_threshold,
                                        p_malignant=malignant_of(answers), **report_kwargs),
        "calibration": _calibration(labels, ensemble.mix(probs, spec.weights), final, spec.temperature),
        "members": spec.models,
        "weights": spec.weights,
        "weighting": spec.weighting,
        "prior_tau": spec.prior_tau,  # logit adjustment fitted on validation (0: the calibrated posteriors)
        "decision": {
            "malignant_threshold": spec.malignant_threshold,
            "target_sensitivity": spec.target_sensitivity,
            "ood_threshold": spec.ood_threshold,
            "uncertain_margin": spec.uncertain_margin,
            "counts": {d: decisions.count(d) for d in ("malignant", "benign", "uncertain")},
            "share_uncertain": decisions.count("uncertain") / max(len(decisions), 1),
        },
    }


def score(core: Inference, files: list[str], meta: pd.DataFrame, image_size: int, config: Config
          ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Evaluation's scoring: every member's raw probabilities on the shards (Ray Data actors running ``core``), in
    ``meta``'s row order, and the core's answer per image."""
    init_ray()
    scored = batch_predict(files, core, image_size, config)
    probs = {name: _aligned(meta["image_id"], *scored[name]) for name in core.names}
    return probs, core.answers(probs)


def _cam_figures(core: Inference, files: list[str], meta: pd.DataFrame, image_size: int, final: np.ndarray,
                 out: Path, config: Config, compared: dict[str, list[str]]) -> tuple[dict, dict[str, Path]]:
    """Explanation quality on ``cam_score_images`` evaluated images and the Grad-CAM grid of ``cam_images``: all
    models, then the variants of each architecture in ``compared`` ({arch: variants})."""
    ev, classes = config.evaluate, core.classes
    if not (ev.cam_methods and ev.cam_score_images > 0):
        return {}, {}
    rows = np.unique(np.linspace(0, len(meta) - 1, min(ev.cam_score_images, len(meta))).astype(int))
    images, masks = read_rows(files, rows, image_size)
    section, cams = explanation_quality(core.on_torch().load(), images, masks, list(ev.cam_methods))
    shown = np.unique(np.linspace(0, len(images) - 1, min(ev.cam_images, len(images))).astype(int))
    method = ev.cam_methods[0]
    overlays = {name: np.stack([explain.overlay(images[i], cams[method][name][i]) for i in shown])
                for name in [*core.names, "ensemble"]}
    labels = meta["label"].to_numpy(np.int64)
    row_labels = [f"{classes[labels[rows[i]]]} → {classes[final[rows[i]].argmax()]}" for i in shown]
    title = f"{method} maps: image, one column per model and the ensemble (true → ensemble prediction)"
    figures = {title: report.plot_cam_grid(images[shown], overlays, out / "plots" / "cam_grid.png", row_labels)}
    for arch, variants in compared.items():  # the same images across the variants of one architecture
        figures[f"{method} maps of the {arch} variants (same images; true → ensemble prediction)"] = (
            report.plot_cam_grid(images[shown], {v: overlays[v] for v in variants},
                                 out / "plots" / f"cam_grid_{arch}.png", row_labels))
    return section, figures


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluate(Stage):
    """Scoring the run's models and ensemble (``evaluate``) on ``split`` (default: ``evaluate.split``) of
    ``data_run`` (default: the run's own data): ``RUN/eval/``, or ``RUN/eval/external/<name>/``."""

    split: str | None = None
    data_run: RunDir | None = None
    site: str | None = None
    kind = "evaluate"

    def _split(self, config: Config) -> str:
        return self.split or config.evaluate.split

    def artefact(self, run: RunDir) -> str:
        return output_dir(run, self.data_run, self.site).relative_to(run.root).as_posix()

    def artefacts(self, run: RunDir) -> list[Path]:
        return [output_dir(run, self.data_run, self.site) / "metrics.json"]

    def fingerprint(self, config: Config, run: RunDir) -> str:
        return evaluation_fingerprint(config, run, self._split(config), self.data_run)

    def run(self, config: Config, run: RunDir) -> dict:
        return evaluate(config, run, self._split(config), self.data_run, force=True)

    def summary(self, result: dict) -> str:
        ensemble_scores = result["models"]["ensemble"]
        return (f"{result['split']}: ensemble bal.acc {ensemble_scores['balanced_accuracy']:.3f}, "
                f"acc {ensemble_scores['accuracy']:.3f}")


def evaluate(config: Config, run: RunDir, split: str = "test", data_run: RunDir | None = None, *,
             force: bool = False) -> dict:
    """Score every trained model of ``run`` and the ensemble on ``split`` of ``data_run`` (default: the run's own
    data; ``all`` = every split, for an external set). Writes the evaluation folder and returns metrics.json's
    content. With ``force=False`` an evaluation already made with the same fingerprint is returned unchanged."""
    data_run = data_run or run
    stage = Evaluate(split=split, data_run=data_run, site=config.inference.site)
    out = output_dir(run, data_run, config.inference.site)
    external = out != run.eval
    artefact = stage.artefact(run)
    fp = stage.fingerprint(config, run)
    if not force and stage.made_from(run, fp):
        log.info("%s is current (fingerprint %s): not re-evaluating", out, fp)
        return json.loads((out / "metrics.json").read_text())
    times = StageTimes()
    with times("ensemble spec"):
        core = load_inference(run.root, config, load=False)  # on inference.engine; Grad-CAM scores on torch
    if split == "val" and not external:
        log.warning("evaluating on the validation split, which the ensemble was fitted on: its scores are optimistic")
    augment = run.data / "augment_examples.png"
    result = write_evaluation(core, config, data_run, split, out, external=external, times=times,
                              augment=augment if augment.is_file() else None)
    run.record(artefact, config=config.to_dict(), fingerprint=fp, split=split, data=str(data_run.root),
               models=core.names, output=str(out))
    return result


def evaluate_models(config: Config, model_uri: str, data_run: RunDir, out: str | Path, split: str = "all") -> dict:
    """Score the models at ``model_uri`` (an export bundle or ``models:/NAME@ALIAS``: anything
    ``lesion.resolve.load_inference`` takes) and their ensemble on ``split`` of the ingested ``data_run``, with no
    run directory: metrics.json, predictions, figures, report.html and model_card.md go into ``out``."""
    times = StageTimes()
    with times("ensemble spec"):
        core = load_inference(model_uri, config, load=False)
    return write_evaluation(core, config, data_run, split, Path(out), external=True, times=times,
                            model_uri=str(model_uri))


def write_evaluation(core: Inference, config: Config, data_run: RunDir, split: str, out: Path, *, external: bool,
                     times: StageTimes, augment: Path | None = None, model_uri: str | None = None) -> dict:
    """Score ``core`` (unloaded) on ``split`` of ``data_run`` with Ray Data and write the evaluation folder ``out``:
    metrics.json (with ``model_uri`` when the models are not a run's), predictions, figures (``augment``: the
    training augmentation examples, when there are), Grad-CAM scores, report.html and model_card.md; returns
    metrics.json's content."""
    info = read_info(data_run.root)
    if info.task != core.spec.task:
        raise ValueError(f"{data_run.root} holds a {info.task} data set but the models are {core.spec.task}")
    files = evaluation_files(data_run.root, split)
    meta = read_meta(files)
    labels = meta["label"].to_numpy(np.int64)
    with times("scoring"):
        probs, answers = score(core, files, meta, info.image_size, config)
    final = core.combine(probs)

    out.mkdir(parents=True, exist_ok=True)
    groups = meta["lesion_id"].fillna(meta["image_id"]).to_numpy()  # an image without lesion_id is its own lesion
    report_kwargs = {"groups": groups, "meta": meta, "n_bootstrap": config.evaluate.bootstrap,
                     "seed": config.data.seed}
    with times("metrics"):
        results = model_results(core, labels, probs, report_kwargs)
        results["ensemble"] = ensemble_result(core, labels, probs, answers, report_kwargs)
        all_probs = {**probs, "ensemble": final}
        _write_predictions(out, meta, core.classes, core.spec.task, all_probs, answers)
        result = _result_document(core, split, external, data_run, info, meta, groups, results)
        result["comparison"] = comparison(core.model_dirs, core.spec.task, labels, probs, groups, config)
        if model_uri is not None:
            result["model_uri"] = model_uri
    with times("figures"):
        figures = _figures(out, core.model_dirs, labels, all_probs, ensemble.mix(probs, core.spec.weights),
                           malignant_of(answers), core.classes, core.spec.task, results, augment)
    compared = {arch: list(section["variants"]) for arch, section in result["comparison"].items()}
    with times("explanations"):
        result["explanations"], cam_figures = _cam_figures(core, files, meta, info.image_size, final, out,
                                                           config, compared)
    figures.update(cam_figures)

    with times("report"):
        write_atomic(out / "metrics.json", json.dumps(metrics.json_safe(result), indent=2, allow_nan=False))
        report.render_html(metrics.json_safe(result), figures, out / "report.html")
        report.render_model_card(metrics.json_safe(result), out / "model_card.md")
    log.info("evaluation time: %s", times)
    log.info("evaluation written to %s", out)
    return metrics.json_safe(result)


def _result_document(core: Inference, split: str, external: bool, data_run: RunDir, info: DataRecord,
                     meta: pd.DataFrame, groups: np.ndarray, results: dict) -> dict[str, Any]:
    """metrics.json without the explanations."""
    spec = core.spec
    return {
        "split": split,
        "task": spec.task,
        "classes": core.classes,
        "tta": spec.tta,
        "external": external,
        "data": {
            "run": str(data_run.root), "source": info.source, "fingerprint": info.fingerprint,
            "image_size": info.image_size, "n_images": int(len(meta)),
            "n_lesions": int(len(set(groups))), "counts": info.to_dict()["counts"],
        },
        "ensemble_spec": {"file": core.spec_file, "fitted_on": spec.fitted_on, "tta": spec.tta,
                          "validation": spec.validation},
        "site": core.site.summary() if core.site is not None else None,
        "models": results,
        "explanations": {},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }


def _calibration(labels, before: np.ndarray, after: np.ndarray, temperature: float) -> dict[str, float]:
    return {
        "temperature": temperature,
        "ece_before": metrics.expected_calibration_error(labels, before),
        "ece_after": metrics.expected_calibration_error(labels, after),
        "log_loss_before": metrics.log_loss(labels, before),
        "log_loss_after": metrics.log_loss(labels, after),
    }


def _write_predictions(out: Path, meta: pd.DataFrame, classes: list[str], task: str,
                       probs: dict[str, np.ndarray], answers: list[dict]) -> None:
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    for name, p in probs.items():
        with atomic_path(folder / f"{name}.csv") as tmp:
            isic_table(meta["image_id"], p, task).to_csv(tmp, index=False, float_format="%.6f")
    long = meta[["image_id", "lesion_id", "dx", "age", "sex", "localization"]].copy()
    long.insert(2, "true_label", [classes[i] for i in meta["label"]])
    for name, p in probs.items():
        for k, cls in enumerate(classes):
            long[f"{name}:{cls}"] = np.round(p[:, k], 6)
    long["ensemble_malignant_probability"] = [round(a["malignant_probability"], 6) for a in answers]
    long["ensemble_decision"] = [a["decision"] for a in answers]
    with atomic_path(out / "predictions_long.csv") as tmp:
        long.to_csv(tmp, index=False)


def _figures(out: Path, model_dirs: dict[str, str], labels: np.ndarray, probs: dict[str, np.ndarray],
             uncalibrated: np.ndarray, ensemble_malignant: np.ndarray, classes: list[str], task: str,
             results: dict, augment: Path | None = None) -> dict[str, Path]:
    plots = out / "plots"
    models = list(model_dirs)
    figures: dict[str, Path] = {}
    histories = _histories(model_dirs)
    if histories:
        figures["Learning curves (train and validation)"] = report.plot_learning_curves(
            histories, plots / "learning_curves.png")
    figures["Confusion matrices (rows: true class)"] = report.plot_confusion_matrices(
        {name: results[name]["confusion_matrix"] for name in probs}, classes, plots / "confusion_matrices.png")
    figures["ROC curves, malignant vs benign"] = report.plot_roc_curves(labels, probs, task, plots / "roc_curves.png",
                                                                        {"ensemble": ensemble_malignant})
    figures["Reliability diagrams (models uncalibrated; ensemble before and after temperature scaling)"] = (
        report.plot_reliability(labels, {**{n: probs[n] for n in models}, "ensemble (uncalibrated)": uncalibrated,
                                         "ensemble": probs["ensemble"]}, plots / "reliability.png"))
    if augment is not None:
        with atomic_path(plots / "augment_examples.png") as tmp:
            shutil.copyfile(augment, tmp)
        figures["Original / augmented pairs (training augmentation)"] = plots / "augment_examples.png"
    return figures


def ingest_external(config: Config, run: RunDir, source: str, root: str | None) -> RunDir:
    """Ingest another data set into ``RUN/eval/external/<name>`` with the preprocessing the run's own images had
    (``lesion.inference.data_config_of``: cache size, border crop, hair removal, resizing, colour constancy)."""
    name = Path(root).name if root else source
    if source.startswith("ph2-"):  # a part of its root: the part is in the name
        name = f"{name}-{source.partition('-')[2]}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or source
    return ingest_with(config, data_config_of(run, config), source, root, RunDir(run.eval / "external" / name))


def ingest_with(config: Config, preprocessing: DataConfig, source: str, root: str | None, target: RunDir) -> RunDir:
    """Ingest ``source`` (at ``root``) into ``target`` with the task and ``PREPROCESSING`` settings of
    ``preprocessing`` (the models' own: a run's ``data_config_of``, a bundle's recorded data section)."""
    from pipelines.ingest import ingest

    settings = {f"data.{key}": getattr(preprocessing, key) for key in ("task", *PREPROCESSING)}
    ingest(apply_overrides(config, {**settings, "data.source": source, "data.root": root}), target)
    return target


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run directory with trained models")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--split", choices=[*SPLITS, "all"],
                        help="split to score (default: evaluate.split; 'all' for an external data set)")
    parser.add_argument("--tta", action="store_true", default=None, help="test-time augmentation (flips)")
    parser.add_argument("--data", help="score another already ingested run directory (an external test set)")
    parser.add_argument("--source", help="ingest and score another data set of this source kind "
                                         f"({', '.join(s for s in SOURCES if s != 'synthetic')})")
    parser.add_argument("--root", help="folder or file of --source")
    parser.add_argument("--out", help="evaluation folder, for --model-uri BUNDLE or models:/...: models with no run "
                                      "directory (a run's evaluation goes to RUN/eval)")
    parser.add_argument("--force", action="store_true", help="re-evaluate even if nothing changed")
    add_model_source_arguments(parser)


def run_command(name: str, args: argparse.Namespace) -> int:
    from lesion.resolve import is_bundle

    if args.data and args.source:
        raise ValueError("give either --data (an ingested run) or --source/--root, not both")
    uri = model_uri_of(args)
    config = models_config(args, {"evaluate.tta": args.tta})
    if uri.startswith("models:/") or is_bundle(uri):
        result, report_file = _evaluate_without_run(config, uri, args)
    else:
        if args.out:
            raise ValueError("--out is for --model-uri BUNDLE or models:/...; a run's evaluation goes to RUN/eval "
                             "(RUN/eval/external/NAME for --data/--source)")
        run = RunDir(uri)
        data_run = None
        if args.data:
            data_run = RunDir(args.data)
        elif args.source:
            data_run = ingest_external(config, run, args.source, args.root)
        split = args.split or ("all" if data_run is not None else config.evaluate.split)
        result = evaluate(config, run, split, data_run, force=args.force)
        report_file = output_dir(run, data_run, config.inference.site) / "report.html"
    print(f"{'model':<22} {'acc':>6} {'bal.acc':>8} {'macroAUC':>9} {'malAUC':>7} {'ECE':>6}")
    for model, m in result["models"].items():
        print(f"{model:<22} {_num(m['accuracy']):>6} {_num(m['balanced_accuracy']):>8} {_num(m['macro']['auc']):>9} "
              f"{_num(m['binary']['auc']):>7} {_num(m['calibration']['ece_after']):>6}")
    print(f"report: {report_file}")
    return 0


def _evaluate_without_run(config: Config, uri: str, args: argparse.Namespace) -> tuple[dict, Path]:
    """``--model-uri BUNDLE --source S --out DIR`` (or ``--data``): the labelled source ingested into
    ``DIR/ingested`` with the models' own preprocessing, then scored into ``DIR``."""
    if not args.out:
        raise ValueError(f"{uri} is not a run directory: give --out DIR for the evaluation")
    if not (args.data or args.source):
        raise ValueError(f"{uri} carries no data of its own: give a labelled --source (with --root) or --data")
    out = Path(args.out)
    if args.data:
        data_run = RunDir(args.data)
    else:
        preprocessing = load_inference(uri, config, load=False).data_config
        data_run = ingest_with(config, preprocessing, args.source, args.root, RunDir(out / "ingested"))
    result = evaluate_models(config, uri, data_run, out, args.split or "all")
    return result, out / "report.html"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
