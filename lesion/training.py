"""The pieces of a training run, without Ray: optimizer, scheduler, loss, class balance, one training epoch, one
validation pass, early stopping, the two-phase transfer-learning schedule and the metrics history (CSV, JSON,
TensorBoard, learning-curve plot).

``pipelines/loop.py`` drives them on Ray Train workers (DDP); a notebook can drive them on one process. Batches are
``(images, labels)`` with images uint8 (N, H, W, 3), on any device; augmentation runs on the batch's device.
When ``torch.distributed`` is initialised, epoch statistics are summed over the ranks, so every rank sees the same
numbers and takes the same decisions (early stopping, learning-rate changes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lesion import metrics
from lesion.config import TrainConfig
from lesion.data import augment
from lesion.labels import output_units
from lesion.models import freeze_backbone, logits_to_probs, unfreeze_last_fraction, unwrap
from lesion.rundir import TEMP_MARK, atomic_path, write_atomic
from lesion.vocabulary import OPTIMIZERS, SCHEDULERS

log = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """What turns a uint8 batch into model input and logits into predictions, fixed for a whole run."""

    task: str  # multiclass or binary
    num_classes: int  # classes of the task (2 for binary, whose model has one logit)
    mean: Sequence[float]
    std: Sequence[float]
    input_size: int
    device: torch.device
    amp: bool = True  # bf16 autocast on CUDA (on the CPU only with amp_on_cpu)
    channels_last: bool = True
    amp_on_cpu: bool = False  # bf16 autocast on the CPU too (a worker given a GPU that torch cannot see)

    def autocast(self):
        """bf16 autocast on CUDA when enabled (and on the CPU with ``amp_on_cpu``); otherwise a no-op context."""
        if self.amp and (self.device.type == "cuda" or (self.device.type == "cpu" and self.amp_on_cpu)):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def monitor_mode(monitor: str) -> str:
    """``min`` for loss-like metrics, ``max`` for the others."""
    return "min" if monitor.endswith("loss") else "max"


# ------------------------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum) over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int):
    """ReduceLROnPlateau on the monitored metric, cosine annealing over ``epochs``, or None; stepped once an epoch.
    ``warmup_epochs`` > 0 first raises the rate linearly (epoch e of w at (e + 1) / (w + 1) of it), then the cosine
    runs over the epochs left."""
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"train.scheduler: expected one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    warmup = min(cfg.warmup_epochs, max(epochs - 1, 0))
    if cfg.scheduler == "plateau":
        if cfg.warmup_epochs:
            raise ValueError("train.warmup_epochs needs train.scheduler cosine or none (plateau follows the metric)")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=monitor_mode(cfg.monitor), factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup, 1))
    elif warmup:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    else:
        return None
    if not warmup:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def step_scheduler(scheduler, metrics: dict[str, float], monitor: str) -> None:
    """Advance the scheduler one epoch (plateau: on ``metrics[monitor]``)."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(metrics[monitor])
    else:
        scheduler.step()


