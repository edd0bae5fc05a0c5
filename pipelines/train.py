"""``lesion train``: train one model (or all configured ones) with Ray Train, from the ingested Parquet shards.

The training split streams to DDP workers through Ray Data (``pipelines.datasets``): raw uint8 pixels are viewed
without copying, pinned and moved to the worker's device in Ray Data's background threads, and augmented there as
batch tensor ops. The workers run the training loop of ``pipelines.loop`` (shared with ``lesion tune``); a worker
that dies is replaced and training resumes from the last checkpoint (``FailureConfig``). After the run the best
epoch's weights become ``RUN/models/<variant>/best.pt`` (``model.json`` records the variant as ``name`` and its
architecture as ``arch``), recorded in the manifest with ``train_fingerprint``. Settings that no retry can mend
(config, resources, missing pretrained weights) are checked on the driver before any worker starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from typing import Any

from lesion.config import Config, TrainConfig, apply_overrides, dump_yaml
from lesion.data.shards import read_info
from lesion.models import WeightsSource, check_weights, model_spec, rebuild_model, save_checkpoint
from lesion.records import CheckpointRecord, DataRecord, LoopSpec
from lesion.rundir import RunDir, changed_settings, fingerprint, package_versions, remove_tree
from lesion.training import plot_learning_curve, write_history
from lesion.vocabulary import BALANCE_MODES
from pipelines import capacity
from pipelines.common import init_ray, resolve_config
from pipelines.datasets import training_datasets
from pipelines.loop import StepHook, build_trainer, loop_spec, quiet_ray_progress, read_state
from pipelines.tuned import best_overrides

log = logging.getLogger(__name__)

TRAIN_VERSION = 2  # bump when a change makes training write different models (re-trains every run's models)
RAY_RUN_NAME = "train"  # RUN/models/<name>/ray/<RAY_RUN_NAME>/ holds Ray Train's checkpoints


def train_fingerprint(cfg: TrainConfig, data: DataRecord) -> str:
    """What a trained model depends on: ``TRAIN_VERSION``, its resolved training config (``changed_settings``) and
    the data's fingerprint (``data``: the run's ``data/info.json``)."""
    settings = changed_settings(cfg)
    settings.pop("models", None)
    return fingerprint("train", TRAIN_VERSION, settings, data.fingerprint)


def ray_storage(run: RunDir, name: str) -> str:
    """Where Ray Train keeps model ``name``'s checkpoints (``<storage>/<RAY_RUN_NAME>/``): straight at the run's URI
    for a remote run, so that every node reaches them."""
    return f"{run.uri}/models/{name}/ray" if run.is_remote else str(run.model_dir(name) / "ray")


def required_weights(config: Config, names: list[str]) -> dict[str, WeightsSource | None]:
    """Where each variant of ``names`` gets its starting weights (None: from scratch), checked on the driver before
    any worker starts, so that a missing file fails once, at once, instead of in every worker and every retry Ray
    Train's ``FailureConfig`` allows. Raises WeightsError naming every model that lacks them and the ways to supply
    them."""
    models = {}
    for name in names:
        cfg = config.model_config(name)
        models[name] = (cfg.arch, cfg.weights or cfg.pretrained, cfg.weights_dir)
    return check_weights(models)


def worker_config(cfg: TrainConfig, source: WeightsSource | None) -> TrainConfig:
    """The training config the workers get: a model whose weights the driver found in ``train.weights_dir`` loads
    that very file (``weights``), so the workers repeat no search."""
    return dataclasses.replace(cfg, weights=source.location) if source and source.kind == "weights_dir" else cfg


def train_model(config: Config, run: RunDir, name: str, *, resume: bool = False,
                step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train variant ``name`` (a key of ``train.models``, or an architecture) with Ray Train on the run's ingested
    data; write ``RUN/models/<name>/``.

    ``resume`` continues from the last checkpoint of an earlier, interrupted run of this model; otherwise training
    starts afresh. ``step_hook`` (see ``pipelines.loop``) is called on every worker after each optimiser step.
    Returns a summary (best epoch, validation metrics at it, weights origin, paths, timings).
    """
    cfg = config.model_config(name)  # an unknown name or arch fails here, not on the workers
    source = required_weights(config, [name])[name]  # so do missing weights
    data = read_info(run.root)
    model_dir = run.model_dir(name)
    storage = ray_storage(run, name)
    init_ray()
    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    capacity.check(f"train {name}", capacity.train_needs(name, cfg), cluster)  # before any worker or data task
    if not resume:
        remove_tree(f"{storage}/{RAY_RUN_NAME}")
    # TensorBoard: live from rank 0 when the run is local; written from the history after the run otherwise
    loop = loop_spec(worker_config(cfg, source), name, data, tb_dir=None if run.is_remote else model_dir / "tb",
                     step_hook=step_hook)
    model_dir.mkdir(parents=True, exist_ok=True)
    quiet_ray_progress()
    log.info("training %s: %d epochs, %d worker(s), balance=%s, starting from %s", name, cfg.epochs, cfg.workers,
             cfg.balance, source.describe() if source else "scratch")
    started = time.perf_counter()
    with capacity.waiting_notice(f"train {name}"):
        result = build_trainer(cfg, loop, training_datasets(run, cfg), storage, RAY_RUN_NAME).fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} reported no checkpoint (see the Ray logs under {storage})")
    # the artefacts record the configured settings (fingerprint, config.yaml), not the workers' pinned weights file
    return write_artefacts(run, dataclasses.replace(loop, train=cfg), data, read_state(result.checkpoint), seconds)


