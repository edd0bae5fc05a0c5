"""The workflow configuration: one typed dataclass per stage, loaded from YAML, overridable from the command line.

Defaults live here and nowhere else; the allowed names come from ``lesion.vocabulary``. Every field that takes one
of a few names, or a number in a range, says so where it is declared (``checked``), and the check runs whenever a file
or an override is read (``config_from_dict``), so a bad value fails at once with its path
(``train.models.resnet50.balance``), the value and what was expected, never an epoch into training. A YAML file has
one section per stage (``data``, ``train``, ``tune``, ``evaluate``, ``serve``, ``workflow``, ...); ``train.models``
maps a variant name to a partial ``train`` section that overrides the training defaults for that variant only. A
variant's ``arch`` names its architecture (one of ``ARCHITECTURES``; default: the variant name), so
``resnet50-balanced: {arch: resnet50, balance: oversample}`` and ``resnet50-imbalanced: {arch: resnet50, balance:
none}`` train the same network two ways. ``config_schema`` gives the whole config as a JSON Schema (``lesion config
schema``), generated from the same dataclasses and checks.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lesion.data.splits import check_fractions
from lesion.rundir import write_atomic
from lesion.vocabulary import (
    ARCHITECTURES,
    AUGMENT_POLICIES,
    BALANCE_MODES,
    CAM_METHODS,
    COLOR_CONSTANCY,
    ENSEMBLE_WEIGHTS,
    ENGINES,
    EVALUATE_SPLITS,
    MONITORS,
    OPTIMIZERS,
    PRIOR_CORRECTIONS,
    RESIZE_FITS,
    SCHEDULERS,
    SEARCH_SPACE_TYPES,
    SOURCES,
    TASKS,
    TUNE_MODES,
    TUNE_SCHEDULERS,
)

VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # keys of train.models


class ConfigError(ValueError):
    """A configuration file or override names an unknown field, or holds a value of the wrong kind or out of range."""


# A check returns None for a good value, else what is wrong with it ("expected one of a, b; got 'c'"); its ``schema``
# attribute says the same in JSON Schema keywords (enum, minimum, ..., items) for ``config_schema``.
Check = Callable[[Any], "str | None"]


def one_of(*options: str) -> Check:
    """A check: the value is one of ``options``."""

    def check(value: Any) -> str | None:
        return None if value in options else f"expected one of {', '.join(options)}; got {value!r}"

    check.schema = {"enum": list(options)}
    return check


def interval(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A check: ``low <= value <= high`` (``<`` on an open side)."""
    if high == math.inf:
        expected = f"{'>' if low_open else '>='} {low}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"expected {expected}; got {value!r}"

    check.schema = {"exclusiveMinimum" if low_open else "minimum": low}
    if high != math.inf:
        check.schema["exclusiveMaximum" if high_open else "maximum"] = high
    return check


def each(inner: Check) -> Check:
    """A check: every item of a list passes ``inner``."""

    def check(values: list) -> str | None:
        for i, value in enumerate(values):
            problem = inner(value)
            if problem:
                return f"item {i}: {problem}"
        return None

    check.schema = {"items": inner.schema}
    return check


