"""The one training loop of ``lesion train`` and ``lesion tune``, and the sessions it runs in.

The loop (``run_training``) does not know where it runs: a *session* gives it data, the device, DDP wrapping,
checkpoint restore and reporting. Ray Train workers use ``TrainSession`` (dataset shards streamed by Ray Data);
one-worker Ray Tune trials use ``TuneSession`` (split arrays from the object store). Each epoch every worker reports
its metrics and rank 0 a checkpoint (model, optimizer, scheduler, early stopping with the best weights, history);
a restarted worker group resumes from the last checkpoint.

The loop's input is a ``lesion.records.LoopSpec`` (``loop_spec``): the resolved training config, facts about the
data and output places. Its optional ``step_hook`` is a picklable callable ``hook(epoch=, step=, rank=,
world_size=)`` called on every worker after each optimiser step: instrumentation from the caller's side (the tests
inject faults with it). When the variant's train stage is tracked, its MLflow run travels in the spec and rank 0
logs every epoch's metrics to it live, from a background thread (``pipelines.tracking.EpochLogger``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from lesion.config import TrainConfig
from lesion.models import create_model, model_spec, set_cpu_threads, unwrap
from lesion.records import DataRecord, LoopSpec
from lesion.training import (
    EarlyStopping,
    LoopSettings,
    add_scalars,
    apply_phase,
    array_batches,
    balanced_batches,
    build_loss,
    build_optimizer,
    build_scheduler,
    evaluate_epoch,
    phase_epochs,
    phase_of,
    sampling_rates,
    seed_everything,
    step_scheduler,
    tensorboard_writer,
    train_epoch,
)
from pipelines.datasets import ImageBatchCollate, data_config
from pipelines.tracking import EpochLogger, live_run

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # inside each checkpoint
SHUFFLE_BUFFER_MIN = 512  # rows in the local shuffle buffer (at least 4 batches)
PREFETCH_BATCHES = 4

StepHook = Callable[..., None]  # hook(epoch=, step=, rank=, world_size=)


def verbose() -> bool:
    """Whether Ray's own progress output is wanted: ``lesion -v`` (the root logger at DEBUG)."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_ray_progress() -> None:
    """Ray Data's progress bars off unless ``-v``; call before building datasets (each captures the setting)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose()


def format_duration(seconds: float) -> str:
    """``190`` -> ``3m10s``; ``4000`` -> ``1h06m``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(name: str, row: dict[str, Any], epochs: int, seconds_per_epoch: float) -> str:
    """One epoch of one training, as a person reads it: ``resnet50  epoch 7/40  train loss 0.82  val bal.acc 0.61
    val AUC 0.90  412 img/s  eta 3m10s``."""
    left = epochs - row["epoch"] - 1
    return (f"{name}  epoch {row['epoch'] + 1}/{epochs}  train loss {row['train_loss']:.2f}  "
            f"val bal.acc {row['val_balanced_accuracy']:.2f}  val AUC {row['val_roc_auc']:.2f}  "
            f"{row['images_per_second']:.0f} img/s  eta {format_duration(left * seconds_per_epoch)}")


def keeps_data(loop: LoopSpec, world_size: int) -> bool:
    """Whether a Train worker keeps its share of the train and val splits in memory after the first epoch
    (``train.cache_mb``): replaying small splits spares Ray Data's start-up of a streaming read every epoch, which
    costs seconds where an epoch of small images is seconds of compute."""
    rows = loop.train_rows // world_size + loop.val_rows
    return rows * loop.image_size ** 2 * 3 <= loop.train.cache_mb * 2**20


def worker_device(assigned: torch.device) -> tuple[torch.device, bool]:
    """The device a worker computes on, and whether it fell back to the CPU: Ray gave it a GPU that torch cannot see
    (a logical one, as ``ray.init(num_gpus=1)`` on a CPU machine declares), so it computes on the CPU, as on a GPU
    (bf16 autocast, ``LoopSettings.amp_on_cpu``), rather than failing on a CUDA call."""
    if assigned.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), True
    return assigned, False


