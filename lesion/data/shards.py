"""The ingested data format under ``RUN_DIR/data/``, read and written without Ray.

Layout:
- ``info.json``: the data's description (``lesion.records.DataRecord``: task, class names, image size, counts per
  split and class, preprocessing, source, fingerprint, has_masks), written by ``write_info``, read by ``read_info``.
- ``split.csv``: one row per kept image: image_id, lesion_id, label, dx, split and the metadata columns.
- ``<split>/part-NNNNN.parquet`` for split in train/val/test, with the columns of ``SHARD_SCHEMA``:
  ``image`` holds the raw uint8 pixels (H x W x 3, row-major, H = W = image_size), ``mask`` raw uint8 0/1 pixels
  (H x W) or null, ``label`` the class index in ``lesion.labels.class_names(task)`` order.
- ``rejected.csv``: file, reason for every input that was skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lesion.records import DataRecord
from lesion.rundir import atomic_path, write_atomic

SPLITS = ("train", "val", "test")
INFO_FILE = "info.json"
META_COLUMNS = ("dx", "dx_type", "age", "sex", "localization")
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("lesion_id", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("dx", pa.string()),
        ("dx_type", pa.string()),
        ("age", pa.float64()),
        ("sex", pa.string()),
        ("localization", pa.string()),
    ]
)


@dataclass
class SplitArrays:
    """One split held in memory: images (N,H,W,3) uint8, masks (N,H,W) bool or None, labels (N,) int64, metadata."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    meta: pd.DataFrame  # image_id, lesion_id and META_COLUMNS, row-aligned with images

    def __len__(self) -> int:
        return len(self.labels)


def data_dir(run_root: str | Path) -> Path:
    return Path(run_root) / "data"


def read_info(run_root: str | Path) -> DataRecord:
    """The data record (``info.json``) of an ingested run, with a clear error when the run has not been ingested."""
    path = data_dir(run_root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lesion ingest --run {run_root}` first")
    return DataRecord.from_dict(json.loads(path.read_text()))


def write_info(folder: str | Path, record: DataRecord) -> Path:
    """Write the data record as ``folder/info.json`` (atomically)."""
    path = Path(folder) / INFO_FILE
    write_atomic(path, json.dumps(record.to_dict(), indent=2))
    return path


def split_files(run_root: str | Path, split: str) -> list[str]:
    """Parquet shard paths of one split, sorted."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return sorted(str(p) for p in (data_dir(run_root) / split).glob("*.parquet"))


def decode_images(column, image_size: int) -> np.ndarray:
    """Raw-bytes image column (list/array of bytes) -> (N, S, S, 3) uint8."""
    if len(column) == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    flat = np.frombuffer(b"".join(column), dtype=np.uint8)
    return flat.reshape(len(column), image_size, image_size, 3)


def arrow_images(column: pa.ChunkedArray | pa.Array, image_size: int) -> np.ndarray:
    """Arrow binary column of raw pixels -> (N, S, S, 3) uint8: a view of the Arrow buffer for one chunk, one copy
    for several. The view is read-only."""
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


def decode_masks(column, image_size: int) -> np.ndarray | None:
    """Raw-bytes mask column -> (N, S, S) bool, or None when any row has no mask."""
    if len(column) == 0 or any(m is None for m in column):
        return None
    flat = np.frombuffer(b"".join(column), dtype=np.uint8)
    return flat.reshape(len(column), image_size, image_size).astype(bool)


def load_split(run_root: str | Path, split: str) -> SplitArrays:
    """Read one split of an ingested run into memory (for evaluation and tests; training streams with Ray Data)."""
    size = read_info(run_root).image_size
    files = split_files(run_root, split)
    if not files:
        raise FileNotFoundError(f"no shards for split {split!r} under {data_dir(run_root)}")
    table = pa.concat_tables([pq.read_table(f, schema=SHARD_SCHEMA) for f in files])
    columns = table.to_pydict()
    meta = pd.DataFrame({k: columns[k] for k in ("image_id", "lesion_id", *META_COLUMNS)})
    return SplitArrays(
        images=decode_images(columns["image"], size),
        masks=decode_masks(columns["mask"], size),
        labels=np.asarray(columns["label"], dtype=np.int64),
        meta=meta,
    )


def records_to_table(rows: list[dict]) -> pa.Table:
    """Rows with SHARD_SCHEMA keys (image as uint8 array or bytes, mask as array/bytes/None) -> an Arrow table."""
    columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for row in rows:
        for name in SHARD_SCHEMA.names:
            value = row.get(name)
            if name in ("image", "mask") and isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value, dtype=np.uint8).tobytes()
            columns[name].append(value)
    return pa.table(columns, schema=SHARD_SCHEMA)


def write_shards(table: pa.Table, folder: Path, rows_per_shard: int) -> list[Path]:
    """Write a table as ``part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows (old parts removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    paths = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        paths.append(write_shard(table.slice(start, rows_per_shard), folder / f"part-{index:05d}.parquet"))
    return paths


def write_shard(table: pa.Table, path: Path) -> Path:
    """Write one Parquet shard of ``SHARD_SCHEMA`` atomically (complete, or absent after a crash)."""
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(SHARD_SCHEMA), tmp)
    return path
