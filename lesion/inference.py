"""The one inference core: a run's trained models, its preprocessing, its ensemble spec and the answer builder.

Everything that turns images into answers builds an ``Inference`` with ``Inference.from_run(run, config)`` and calls
it: evaluation's Ray Data actors, each Serve deployment, ``lesion predict``, ``lesion explain`` (through
``lesion.explain.Explainer``) and the explanation-quality scores. So they cannot disagree.

- Models: each member is loaded once per process (``Inference.load``) with its checkpoint record
  (``lesion.records.CheckpointRecord``: input transform and provenance: checkpoint sha256, training run id,
  pretrained origin). ``unloaded()`` is the same core without weights, cheap to send to Ray actors
  and Serve replicas, which load the members they run.
- Preprocessing: the data section ingest recorded in the run's manifest (``data_config_of``), so a new image is
  decoded, cropped, cleaned and resized exactly like the training images.
- Ensemble spec (``lesion.ensemble.EnsembleSpec``): weights, temperatures and thresholds fitted on the validation
  split for one inference mode, ``tta`` (the mean over four flips) or a single pass. The spec records its mode and
  the core applies that mode to every member, so a threshold is never used on probabilities it was not fitted for.
  Each mode, and each subset of the trained models, has its own spec file (``spec_path``); a spec whose fingerprint
  (checkpoints, data, fitting options, mode) no longer matches is refitted, the same way for every caller.
- Answers: ``answers(probs_by_model)`` is the one answer builder: calibrated probabilities, malignant probability,
  decision with its reason, per-model probabilities, model versions, margin and the OOD score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lesion import calibration, ensemble
from lesion.config import Config, DataConfig, config_from_dict
from lesion.data.preprocess import preprocess_bytes
from lesion.data.shards import load_split, read_info
from lesion.labels import class_names
from lesion.models import load_trained, logits_to_probs
from lesion.records import CheckpointRecord
from lesion.rundir import RunDir, fingerprint
from lesion.sites import SiteProfile, check_site

log = logging.getLogger(__name__)

TTA_FLIPS = ((), (3,), (2,), (2, 3))  # identity, horizontal, vertical, both (dims of an N,3,H,W tensor)
SPEC_VERSION = 3  # bump when the fitting of the spec changes (its history: docs/decisions.md, "Ensemble spec")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(model_dir: str | Path) -> str:
    """SHA-256 of a model's ``best.pt``."""
    return file_sha256(Path(model_dir) / "best.pt")


def data_config_of(run: RunDir, config: Config) -> DataConfig:
    """How a run's images are preprocessed: the data section ingest recorded in the manifest, so new images are
    preprocessed exactly like the training images. Runs without that record use ``config.data`` with the image size
    of ``data/info.json``."""
    recorded = run.manifest().get("data", {}).get("config")
    if recorded is not None:
        return config_from_dict({"data": recorded}).data
    return dataclasses.replace(config.data, image_size=read_info(run.root).image_size)