def process_group_backend(gpus_per_worker: float) -> str:
    """The workers' ``torch.distributed`` backend: NCCL for GPU workers, gloo for CPU ones, and gloo too where the
    driver's node declares GPUs that torch cannot see (logical GPUs on a CPU machine: NCCL refuses to start without a
    real one, and the workers fall back to the CPU, ``worker_device``)."""
    if gpus_per_worker <= 0:
        return "gloo"
    here = ray.get_runtime_context().get_node_id()
    gpus_here = next((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["NodeID"] == here), 0.0)
    return "gloo" if gpus_here and not torch.cuda.is_available() else "nccl"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (base seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------- sessions


class TrainSession:
    """The loop's view of a Ray Train worker: dataset shards, device, DDP, checkpoints, ``ray.train.report``."""

    def __init__(self, loop: LoopSpec):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device, self.gpu_fallback = worker_device(ray.train.torch.get_device())
        self.loop = loop
        set_cpu_threads(loop.train.threads_per_worker, self.device)
        self.kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> this worker's images and labels
        self.keeps = keeps_data(loop, self.world_size)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def _batches(self, name: str, batch_size: int, **kwargs):
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=batch_size, collate_fn=ImageBatchCollate(self.loop.image_size), device=self.device,
            pin_memory=self.device.type == "cuda", prefetch_batches=PREFETCH_BATCHES, **kwargs)

    def _keep(self, name: str, batches):
        """Yield ``batches``; once all are seen, keep them for replay when the worker keeps its data."""
        if not self.keeps:
            yield from batches
            return
        images, labels = [], []
        for batch in batches:
            images.append(batch[0].cpu().numpy())
            labels.append(batch[1].cpu().numpy())
            yield batch
        self.kept[name] = (np.concatenate(images), np.concatenate(labels))

    def train_batches(self, epoch: int):
        batch_size = self.loop.train.batch_size
        seed = derive_seed(self.loop.train.seed, epoch, self.rank)
        if "train" in self.kept:  # the same rows as the first epoch, in a new order
            images, labels = self.kept["train"]
            return array_batches(images, labels, batch_size, seed=seed, drop_last=len(labels) % batch_size == 1)
        rows = self.loop.train_rows // self.world_size  # the equal split of every epoch
        return self._keep("train", self._batches(
            "train", batch_size, drop_last=rows % batch_size == 1,  # no batch of 1 for BatchNorm
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_MIN, 4 * batch_size), local_shuffle_seed=seed))

    def val_batches(self):
        batch_size = 2 * self.loop.train.batch_size
        if "val" in self.kept:
            return array_batches(*self.kept["val"], batch_size)
        return self._keep("val", self._batches("val", batch_size))

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """The loop's view of a one-worker Tune trial: arrays from the object store, ``tune.report``."""

    rank = 0
    world_size = 1

    def __init__(self, loop: LoopSpec, data: dict[str, np.ndarray]):
        self.loop = loop
        self.data = data
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.gpu_fallback = self.device.type == "cpu" and bool(ray.get_gpu_ids())  # see worker_device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def train_batches(self, epoch: int):
        batch_size = self.loop.train.batch_size
        labels = self.data["train_labels"]
        return array_batches(self.data["train_images"], labels, batch_size, drop_last=len(labels) % batch_size == 1,
                             seed=derive_seed(self.loop.train.seed, epoch, 0))

    def val_batches(self):
        return array_batches(self.data["val_images"], self.data["val_labels"], 2 * self.loop.train.batch_size)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


# --------------------------------------------------------------------------------------------- the loop


def loop_spec(cfg: TrainConfig, name: str, data: DataRecord, *, tb_dir: Path | None = None,
              step_hook: StepHook | None = None, progress: bool = True) -> LoopSpec:
    """Everything a worker needs: the resolved training config of variant ``name``, facts about ``data``, output
    places, an optional step hook, whether rank 0 logs one progress line per epoch (``progress``), and the MLflow run
    of the variant's train stage when it is tracked (``pipelines.tracking.live_run``)."""
    return LoopSpec.build(cfg, name, data, tb_dir=str(tb_dir) if tb_dir else None, step_hook=step_hook,
                          progress=progress, verbose=verbose(), tracking=live_run(name))