def checked(default: Any, check: Check) -> Any:
    """A dataclass field with ``default`` whose values must pass ``check`` (None, where allowed, is not checked)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def non_empty() -> Check:
    """A check: a string with something in it (a path, a name)."""

    def check(value: Any) -> str | None:
        return None if value.strip() else f"expected a non-empty path; got {value!r}"

    check.schema = {"minLength": 1}
    return check


POSITIVE = interval(1)  # a count of at least one
NON_NEGATIVE = interval(0)
FRACTION = interval(0, 1)
SHARE = interval(0, 1, low_open=True)  # a probability or share that cannot be zero


@dataclass
class DataConfig:
    """Where the images come from and how they are split and preprocessed at ingest."""

    source: str = checked("synthetic", one_of(*SOURCES))
    root: str | None = None  # data set folder or file; not needed for synthetic
    task: str = checked("multiclass", one_of(*TASKS))  # multiclass (7 dx classes) or binary (mel, bcc, akiec)
    image_size: int = checked(64, POSITIVE)  # side of the square cached image, in pixels
    split: list[float] = checked([0.7, 0.15, 0.15], each(FRACTION))  # train/val/test fractions, summing to 1
    seed: int = checked(0, NON_NEGATIVE)  # seed of the split and of the synthetic generator
    crop_border: bool = True  # crop the black dermatoscope border
    remove_hair: bool = True  # black-hat + inpainting hair and small dark artefact removal
    synthetic_count: int = checked(560, POSITIVE)  # images drawn by the synthetic source
    image_column: str = "image"  # parquet source: column of encoded image bytes (or struct with 'bytes')
    label_column: str = "label"  # parquet source: column of class names or integer labels
    id_column: str = "image_id"  # parquet source: optional column of image ids
    max_image_pixels: int = checked(50_000_000, POSITIVE)  # decompression-bomb guard for decoding
    min_image_side: int = checked(32, POSITIVE)  # images narrower or shorter than this (pixels) are refused
    resize: str = checked("crop", one_of(*RESIZE_FITS))  # square by centre crop or by padding; never stretched
    color_constancy: str = checked("none", one_of(*COLOR_CONSTANCY))  # Shades of Gray evens out the illuminant
    shard_rows: int = checked(256, POSITIVE)  # rows per written Parquet shard

    def validate(self, where: str) -> None:
        """Checks across fields: the split fractions."""
        try:
            check_fractions(self.split)
        except ValueError as exc:
            raise ConfigError(f"{_join(where, 'split')}: {exc}") from None


@dataclass
class TrainConfig:
    """How one model is trained; per-variant overrides live in ``models`` (variant name -> partial train section)."""

    models: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "custom_cnn": {},
            "scratch_cnn": {},
            "mobilenetv2": {},
            "efficientnet_lite0": {"pretrained": True, "lr": 3e-4},
        }
    )
    epochs: int = checked(8, POSITIVE)
    batch_size: int = checked(32, POSITIVE)
    optimizer: str = checked("adamw", one_of(*OPTIMIZERS))
    lr: float = checked(1e-3, interval(0, low_open=True))
    weight_decay: float = checked(1e-4, NON_NEGATIVE)
    momentum: float = checked(0.9, FRACTION)  # sgd only
    scheduler: str = checked("plateau", one_of(*SCHEDULERS))
    plateau_factor: float = checked(0.2, interval(0, 1, low_open=True, high_open=True))
    plateau_patience: int = checked(3, NON_NEGATIVE)
    patience: int = checked(10, NON_NEGATIVE)  # early stopping on the monitored metric; the best weights are restored
    monitor: str = checked("val_loss", one_of(*MONITORS))  # picks the best epoch (val_loss minimised, others max.)
    label_smoothing: float = checked(0.0, interval(0, 1, high_open=True))
    grad_clip: float = checked(1.0, NON_NEGATIVE)  # max gradient norm; 0 disables
    balance: str = checked("none", one_of(*BALANCE_MODES))  # weights: inverse-frequency loss weights
    augment: float = checked(1.0, NON_NEGATIVE)  # augmentation strength; 0 disables
    augment_policy: str = checked("basic", one_of(*AUGMENT_POLICIES))  # dermoscopy: any angle, hue, saturation, blur
    mixup: float = checked(0.0, NON_NEGATIVE)  # Beta(a, a) of mixup / cutmix (half the batches each); 0 disables
    warmup_epochs: int = checked(0, NON_NEGATIVE)  # linear learning-rate warm-up before a cosine (or no) schedule
    ema: float = checked(0.0, interval(0, 1, high_open=True))  # decay per step of an average of the weights that
    # is validated, kept as the best and saved instead of the raw weights; 0 disables (0.99: about 100 steps)
    input_size: int | None = checked(None, POSITIVE)  # model input side; None = the cached image size
    pretrained: bool | str = False  # False, True (ImageNet via timm / packaged weights) or a weights path
    weights: str | None = None  # explicit local weights file or directory (implies pretrained)
    # a folder filled by `lesion weights fetch` (the Hugging Face cache layout, or <timm name>.safetensors files);
    # every node must see it at this path
    weights_dir: str | None = checked(None, non_empty())  # looked in first by pretrained: true models
    freeze_epochs: int = checked(2, NON_NEGATIVE)  # transfer learning phase 1: epochs with the backbone frozen
    unfreeze_fraction: float = checked(0.25, FRACTION)  # phase 2: share of backbone layers unfrozen
    finetune_lr_factor: float = checked(0.1, interval(0, low_open=True))  # phase 2 learning rate = lr * factor
    dropout: list[float] = checked([0.3, 0.5], each(interval(0, 1, high_open=True)))  # transfer head, custom CNN FC
    conv_widths: list[int] = checked([64, 128, 256, 512], each(POSITIVE))  # custom_cnn conv blocks
    fc_widths: list[int] = checked([512, 128], each(POSITIVE))  # custom_cnn hidden FC layers
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    workers: int = checked(2, POSITIVE)  # Ray Train workers (DDP)
    cpus_per_worker: float = checked(0.25, NON_NEGATIVE)  # small: two trainings of the demo fit 2 CPUs at once
    threads_per_worker: int | None = checked(None, POSITIVE)  # torch CPU threads per worker; None: Ray's (its CPUs)
    # a worker whose share of the train and val splits is at most this many MB keeps it in memory after the first
    # epoch and replays it (reshuffled) instead of restarting Ray Data's streaming read every epoch; 0: always stream
    cache_mb: int = checked(1024, NON_NEGATIVE)
    gpus_per_worker: float = checked(0.0, NON_NEGATIVE)
    max_failures: int = checked(2, interval(-1))  # worker failures survived from the last checkpoint; -1: no limit
    seed: int = checked(0, NON_NEGATIVE)
    arch: str | None = checked(None, one_of(*ARCHITECTURES))  # the variant's architecture; None = the variant name


@dataclass
class TuneConfig:
    """Ray Tune + Optuna search over one architecture (its tuned settings go to every variant of it)."""

    model: str = checked("custom_cnn", one_of(*ARCHITECTURES))  # an architecture, not a variant name
    trials: int = checked(4, POSITIVE)
    epochs: int = checked(4, POSITIVE)
    metric: str = checked("val_balanced_accuracy", one_of(*MONITORS))
    mode: str = checked("max", one_of(*TUNE_MODES))
    scheduler: str = checked("asha", one_of(*TUNE_SCHEDULERS))
    grace_period: int = checked(1, POSITIVE)  # epochs before ASHA may stop a trial; at most ``epochs``
    reduction_factor: int = checked(2, interval(2))
    cpus_per_trial: float = checked(1.0, NON_NEGATIVE)
    gpus_per_trial: float = checked(0.0, NON_NEGATIVE)
    workers_per_trial: int = checked(1, POSITIVE)  # >1 runs each trial as a multi-worker TorchTrainer
    max_concurrent: int | None = checked(None, POSITIVE)  # None = what the resources allow
    seed: int = checked(0, NON_NEGATIVE)
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
    )  # {train field: {type: loguniform|uniform|int|choice, low, high | values}}

    def validate(self, where: str) -> None:
        """Checks across fields: the grace period fits the epochs; the search space names train fields and values."""
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise ConfigError(f"{_join(where, 'grace_period')}: expected at most tune.epochs ({self.epochs}); "
                              f"got {self.grace_period}")
        check_search_space(self.search_space, _join(where, "search_space"))


@dataclass
class EvaluateConfig:
    """Batch inference, ensemble, calibration, explanations and the report."""

    split: str = checked("test", one_of(*EVALUATE_SPLITS))
    tta: bool = False  # test-time augmentation (flips)
    ensemble_weights: str = checked("fit", one_of(*ENSEMBLE_WEIGHTS))  # fit (on validation) or equal
    # fit: logit adjustment, log p - tau x log(class prior) with tau chosen on validation for balanced accuracy (the
    # class decision; the malignant probability stays the calibrated one); none: the calibrated posteriors of the
    # data's own class mix
    prior_correction: str = checked("none", one_of(*PRIOR_CORRECTIONS))
    bootstrap: int = checked(200, NON_NEGATIVE)  # bootstrap resamples (of lesions) for confidence intervals; 0 disables
    cam_methods: list[str] = checked(["gradcam", "gradcam++", "eigencam"], each(one_of(*CAM_METHODS)))
    cam_images: int = checked(8, NON_NEGATIVE)  # images in the Grad-CAM comparison grid
    cam_score_images: int = checked(16, NON_NEGATIVE)  # images used to score explanation quality
    batch_size: int = checked(64, POSITIVE)
    gpus_per_actor: float = checked(0.0, NON_NEGATIVE)
    cpus_per_actor: float = checked(1.0, NON_NEGATIVE)  # CPUs reserved by each batch-inference actor
    threads_per_actor: int | None = checked(None, POSITIVE)  # torch CPU threads per actor; None: Ray's (its CPUs)
    actors: int = checked(1, POSITIVE)


@dataclass
class ServeConfig:
    """The Ray Serve application."""

    host: str = "127.0.0.1"
    port: int = checked(8000, interval(1, 65535))
    models: list[str] | None = None  # None = every trained model
    tta: bool | None = None  # flip TTA when serving; None = as evaluated (evaluate.tta); its own spec is fitted for it
    gpus_per_replica: float = checked(0.0, NON_NEGATIVE)
    cpus_per_replica: float = checked(0.5, NON_NEGATIVE)  # CPU share of each replica (ingress, ensemble, models, CAM)
    threads_per_replica: int | None = checked(None, POSITIVE)  # torch threads of model/CAM replicas; None: Ray's
    min_replicas: int = checked(1, NON_NEGATIVE)
    max_replicas: int = checked(2, POSITIVE)  # at least min_replicas
    target_ongoing_requests: float = checked(4.0, interval(0, low_open=True))
    max_batch_size: int = checked(8, POSITIVE)
    # how long a model replica holds a request for others to batch with (a lone request waits this long); 0: the
    # requests that arrive while a batch runs still form the next one (docs/decisions.md, "Serve batch wait")
    batch_wait_timeout_s: float = checked(0.0, NON_NEGATIVE)
    # API requests one ingress replica answers at once; past it 503 + Retry-After at once, not a queue. None: no bound.
    # The default keeps an accepted request's wait near 1 s at the measured service time (docs/decisions.md)
    max_pending_requests: int | None = checked(16, POSITIVE)
    # an admitted request not answered within this gets 503 + Retry-After (overload, a restarting replica), so every
    # request is answered within about this; keep it above the slowest /v1/explain. None: no deadline
    answer_timeout_s: float | None = checked(4.0, interval(0, low_open=True))
    max_body_bytes: int = checked(10 * 1024 * 1024, POSITIVE)
    max_image_pixels: int = checked(50_000_000, POSITIVE)
    api_key: str | None = None  # when set, requests need the X-API-Key header
    cors_origins: list[str] = field(default_factory=list)
    target_sensitivity: float = checked(0.95, SHARE)  # malignancy threshold chosen on validation for this sensitivity
    uncertain_margin: float = checked(0.1, FRACTION)  # abstain when the top-2 probability gap is below this
    ood_quantile: float = checked(0.99, SHARE)  # abstain when the OOD score exceeds this validation quantile

    def validate(self, where: str) -> None:
        """Checks across fields: the replica range."""
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"{_join(where, 'max_replicas')}: expected at least min_replicas ({self.min_replicas}); "
                              f"got {self.max_replicas}")


@dataclass
class WorkflowConfig:
    """What ``lesion run`` does beyond ingest, train and evaluate."""

    tune: bool = True
    serve: bool = False
    autoscaling: bool = False  # the Ray cluster adds nodes on demand: a request larger than it warns, never fails
    max_parallel_trainings: int | None = checked(None, POSITIVE)  # trainings at once; None = as many as fit


@dataclass
class InferenceConfig:
    """What runs the models' forward passes for predict, evaluation scoring and serving (``lesion.engines``);
    Grad-CAM always runs on torch."""

    engine: str = checked("torch", one_of(*ENGINES))  # torch (eager) or onnxruntime (CPU; members exported to ONNX)
    threads: int = checked(2, POSITIVE)  # ONNX Runtime intra-op threads per member session
    site: str | None = None  # a site profile of the models (``lesion calibrate``; MODELS/sites/NAME), None: as trained


@dataclass
class TrackingConfig:
    """MLflow tracking (``pipelines.tracking``): off when no URI is set here, by ``--tracking-uri`` or by
    ``MLFLOW_TRACKING_URI``."""

    uri: str | None = None  # http(s)://server, a store URI, or a plain path (a SQLite file there)
    experiment: str = "lesion"


@dataclass
class Config:
    """The whole workflow configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain dicts and lists (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def model_config(self, name: str) -> TrainConfig:
        """The training section with the overrides of variant ``name`` applied; ``arch`` resolved (None -> ``name``,
        which must then be an architecture)."""
        overrides = self.train.models.get(name, {})
        where = f"train.models.{name}"
        if not VARIANT_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a variant name names a folder (RUN/models/<name>/): expected letters, digits, "
                              f"'_', '-' and '.' only; got {name!r}")
        resolved = _build(TrainConfig, {**_shallow(self.train), **overrides}, where)
        resolved.models = {}
        if resolved.arch is None:
            if name not in ARCHITECTURES:
                raise ConfigError(f"{where}.arch: the variant name {name!r} is not an architecture, so arch must name "
                                  f"one: expected one of {', '.join(ARCHITECTURES)}")
            resolved.arch = name
        return resolved

    def variants_of(self, arch: str) -> list[str]:
        """The variants of ``train.models`` whose architecture is ``arch``, in config order."""
        return [name for name in self.train.models if self.model_config(name).arch == arch]


