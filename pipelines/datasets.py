"""Ingested shards as Ray Datasets for training: the image and label columns, collated to tensors on the workers.

Raw uint8 pixels are viewed without copying (``lesion.data.shards.arrow_images``) in Ray Data's collate threads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from lesion.config import TrainConfig
from lesion.data.shards import arrow_images, split_files
from lesion.rundir import RunDir

READ_CPUS = 0.25  # CPUs reserved by each Ray Data read task

# The zero-copy view of Arrow image bytes is read-only; the training loop never writes into it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


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


def training_datasets(run: RunDir, cfg: TrainConfig, *, materialize_train: bool = False) -> dict[str, ray.data.Dataset]:
    """The train split streamed from the shards (file order reshuffled each epoch), or read once into the object
    store with ``materialize_train``; the validation split read once."""
    train = read_split(run, "train", seed=cfg.seed)
    return {"train": train.materialize() if materialize_train else train, "val": read_split(run, "val").materialize()}


def data_config() -> ray.train.DataConfig:
    """Split the training set across workers; give every worker the whole validation set, in order."""
    ordered = ray.data.ExecutionOptions(preserve_order=True)
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": ordered, "val": ordered})