def build_model(loop: LoopSpec, *, pretrained: bool | str | None = None) -> torch.nn.Module:
    """The network of ``loop``'s architecture with the config's architecture options, starting from the configured
    weights (``pretrained`` None) or from ``pretrained``."""
    cfg = loop.train
    if pretrained is None:
        pretrained = cfg.weights or cfg.pretrained
    options = {key: getattr(cfg, key) for key in model_spec(loop.arch)["arch_kwargs"]}
    return create_model(loop.arch, loop.outputs, pretrained=pretrained, input_size=loop.input_size,
                        weights_dir=cfg.weights_dir, **options)


def read_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state saved in a checkpoint by ``run_training``."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


class TrainingRun:
    """One worker's training: the model, its wrapper (DDP, compile), optimizer, scheduler, early stopping and
    history, restored from the session's checkpoint when there is one. The optimizer and scheduler are rebuilt
    when the transfer-learning phase changes."""

    def __init__(self, loop: LoopSpec, session):
        self.loop, self.session = loop, session
        self.cfg = cfg = loop.train
        seed_everything(cfg.seed)
        if session.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        spec = model_spec(loop.arch)
        self.settings = LoopSettings(task=loop.task, num_classes=len(loop.classes), mean=spec["mean"],
                                     std=spec["std"], input_size=loop.input_size, device=session.device,
                                     amp=cfg.amp, channels_last=cfg.channels_last,
                                     amp_on_cpu=getattr(session, "gpu_fallback", False))
        self.loss_fn = build_loss(loop.task, cfg, loop.train_counts)
        self.rates = sampling_rates(loop.train_counts) if cfg.balance == "oversample" else None
        self.stopper = EarlyStopping(cfg.monitor, cfg.patience)
        self.history: list[dict[str, Any]] = []
        self.attempt = 0
        self.ema = None  # torch.optim.swa_utils.AveragedModel of the weights with train.ema
        checkpoint = session.checkpoint()
        state = read_state(checkpoint) if checkpoint is not None else None
        self.start = state["epoch"] + 1 if state else 0
        model = build_model(loop)
        self.enter_phase(phase_of(self.start, model, cfg), model, state)
        if state:
            self._resume(state)

    def enter_phase(self, phase: str, model: torch.nn.Module, state: dict[str, Any] | None = None) -> None:
        """Train ``model`` (weights from ``state`` if given) in ``phase``: freeze or unfreeze as configured, wrap it,
        build the phase's optimizer and scheduler."""
        self.phase = phase
        lr = apply_phase(model, phase, self.cfg)
        if state:
            model.load_state_dict(state["model"])
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = self.session.prepare(model)
        self.net = torch.compile(net) if self.cfg.compile else net
        if self.cfg.ema and self.ema is None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema), use_buffers=True)
            if state and "ema" in state:
                self.ema.load_state_dict(state["ema"])
        self.optimizer = build_optimizer(self.net, self.cfg, lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, phase_epochs(phase, self.cfg))

    def _resume(self, state: dict[str, Any]) -> None:
        if state["phase"] == self.phase:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.attempt = state["attempt"] + 1
        log.info("resuming %s at epoch %d (attempt %d)", self.loop.name, self.start, self.attempt)

    def run(self) -> None:
        """Train from ``start`` to the configured epochs (or early stopping), reporting every epoch."""
        cfg, session = self.cfg, self.session
        writer = tensorboard_writer(self.loop.tb_dir) if session.rank == 0 and self.loop.tb_dir else None
        tracked = EpochLogger(*self.loop.tracking) if session.rank == 0 and self.loop.tracking else None
        try:
            for epoch in range(self.start, cfg.epochs):
                phase = phase_of(epoch, unwrap(self.net), cfg)
                if phase != self.phase:
                    self.enter_phase(phase, unwrap(self.net))
                row = self.epoch(epoch)
                self.history.append(row)
                if session.rank == 0 and self.loop.progress:
                    timed = [r["epoch_seconds"] for r in self.history if r["attempt"] == self.attempt]
                    log.info("%s", progress_line(self.loop.name, row, cfg.epochs, sum(timed) / len(timed)))
                if writer is not None:
                    add_scalars(writer, row)
                if tracked is not None:
                    tracked.log(row)
                self.report(row)
                if self.stopper.should_stop:
                    log.info("early stopping at epoch %d: best %s %.4f at epoch %d", epoch, cfg.monitor,
                             self.stopper.best, self.stopper.best_epoch)
                    break
        finally:
            if writer is not None:
                writer.close()
            if tracked is not None:
                tracked.close()

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch and validate: the epoch's history row."""
        cfg, session = self.cfg, self.session
        lr = self.optimizer.param_groups[0]["lr"]
        generator = torch.Generator(device=session.device).manual_seed(derive_seed(cfg.seed, epoch, session.rank, 1))
        batches = session.train_batches(epoch)
        if self.rates is not None:
            batches = balanced_batches(batches, self.rates, generator)
        hook = self.loop.step_hook

        def on_step(step: int) -> None:
            if self.ema is not None:
                self.ema.update_parameters(unwrap(self.net))
            if hook is not None:
                hook(epoch=epoch, step=step, rank=session.rank, world_size=session.world_size)

        started = time.perf_counter()
        train = train_epoch(self.net, batches, self.optimizer, self.loss_fn, self.settings, augment_strength=cfg.augment,
                            augment_policy=cfg.augment_policy, mixup=cfg.mixup, generator=generator,
                            grad_clip=cfg.grad_clip, on_step=on_step)
        train_seconds = time.perf_counter() - started
        validated = self.net if self.ema is None else self.ema.module  # the EMA weights are the model with train.ema
        val = evaluate_epoch(validated, session.val_batches(), self.settings)
        best = self.stopper.step(epoch, val, validated)
        step_scheduler(self.scheduler, val, cfg.monitor)
        seen = train.pop("seen")
        return {"epoch": epoch, "phase": self.phase, "attempt": self.attempt, "lr": lr, **train, **val, "best": best,
                "train_seconds": train_seconds, "epoch_seconds": time.perf_counter() - started, "time": time.time(),
                "images_per_second": train["images"] / train_seconds if train_seconds > 0 else 0.0,
                **{f"seen_{c}": int(n) for c, n in zip(self.loop.classes, seen)}}

    def report(self, row: dict[str, Any]) -> None:
        """Report the epoch's metrics, with rank 0's checkpoint of the whole training state."""
        stopper = self.stopper
        metrics = {**row, "best_epoch": stopper.best_epoch, f"best_{self.cfg.monitor}": stopper.best,
                   "early_stop": stopper.should_stop}
        with tempfile.TemporaryDirectory() as folder:
            if self.session.rank == 0:
                model = unwrap(self.net)
                torch.save({"epoch": row["epoch"], "phase": self.phase, "attempt": self.attempt,
                            "model": model.state_dict(), "pretrained_origin": model.pretrained_origin,
                            "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                            "early_stopping": stopper.state_dict(), "history": self.history,
                            **({"ema": self.ema.state_dict()} if self.ema is not None else {})},
                           Path(folder) / STATE_FILE)
            self.session.report(metrics, folder if self.session.rank == 0 else None)