def _shallow(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict or hint is dict:
        return "a mapping"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint, where: str) -> Any:
    """``value`` as the annotated type (ints widen to floats, list items are checked), else raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
    elif origin is list and isinstance(value, list):
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif (origin is dict or hint is dict) and isinstance(value, dict):
        return {key: _coerce(item, args[1], _join(where, str(key))) for key, item in value.items()} if args else value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    elif hint is type(None) and value is None:
        return None
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")


@functools.cache
def _fields(cls) -> dict[str, tuple[Any, Check | None]]:
    """Each field of a config dataclass: its type hint and its check."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("check")) for f in dataclasses.fields(cls)}


def _check_field(cls, name: str, value: Any, where: str) -> Any:
    """``value`` checked as field ``name`` of ``cls``: its type, then its allowed values or range."""
    hint, check = _fields(cls)[name]
    value = _coerce(value, hint, where)
    problem = check(value) if check and value is not None else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return value


def _build(cls, values: dict[str, Any], where: str):
    hints = {name: hint for name, (hint, _) in _fields(cls).items()}
    known = set(hints)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{_join(where, name)}: expected a mapping, got {value!r}")
            kwargs[name] = _build(hints[name], value, _join(where, name))
        else:
            kwargs[name] = _check_field(cls, name, value, _join(where, name))
    built = cls(**kwargs)
    if hasattr(built, "validate"):
        built.validate(where)
    return built