def checkpoint_record(loop: LoopSpec, data: DataRecord, state: dict[str, Any], run_id: str,
                      fp: str) -> CheckpointRecord:
    """The record of the best epoch's model of a finished training (``state``: its last checkpoint)."""
    cfg, spec = loop.train, model_spec(loop.arch)
    stopping, history = state["early_stopping"], state["history"]
    best_row = next(row for row in history if row["epoch"] == stopping["best_epoch"])
    return CheckpointRecord(
        name=loop.name, arch=loop.arch, task=loop.task, classes=loop.classes, num_classes=loop.outputs,
        input_size=loop.input_size, image_size=loop.image_size, mean=tuple(spec["mean"]), std=tuple(spec["std"]),
        arch_kwargs={key: getattr(cfg, key) for key in spec["arch_kwargs"]}, preprocessing=dict(data.preprocessing),
        pretrained_origin=state["pretrained_origin"], versions=package_versions(), run_id=run_id, fingerprint=fp,
        data_fingerprint=data.fingerprint, best_epoch=stopping["best_epoch"], monitor=cfg.monitor,
        epochs_trained=len(history), balance=cfg.balance, seed=cfg.seed,
        metrics={k: best_row[k] for k in best_row if k.startswith("val_")})


def write_artefacts(run: RunDir, loop: LoopSpec, data: DataRecord, state: dict[str, Any],
                    seconds: float) -> dict[str, Any]:
    """best.pt (best epoch's weights) + model.json, config.yaml, history.csv/json, learning_curve.png, manifest."""
    name, cfg = loop.name, loop.train
    model_dir = run.model_dir(name)
    history = state["history"]
    options = {key: getattr(cfg, key) for key in model_spec(loop.arch)["arch_kwargs"]}
    model = rebuild_model(loop.arch, loop.outputs, origin=state["pretrained_origin"], input_size=loop.input_size,
                          loading=f"{name}'s best epoch ({state['early_stopping']['best_epoch']})", **options)
    model.load_state_dict(state["early_stopping"]["best_state"])
    cfg_dict = dataclasses.asdict(cfg)
    fp = train_fingerprint(cfg, data)
    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{fp[:8]}"
    record = checkpoint_record(loop, data, state, run_id, fp)
    save_checkpoint(model_dir / "best.pt", model, record)
    dump_yaml(cfg_dict, model_dir / "config.yaml")  # the effective training config (file, tuned values, flags)
    write_history(history, model_dir, tensorboard=run.is_remote)
    plot_learning_curve(history, model_dir / "learning_curve.png", title=f"{name} ({record.pretrained_origin})")
    images = sum(row["images"] for row in history)
    train_seconds = sum(row["train_seconds"] for row in history)
    summary = {
        "name": name, "arch": loop.arch, "best_epoch": record.best_epoch, "epochs": len(history),
        "pretrained": record.pretrained_origin, "run_id": run_id, **record.metrics, "seconds": seconds,
        "images_per_second": images / train_seconds if train_seconds else 0.0,
        "attempts": max(row["attempt"] for row in history) + 1, "model_dir": str(model_dir),
    }
    run.record(f"models/{name}", config=cfg_dict, fingerprint=fp, run_id=run_id, best_epoch=record.best_epoch,
               metrics=dict(record.metrics), pretrained=record.pretrained_origin)
    return summary


