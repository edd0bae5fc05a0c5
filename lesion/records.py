"""Typed records that one stage hands the next, in the manner of timm's ``PretrainedCfg``: small frozen dataclasses
with a name, each written and read in one place, asked by attribute rather than looked up in a dict.

- ``DataRecord``: what ingest made (``RUN/data/info.json``): task, classes, image size, counts per split and class,
  preprocessing, source and fingerprint. Written by ``lesion.data.shards.write_info``, read by ``read_info``.
- ``CheckpointRecord``: what a trained model is (``best.pt``'s ``info`` and ``model.json`` beside it): variant,
  architecture, task, classes, input size, normalisation, preprocessing, where its starting weights came from,
  versions, best epoch. Written by ``lesion.models.save_checkpoint``, read by ``lesion.models.load_trained``; an
  export bundle's metadata is its ``to_dict()``. ``input_transform`` is the one way to turn images into its input.
- ``LoopSpec``: what the training loop needs (``pipelines.loop``): the resolved training config, facts about the
  data and output places. Picklable, so it travels to Ray Train workers and Tune trials.

Files written before these records existed load through ``from_dict``, which fills what old layouts lack.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lesion.config import DataConfig, TrainConfig
from lesion.labels import class_names, output_units
from lesion.vocabulary import TASKS

# DataConfig fields that change the pixels a model sees, recorded with the data and with each checkpoint
PREPROCESSING_FIELDS = ("crop_border", "remove_hair", "resize", "color_constancy")


def _fields_of(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of ``cls`` (keys written by newer versions are left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def preprocessing_of(data_config: DataConfig) -> dict[str, Any]:
    """The preprocessing settings of a data config (``PREPROCESSING_FIELDS``)."""
    return {name: getattr(data_config, name) for name in PREPROCESSING_FIELDS}


@dataclass(frozen=True)
class DataRecord:
    """An ingested data set (``RUN/data/info.json``)."""

    task: str  # multiclass or binary
    classes: tuple[str, ...]  # class names in label-index order
    image_size: int  # side of the cached square images, in pixels
    counts: Mapping[str, Mapping[str, int]]  # split -> class -> images
    source: str  # the data set reader (lesion.vocabulary.SOURCES)
    fingerprint: str | None = None  # of the ingest's inputs
    root: str | None = None  # the source folder or file, resolved
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # PREPROCESSING_FIELDS of the data config
    has_masks: bool = False
    num_images: int = 0
    num_lesions: int = 0
    rejected: int = 0  # inputs skipped, listed in rejected.csv
    split_fractions: tuple[float, ...] = ()
    seed: int = 0
    seconds: float | None = None  # preprocessing time
    images_per_second: float | None = None

    def split_rows(self, split: str) -> int:
        """Images in ``split``."""
        return int(sum(self.counts.get(split, {}).values()))

    def class_counts(self, split: str) -> list[int]:
        """Images per class of ``split``, in label-index order."""
        counts = self.counts.get(split, {})
        return [int(counts.get(name, 0)) for name in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``info.json``)."""
        return json_ready(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataRecord:
        """A record from ``info.json``'s content; files from before the record kept the preprocessing flags at the
        top level."""
        values = dict(values)
        if "preprocessing" not in values:
            values["preprocessing"] = {k: values[k] for k in PREPROCESSING_FIELDS if k in values}
        values["classes"] = tuple(values["classes"])
        values["split_fractions"] = tuple(values.get("split_fractions") or ())
        return cls(**_fields_of(cls, values))


@dataclass(frozen=True)
class CheckpointRecord:
    """A trained model: what it is, what it takes, where it came from."""

    name: str  # the variant (its folder under RUN/models/)
    arch: str  # its architecture (lesion.vocabulary.ARCHITECTURES)
    task: str
    classes: tuple[str, ...]
    num_classes: int  # model outputs: one logit for binary (lesion.labels.output_units)
    input_size: int  # side of the model's input, in pixels
    mean: tuple[float, ...]  # input normalisation
    std: tuple[float, ...]
    image_size: int | None = None  # side of the cached images it was trained on
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # architecture options (conv_widths, dropout, ...)
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # the data's PREPROCESSING_FIELDS
    pretrained_origin: str = "scratch"  # "scratch" or "imagenet:<source>": where its starting weights came from
    versions: Mapping[str, str] = field(default_factory=dict)  # python and the packages that shape results
    run_id: str | None = None  # the training run
    fingerprint: str | None = None  # of the training's inputs
    data_fingerprint: str | None = None
    best_epoch: int | None = None
    monitor: str | None = None  # the metric that picked the best epoch
    epochs_trained: int | None = None
    balance: str | None = None
    seed: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)  # validation metrics at the best epoch
    checkpoint_sha256: str | None = None  # of the checkpoint file, set when it is read (never written into it)

    @property
    def binary(self) -> bool:
        """Whether the model has one logit (malignant vs benign)."""
        return self.num_classes == 1

    def input_transform(self, images, device="cpu"):
        """uint8 images (N, H, W, 3), numpy or torch, -> the model's normalised float input (N, 3, S, S) on
        ``device``: THE evaluation transform (``lesion.data.augment.model_input``) with this model's size and
        normalisation."""
        from lesion.data.augment import model_input  # torch: imported where a model runs

        return model_input(images, self.mean, self.std, self.input_size, device)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``model.json``, an export bundle's metadata)."""
        return json_ready(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CheckpointRecord:
        """A record from a checkpoint's ``info`` or ``model.json``. Older layouts: no ``arch`` (the variant name was
        the architecture), ``pretrained`` for the weights origin, and no task or classes (taken from the outputs)."""
        values = dict(values)
        values.setdefault("arch", values.get("name"))
        if "pretrained_origin" not in values and isinstance(values.get("pretrained"), str):
            values["pretrained_origin"] = values["pretrained"]
        values.setdefault("task", "binary" if int(values.get("num_classes", 0)) == 1 else "multiclass")
        if values["task"] not in TASKS:
            raise ValueError(f"checkpoint task: expected one of {', '.join(TASKS)}; got {values['task']!r}")
        values["classes"] = tuple(values.get("classes") or class_names(values["task"]))
        values["num_classes"] = int(values["num_classes"])
        values["input_size"] = int(values["input_size"])
        values["mean"] = tuple(float(v) for v in values["mean"])
        values["std"] = tuple(float(v) for v in values["std"])
        return cls(**_fields_of(cls, values))


@dataclass(frozen=True)
class LoopSpec:
    """Everything a training worker needs: the resolved training config, data facts and output places."""

    name: str  # the variant
    arch: str  # its architecture
    train: TrainConfig  # the variant's resolved training config (``models`` empty)
    task: str
    classes: tuple[str, ...]
    image_size: int  # side of the cached images
    input_size: int  # side of the model's input
    train_counts: tuple[int, ...]  # training images per class, in label-index order
    train_rows: int
    val_rows: int
    tb_dir: str | None = None  # where rank 0 writes TensorBoard events live; None: none
    step_hook: Callable[..., None] | None = None  # hook(epoch=, step=, rank=, world_size=) after each optimiser step
    progress: bool = True  # rank 0 logs one progress line per epoch
    verbose: bool = False  # Ray Train's own per-report lines are shown
    tracking: tuple[str, str] | None = None  # (MLflow tracking URI, run id): rank 0 logs each epoch there, live

    @property
    def outputs(self) -> int:
        """The model's outputs (one logit for binary)."""
        return output_units(self.task, len(self.classes))

    @classmethod
    def build(cls, cfg: TrainConfig, name: str, data: DataRecord, **places) -> LoopSpec:
        """The spec of variant ``name`` trained with ``cfg`` on ``data``; ``places``: tb_dir, step_hook, progress,
        verbose, tracking."""
        return cls(name=name, arch=cfg.arch or name, train=dataclasses.replace(cfg, models={}), task=data.task,
                   classes=tuple(data.classes), image_size=int(data.image_size),
                   input_size=int(cfg.input_size or data.image_size), train_counts=tuple(data.class_counts("train")),
                   train_rows=data.split_rows("train"), val_rows=data.split_rows("val"), **places)


def json_ready(record) -> dict[str, Any]:
    """A record as plain JSON types (tuples as lists, numpy scalars and arrays as numbers and lists)."""
    return _plain(dataclasses.asdict(record))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"record field: {type(value).__name__} value {value!r} is not JSON-serialisable")