def check_search_space(space: dict[str, Any], where: str = "tune.search_space") -> None:
    """Check a Tune search space: each key a train field, each entry ``{type, low, high}`` or ``{type: choice,
    values}`` whose bounds and values are valid values of that field."""
    fields = set(_fields(TrainConfig)) - {"models", "arch"}
    for key, entry in space.items():
        at = _join(where, key)
        if key not in fields:
            raise ConfigError(f"{at}: not a train field; known: {', '.join(sorted(fields))}")
        if not isinstance(entry, dict) or entry.get("type") not in SEARCH_SPACE_TYPES:
            raise ConfigError(f"{at}: expected a mapping with type one of {', '.join(SEARCH_SPACE_TYPES)}, "
                              f"got {entry!r}")
        kind = entry["type"]
        needed = ("values",) if kind == "choice" else ("low", "high")
        extra = sorted(set(entry) - {"type", *needed})
        missing = [name for name in needed if name not in entry]
        if missing or extra:
            raise ConfigError(f"{at}: a {kind} entry needs exactly type, {', '.join(needed)}; "
                              f"missing {missing or 'nothing'}, unknown {extra or 'nothing'}")
        if kind == "choice":
            if not isinstance(entry["values"], list) or not entry["values"]:
                raise ConfigError(f"{at}.values: expected a non-empty list, got {entry['values']!r}")
            for i, value in enumerate(entry["values"]):
                _check_field(TrainConfig, key, value, f"{at}.values[{i}]")
            continue
        low, high = (_check_field(TrainConfig, key, entry[name], f"{at}.{name}") for name in ("low", "high"))
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{at}: need 0 < low < high (loguniform) or low < high, got {low}, {high}")