# ------------------------------------------------------------------------------------------- loss and balance


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights ``N / (K * n_c)`` over the K classes present (absent classes get 0).

    A balanced set gets all ones; the weighted mean over the training samples is 1.
    """
    counts_t = torch.as_tensor(counts, dtype=torch.float64)
    present = counts_t > 0
    if not present.any():
        raise ValueError("class_weights: every class count is zero")
    weights = torch.zeros_like(counts_t)
    weights[present] = counts_t.sum() / (present.sum() * counts_t[present])
    return weights.float()


class BinaryLoss(nn.Module):
    """BCE-with-logits on one logit (N, 1) against integer labels 0/1, with label smoothing and ``pos_weight``."""

    def __init__(self, pos_weight: float | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor([float(pos_weight)]))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels.to(logits.dtype).view(-1, 1)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits.view(-1, 1), target, pos_weight=self.pos_weight)


def build_loss(task: str, cfg: TrainConfig, train_counts: Sequence[int]) -> nn.Module:
    """The training loss: cross-entropy (7 classes) or BCE-with-logits (binary, one logit), with label smoothing;
    ``balance=weights`` adds inverse-frequency class weights (binary: ``pos_weight = n_benign / n_malignant``)."""
    weighted = cfg.balance == "weights"
    if task == "binary":
        if len(train_counts) != 2:
            raise ValueError(f"binary task expects 2 class counts, got {list(train_counts)}")
        negatives, positives = train_counts
        if weighted and positives == 0:
            raise ValueError("balance=weights: the training split has no malignant images")
        return BinaryLoss(negatives / positives if weighted else None, cfg.label_smoothing)
    weight = class_weights(train_counts) if weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def sampling_rates(counts: Sequence[int]) -> torch.Tensor:
    """Per-class draw weights of balanced sampling: ``1 / n_c`` for present classes, 0 for absent ones."""
    counts_t = torch.as_tensor(counts, dtype=torch.float64)
    rates = torch.where(counts_t > 0, 1.0 / counts_t.clamp(min=1), torch.zeros_like(counts_t))
    return rates.float()


def balanced_batches(batches: Iterable, rates: torch.Tensor, generator: torch.Generator,
                     pool_batches: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced sampling over a stream: each output batch is drawn with replacement from a pool of the last
    ``pool_batches`` input batches, every row weighted by ``rates[label]``.

    Every class present in the pool is then equally likely to be drawn, whatever its frequency (minority images are
    repeated, majority ones drawn less often), as a weighted random sampler does over a whole data set. Output
    batches have the sizes of the input batches, so every DDP rank still takes the same number of steps. The pool
    and draws stay on the batches' device; ``generator`` must live there too.
    """
    pool_images: list[torch.Tensor] = []
    pool_labels: list[torch.Tensor] = []
    for images, labels in batches:
        pool_images.append(images)
        pool_labels.append(labels)
        if len(pool_images) > pool_batches:
            pool_images.pop(0)
            pool_labels.pop(0)
        all_labels = torch.cat(pool_labels)
        weights = rates.to(all_labels.device)[all_labels]
        picks = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
        yield torch.cat(pool_images)[picks], all_labels[picks]


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int | None = None,
                  drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of in-memory arrays as tensors (shuffled with ``seed``; in order when None)."""
    order = np.arange(len(labels)) if seed is None else np.random.default_rng(seed).permutation(len(labels))
    stop = len(order) - len(order) % batch_size if drop_last and len(order) >= batch_size else len(order)
    for start in range(0, stop, batch_size):
        index = np.sort(order[start:start + batch_size]) if seed is None else order[start:start + batch_size]
        yield torch.from_numpy(np.ascontiguousarray(images[index])), torch.from_numpy(np.asarray(labels[index]))


# ------------------------------------------------------------------------------------------- epochs


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _predictions(logits: torch.Tensor, task: str) -> torch.Tensor:
    return (logits.view(-1) > 0).long() if task == "binary" else logits.argmax(dim=1)


def _balanced_accuracy_from_confusion(confusion: np.ndarray) -> float:
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else math.nan


def mix_batch(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (even odds) of a batch with a shuffled copy of itself, the share ``lam`` ~ Beta(alpha, alpha)
    of each image kept: (mixed images, the partner of each image (indices), lam). CutMix pastes a box of the partner
    covering 1 - lam of the image (lam is then the exact share kept)."""
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(4, generator=generator, device=device).tolist()
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(len(x), generator=generator, device=device).to(x.device)
    if draws[0] < 0.5:
        return lam * x + (1 - lam) * x[partner], partner, lam
    height, width = x.shape[-2:]
    box_h, box_w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
    top, left = int(draws[1] * (height - box_h + 1)), int(draws[2] * (width - box_w + 1))
    mixed = x.clone()
    mixed[..., top:top + box_h, left:left + box_w] = x[partner][..., top:top + box_h, left:left + box_w]
    return mixed, partner, 1 - box_h * box_w / (height * width)


