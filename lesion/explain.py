"""Explanations: class activation maps (CAMs) from pytorch-grad-cam, overlays, and measures of their quality.

- ``explain_batch`` runs one of ``METHODS`` on a batch at the model's Grad-CAM layer (``TARGET_LAYERS``, the
  architecture table's ``model_spec(name)["target_layer"]``) and returns maps in [0, 1] at the input size.
- ``ensemble_cam`` is the ensemble's map: the ensemble-weighted mean of its members' maps.
- ``cam_mask_scores`` says how well maps agree with lesion masks (energy inside the mask, pointing game) next to the
  chance level; ``faithfulness`` says how much the model's confidence depends on the highlighted pixels (grad-cam's
  ROAD and CAM-times-image confidence change).
- ``Explainer`` explains one image with a run's inference core (``lesion.inference``): ``lesion explain``, the
  served Grad-CAM deployment.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import neighbors_weights as ROAD_NEIGHBOURS
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from torch import nn

from lesion.inference import Inference
from lesion.models import MODEL_NAMES, model_spec, unwrap
from lesion.records import CheckpointRecord
from lesion.vocabulary import CAM_METHODS

log = logging.getLogger(__name__)

# name -> grad-cam class. Gradient-based: gradcam, gradcam++, layercam; gradient-free: scorecam (one forward pass
# per channel of the target layer: slow), eigencam (first principal component of the activations; class-agnostic).
_CAM_CLASSES = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "eigencam": EigenCAM,
}
METHODS = {name: _CAM_CLASSES[name] for name in CAM_METHODS}  # every method of the vocabulary, in its order
SCORECAM_BATCH = 64  # masked images per forward pass inside Score-CAM
ENSEMBLE = "ensemble"

# The one table of Grad-CAM layers lives in the architecture table (lesion.models); this is a read-only view of it.
TARGET_LAYERS: Mapping[str, Callable[[nn.Module], nn.Module]] = MappingProxyType(
    {name: model_spec(name)["target_layer"] for name in MODEL_NAMES}
)


def target_layer(model: nn.Module, name: str) -> nn.Module:
    """The Grad-CAM layer of a built model of architecture ``name`` (DDP / compile wrappers are looked through)."""
    if name not in TARGET_LAYERS:
        raise ValueError(f"no Grad-CAM layer for model {name!r}; known models: {', '.join(TARGET_LAYERS)}")
    return TARGET_LAYERS[name](unwrap(model))


def _class_targets(classes: Sequence[int], binary: bool) -> list:
    """grad-cam targets on the raw output: the logit of each class (binary: +logit for 1, -logit for 0)."""
    return [BinaryClassifierOutputTarget(int(c)) if binary else ClassifierOutputTarget(int(c)) for c in classes]


class _BinaryProbabilityTarget:
    """Probability of class ``category`` (0 benign, 1 malignant) from a one-logit output (grad-cam target protocol)."""

    def __init__(self, category: int):
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(model_output)
        return p if self.category == 1 else 1 - p


def _probability_targets(classes: Sequence[int], binary: bool) -> list:
    return [_BinaryProbabilityTarget(int(c)) if binary else ClassifierOutputSoftmaxTarget(int(c)) for c in classes]


def predicted_classes(model: nn.Module, record: CheckpointRecord, x: torch.Tensor) -> np.ndarray:
    """Predicted class index per image of a normalised batch (binary: 1 when the logit is > 0)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(x.to(device)).float().cpu()
    if record.binary:
        return (logits.reshape(-1) > 0).long().numpy()
    return logits.argmax(dim=1).numpy()


def _check_targets(targets, n: int, record: CheckpointRecord) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    classes = 2 if record.binary else record.num_classes
    if len(targets) != n or targets.min(initial=0) < 0 or targets.max(initial=0) >= classes:
        raise ValueError(f"targets must hold one class index in [0, {classes}) per image ({n} images), got {targets}")
    return targets