def config_from_dict(values: dict[str, Any] | None) -> Config:
    """Build a Config from nested dicts (as read from YAML), checking every field: unknown names, types, allowed
    values and ranges, each per-model section of ``train.models``; errors name the field's path."""
    config = _build(Config, values or {}, "")
    for name in config.train.models:
        config.model_config(name)  # checks the model's overrides
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw sections of a YAML config file (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return values or {}


def load_config(path: str | Path | None = None) -> Config:
    """Load and check a YAML config file (or the built-in defaults when ``path`` is None)."""
    if path is None:
        return Config()
    values = read_config_file(path)
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``config`` with dotted-path overrides applied and checked, e.g. ``{"train.epochs": 3}``.

    None values are skipped, so unset command-line flags can be passed straight through.
    """
    values = config.to_dict()
    applied = {dotted: value for dotted, value in overrides.items() if value is not None}
    for dotted, value in applied.items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        shown = ", ".join(f"{dotted}={value!r}" for dotted, value in applied.items())
        raise ConfigError(f"{exc} (overrides: {shown})") from None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as ``{dotted.path: value}`` leaves (lists and empty mappings are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = _join(prefix, str(key))
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def dump_yaml(values: Any, path: str | Path) -> None:
    """Write plain data as YAML (block style, key order kept), atomically."""
    write_atomic(path, yaml.safe_dump(values, sort_keys=False))


# --------------------------------------------------------------------------------------------- JSON Schema

JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def _type_schema(hint) -> dict[str, Any]:
    """The JSON Schema of a field's type hint (without its allowed values or range)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin in (typing.Union, types.UnionType):
        arms = [_type_schema(arm) for arm in args]
        if all(set(arm) == {"type"} for arm in arms):
            return {"type": [arm["type"] for arm in arms]}
        return {"anyOf": arms}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict or hint is dict:
        return {"type": "object", **({"additionalProperties": _type_schema(args[1])} if args else {})}
    raise TypeError(f"no JSON Schema for the config type {hint!r}")


@functools.cache
def _field_comments(cls) -> dict[str, str]:
    """The comment at the end of each field's line in the source of ``cls`` (its description in the schema)."""
    import inspect

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        found = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if found:
            comments[found.group(1)] = found.group(2).strip()
    return comments


def _field_schema(cls, f: dataclasses.Field) -> dict[str, Any]:
    """One field: its type, allowed values or range, default and description."""
    hint, check = _fields(cls)[f.name]
    schema = _type_schema(hint)
    constraint = dict(getattr(check, "schema", {})) if check else {}
    if "items" in constraint and "items" in schema:
        constraint["items"] = {**schema["items"], **constraint["items"]}
    if "enum" in constraint and "null" in (schema.get("type") or ()):
        constraint["enum"] = [*constraint["enum"], None]  # None is allowed and not checked
    schema.update(constraint)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        schema["default"] = default
    if f.name in _field_comments(cls):
        schema["description"] = _field_comments(cls)[f.name]
    return schema


def _section_schema(cls, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass as a closed object of its fields (nested dataclasses as their own sections)."""
    properties = {}
    for f in dataclasses.fields(cls):
        if f.name in leave_out:
            continue
        hint = _fields(cls)[f.name][0]
        properties[f.name] = _section_schema(hint) if dataclasses.is_dataclass(hint) else _field_schema(cls, f)
    return {"type": "object", "description": (cls.__doc__ or "").strip(), "properties": properties,
            "additionalProperties": False}


def _search_space_schema() -> dict[str, Any]:
    """``tune.search_space``: train field -> ``{type, low, high}`` or ``{type: choice, values}``, the bounds and values
    being valid values of that field."""

    def entry(f: dataclasses.Field) -> dict[str, Any]:
        value = {k: v for k, v in _field_schema(TrainConfig, f).items() if k not in ("default", "description")}
        return {"type": "object", "required": ["type"], "additionalProperties": False,
                "properties": {"type": {"enum": list(SEARCH_SPACE_TYPES)}, "low": value, "high": value,
                               "values": {"type": "array", "minItems": 1, "items": value}}}

    searchable = [f for f in dataclasses.fields(TrainConfig) if f.name not in ("models", "arch")]
    return {"properties": {f.name: entry(f) for f in searchable}, "additionalProperties": False}


def config_schema() -> dict[str, Any]:
    """The whole config file as a JSON Schema (draft 2020-12), generated from the config dataclasses: types,
    allowed values (``lesion.vocabulary``), ranges, defaults and each field's comment as its description.
    ``train.models`` maps variant names to partial ``train`` sections. Checks across fields (the split summing to 1,
    ``tune.grace_period`` within ``tune.epochs``) are made when a config is read, not by the schema."""
    schema = _section_schema(Config)
    train, tune = schema["properties"]["train"], schema["properties"]["tune"]
    variant = _section_schema(TrainConfig, leave_out=("models",))
    variant["description"] = "A variant: overrides of the train section (arch: its architecture)."
    train["properties"]["models"].update({"propertyNames": {"pattern": f"^{VARIANT_NAME.pattern}$"},
                                          "additionalProperties": variant})
    tune["properties"]["search_space"].update(_search_space_schema())
    return {"$schema": JSON_SCHEMA_DRAFT, "title": "lesion workflow configuration", **schema}