def predict_proba(net: nn.Module, record: CheckpointRecord, images: np.ndarray, *, tta: bool, batch_size: int = 64,
                  device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) of preprocessed uint8 images (N, S, S, 3) through the evaluation transform; with
    ``tta`` the mean over the four flips."""
    out = []
    flips = TTA_FLIPS if tta else ((),)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = np.array(images[start:start + batch_size])  # a writable copy (shard and Ray views are read-only)
            x = record.input_transform(chunk, device)
            probs = sum(logits_to_probs(net(torch.flip(x, f) if f else x).float(), record.task) for f in flips)
            out.append((probs / len(flips)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(class_names(record.task))), np.float32)


@dataclass
class Member:
    """One trained model, loaded once (eval mode), with its checkpoint record."""

    name: str  # the variant (its folder under RUN/models/)
    net: nn.Module
    checkpoint: CheckpointRecord  # what the model is and takes (lesion.models.load_trained), with checkpoint_sha256
    device: str = "cpu"

    @classmethod
    def load(cls, name: str, model_dir: str | Path, device: str = "cpu") -> Member:
        """Load ``model_dir/best.pt`` onto ``device``, in channels-last memory format (as trained, and faster on the
        CPU: docs/decisions.md, "Channels-last inference")."""
        net, checkpoint = load_trained(model_dir, device=device)
        return cls(name, net.to(memory_format=torch.channels_last), checkpoint, device)

    def input_transform(self, images) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> this model's input on its device."""
        return self.checkpoint.input_transform(images, self.device)

    @property
    def version(self) -> dict[str, Any]:
        """The checkpoint's sha256 and the training run id."""
        return {"checkpoint_sha256": self.checkpoint.checkpoint_sha256, "run_id": self.checkpoint.run_id}

    def summary(self) -> dict[str, Any]:
        """What /v1/models says about this model."""
        record = self.checkpoint
        return {"name": self.name, "arch": record.arch, "task": record.task, "classes": list(record.classes),
                "input_size": record.input_size, "pretrained": record.pretrained_origin,
                "best_epoch": record.best_epoch, **self.version}

    def probs(self, images: np.ndarray, *, tta: bool, batch_size: int = 64) -> np.ndarray:
        """Raw class probabilities (N, C) of preprocessed uint8 images (N, S, S, 3)."""
        return predict_proba(self.net, self.checkpoint, images, tta=tta, batch_size=batch_size, device=self.device)


def spec_path(run: RunDir, models: list[str], tta: bool) -> Path:
    """The spec file of a mode and a set of models: ``eval/ensemble.json`` for every trained model in a single pass,
    ``-a+b`` for a subset (``lesion serve --models a,b``), ``-tta`` for the flip mode."""
    subset = "" if sorted(models) == run.trained_models() else "-" + "+".join(sorted(models))
    return run.eval / f"ensemble{subset}{'-tta' if tta else ''}.json"


def spec_fingerprint(run: RunDir, config: Config, models: list[str], tta: bool) -> str:
    """What a spec depends on: the members' checkpoints, the data, the fitting options and the inference mode."""
    shas = {name: checkpoint_sha256(run.model_dir(name)) for name in models}
    ev, sv = config.evaluate, config.serve
    return fingerprint(SPEC_VERSION, shas, read_info(run.root).fingerprint, ev.ensemble_weights, tta,
                       sv.target_sensitivity, sv.ood_quantile, ev.prior_correction)


def fit_spec(run: RunDir, config: Config, members: dict[str, Member], tta: bool) -> ensemble.EnsembleSpec:
    """Fit the ensemble on the run's validation split with the members' probabilities in mode ``tta``."""
    val = load_split(run.root, "val")
    batch = config.evaluate.batch_size
    probs = {name: m.probs(val.images, tta=tta, batch_size=batch) for name, m in members.items()}
    sv = config.serve
    task = next(iter(members.values())).checkpoint.task
    spec = ensemble.fit(probs, val.labels, task=task, weighting=config.evaluate.ensemble_weights,
                        target_sensitivity=sv.target_sensitivity, ood_quantile=sv.ood_quantile,
                        uncertain_margin=sv.uncertain_margin, tta=tta,
                        prior_correction=config.evaluate.prior_correction)
    spec.model_versions = {name: m.version for name, m in members.items()}
    log.info("ensemble fitted on %d validation images (%s): weights %s, T=%.3f, prior tau %.2f, malignant "
             "threshold %.3f", len(val.labels), "flip TTA" if tta else "single pass",
             {n: round(w, 3) for n, w in spec.weights.items()}, spec.temperature, spec.prior_tau,
             spec.malignant_threshold)
    return spec


def _check_models(run: RunDir, models: list[str] | None) -> list[str]:
    trained = run.trained_models()
    if not trained:
        raise FileNotFoundError(f"no trained models under {run.models}: run `lesion train --run {run.root}` first")
    names = list(models or trained)
    missing = [name for name in names if name not in trained]
    if missing:
        raise FileNotFoundError(f"{run.models}: no trained checkpoint (best.pt) for {', '.join(missing)}; "
                                f"trained models: {', '.join(trained)}")
    return names