def train_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                settings: LoopSettings, *, augment_strength: float = 1.0, augment_policy: str = "basic",
                mixup: float = 0.0, generator: torch.Generator | None = None, grad_clip: float = 0.0,
                on_step=None) -> dict[str, Any]:
    """One pass over ``batches`` of (uint8 (N,H,W,3) images, labels); returns train_loss, train_accuracy,
    train_balanced_accuracy, images (count) and seen (images per class), summed over DDP ranks. ``mixup`` > 0
    mixes each batch (``mix_batch``) and weighs the loss of both labels by their shares; accuracy counts the label
    of the larger share.

    Statistics accumulate on the device: the only host synchronisation is at the end of the epoch.
    ``on_step(step)`` is called after each optimiser step.
    """
    model.train()
    loss_fn = loss_fn.to(settings.device)
    c = settings.num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=settings.device)
    confusion = torch.zeros(c * c, dtype=torch.int64, device=settings.device)
    params = [p for p in model.parameters() if p.requires_grad]
    for step, (images, labels) in enumerate(batches):
        images = images.to(settings.device, non_blocking=True)
        labels = labels.to(settings.device, non_blocking=True).long()
        x = augment.to_float(images)
        x = augment.augment_batch(x, augment_strength, generator, augment_policy)
        x = augment.normalize(augment.resize(x, settings.input_size), settings.mean, settings.std)
        partner, lam = None, 1.0
        if mixup > 0:
            x, partner, lam = mix_batch(x, mixup, generator)
        x = settings.memory_format(x)
        with settings.autocast():
            logits = model(x)
            loss = loss_fn(logits.float(), labels)
            if partner is not None:
                loss = lam * loss + (1 - lam) * loss_fn(logits.float(), labels[partner])
        if lam < 0.5:
            labels = labels[partner]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        cells = labels * c + _predictions(logits.detach(), settings.task)
        confusion.index_add_(0, cells, torch.ones_like(cells))  # (bincount would sync with the host on CUDA)
        if on_step is not None:
            on_step(step)
    stats = _all_reduce_sum(torch.cat([loss_sum.view(1), confusion.double()])).cpu().numpy()
    matrix = stats[1:].reshape(c, c)
    images_seen = int(matrix.sum())
    return {
        "train_loss": float(stats[0] / images_seen) if images_seen else math.nan,
        "train_accuracy": float(np.trace(matrix) / images_seen) if images_seen else math.nan,
        "train_balanced_accuracy": _balanced_accuracy_from_confusion(matrix),
        "images": images_seen,
        "seen": matrix.sum(axis=1).astype(int).tolist(),
    }


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, settings: LoopSettings) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels of every batch, through THE evaluation transform (``augment.model_input``)."""
    model.eval()
    outputs, targets = [], []
    for images, labels in batches:
        x = settings.memory_format(augment.model_input(images, settings.mean, settings.std, settings.input_size,
                                                       settings.device))
        with settings.autocast():
            outputs.append(model(x).float())
        targets.append(labels)
    if not outputs:
        return np.zeros((0, output_units(settings.task, settings.num_classes)), np.float32), np.zeros(0, int)
    return torch.cat(outputs).cpu().numpy(), torch.cat([torch.as_tensor(t) for t in targets]).cpu().numpy()


def evaluate_epoch(model: nn.Module, batches: Iterable, settings: LoopSettings) -> dict[str, float]:
    """Validation metrics over the whole validation set: val_loss (unweighted, no smoothing), val_accuracy,
    val_balanced_accuracy, val_macro_f1, val_roc_auc (one-vs-rest mean over the classes present).

    Under DDP every rank is handed the same full, ordered stream of batches; rank r predicts batches r, r + W, ...
    and the predictions are gathered, so each image is scored exactly once and every rank gets the same metrics.
    """
    rank, world = _world()
    mine = (batch for i, batch in enumerate(batches) if i % world == rank)
    logits, labels = predict_logits(unwrap(model), mine, settings)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (logits, labels))
        logits = np.concatenate([g[0] for g in gathered])
        labels = np.concatenate([g[1] for g in gathered])
    return validation_metrics(logits, labels, settings.task, settings.num_classes)


def validation_metrics(logits: np.ndarray, labels: np.ndarray, task: str, num_classes: int) -> dict[str, float]:
    """val_* metrics of logits against integer labels, by the definitions of the test metrics (``lesion.metrics``):
    val_loss is the unweighted loss without smoothing; val_balanced_accuracy, val_macro_f1 and val_roc_auc average
    over the classes where they are defined (ROC-AUC: one-vs-rest; binary: malignant vs benign; NaN when fewer than
    two classes are present)."""
    if len(labels) == 0:
        raise ValueError("validation set is empty: cannot compute validation metrics")
    labels = np.asarray(labels, dtype=np.int64)
    logits_t = torch.as_tensor(logits, dtype=torch.float32)
    if logits_t.ndim != 2 or logits_t.shape[1] != output_units(task, num_classes):
        raise ValueError(f"{task} validation with {num_classes} classes got logits of shape {tuple(logits_t.shape)}")
    if task == "binary":
        loss = F.binary_cross_entropy_with_logits(logits_t.view(-1), torch.as_tensor(labels, dtype=torch.float32))
    else:
        loss = F.cross_entropy(logits_t, torch.as_tensor(labels))
    probs = logits_to_probs(logits_t, task).numpy()
    auc = metrics.roc_auc(labels, probs)
    return {
        "val_loss": float(loss),
        "val_accuracy": metrics.accuracy(labels, probs),
        "val_balanced_accuracy": metrics.balanced_accuracy(labels, probs),
        "val_macro_f1": metrics.precision_recall_f1(labels, probs)["macro"]["f1"],
        "val_roc_auc": float(auc["per_class"][1] if task == "binary" else auc["macro"]),
    }


# ------------------------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stop after ``patience`` epochs without improvement of ``monitor``; keeps the best weights (on the CPU)."""

    def __init__(self, monitor: str, patience: int, mode: str | None = None):
        self.monitor = monitor
        self.patience = patience
        self.mode = mode or monitor_mode(monitor)
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def improved(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def step(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record one epoch's metrics; returns whether it is the new best (whose weights are then kept)."""
        if self.monitor not in metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, not among {', '.join(metrics)}")
        value = float(metrics[self.monitor])
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best weights into ``model`` (no-op before the first epoch)."""
        if self.best_state is not None:
            unwrap(model).load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience, "mode": self.mode, "best": self.best,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best", "best_epoch", "bad_epochs", "best_state"):
            setattr(self, key, state[key])


# ------------------------------------------------------------------------------------------- transfer phases


def uses_transfer_phases(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether the run follows the two-phase schedule: a pretrained backbone and ``freeze_epochs > 0``."""
    return unwrap(model).pretrained_origin.startswith("imagenet") and cfg.freeze_epochs > 0


def phase_of(epoch: int, model: nn.Module, cfg: TrainConfig) -> str:
    """``frozen`` (backbone frozen, head trained), ``finetune`` (last fraction unfrozen) or ``full``."""
    if not uses_transfer_phases(model, cfg):
        return "full"
    return "frozen" if epoch < cfg.freeze_epochs else "finetune"


def apply_phase(model: nn.Module, phase: str, cfg: TrainConfig) -> float:
    """Set which parameters train in ``phase``; returns the phase's learning rate. A DDP-wrapped model must be
    wrapped again afterwards (DDP only syncs the parameters trainable when it was built)."""
    if phase == "frozen":
        freeze_backbone(model)
        return cfg.lr
    if phase == "finetune":
        count = unfreeze_last_fraction(model, cfg.unfreeze_fraction)
        log.info("fine-tuning: unfroze the last %d backbone layers at lr %.3g", count, cfg.lr * cfg.finetune_lr_factor)
        return cfg.lr * cfg.finetune_lr_factor
    unwrap(model).requires_grad_(True)
    return cfg.lr


def phase_epochs(phase: str, cfg: TrainConfig) -> int:
    """Epochs in ``phase`` (the cosine schedule's period)."""
    if phase == "frozen":
        return cfg.freeze_epochs
    if phase == "finetune":
        return cfg.epochs - cfg.freeze_epochs
    return cfg.epochs


# ------------------------------------------------------------------------------------------- history


def tensorboard_writer(folder: str | Path):
    """A TensorBoard event writer into ``folder`` (feed it rows with ``add_scalars``)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def add_scalars(writer, row: dict[str, Any]) -> None:
    """One history row as TensorBoard scalars: every numeric column, at step ``row["epoch"]``."""
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "attempt"):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def write_history(history: list[dict[str, Any]], folder: str | Path, *, tensorboard: bool = False) -> None:
    """``history.csv`` and ``history.json`` in ``folder``; with ``tensorboard`` also its events under ``tb/``
    (for runs whose workers could not write them live)."""
    import pandas as pd

    folder = Path(folder)
    with atomic_path(folder / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    write_atomic(folder / "history.json", json.dumps(history, indent=2) + "\n")
    if tensorboard:
        _write_tensorboard(history, folder / "tb")


def _write_tensorboard(history: list[dict[str, Any]], folder: Path) -> None:
    """TensorBoard events of ``history`` into ``folder``: written in a temporary folder beside it, then each events
    file renamed in (complete, or absent after a crash)."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}{TEMP_MARK}{os.getpid()}-") as tmp:
        with tensorboard_writer(tmp) as writer:
            for row in history:
                add_scalars(writer, row)
        folder.mkdir(parents=True, exist_ok=True)
        for events in Path(tmp).iterdir():
            os.replace(events, folder / events.name)


def plot_learning_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and balanced accuracy, train and validation, per epoch (best epoch marked)."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "balanced_accuracy", "balanced accuracy")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], marker="o", label="train")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label="validation")
        best = [row["epoch"] for row in history if row.get("best")]
        if best:
            ax.axvline(best[-1], color="grey", linestyle=":", label=f"best (epoch {best[-1]})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
    return path
