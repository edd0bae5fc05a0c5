"""``lesion train``: train one model (or all configured ones) with Ray Train, from the ingested Parquet shards.

The training split streams to DDP workers through Ray Data (``get_dataset_shard``): raw uint8 pixels are viewed
without copying, pinned and moved to the worker's device in Ray Data's background threads, and augmented there as
batch tensor ops. Each epoch every worker reports its metrics and rank 0 a checkpoint (model, optimizer, scheduler,
early stopping with the best weights, history); a worker that dies is replaced and training resumes from the last
checkpoint (``FailureConfig``). After the run the best epoch's weights become ``RUN/models/<name>/best.pt``.

The loop itself (``run_training``) does not know where it runs: a *session* gives it data, the device, DDP wrapping,
checkpoint restore and reporting. Ray Train workers use ``TrainSession``; Ray Tune trials (``pipelines.tune``) use
their own session around the same loop, so tuning and training share one training function.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from lesion.config import Config, TrainConfig, dump_yaml
from lesion.data.shards import decode_images, read_info, split_files
from lesion.models import create_model, model_spec, save_checkpoint, unwrap
from lesion.rundir import RunDir, fingerprint
from lesion.training import (
    BALANCE_MODES,
    EarlyStopping,
    LoopSettings,
    apply_phase,
    balanced_batches,
    build_loss,
    build_optimizer,
    build_scheduler,
    evaluate_epoch,
    phase_epochs,
    phase_of,
    plot_learning_curve,
    sampling_rates,
    seed_everything,
    step_scheduler,
    train_epoch,
)
from pipelines.common import init_ray, resolve_config

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # inside each Ray checkpoint
RAY_RUN_NAME = "train"  # RUN/models/<name>/ray/<RAY_RUN_NAME>/ holds Ray Train's checkpoints
FAIL_ENV = "LESION_FAIL_AT_EPOCH"  # fault injection: the last worker exits once, mid-way through this epoch
FAIL_MARKER = ".fault-injected"  # in the model dir: the injected failure has happened (so it fires once)
# Ray Train writes this beside the checkpoints once it has registered one (the checkpoint folder appears earlier)
REGISTERED_FILE = "checkpoint_manager_snapshot.json"
SHUFFLE_BUFFER_MIN = 512  # rows in the local shuffle buffer (at least 4 batches)
PREFETCH_BATCHES = 4
READ_CPUS = 0.25  # CPUs reserved by each Ray Data read task

# The zero-copy view of Arrow image bytes is read-only; the loop never writes into it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


# --------------------------------------------------------------------------------------------- data


def arrow_images(column: pa.ChunkedArray | pa.Array, image_size: int) -> np.ndarray:
    """Arrow binary column of raw pixels -> (N, S, S, 3) uint8: a view of the Arrow buffer for one chunk, one copy
    for several."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            parts = [arrow_images(chunk, image_size) for chunk in column.chunks]
            return np.concatenate(parts) if parts else decode_images([], image_size)
        column = column.chunk(0)
    row_bytes = image_size * image_size * 3
    binary = pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)
    if binary and column.null_count == 0 and len(column):
        offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        _, offsets_buf, data_buf = column.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset: column.offset + len(column) + 1]
        if np.all(np.diff(offsets) == row_bytes):
            flat = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]]
            return flat.reshape(len(column), image_size, image_size, 3)
    return decode_images(column.to_pylist(), image_size)  # copies; raises on rows of the wrong size


