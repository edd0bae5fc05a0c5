"""The Python API: a trained classifier in a notebook or a script, without Ray.

``lesion.load(uri)`` turns a run directory, an export bundle or a registered model (``models:/NAME@ALIAS``) into a
``Classifier`` through the one resolver every command uses (``lesion.resolve.load_inference``).
``Classifier.predict`` answers with ``Prediction`` records and ``Classifier.explain`` with an ``Explanation`` (heat
map and overlay). Images go through the run's inference core (``lesion.inference.Inference``): decoded and
preprocessed as at ingest, scored by every model in the ensemble's inference mode, so the answers are those of
``lesion predict`` and ``/v1/predict``.

    >>> import os
    >>> import lesion
    >>> from lesion.data.synthetic import generate
    >>> clf = lesion.load(os.environ["LESION_RUN"])  # a trained run directory, or an export bundle
    >>> image = next(generate(1, 96, seed=3))["image"]  # a drawn lesion: uint8 RGB (96, 96, 3)
    >>> result = clf.predict(image)
    >>> result.label in clf.classes
    True
    >>> round(sum(result.probabilities.values()), 6)
    1.0
    >>> result.decision in ("malignant", "benign", "uncertain")
    True
    >>> result.abstained == (result.decision == "uncertain")
    True
    >>> sorted(result.model_versions) == sorted(clf.models)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from lesion.data.dicom import DicomUids, dicom_uids
from lesion.data.preprocess import ImageError, preprocess

if TYPE_CHECKING:
    from lesion.explain import Explainer
    from lesion.inference import Inference

ENSEMBLE = "ensemble"  # explain the ensemble's prediction (the spec-weighted mean of its members' heat maps)
ImageInput = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """The ensemble's answer for one image (the fields of ``/v1/predict``'s answer, named for Python)."""

    label: str  # the most probable class
    probabilities: dict[str, float]  # the ensemble's calibrated probability of each class (sum 1)
    malignant_probability: float  # the calibrated probability that the lesion is malignant
    malignant_threshold: float  # chosen on validation for the target sensitivity
    decision: str  # "malignant", "benign" or "uncertain" (abstained)
    abstained: bool  # the ensemble declined to decide: the image looks unlike the training data, or is ambiguous
    reason: str  # why this decision (for an abstention: out of distribution, or the top two classes too close)
    margin: float  # gap between the two most probable classes
    ood_score: float  # out-of-distribution score, against ``ood_threshold`` chosen on validation
    model_probabilities: dict[str, dict[str, float]]  # each model's own (uncalibrated) probabilities
    model_versions: dict[str, dict[str, Any]]  # which models answered: checkpoint sha256 and training run id
    site: str | None = None  # the site profile the answer was calibrated with (``lesion calibrate``), None: as trained
    source: str | None = None  # the file, when the input was a path
    sop_instance_uid: str | None = None  # DICOM input: SOP Instance UID, to match the answer in an archive
    study_instance_uid: str | None = None  # DICOM input: Study Instance UID

    @classmethod
    def from_answer(cls, answer: dict, source: str | None = None, uids: DicomUids | None = None) -> Prediction:
        """A prediction from the inference core's answer (``Inference.answers``)."""
        return cls(
            label=answer["predicted_class"],
            probabilities=dict(answer["probabilities"]),
            malignant_probability=answer["malignant_probability"],
            malignant_threshold=answer["malignant_threshold"],
            decision=answer["decision"],
            abstained=answer["decision"] == "uncertain",
            reason=answer["decision_reason"],
            margin=answer["margin"],
            ood_score=answer["ood_score"],
            site=answer.get("site"),
            model_probabilities={name: dict(p) for name, p in answer["models"].items()},
            model_versions={name: dict(v) for name, v in answer["model_versions"].items()},
            source=source,
            sop_instance_uid=uids.sop_instance_uid if uids else None,
            study_instance_uid=uids.study_instance_uid if uids else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (e.g. a row of ``pandas.DataFrame([p.to_dict() for p in predictions])``)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class Explanation:
    """Where in the image the explained model looked for its prediction."""

    prediction: Prediction  # the ensemble's answer for the image
    model: str  # the explained model: "ensemble" or one member
    method: str  # the CAM method (lesion.explain.METHODS)
    explained_class: str  # the class the heat map explains: the explained model's own prediction
    heatmap: np.ndarray  # float32 (S, S) in [0, 1], over the preprocessed image
    overlay: np.ndarray  # uint8 RGB (S, S, 3): the heat map in the jet colormap blended into the image
    image: np.ndarray  # uint8 RGB (S, S, 3): the preprocessed image the models saw


def _rgb_array(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB from a uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA array (alpha dropped)."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"an image array must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got {array.dtype} "
                         f"{array.shape}")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


class Classifier:
    """A trained ensemble, loaded once: ``predict`` and ``explain`` images.

    An image is a file path, the bytes of an image file (JPEG, PNG, BMP, TIFF, WebP or DICOM), a PIL image or a
    uint8 RGB numpy array (H, W, 3) of the photograph; each is preprocessed as at ingest (border crop, hair removal,
    resize). Build one with ``lesion.load``.
    """

    def __init__(self, core: Inference, device: str = "cpu"):
        self.core = core
        self.device = device  # where explanations load the members (on torch: Grad-CAM needs gradients)
        self._explainer: Explainer | None = None

    def __repr__(self) -> str:
        mode = "flip TTA" if self.core.tta else "single pass"
        return f"Classifier(models={self.models}, classes={self.classes}, {mode})"

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the models' outputs."""
        return self.core.classes

    @property
    def models(self) -> list[str]:
        """The ensemble's members."""
        return self.core.names

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """The uint8 (S, S, 3) image the models see for one input (see the class docstring)."""
        return self._prepare(image)[0]

    def _prepare(self, image: ImageInput) -> tuple[np.ndarray, str | None, DicomUids | None]:
        """(preprocessed image, source path or None, DICOM UIDs or None) of one input."""
        if isinstance(image, (str, Path)):
            path = Path(image).expanduser()
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageError(f"{path}: cannot read file: {exc}") from exc
            try:
                return self.core.preprocess(data), str(path), dicom_uids(data)
            except ImageError as exc:
                raise ImageError(f"{path}: {str(exc).removeprefix('image bytes: ')}") from exc
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            return self.core.preprocess(data), None, dicom_uids(data)
        if isinstance(image, Image.Image):
            return preprocess(np.asarray(image.convert("RGB")), self.core.data_config)[0], None, None
        if isinstance(image, np.ndarray):
            return preprocess(_rgb_array(image), self.core.data_config)[0], None, None
        raise TypeError(f"cannot predict a {type(image).__name__}: give a path, the bytes of an image file, a PIL "
                        "image or a uint8 RGB numpy array, or a list of them")

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """The ensemble's ``Prediction`` for one image, or a list of them for a list (or tuple) of images.

        Raises ``ImageError`` naming the input that cannot be used (unreadable, not an image, a DICOM file of
        another kind, too small or too large).

            >>> import os, lesion
            >>> from lesion.data.synthetic import generate
            >>> clf = lesion.load(os.environ["LESION_RUN"])
            >>> images = [record["image"] for record in generate(3, 96, seed=5)]
            >>> [p.label in clf.classes for p in clf.predict(images)]
            [True, True, True]
            >>> try:
            ...     clf.predict(b"not an image")
            ... except lesion.ImageError as exc:
            ...     print(exc)
            image bytes: not a decodable image (expected one of JPEG, PNG, BMP, TIFF, WEBP)
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            return []
        prepared = [self._prepare(image) for image in batch]
        answers = self.core.predict(np.stack([pixels for pixels, _, _ in prepared]))
        found = [Prediction.from_answer(answer, source, uids)
                 for answer, (_, source, uids) in zip(answers, prepared)]
        return found[0] if single else found

    def explain(self, image: ImageInput, method: str = "gradcam", model: str = ENSEMBLE) -> Explanation:
        """Explain one image's prediction: the ``method`` heat map (``lesion.explain.METHODS``) of ``model``, a
        member's name or ``"ensemble"`` (the ensemble-weighted mean of its members' maps), and its overlay.

            >>> import os, lesion
            >>> from lesion.data.synthetic import generate
            >>> clf = lesion.load(os.environ["LESION_RUN"])
            >>> explained = clf.explain(next(generate(1, 96, seed=3))["image"], method="gradcam")
            >>> explained.heatmap.shape == explained.image.shape[:2], explained.overlay.dtype.name
            (True, 'uint8')
            >>> bool(0.0 <= explained.heatmap.min() <= explained.heatmap.max() <= 1.0)
            True
            >>> explained.explained_class == explained.prediction.label  # the ensemble explains its own answer
            True
        """
        from lesion.explain import Explainer, overlay

        if self._explainer is None:
            self._explainer = Explainer(self.core.on_torch().load(device=self.device))
        pixels, source, uids = self._prepare(image)
        answer, heatmap = self._explainer.explain_map(pixels, model, method)
        return Explanation(prediction=Prediction.from_answer(answer, source, uids), model=model, method=method,
                           explained_class=answer["explained_class"], heatmap=heatmap,
                           overlay=overlay(pixels, heatmap), image=pixels)


def load(uri: str | Path, config: Any = None, *, engine: str | None = None, device: str = "cpu",
         models: list[str] | None = None, tta: bool | None = None, site: str | None = None) -> Classifier:
    """A ``Classifier`` of the trained models at ``uri``: a run directory, an export bundle or a registry URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), through ``lesion.resolve.load_inference``. ``config``: a
    config file or ``Config`` (default: the one recorded with the models); ``engine``: ``torch`` or ``onnxruntime``
    (default: ``inference.engine``; explanations run on torch); ``device``: a torch device; ``models``: a subset of a
    run's models; ``tta``: a run's inference mode (default: the config's); ``site``: a site profile made by
    ``lesion calibrate`` (default: ``inference.site``, none).

        >>> import os, lesion
        >>> clf = lesion.load(os.environ["LESION_RUN"], device="cpu")
        >>> clf.classes
        ['mel', 'nv', 'bcc', 'akiec', 'bkl', 'df', 'vasc']
    """
    from lesion.resolve import load_inference

    return Classifier(load_inference(uri, config, engine=engine, device=device, models=models, tta=tta,
                                     site=site), device)