@dataclass
class Inference:
    """A run's inference: members, preprocessing, the ensemble spec of one inference mode, and the answers."""

    spec: ensemble.EnsembleSpec
    data_config: DataConfig
    model_dirs: dict[str, str]  # member name -> model folder, in spec order
    spec_file: str = ""  # where the spec was read from or written to
    batch_size: int = 64
    members: dict[str, Member] = field(default_factory=dict)  # the loaded ones (see ``load``)
    # what loads a member (lesion.engines): None is eager torch (``Member.load``); the answers are the core's either way
    loader: Any = None
    site: SiteProfile | None = None  # the site profile applied (``with_site``), None: as trained

    @classmethod
    def from_run(cls, run: RunDir, config: Config, models: list[str] | None = None, *, tta: bool | None = None,
                 device: str = "cpu", load: bool = True) -> Inference:
        """The inference core of ``run``'s trained ``models`` (default: all) in mode ``tta`` (default:
        ``config.evaluate.tta``). The spec is read from ``spec_path`` when its fingerprint is current, else fitted on
        the validation split and written there. ``load`` keeps every member loaded on ``device``."""
        names = _check_models(run, models)
        tta = config.evaluate.tta if tta is None else bool(tta)
        path = spec_path(run, names, tta)
        fp = spec_fingerprint(run, config, names, tta)
        model_dirs = {name: str(run.model_dir(name)) for name in names}
        members: dict[str, Member] = {}
        spec = ensemble.load(path) if path.is_file() else None
        if spec is None or spec.fingerprint != fp:
            if spec is not None:
                log.info("%s is out of date (checkpoints, data or options changed): refitting on validation", path)
            members = {name: Member.load(name, model_dirs[name], device) for name in names}
            tasks = {name: m.checkpoint.task for name, m in members.items()}
            if len(set(tasks.values())) != 1:
                raise ValueError(f"models of {run.root} were trained for different tasks: {tasks}")
            spec = fit_spec(run, config, members, tta)
            spec.fingerprint = fp
            ensemble.save(spec, path)
        spec.uncertain_margin = config.serve.uncertain_margin
        core = cls(spec, data_config_of(run, config), model_dirs, str(path), config.evaluate.batch_size, members)
        return core.load(device=device) if load else core.unloaded()

    @property
    def names(self) -> list[str]:
        return list(self.spec.models)

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def tta(self) -> bool:
        """The inference mode the spec was fitted for, applied to every member."""
        return self.spec.tta

    def load(self, names: list[str] | None = None, device: str = "cpu") -> Inference:
        """Load the members ``names`` (default: all) that are not loaded yet; returns this core."""
        for name in names or self.names:
            if name not in self.model_dirs:
                raise KeyError(f"model {name!r} is not an ensemble member; members: {', '.join(self.names)}")
            if name not in self.members:
                self.members[name] = (self.loader or Member.load)(name, self.model_dirs[name], device)
        return self

    def unloaded(self) -> Inference:
        """This core without loaded weights (to send to other processes, which ``load`` what they run)."""
        return dataclasses.replace(self, members={})

    @property
    def engine(self) -> str:
        """What runs the members' forward passes: ``torch`` or ``onnxruntime`` (``lesion.engines``)."""
        return getattr(self.loader, "engine", "torch")

    def on_torch(self) -> Inference:
        """This core on eager torch, members unloaded (Grad-CAM needs gradients, whatever engine predicts)."""
        return self if self.loader is None else dataclasses.replace(self, members={}, loader=None)

    def with_site(self, profile: SiteProfile) -> Inference:
        """This core adapted to a calibrated site (``lesion.sites``): its colour gains before the models and its
        refitted spec fields; refused when the profile was made for other checkpoints or another inference mode."""
        check_site(profile, self.versions(), self.tta)
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, **profile.spec), site=profile)

    def member(self, name: str) -> Member:
        """A loaded member."""
        if name not in self.members:
            raise KeyError(f"model {name!r} is not loaded here (loaded: {', '.join(self.members) or 'none'})")
        return self.members[name]

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the uint8 (S, S, 3) image the models see (the ingest preprocessing)."""
        return preprocess_bytes(data, self.data_config)

    def member_probs(self, name: str, images: np.ndarray) -> np.ndarray:
        """One member's raw probabilities (N, C) of preprocessed images, in the spec's inference mode."""
        images = self.site.adjust(images) if self.site is not None else images
        return self.member(name).probs(images, tta=self.tta, batch_size=self.batch_size)

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every member's raw probabilities (N, C) of preprocessed images (N, S, S, 3)."""
        return {name: self.member_probs(name, images) for name in self.names}

    def combine(self, probs_by_model: dict[str, np.ndarray]) -> np.ndarray:
        """The ensemble's calibrated probabilities (N, C)."""
        return ensemble.combine(probs_by_model, self.spec)

    def versions(self) -> dict[str, dict[str, Any]]:
        """Each member's checkpoint sha256 and training run id (the loaded checkpoint, else the spec's record)."""
        return {name: self.members[name].version if name in self.members else self.spec.model_versions.get(name, {})
                for name in self.names}

    def answers(self, probs_by_model: dict[str, np.ndarray], versions: dict[str, dict] | None = None) -> list[dict]:
        """The API's answer per image from each member's raw probabilities (N, C): calibrated ensemble
        probabilities, the malignant probability against the validation-chosen threshold, the decision
        (``lesion.ensemble.decide``) with its reason, margin, OOD score, per-model probabilities and versions."""
        spec, classes = self.spec, self.classes
        final = self.combine(probs_by_model)
        decisions, reasons = ensemble.decide(final, spec)
        ood = calibration.ood_score(final)
        top2 = np.sort(final, axis=1)[:, -2:]
        p_mal = ensemble.malignant_probability(final, spec)
        versions = versions or self.versions()
        return [{
            "predicted_class": classes[int(np.argmax(final[k]))],
            "probabilities": {c: float(p) for c, p in zip(classes, final[k])},
            "malignant_probability": float(p_mal[k]),
            "malignant_threshold": float(spec.malignant_threshold),
            "decision": decisions[k],
            "decision_reason": reasons[k],
            "threshold_decision": "malignant" if p_mal[k] >= spec.malignant_threshold else "benign",
            "margin": float(top2[k, 1] - top2[k, 0]),
            "ood_score": float(ood[k]),
            "ood_threshold": float(spec.ood_threshold),
            "tta": spec.tta,
            "models": {name: {c: float(p) for c, p in zip(classes, probs_by_model[name][k])} for name in self.names},
            "model_versions": {name: versions[name] for name in self.names},
            "site": self.site.name if self.site is not None else None,
        } for k in range(len(final))]

    def predict(self, images: np.ndarray) -> list[dict]:
        """Answers for preprocessed uint8 images (N, S, S, 3) with the loaded members."""
        return self.answers(self.probabilities(images))

    def describe(self, summaries: list[dict] | None = None) -> dict:
        """The ensemble for /v1/models: each member's summary (default: the loaded members') with its weight, the
        thresholds, the temperature and the inference mode."""
        spec = self.spec
        summaries = summaries if summaries is not None else [self.member(n).summary() for n in self.names]
        return {
            "models": [{**s, "ensemble_weight": spec.weights[s["name"]]} for s in summaries],
            "malignant_threshold": spec.malignant_threshold,
            "target_sensitivity": spec.target_sensitivity,
            "ood_threshold": spec.ood_threshold,
            "uncertain_margin": spec.uncertain_margin,
            "temperature": spec.temperature,
            "tta": spec.tta,
            "site": self.site.summary() if self.site is not None else None,
        }