class ImageBatchCollate(ArrowBatchCollateFn):
    """Arrow batch -> (uint8 images (N, S, S, 3), int64 labels) tensors, run in Ray Data's collate threads."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(arrow_images(batch.column("image"), self.image_size))
        labels = torch.from_numpy(batch.column("label").to_numpy().astype(np.int64))
        return images, labels


def read_split(run: RunDir, split: str, seed: int | None = None) -> ray.data.Dataset:
    """The image and label columns of one ingested split as a Ray Dataset (file order shuffled per epoch with
    ``seed``; in order when None)."""
    files = split_files(run.root, split)
    if not files:
        raise FileNotFoundError(f"no {split} shards under {run.data / split}: run `lesion ingest --run {run.uri}`")
    if run.is_remote:  # every node reads the shards from the run's storage, not the driver's staging copy
        files = [f"{run.uri}/data/{split}/{Path(f).name}" for f in files]
    shuffle = None if seed is None else ray.data.FileShuffleConfig(seed=seed)
    # Reading raw-pixel shards is light work: a fraction of a CPU per read task keeps reads schedulable beside
    # fractional-CPU train workers on small machines (the 2-CPU hang in RAY-NOTES.md).
    return ray.data.read_parquet(files, shuffle=shuffle, num_cpus=READ_CPUS).select_columns(["image", "label"])


def data_config() -> ray.train.DataConfig:
    """Split the training set across workers; give every worker the whole validation set, in order."""
    ordered = ray.data.ExecutionOptions(preserve_order=True)
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": ordered, "val": ordered})


# --------------------------------------------------------------------------------------------- sessions


class TrainSession:
    """The loop's view of a Ray Train worker: dataset shards, device, DDP, checkpoints, ``ray.train.report``."""

    def __init__(self, loop: dict[str, Any]):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.loop = loop

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def _batches(self, name: str, batch_size: int, **kwargs):
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=batch_size, collate_fn=ImageBatchCollate(self.loop["image_size"]), device=self.device,
            pin_memory=self.device.type == "cuda", prefetch_batches=PREFETCH_BATCHES, **kwargs)

    def train_batches(self, epoch: int):
        batch_size = self.loop["cfg"]["batch_size"]
        rows = self.loop["train_rows"] // self.world_size  # the equal split of every epoch
        return self._batches("train", batch_size, drop_last=rows % batch_size == 1,  # no batch of 1 for BatchNorm
                             local_shuffle_buffer_size=max(SHUFFLE_BUFFER_MIN, 4 * batch_size),
                             local_shuffle_seed=derive_seed(self.loop["cfg"]["seed"], epoch, self.rank))

    def val_batches(self):
        return self._batches("val", 2 * self.loop["cfg"]["batch_size"])

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (base seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------- the loop


def loop_config(cfg: TrainConfig, name: str, info: dict[str, Any], *, tb_dir: Path | None = None,
                fail_at_epoch: int | None = None, fail_marker: Path | None = None,
                registered: str | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data: the resolved training config, data facts, output places."""
    if cfg.balance not in BALANCE_MODES:
        raise ValueError(f"train.balance: expected one of {', '.join(BALANCE_MODES)}, got {cfg.balance!r}")
    classes = list(info["classes"])
    counts = info["counts"]
    return {
        "name": name,
        "cfg": {**dataclasses.asdict(cfg), "models": {}},
        "task": info["task"],
        "classes": classes,
        "image_size": int(info["image_size"]),
        "input_size": int(cfg.input_size or info["image_size"]),
        "train_counts": [int(counts["train"].get(c, 0)) for c in classes],
        "train_rows": int(sum(counts["train"].values())),
        "tb_dir": str(tb_dir) if tb_dir else None,
        "fail_at_epoch": fail_at_epoch,
        "fail_marker": str(fail_marker) if fail_marker else None,
        "registered": registered,  # Ray Train's file that says a checkpoint is registered (for fault injection)
    }


def build_model(loop: dict[str, Any]) -> torch.nn.Module:
    """The model of ``loop`` (pretrained weights as configured), with the config's architecture options."""
    cfg = loop["cfg"]
    pretrained = cfg["weights"] or cfg["pretrained"]
    outputs = 1 if loop["task"] == "binary" else len(loop["classes"])
    arch = {key: cfg[key] for key in model_spec(loop["name"])["arch_kwargs"]}
    return create_model(loop["name"], outputs, pretrained=pretrained, input_size=loop["input_size"], **arch)


def _maybe_fail(loop: dict[str, Any], epoch: int, rank: int, world_size: int):
    """Fault injection: a callback that kills this worker's process after the first step of the chosen epoch."""
    if loop.get("fail_at_epoch") != epoch or rank != world_size - 1 or not loop.get("fail_marker"):
        return None
    marker = Path(loop["fail_marker"])

    def fail(step: int) -> None:
        if step == 0 and not marker.exists():
            # Ray Train registers the last report's checkpoint after the report returns: exit only once it has
            # registered the previous epoch's (at most a minute), so that the restart resumes from it.
            deadline = time.monotonic() + 60
            while epoch > 0 and not _registered(loop["registered"], epoch - 1) and time.monotonic() < deadline:
                time.sleep(0.2)
            marker.touch()
            log.warning("fault injection: worker rank %d exits in epoch %d", rank, epoch)
            os._exit(1)

    return fail


def run_training(loop: dict[str, Any], session) -> None:
    """Train for the configured epochs (resuming from the session's checkpoint), reporting every epoch."""
    cfg = TrainConfig(**loop["cfg"])
    seed_everything(cfg.seed)
    device = session.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec = model_spec(loop["name"])
    settings = LoopSettings(task=loop["task"], num_classes=len(loop["classes"]), mean=spec["mean"], std=spec["std"],
                            input_size=loop["input_size"], device=device, amp=cfg.amp,
                            channels_last=cfg.channels_last)
    model = build_model(loop)
    state = None
    checkpoint = session.checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    start = state["epoch"] + 1 if state else 0
    phase = phase_of(start, model, cfg)
    lr = apply_phase(model, phase, cfg)
    if state:
        model.load_state_dict(state["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def prepare(plain):
        wrapped = session.prepare(plain)
        return torch.compile(wrapped) if cfg.compile else wrapped

    net = prepare(model)
    optimizer = build_optimizer(net, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, phase_epochs(phase, cfg))
    stopper = EarlyStopping(cfg.monitor, cfg.patience)
    history: list[dict[str, Any]] = []
    attempt = 0
    if state:
        if state["phase"] == phase:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        stopper.load_state_dict(state["early_stopping"])
        history = list(state["history"])
        attempt = state["attempt"] + 1
        log.info("resuming %s at epoch %d (attempt %d)", loop["name"], start, attempt)
    loss_fn = build_loss(loop["task"], cfg, loop["train_counts"])
    rates = sampling_rates(loop["train_counts"]) if cfg.balance == "oversample" else None
    writer = None
    if session.rank == 0 and loop.get("tb_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(loop["tb_dir"])

    for epoch in range(start, cfg.epochs):
        new_phase = phase_of(epoch, model, cfg)
        if new_phase != phase:
            phase = new_phase
            lr = apply_phase(model, phase, cfg)
            net = prepare(unwrap(net))
            optimizer = build_optimizer(net, cfg, lr)
            scheduler = build_scheduler(optimizer, cfg, phase_epochs(phase, cfg))
        lr_now = optimizer.param_groups[0]["lr"]
        generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, epoch, session.rank, 1))
        batches = session.train_batches(epoch)
        if rates is not None:
            batches = balanced_batches(batches, rates, generator)
        started = time.perf_counter()
        train = train_epoch(net, batches, optimizer, loss_fn, settings, augment_strength=cfg.augment,
                            generator=generator, grad_clip=cfg.grad_clip,
                            on_step=_maybe_fail(loop, epoch, session.rank, session.world_size))
        train_seconds = time.perf_counter() - started
        val = evaluate_epoch(net, session.val_batches(), settings)
        best = stopper.step(epoch, val, net)
        step_scheduler(scheduler, val, cfg.monitor)
        seen = train.pop("seen")
        row = {"epoch": epoch, "phase": phase, "attempt": attempt, "lr": lr_now, **train, **val, "best": best,
               "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - started,
               "images_per_second": train["images"] / train_seconds if train_seconds > 0 else 0.0,
               **{f"seen_{c}": int(n) for c, n in zip(loop["classes"], seen)}}
        history.append(row)
        if writer is not None:
            _add_scalars(writer, row)
        metrics = {**row, "best_epoch": stopper.best_epoch, f"best_{cfg.monitor}": stopper.best,
                   "early_stop": stopper.should_stop}
        with tempfile.TemporaryDirectory() as folder:
            if session.rank == 0:
                torch.save({"epoch": epoch, "phase": phase, "attempt": attempt, "model": unwrap(net).state_dict(),
                        "pretrained_origin": unwrap(net).pretrained_origin,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "early_stopping": stopper.state_dict(), "history": history},
                           Path(folder) / STATE_FILE)
            session.report(metrics, folder if session.rank == 0 else None)
        if stopper.should_stop:
            log.info("early stopping at epoch %d: best %s %.4f at epoch %d", epoch, cfg.monitor, stopper.best,
                     stopper.best_epoch)
            break
    if writer is not None:
        writer.close()


def train_func(loop: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    run_training(loop, TrainSession(loop))


# --------------------------------------------------------------------------------------------- driver


def training_datasets(run: RunDir, cfg: TrainConfig, *, materialize_train: bool = False) -> dict[str, ray.data.Dataset]:
    """The train split streamed from the shards (file order reshuffled each epoch), or read once into the object
    store with ``materialize_train``; the validation split read once."""
    train = read_split(run, "train", seed=cfg.seed)
    return {"train": train.materialize() if materialize_train else train, "val": read_split(run, "val").materialize()}


def build_trainer(cfg: TrainConfig, loop: dict[str, Any], datasets: dict[str, ray.data.Dataset], storage: str,
                  run_name: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer over ``datasets`` (``training_datasets``) with the config's workers, resources and failure
    policy; checkpoints go to ``storage/run_name``."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    return ray.train.torch.TorchTrainer(
        train_func,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        datasets=datasets,
        dataset_config=data_config(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )


def _storage(location: str):
    """(pyarrow filesystem, path) of a local path or a pyarrow-supported storage URI."""
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)


def _registered(snapshot: str, epoch: int) -> bool:
    """Whether Ray Train's checkpoint-manager snapshot (local path or URI) says the latest registered checkpoint is
    of ``epoch`` or later (its reported metrics carry our ``epoch``)."""
    from pyarrow import fs as pafs

    filesystem, path = _storage(snapshot)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    try:
        with filesystem.open_input_stream(path) as stream:
            latest = json.loads(stream.read()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # caught mid-write
        return False
    return bool(latest) and latest["metrics"]["epoch"] >= epoch


def remove_tree(location: str) -> None:
    """Delete a local folder or a folder in a pyarrow-supported storage URI (nothing when it is absent)."""
    from pyarrow import fs as pafs

    filesystem, path = _storage(location)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def write_tensorboard(history: list[dict[str, Any]], folder: Path) -> None:
    """TensorBoard scalars of every numeric history column, one step per epoch."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for row in history:
            _add_scalars(writer, row)


def _add_scalars(writer, row: dict[str, Any]) -> None:
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "attempt"):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def read_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state saved in a checkpoint by ``run_training``."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def train_model(config: Config, run: RunDir, name: str, *, resume: bool = False) -> dict[str, Any]:
    """Train model ``name`` with Ray Train on the run's ingested data; write ``RUN/models/<name>/``.

    ``resume`` continues from the last checkpoint of an earlier, interrupted run of this model; otherwise training
    starts afresh. Returns a summary (best epoch, validation metrics at it, weights origin, paths, timings).
    """
    model_spec(name)  # unknown names fail here, not on the workers
    cfg = config.model_config(name)
    info = read_info(run.root)
    model_dir = run.model_dir(name)
    storage = f"{run.uri}/models/{name}/ray" if run.is_remote else str(model_dir / "ray")
    if not resume:
        remove_tree(f"{storage}/{RAY_RUN_NAME}")
    fail_at = os.environ.get(FAIL_ENV)
    marker = model_dir / FAIL_MARKER
    marker.unlink(missing_ok=True)
    # TensorBoard: live from rank 0 when the run is local; written from the history after the run otherwise
    loop = loop_config(cfg, name, info, tb_dir=None if run.is_remote else model_dir / "tb",
                       fail_at_epoch=int(fail_at) if fail_at else None, fail_marker=marker if fail_at else None,
                       registered=f"{storage}/{RAY_RUN_NAME}/{REGISTERED_FILE}")
    model_dir.mkdir(parents=True, exist_ok=True)
    init_ray()
    log.info("training %s: %d epochs, %d worker(s), balance=%s", name, cfg.epochs, cfg.workers, cfg.balance)
    started = time.perf_counter()
    result = build_trainer(cfg, loop, training_datasets(run, cfg), storage, RAY_RUN_NAME).fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} reported no checkpoint (see the Ray logs under {storage})")
    state = read_state(result.checkpoint)
    return write_artefacts(config, run, name, cfg, loop, info, state, seconds)


def write_artefacts(config: Config, run: RunDir, name: str, cfg: TrainConfig, loop: dict[str, Any],
                    info: dict[str, Any], state: dict[str, Any], seconds: float) -> dict[str, Any]:
    """best.pt (best epoch's weights) + model.json, config.yaml, history.csv/json, learning_curve.png, manifest."""
    model_dir = run.model_dir(name)
    history = state["history"]
    stopping = state["early_stopping"]
    best_epoch = stopping["best_epoch"]
    best_row = next(row for row in history if row["epoch"] == best_epoch)
    model = build_model({**loop, "cfg": {**loop["cfg"], "pretrained": False, "weights": None}})
    model.load_state_dict(stopping["best_state"])
    spec = model_spec(name)
    cfg_dict = {**dataclasses.asdict(cfg), "models": {}}
    fp = fingerprint(cfg_dict, info.get("fingerprint"))
    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{fp[:8]}"
    val_metrics = {k: best_row[k] for k in best_row if k.startswith("val_")}
    checkpoint_info = {
        "name": name, "task": loop["task"], "classes": loop["classes"], "num_classes": 1 if loop["task"] == "binary"
        else len(loop["classes"]), "input_size": loop["input_size"], "image_size": loop["image_size"],
        "mean": list(spec["mean"]), "std": list(spec["std"]),
        "arch_kwargs": {key: loop["cfg"][key] for key in spec["arch_kwargs"]},
        "pretrained": state["pretrained_origin"], "run_id": run_id,
        "best_epoch": best_epoch, "monitor": cfg.monitor, "epochs_trained": len(history), "balance": cfg.balance,
        "seed": cfg.seed, "data_fingerprint": info.get("fingerprint"), "metrics": val_metrics,
    }
    save_checkpoint(model_dir / "best.pt", model, checkpoint_info)
    dump_yaml(cfg_dict, model_dir / "config.yaml")
    pd.DataFrame(history).to_csv(model_dir / "history.csv", index=False)
    (model_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    if run.is_remote:
        write_tensorboard(history, model_dir / "tb")
    plot_learning_curve(history, model_dir / "learning_curve.png", title=f"{name} ({checkpoint_info['pretrained']})")
    images = sum(row["images"] for row in history)
    train_seconds = sum(row["train_seconds"] for row in history)
    summary = {
        "name": name, "best_epoch": best_epoch, "epochs": len(history), "pretrained": checkpoint_info["pretrained"],
        "run_id": run_id, **val_metrics, "seconds": seconds,
        "images_per_second": images / train_seconds if train_seconds else 0.0,
        "attempts": max(row["attempt"] for row in history) + 1, "model_dir": str(model_dir),
    }
    run.record(f"models/{name}", config=cfg_dict, fingerprint=fp, run_id=run_id, best_epoch=best_epoch,
               metrics=val_metrics, pretrained=checkpoint_info["pretrained"])
    return summary


def train_all(config: Config, run: RunDir) -> dict[str, dict[str, Any]]:
    """Train every model of ``train.models``, one after the other (each uses the whole worker pool)."""
    if not config.train.models:
        raise ValueError("train.models is empty: name at least one model to train (e.g. custom_cnn: {})")
    return {name: train_model(config, run, name) for name in config.train.models}


# --------------------------------------------------------------------------------------------- CLI

_FLAG_FIELDS = {"workers": "workers", "gpus_per_worker": "gpus_per_worker", "epochs": "epochs", "balance": "balance",
                "weights": "weights", "batch_size": "batch_size", "lr": "lr"}


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion train``."""
    parser.add_argument("--run", required=True, help="run directory (ingested with `lesion ingest`)")
    parser.add_argument("--config", help="YAML config (default: RUN/config.yaml, else the built-in defaults)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model to train (a name of lesion.models.MODEL_NAMES)")
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
    from lesion.config import apply_overrides

    run = RunDir(args.run)
    config = resolve_config(run, args.config)
    if args.from_tune:
        from pipelines.tune import apply_best

        config = apply_best(config, run)
    names = list(config.train.models) if args.all else [args.model]
    config = apply_overrides(config, _overrides(args, names))
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