def train_all(config: Config, run: RunDir) -> dict[str, dict[str, Any]]:
    """Train every model of ``train.models``, one after the other (each uses the whole worker pool)."""
    if not config.train.models:
        raise ValueError("train.models is empty: name at least one model to train (e.g. custom_cnn: {})")
    required_weights(config, list(config.train.models))  # all at once, before the first training
    return {name: train_model(config, run, name) for name in config.train.models}


# --------------------------------------------------------------------------------------------- CLI

_FLAG_FIELDS = {"workers": "workers", "gpus_per_worker": "gpus_per_worker", "epochs": "epochs", "balance": "balance",
                "weights": "weights", "batch_size": "batch_size", "lr": "lr"}


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion train``."""
    parser.add_argument("--run", required=True, help="run directory (ingested with `lesion ingest`)")
    parser.add_argument("--config", help="YAML config (default: RUN/config.yaml, else the built-in defaults)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="variant to train (a key of train.models, or an architecture)")
    which.add_argument("--all", action="store_true", help="train every model of train.models in the config")
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (= --gpus-per-worker 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions allowed)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--balance", choices=BALANCE_MODES, help="class imbalance handling")
    parser.add_argument("--pretrained", action="store_true", help="start from ImageNet weights")
    parser.add_argument("--weights", help="local pretrained weights file or directory (implies --pretrained)")
    parser.add_argument("--from-tune", action="store_true",
                        help="apply RUN/tune/best.yaml (the best config found by `lesion tune`) first")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")


def _overrides(args, names: list[str]) -> dict[str, Any]:
    """Flag values as per-model overrides (``train.models.<name>.<field>``), so they beat the config's own
    per-model settings."""
    values = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items()}
    if args.gpu and args.gpus_per_worker is None:
        values["gpus_per_worker"] = 1.0
    if args.pretrained:
        values["pretrained"] = True
    return {f"train.models.{name}.{field}": value for name in names for field, value in values.items()
            if value is not None}


def run_command(name: str, args) -> int:
    """``lesion train``: train, then print one line per model."""
    run = RunDir(args.run)
    base = resolve_config(run, args.config)
    names = list(base.train.models) if args.all else [args.model]
    if not args.all and args.model not in base.train.models:  # an architecture trained under its own name
        base = apply_overrides(base, {f"train.models.{args.model}": {}})
    tuned = best_overrides(run, base) if args.from_tune else {}  # every variant of the tuned architecture
    # flags beat the tuned settings, which beat the config's
    config = resolve_config(run, args.config, {**tuned, **_overrides(args, names)}, save=args.save_config)
    if args.all:
        results = train_all(config, run)
    else:
        results = {args.model: train_model(config, run, args.model, resume=args.resume)}
    print(f"{'model':<20} {'best epoch':>10} {'val bal.acc':>11} {'val AUC':>8} {'val loss':>9} {'img/s':>8}  weights")
    for result in results.values():
        print(f"{result['name']:<20} {result['best_epoch']:>10} {result['val_balanced_accuracy']:>11.4f} "
              f"{result['val_roc_auc']:>8.4f} {result['val_loss']:>9.4f} {result['images_per_second']:>8.1f}  "
              f"{result['pretrained']}")
    print(f"models written under {run.models}")
    return 0