def run_training(loop: LoopSpec, session) -> None:
    """Train for the configured epochs (resuming from the session's checkpoint), reporting every epoch."""
    TrainingRun(loop, session).run()


def train_func(config: dict[str, LoopSpec]) -> None:
    """Ray Train's per-worker function, given ``{"loop": LoopSpec}`` (Ray Train takes a dict). Ray Train's own
    per-report lines are shown only with ``-v``; rank 0's progress line (root logger, INFO on Train workers) says the
    same in one line."""
    loop = config["loop"]
    if not loop.verbose:
        from ray.train.v2._internal.execution import context as train_context

        # Ray 2.60 logs "Reporting training result ..." on a logger named after that module's file path
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    run_training(loop, TrainSession(loop))


def build_trainer(cfg: TrainConfig, loop: LoopSpec, datasets: dict[str, ray.data.Dataset], storage: str,
                  run_name: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer running the loop over ``datasets`` (``pipelines.datasets.training_datasets``) with the
    config's workers, resources and failure policy; checkpoints go to ``storage/run_name``."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker > 0:
        resources["GPU"] = cfg.gpus_per_worker
    return ray.train.torch.TorchTrainer(
        train_func,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        torch_config=ray.train.torch.TorchConfig(backend=process_group_backend(cfg.gpus_per_worker)),
        datasets=datasets,
        dataset_config=data_config(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