def explain_batch(model: nn.Module, record: CheckpointRecord, x: torch.Tensor, targets: Sequence[int] | None = None,
                  method: str = "gradcam", batch_size: int = 32) -> np.ndarray:
    """Class activation maps of a normalised batch ``x`` (N, 3, H, W): float32 (N, H, W) in [0, 1].

    ``record`` is the model's checkpoint record (its architecture picks the target layer; a binary model has one
    logit).
    ``targets``: class index per image to explain (binary: 0 benign, 1 malignant); None explains the predicted class.
    Each map is min-max scaled on its own (grad-cam's convention); a map with no positive evidence is all zeros.
    Gradients are enabled here even when called under ``torch.no_grad``/``inference_mode``; the model is put in
    eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(METHODS)}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"explain_batch expects a normalised (N, 3, H, W) batch, got shape {tuple(x.shape)}")
    model = unwrap(model).eval()
    layer = target_layer(model, record.arch)
    binary = record.binary
    maps = []
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()  # an inference tensor (made under inference_mode) cannot enter autograd
        if targets is None:
            targets = predicted_classes(model, record, x)
        targets = _check_targets(targets, len(x), record)
        cam = METHODS[method](model, target_layers=[layer])
        cam.batch_size = SCORECAM_BATCH
        try:
            for start in range(0, len(x), batch_size):
                # requires_grad on the input: the layer's output needs a gradient even when the backbone is frozen
                chunk = x[start:start + batch_size].requires_grad_(True)
                maps.append(cam(chunk, _class_targets(targets[start:start + batch_size], binary)))
        finally:
            cam.activations_and_grads.release()
    if not maps:
        return np.zeros((0, *x.shape[-2:]), np.float32)
    return np.clip(np.concatenate(maps).astype(np.float32), 0.0, 1.0)


def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, H, W) float32 with bilinear interpolation (no-op when already that size)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1:] == tuple(size):
        return maps
    height, width = size
    return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps])


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3): ``cam`` (h, w, values in [0, 1]) resized to the image, in the jet colormap, blended in."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"overlay expects one (H, W) map, got shape {cam.shape}")
    cam = np.clip(_resize_maps(cam[None], image.shape[:2])[0], 0.0, 1.0)
    return show_cam_on_image(image.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=image_weight)


def ensemble_cam(cams_by_model: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                 size: int | tuple[int, int] | None = None) -> np.ndarray:
    """The ensemble's maps (N, H, W): the weighted mean of each member's maps (N, h_m, w_m) after resizing them to
    ``size`` (default: the largest member map). ``weights`` None means equal weights; otherwise it must name exactly
    the members in ``cams_by_model``."""
    if not cams_by_model:
        raise ValueError("ensemble_cam: no member maps given")
    weights = dict(weights) if weights is not None else {name: 1.0 for name in cams_by_model}
    if set(weights) != set(cams_by_model):
        raise ValueError(f"ensemble_cam: weights name {sorted(weights)} but maps were given for {sorted(cams_by_model)}")
    total = float(sum(weights.values()))
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"ensemble_cam: weights must be >= 0 with a positive sum, got {weights}")
    if size is None:
        size = max((np.shape(m)[1:] for m in cams_by_model.values()), key=lambda s: s[0] * s[1])
    elif isinstance(size, int):
        size = (size, size)
    counts = {name: len(m) for name, m in cams_by_model.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"ensemble_cam: members explain different numbers of images: {counts}")
    return sum(weights[name] / total * _resize_maps(cams_by_model[name], tuple(size)) for name in weights)


def cam_mask_scores(cams: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> dict[str, float]:
    """How well maps (N, h, w) agree with lesion masks (N, H, W), over images whose mask is not empty.

    - energy_inside: mean share of a map's total value lying inside the mask (energy-based pointing game,
      Score-CAM paper); a map with no energy counts 0.
    - pointing_game: share of images whose map maximum (first one in row-major order) falls inside the mask
      dilated by ``tolerance`` pixels; a map with no energy counts as a miss.
    - mask_share: mean share of the image the mask covers: the chance level of both scores above (a map that is
      uniform, or a random point, scores this on average).
    - n: images scored; degenerate: how many of them had an all-zero map.
    Maps are resized to the mask size first.
    """
    masks = np.asarray(masks).astype(bool)
    cams = np.asarray(cams, dtype=np.float32)
    if masks.ndim == 2:
        masks, cams = masks[None], cams[None]
    if cams.ndim != 3 or masks.ndim != 3 or len(cams) != len(masks):
        raise ValueError(f"cam_mask_scores expects maps (N, h, w) and masks (N, H, W), got {cams.shape} and "
                         f"{masks.shape}")
    keep = masks.reshape(len(masks), -1).any(axis=1)
    if not keep.any():
        raise ValueError("cam_mask_scores: every mask is empty; no image can be scored")
    masks = masks[keep]
    cams = np.maximum(_resize_maps(cams[keep], masks.shape[1:]), 0.0)
    energy = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    share = np.divide(inside, energy, out=np.zeros_like(energy), where=energy > 0)
    if tolerance > 0:
        kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
        targets = np.stack([cv2.dilate(m.astype(np.uint8), kernel).astype(bool) for m in masks])
    else:
        targets = masks
    flat_max = cams.reshape(len(cams), -1).argmax(axis=1)
    hits = targets.reshape(len(targets), -1)[np.arange(len(targets)), flat_max] & (energy > 0)
    return {
        "energy_inside": float(share.mean()),
        "pointing_game": float(hits.mean()),
        "mask_share": float(masks.mean()),
        "n": int(len(masks)),
        "degenerate": int((energy <= 0).sum()),
    }


class LinearInfill:
    """ROAD's imputer: grad-cam's ``NoisyLinearImputer`` (each removed pixel the weighted mean of its 8 neighbours,
    one sparse linear system per image, plus noise), solving the same system faster: assembled at once as a sparse
    matrix and factorised with SuperLU's symmetric ordering and mode, where grad-cam fills a LIL matrix pixel by
    pixel and uses the default ordering with pivoting. The noise comes from the imputer's own generator (seeded), so
    that scores are reproducible when several imputers run in threads. An image with no pixel kept is filled with its
    channel means (the system has no unique solution there)."""

    def __init__(self, noise: float = 0.01, seed: int = 0):
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``img`` (C, H, W), ``mask`` (H, W) with 1 = keep, 0 = impute -> the infilled image (C, H, W)."""
        channels, height, width = img.shape
        keep = mask.reshape(-1).cpu().numpy() > 0.5
        missing = np.flatnonzero(~keep)
        values = img.reshape(channels, -1).cpu().numpy().astype(np.float64)
        if not len(missing):
            return img.clone()
        if not keep.any():
            solution = np.broadcast_to(values.mean(axis=1), (len(missing), channels))
        else:
            solution = self._solve(values, keep, missing, height, width)
        out = img.reshape(channels, -1).clone()
        fill = torch.as_tensor(np.ascontiguousarray(solution.T), dtype=img.dtype)
        out[:, torch.as_tensor(missing)] = fill + self.noise * torch.randn(fill.shape, generator=self.generator)
        return out.reshape_as(img)

    @staticmethod
    def _solve(values: np.ndarray, keep: np.ndarray, missing: np.ndarray, height: int, width: int) -> np.ndarray:
        n = len(missing)
        unknown = np.full(height * width, -1)
        unknown[missing] = np.arange(n)
        y, x = np.divmod(missing, width)
        weight_inside = np.ones(n)
        rhs = np.zeros((n, values.shape[0]))
        rows, cols, entries = [], [], []
        for (dy, dx), weight in ROAD_NEIGHBOURS:
            ny, nx = y + dy, x + dx
            inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
            weight_inside[~inside] -= weight
            source = np.flatnonzero(inside)
            neighbour = (ny * width + nx)[inside]
            known = keep[neighbour]
            rhs[source[known]] -= weight * values[:, neighbour[known]].T
            rows.append(source[~known])
            cols.append(unknown[neighbour[~known]])
            entries.append(np.full(int((~known).sum()), weight))
        rows.append(np.arange(n))
        cols.append(np.arange(n))
        entries.append(-weight_inside)
        matrix = csc_matrix((np.concatenate(entries), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        # symmetric and diagonally dominant (nonsingular once any pixel is kept): no pivoting needed, so SuperLU's
        # symmetric mode, faster to the same solution (docs/decisions.md, "ROAD infill solver")
        return splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                    options={"SymmetricMode": True}).solve(rhs)


def road(model: nn.Module, x: torch.Tensor, cams: np.ndarray, targets: Sequence, percentiles: Sequence[int],
         most_relevant_first: bool, seed: int = 0) -> np.ndarray:
    """grad-cam's ROAD average over ``percentiles`` (``ROADMostRelevantFirstAverage`` or the least-relevant-first
    one) with ``LinearInfill`` as the imputer: the change of each image's target score, (N,)."""
    remove = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    infill = LinearInfill(seed=seed)
    averager = AveragerAcrossThresholds(lambda p: PerturbationConfidenceMetric(remove(p, infill)), list(percentiles))
    return averager(x, cams, targets, model)


def faithfulness(model: nn.Module, record: CheckpointRecord, x: torch.Tensor, cams: np.ndarray,
                 targets: Sequence[int] | None = None, percentiles: Sequence[int] = (20, 40, 60, 80),
                 seed: int = 0) -> dict[str, float]:
    """Whether the model's confidence in the explained class depends on the pixels the maps highlight.

    All scores are changes of the explained class's probability (softmax, or sigmoid for one logit), averaged over
    images; grad-cam's definitions:
    - road_morf: ROAD, most relevant first: mean change after imputing (noisy linear infill) the pixels above each
      of ``percentiles`` of the map (grad-cam keeps the pixels below the percentile). More negative = more faithful.
    - road_lerf: ROAD, least relevant first: the same removing the least relevant pixels. Near 0 = more faithful.
    - road: (road_lerf - road_morf) / 2, grad-cam's ROADCombined. Higher = more faithful.
    - confidence_change: change after multiplying the input by the map (CamMultImageConfidenceChange: keep only
      what the map shows). Near 0 or positive = the highlighted region alone carries the decision.
    ``targets`` None uses the predicted class; ``cams`` are resized to the input size. ROAD's imputation noise comes
    from ``seed`` (``LinearInfill``), not from the global random state, so calls may run in parallel threads.
    """
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    x = x.detach().to(device)
    if targets is None:
        targets = predicted_classes(model, record, x)
    targets = _check_targets(targets, len(x), record)
    probability_targets = _probability_targets(targets, record.binary)
    cams = _resize_maps(cams, tuple(x.shape[-2:]))
    if len(cams) != len(x):
        raise ValueError(f"faithfulness: {len(cams)} maps for {len(x)} images")
    with torch.no_grad():
        morf = road(model, x, cams, probability_targets, percentiles, most_relevant_first=True, seed=seed)
        lerf = road(model, x, cams, probability_targets, percentiles, most_relevant_first=False, seed=seed)
        change = CamMultImageConfidenceChange()(x, cams, probability_targets, model)
    return {
        "road": float(np.mean((lerf - morf) / 2)),
        "road_morf": float(np.mean(morf)),
        "road_lerf": float(np.mean(lerf)),
        "confidence_change": float(np.mean(change)),
        "n": int(len(x)),
    }


# ------------------------------------------------------------------------------------------ one image of a run


def _read_image_bytes(image: bytes | str | Path) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path.read_bytes()


@dataclass
class Explainer:
    """Grad-CAM for single images over a run's inference core (``lesion.inference.Inference``, members loaded):
    the prediction is the core's answer, so ``lesion explain`` and the served /v1/explain agree with /v1/predict.

    Thread-safe: one explanation runs at a time (the CAM hooks sit on the shared models).
    """

    core: Inference
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def targets(self) -> list[str]:
        """What can be explained: ``ensemble`` and each member."""
        return [ENSEMBLE, *self.core.names]

    def explain(self, image: bytes | str | Path, model: str = ENSEMBLE, method: str = "gradcam"
                ) -> tuple[dict, np.ndarray]:
        """Preprocess an encoded image (bytes or file) as at ingest, predict it and explain ``model``'s prediction.

        Returns (answer, overlay): answer = the core's answer (``Inference.answers``) plus ``explained_model``,
        ``explained_class`` (the class the overlay explains: the ensemble's predicted class, or a single model's own
        prediction) and ``method``; overlay = uint8 RGB at the preprocessed image size (what the models saw). The
        ensemble's map is the spec-weighted mean of its members' maps.
        """
        self._check(model, method)  # refuse an unknown model or method before reading the image
        return self.explain_preprocessed(self.core.preprocess(_read_image_bytes(image)), model, method)

    def explain_preprocessed(self, img: np.ndarray, model: str = ENSEMBLE, method: str = "gradcam"
                             ) -> tuple[dict, np.ndarray]:
        """``explain`` for an image already through the ingest preprocessing: uint8 RGB (S, S, 3)."""
        answer, cam = self.explain_map(img, model, method)
        return answer, overlay(np.asarray(img), cam)

    def explain_map(self, img: np.ndarray, model: str = ENSEMBLE, method: str = "gradcam"
                    ) -> tuple[dict, np.ndarray]:
        """``explain_preprocessed`` giving the heat map itself, float32 (S, S) in [0, 1], instead of the overlay."""
        self._check(model, method)
        with self.lock:
            return self._explain(np.array(img), model, method)  # a writable copy (Ray's arrays are read-only)

    def _check(self, model: str, method: str) -> None:
        if model not in self.targets:
            raise ValueError(f"model {model!r} is not one of this run's models; available: {', '.join(self.targets)}")
        if method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; known: {', '.join(METHODS)}")

    def _explain(self, img: np.ndarray, model: str, method: str) -> tuple[dict, np.ndarray]:
        core = self.core
        probs = core.probabilities(img[None])
        answer = core.answers(probs)[0]
        if model == ENSEMBLE:
            names, weights = core.names, core.spec.weights
            explained = core.classes.index(answer["predicted_class"])
        else:
            names, weights = [model], None
            explained = int(np.argmax(probs[model][0]))
        cams = {}
        for name in names:
            member = core.member(name)
            cams[name] = explain_batch(member.net, member.checkpoint, member.input_transform(img[None]), [explained],
                                       method)
        cam = ensemble_cam(cams, weights, size=img.shape[:2])[0] if model == ENSEMBLE else cams[model][0]
        answer.update({"explained_model": model, "explained_class": core.classes[explained], "method": method})
        return answer, _resize_maps(cam[None], img.shape[:2])[0]
