"""The workflow configuration: one typed dataclass per stage, loaded from YAML, overridable from the command line.

Defaults live here and nowhere else. A YAML file has one section per stage (``data``, ``train``, ``tune``,
``evaluate``, ``serve``, ``workflow``); ``train.models`` maps a model name to a partial ``train`` section that
overrides the training defaults for that model only.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("multiclass", "binary")
SOURCES = ("ham10000", "isic-task3", "isic-binary", "folder", "parquet", "synthetic")


class ConfigError(ValueError):
    """A configuration file or override names an unknown field or holds a value of the wrong kind."""


@dataclass
class DataConfig:
    """Where the images come from and how they are split and preprocessed at ingest."""

    source: str = "synthetic"  # one of SOURCES
    root: str | None = None  # data set folder or file; not needed for synthetic
    task: str = "multiclass"  # multiclass (7 dx classes) or binary (malignant = mel, bcc, akiec)
    image_size: int = 64  # side of the square cached image, in pixels
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train/val/test fractions
    seed: int = 0  # seed of the split and of the synthetic generator
    crop_border: bool = True  # crop the black dermatoscope border
    remove_hair: bool = True  # black-hat + inpainting hair and small dark artefact removal
    synthetic_count: int = 560  # images drawn by the synthetic source
    image_column: str = "image"  # parquet source: column of encoded image bytes (or struct with 'bytes')
    label_column: str = "label"  # parquet source: column of class names or integer labels
    id_column: str = "image_id"  # parquet source: optional column of image ids
    max_image_pixels: int = 50_000_000  # decompression-bomb guard for decoding
    shard_rows: int = 256  # rows per written Parquet shard


@dataclass
class TrainConfig:
    """How one model is trained; per-model overrides live in ``models``."""

    models: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "custom_cnn": {},
            "scratch_cnn": {},
            "mobilenetv2": {},
            "efficientnet_lite0": {"pretrained": True, "lr": 3e-4},
        }
    )
    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adamw"  # adam, adamw or sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    scheduler: str = "plateau"  # plateau, cosine or none
    plateau_factor: float = 0.2
    plateau_patience: int = 3
    patience: int = 10  # early stopping on the monitored metric; the best weights are restored
    monitor: str = "val_loss"  # metric that picks the best epoch (val_loss is minimised, others maximised)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    balance: str = "none"  # none, weights (inverse-frequency loss weights) or oversample
    augment: float = 1.0  # augmentation strength; 0 disables
    input_size: int | None = None  # model input side; None = the cached image size
    pretrained: bool | str = False  # False, True (ImageNet via timm / packaged weights) or a weights path
    weights: str | None = None  # explicit local weights file or directory (implies pretrained)
    freeze_epochs: int = 2  # transfer learning phase 1: epochs with the backbone frozen
    unfreeze_fraction: float = 0.25  # phase 2: share of backbone layers unfrozen
    finetune_lr_factor: float = 0.1  # phase 2 learning rate = lr * factor
    dropout: list[float] = field(default_factory=lambda: [0.3, 0.5])  # head dropouts (transfer head, custom CNN FC)
    conv_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # custom_cnn conv blocks
    fc_widths: list[int] = field(default_factory=lambda: [512, 128])  # custom_cnn hidden FC layers
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    workers: int = 2  # Ray Train workers (DDP)
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    seed: int = 0


@dataclass
class TuneConfig:
    """Ray Tune + Optuna search over the custom CNN."""

    model: str = "custom_cnn"
    trials: int = 4
    epochs: int = 4
    metric: str = "val_balanced_accuracy"
    mode: str = "max"
    scheduler: str = "asha"  # asha or none
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1  # >1 runs each trial as a multi-worker TorchTrainer
    max_concurrent: int | None = None  # None = what the resources allow
    seed: int = 0
    search_space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
            "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-3},
            "dropout": {"type": "choice", "values": [[0.3, 0.5], [0.2, 0.3], [0.5, 0.5]]},
            "batch_size": {"type": "choice", "values": [16, 32]},
            "optimizer": {"type": "choice", "values": ["adam", "adamw", "sgd"]},
            "conv_widths": {"type": "choice", "values": [[16, 32, 64, 128], [32, 64, 128, 256], [64, 128, 256, 512]]},
            "fc_widths": {"type": "choice", "values": [[128, 64], [256, 128], [512, 128]]},
            "augment": {"type": "uniform", "low": 0.0, "high": 1.0},
        }
    )


@dataclass
class EvaluateConfig:
    """Batch inference, ensemble, calibration, explanations and the report."""

    split: str = "test"
    tta: bool = False  # test-time augmentation (flips)
    ensemble_weights: str = "fit"  # fit (on validation) or equal
    bootstrap: int = 200  # bootstrap resamples (of lesions) for confidence intervals; 0 disables
    cam_methods: list[str] = field(default_factory=lambda: ["gradcam", "gradcam++", "eigencam"])
    cam_images: int = 8  # images in the Grad-CAM comparison grid
    cam_score_images: int = 16  # images used to score explanation quality
    batch_size: int = 64
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0  # CPUs reserved by each batch-inference actor
    actors: int = 1


@dataclass
class ServeConfig:
    """The Ray Serve application."""

    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] | None = None  # None = every trained model
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 0.5  # CPU share of each replica (ingress, ensemble, each model, Grad-CAM)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    api_key: str | None = None  # when set, requests need the X-API-Key header
    cors_origins: list[str] = field(default_factory=list)
    target_sensitivity: float = 0.95  # malignancy threshold chosen on validation for this sensitivity
    uncertain_margin: float = 0.1  # abstain when the top-2 probability gap is below this
    ood_quantile: float = 0.99  # abstain when the OOD score exceeds this validation quantile


@dataclass
class WorkflowConfig:
    """What ``lesion run`` does beyond ingest, train and evaluate."""

    tune: bool = True
    serve: bool = False


@dataclass
class Config:
    """The whole workflow configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain dicts and lists (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def model_config(self, name: str) -> TrainConfig:
        """The training section with the overrides of model ``name`` applied."""
        overrides = self.train.models.get(name, {})
        resolved = _build(TrainConfig, {**_shallow(self.train), **overrides}, f"train.models.{name}")
        resolved.models = {}
        return resolved


def _shallow(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _check_type(value, annotation, where: str):
    """Coerce ``value`` to a field's annotated type where that is lossless (int -> float), else raise ConfigError."""
    hints = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else (annotation,)
    if value is None:
        if type(None) in hints:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    for hint in hints:
        origin = typing.get_origin(hint) or hint
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (bool, str, list, dict) and isinstance(value, origin):
            return value
        if hint is Any:
            return value
    names = ", ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


_UnionType = type(int | None)


def _build(cls, values: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any] | None) -> Config:
    """Build a Config from nested dicts (as read from YAML), rejecting unknown fields with their path."""
    config = _build(Config, values or {}, "config")
    for name, overrides in config.train.models.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"train.models.{name}: expected a mapping of training fields, got {overrides!r}")
        config.model_config(name)  # validates the overrides
    return config


def load_config(path: str | Path | None = None) -> Config:
    """Load a YAML config file (or the built-in defaults when ``path`` is None)."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(values)


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``config`` with dotted-path overrides applied, e.g. ``{"train.epochs": 3}``.

    None values are skipped, so unset command-line flags can be passed straight through.
    """
    values = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return config_from_dict(values)


def dump_yaml(values: Any, path: str | Path) -> None:
    """Write plain data as YAML (block style, key order kept)."""
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
