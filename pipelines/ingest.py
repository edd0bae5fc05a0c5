"""``lesion ingest`` and ``lesion data summary``: read a data set, split it by lesion, preprocess every image once with
Ray Data, and write the shard format of ``lesion.data.shards`` to ``RUN_DIR/data/``.

The driver reads the source (paths, or encoded bytes for synthetic/Parquet sources; never pixels), splits it, and
hands the records to Ray Data in blocks; ``map_batches`` tasks (one CPU each, as many as the cluster has) decode,
crop the border, remove hair and resize; the driver streams the results into Parquet shards per split. An image
that fails to decode becomes a rejected row (file, reason) in ``rejected.csv``; nothing is dropped silently.

A fingerprint of the data config, the source files (names, sizes, modification times) and ``INGEST_VERSION`` is kept
in the manifest: a second ingest with the same inputs is skipped (``Ingest.is_current``, the rule of every stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lesion.config import SOURCES, TASKS, Config, DataConfig
from lesion.data import preprocess as prep
from lesion.data import shards, sources, splits
from lesion.data.shards import SHARD_SCHEMA, SPLITS
from lesion.labels import class_names
from lesion.records import DataRecord, preprocessing_of
from lesion.rundir import RunDir, changed_settings, atomic_path, fingerprint
from pipelines import capacity
from pipelines.common import RUN_CONFIG, init_ray, record_run_config, resolve_config
from pipelines.stages import Stage

if TYPE_CHECKING:
    import ray

log = logging.getLogger(__name__)

# Bump when the ingested data changes for the same inputs (readers, split, preprocessing, synthetic generator, shard
# format): every run then ingests again. tests/test_golden.py fails when the output changes without a bump.
INGEST_VERSION = 2
BLOCK_ROWS = 32  # images per Ray Data block (= per preprocessing task)
FIGURE_IMAGES = 6  # image pairs in the augmentation figure (the preprocessing figure shows one image per class)
INPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("lesion_id", pa.string()), ("label", pa.int64()), ("dx", pa.string()),
        ("dx_type", pa.string()), ("age", pa.float64()), ("sex", pa.string()), ("localization", pa.string()),
        ("split", pa.string()), ("file", pa.string()), ("path", pa.string()), ("image_bytes", pa.binary()),
        ("mask_path", pa.string()), ("mask_bits", pa.binary()), ("mask_file", pa.string()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [*SHARD_SCHEMA, ("split", pa.string()), ("file", pa.string()), ("error", pa.string()),
     ("mask_file", pa.string()), ("mask_error", pa.string())]
)
SPLIT_COLUMNS = ("image_id", "lesion_id", "label", "dx", "split", "dx_type", "age", "sex", "localization")


def data_fingerprint(data_config: DataConfig) -> str:
    """Fingerprint of an ingest, from its inputs only: the data config, the source files (names, sizes, mtimes) and
    ``INGEST_VERSION``. No source code is read, so editing docs, help text or plotting code re-runs nothing."""
    values = changed_settings(data_config)
    if values.get("root") is not None:
        values["root"] = str(Path(values["root"]).expanduser().resolve())
    return fingerprint("ingest", INGEST_VERSION, values, sources.input_files(data_config))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ingest(Stage):
    """Ingesting ``config.data`` into ``RUN/data/`` (``ingest``)."""

    kind = "ingest"
    exclusive = True  # Ray Data spreads its tasks over every CPU
    current_status = "current"  # found current by listing its source files again, not skipped unseen

    def artefact(self, run: RunDir) -> str:
        return "data"

    def artefacts(self, run: RunDir) -> list[Path]:
        return [run.data / "info.json"]

    def fingerprint(self, config: Config, run: RunDir) -> str:
        return data_fingerprint(config.data)

    def run(self, config: Config, run: RunDir) -> dict[str, Any]:
        return ingest(config, run, force=True)

    def summary(self, result: dict[str, Any]) -> str:
        per_split = ", ".join(f"{split} {sum(counts.values())}" for split, counts in result["counts"].items())
        return f"{result['num_images']} images ({per_split}), {result['image_size']} px, {result['source']}"


def ingest(config: Config, run: RunDir, force: bool = False, num_cpus: int | None = None) -> dict[str, Any]:
    """Ingest ``config.data`` into ``run.data``; skipped when the fingerprint is unchanged (unless ``force``).

    Ray is started (``num_cpus`` for a local one) only when there is work to do. Returns info.json's content
    (counts, ``rejected`` count, preprocessing ``seconds`` and ``images_per_second``) plus ``skipped``.
    """
    data_config = config.data
    splits.check_fractions(data_config.split)
    class_names(data_config.task)
    stage = Ingest()
    fp = stage.fingerprint(config, run)
    if not force and stage.made_from(run, fp):
        log.info("data: unchanged (fingerprint %s), skipping ingest of %s; use --force to redo it", fp, run.data)
        return {**shards.read_info(run.root).to_dict(), "skipped": True}

    started = time.perf_counter()
    records, rejected = sources.read_source(data_config)
    partial = run.root / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if not records:
        _fail(partial, rejected, data_config)
    labels = [r["label"] for r in records]
    for record, name in zip(records, splits.split_by_lesion(labels, [r["lesion_id"] for r in records],
                                                            data_config.split, data_config.seed)):
        record["split"] = str(name)
        record["lesion_id"] = record["lesion_id"] or record["image_id"]  # no lesion id: the image is its own lesion
    log.info("ingest: %d images from %s (%d rejected while reading); preprocessing with Ray Data",
             len(records), data_config.source, len(rejected))

    # uint8 pixels of every image (and its 1-bit mask), with room for Parquet's overhead and the old copy it replaces
    needed = 2 * len(records) * data_config.image_size ** 2 * (3 + 1 / 8)
    capacity.check_disk(run.root, needed, f"ingest of {len(records)} images at {data_config.image_size} px",
                        "data.image_size")
    init_ray(num_cpus=num_cpus)
    processed = time.perf_counter()
    written = _process(records, data_config, partial)
    seconds = time.perf_counter() - processed
    rejected += written["rejected"]
    table = written["split_table"]
    if table.empty:
        _fail(partial, rejected, data_config)
    _write_rejected(partial, rejected)
    with atomic_path(partial / "split.csv") as tmp:
        table.to_csv(tmp, index=False)
    info = _info(data_config, fp, table, written["has_masks"], len(rejected), seconds)
    shards.write_info(partial, info)
    _figures(records, table, written["train_sample"], data_config, partial)
    _replace(partial, run.data)
    run.record("data", config=dataclasses.asdict(data_config), fingerprint=fp, num_images=info.num_images,
               rejected=len(rejected))
    run.push("data")
    total = time.perf_counter() - started
    log.info("ingest: %d images kept, %d rejected, in %.1f s (preprocessing %.1f images/s) -> %s",
             info.num_images, len(rejected), total, info.images_per_second, run.data)
    return {**info.to_dict(), "skipped": False, "seconds_total": total}


def _fail(partial: Path, rejected: list[tuple[str, str]], data_config: DataConfig) -> None:
    _write_rejected(partial, rejected)
    shown = "; ".join(f"{file}: {reason}" for file, reason in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    raise ValueError(f"ingest: no usable image in source {data_config.source!r} at {data_config.root}: "
                     f"{len(rejected)} input(s) rejected, listed in {partial / 'rejected.csv'}: {shown}{more}")


def _write_rejected(folder: Path, rejected: list[tuple[str, str]]) -> None:
    with atomic_path(folder / "rejected.csv") as tmp:
        pd.DataFrame(rejected, columns=["file", "reason"]).to_csv(tmp, index=False)


def _replace(partial: Path, target: Path) -> None:
    """Move the freshly written data folder into place (the old one is removed only once the new one is complete)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _input_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{name: r.get(name) for name in INPUT_SCHEMA.names} for r in records],
                                schema=INPUT_SCHEMA)


def map_blocks(dataset: "ray.data.Dataset", fn: Any, **fn_kwargs: Any) -> "ray.data.Dataset":
    """``fn(block, **fn_kwargs)`` over every block of ``dataset`` (Arrow in, one task of one CPU per block), results
    in input order (same inputs -> same shard contents), as many tasks at once as the cluster has CPUs.

    Ray Data's per-operator resource reservation is turned off for this dataset, since it holds short tasks back
    (docs/decisions.md, "Ingest without Ray Data's resource reservation").
    """
    dataset = dataset.map_batches(fn, batch_size=None, batch_format="pyarrow", fn_kwargs=fn_kwargs, num_cpus=1)
    dataset.context.execution_options.preserve_order = True
    dataset.context.op_resource_reservation_enabled = False
    return dataset


def _process(records: list[dict], data_config: DataConfig, folder: Path) -> dict[str, Any]:
    """Preprocess the records with Ray Data and stream the results into ``folder/<split>/part-*.parquet``."""
    import ray

    table = _input_table(records)
    blocks = [table.slice(start, BLOCK_ROWS) for start in range(0, table.num_rows, BLOCK_ROWS)]
    dataset = map_blocks(ray.data.from_arrow(blocks), preprocess_batch, data_config=data_config)
    writers = {name: _ShardWriter(folder / name, data_config.shard_rows) for name in SPLITS}
    rejected: list[tuple[str, str]] = []
    split_rows: list[pd.DataFrame] = []
    train_sample: list[np.ndarray] = []
    has_masks = False
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        failed = batch.filter(pc.is_valid(batch["error"]))
        rejected += zip(failed["file"].to_pylist(), failed["error"].to_pylist())
        bad_masks = batch.filter(pc.is_valid(batch["mask_error"]))
        rejected += zip(bad_masks["mask_file"].to_pylist(), bad_masks["mask_error"].to_pylist())
        kept = batch.filter(pc.is_null(batch["error"]))
        has_masks = has_masks or kept["mask"].null_count < kept.num_rows
        for name, writer in writers.items():
            part = kept.filter(pc.equal(kept["split"], name))
            writer.add(part.select(SHARD_SCHEMA.names))
            if name == "train" and len(train_sample) < FIGURE_IMAGES and part.num_rows:
                images = shards.decode_images(part["image"].to_pylist(), data_config.image_size)
                train_sample += list(images[: FIGURE_IMAGES - len(train_sample)])
        split_rows.append(kept.select(list(SPLIT_COLUMNS)).to_pandas())
    for writer in writers.values():
        writer.close()
    split_table = pd.concat(split_rows, ignore_index=True) if split_rows else pd.DataFrame(columns=SPLIT_COLUMNS)
    return {"rejected": rejected, "split_table": split_table, "train_sample": train_sample, "has_masks": has_masks}


class _ShardWriter:
    """Buffers rows of one split and writes ``part-NNNNN.parquet`` files of ``rows`` rows as they fill."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows, self.parts, self.buffer = folder, rows, 0, []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)
        while sum(t.num_rows for t in self.buffer) >= self.rows:
            full = pa.concat_tables(self.buffer)
            self._write(full.slice(0, self.rows))
            self.buffer = [full.slice(self.rows)]

    def close(self) -> None:
        rest = pa.concat_tables(self.buffer) if self.buffer else SHARD_SCHEMA.empty_table()
        if rest.num_rows or self.parts == 0:  # an empty split still gets one (empty) shard
            if rest.num_rows == 0:
                log.warning("ingest: split %s is empty", self.folder.name)
            self._write(rest)

    def _write(self, table: pa.Table) -> None:
        shards.write_shard(table, self.folder / f"part-{self.parts:05d}.parquet")
        self.parts += 1


def preprocess_batch(batch: pa.Table, data_config: DataConfig) -> pa.Table:
    """Ray Data UDF: decode + preprocess each row of an INPUT_SCHEMA batch into an OUTPUT_SCHEMA row.

    A row whose image cannot be used gets ``error`` (the reason) and no image; a row whose mask cannot be used keeps
    its image and gets ``mask_error``.
    """
    import cv2

    cv2.setNumThreads(1)  # Ray runs one task per CPU; OpenCV's own threads would oversubscribe
    out = {name: [] for name in OUTPUT_SCHEMA.names}
    for row in batch.to_pylist():
        image = mask = error = mask_error = None
        try:
            original = prep.decode_image(row["path"] or row["image_bytes"], max_pixels=data_config.max_image_pixels)
            raw_mask, mask_error = _load_mask(row, original.shape[:2])
            pixels, small_mask = prep.preprocess(original, data_config, raw_mask)
            image = pixels.tobytes()
            mask = None if small_mask is None else small_mask.astype(np.uint8).tobytes()
        except (prep.ImageError, ValueError, OSError, cv2.error) as exc:
            error = str(exc) if isinstance(exc, prep.ImageError) else f"cannot preprocess: {exc}"
        for name in ("image_id", "lesion_id", "label", "dx", "dx_type", "age", "sex", "localization", "split",
                     "file", "mask_file"):
            out[name].append(row[name])
        out["image"].append(image)
        out["mask"].append(mask)
        out["error"].append(error)
        out["mask_error"].append(mask_error)
    return pa.table(out, schema=OUTPUT_SCHEMA)


def _load_mask(row: dict, shape: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The row's lesion mask as bool H x W matching the image, or (None, reason) when it cannot be used."""
    if row["mask_path"]:
        try:
            mask = prep.decode_image(row["mask_path"])[..., 0] > 0
        except prep.ImageError as exc:
            return None, f"mask unusable, image kept without mask: {exc}"
    elif row["mask_bits"]:
        packed = np.frombuffer(row["mask_bits"], np.uint8)
        if packed.size % shape[0] or packed.size // shape[0] * 8 < shape[1]:
            return None, (f"mask unusable, image kept without mask: {packed.size} packed bytes do not fit "
                          f"the {shape[1]}x{shape[0]} image")
        mask = np.unpackbits(packed.reshape(shape[0], -1), axis=1)[:, : shape[1]].astype(bool)
    else:
        return None, None
    if mask.shape != shape:
        return None, (f"mask unusable, image kept without mask: mask is {mask.shape[1]}x{mask.shape[0]}, "
                      f"image is {shape[1]}x{shape[0]}")
    return mask, None


def _info(data_config: DataConfig, fp: str, table: pd.DataFrame, has_masks: bool, rejected: int,
          seconds: float) -> DataRecord:
    classes = class_names(data_config.task)
    counts = {name: {c: int(((table["split"] == name) & (table["label"] == i)).sum()) for i, c in enumerate(classes)}
              for name in SPLITS}
    return DataRecord(
        task=data_config.task, classes=tuple(classes), image_size=data_config.image_size, counts=counts,
        source=data_config.source, fingerprint=fp,
        root=None if data_config.root is None else str(Path(data_config.root).expanduser().resolve()),
        preprocessing=preprocessing_of(data_config), has_masks=bool(has_masks), num_images=int(len(table)),
        num_lesions=int(table["lesion_id"].nunique()), rejected=rejected, split_fractions=tuple(data_config.split),
        seed=data_config.seed, seconds=round(seconds, 2),
        images_per_second=round(len(table) / seconds, 1) if seconds > 0 else None)


def _figures(records: list[dict], table: pd.DataFrame, train_sample: list[np.ndarray], data_config: DataConfig,
             folder: Path) -> None:
    """preprocess_examples.png (original vs preprocessed, one image per class) and augment_examples.png."""
    kept = set(table["image_id"])
    chosen: dict[int, dict] = {}
    for record in records:
        if record["image_id"] in kept and record["label"] not in chosen:
            chosen[record["label"]] = record
    names = class_names(data_config.task)
    pairs, titles = [], []
    for label, record in sorted(chosen.items()):
        original = prep.decode_image(record["path"] or record["image_bytes"], max_pixels=data_config.max_image_pixels)
        pairs.append((original, prep.preprocess(original, data_config)[0]))
        titles.append(f"{record['image_id']} ({names[label]})")
    prep.save_preprocess_figure(pairs, folder / "preprocess_examples.png", titles)
    if train_sample:
        from lesion.data.augment import save_augment_figure  # imports torch: kept out of the Ray workers' imports

        save_augment_figure(np.stack(train_sample), folder / "augment_examples.png")


def format_counts(info: DataRecord) -> str:
    """Counts per class (rows) and split (columns), with totals, as a text table."""
    classes = info.classes
    counts = info.counts
    width = max(len(c) for c in [*classes, "total"])
    lines = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in (*SPLITS, "total"))]
    for name in classes:
        row = [counts[s].get(name, 0) for s in SPLITS]
        lines.append(f"{name:<{width}}" + "".join(f"{n:>8}" for n in (*row, sum(row))))
    totals = [sum(counts[s].values()) for s in SPLITS]
    lines.append(f"{'total':<{width}}" + "".join(f"{n:>8}" for n in (*totals, sum(totals))))
    return "\n".join(lines)


def add_arguments(name: str, parser) -> None:
    """Flags of ``lesion ingest`` and ``lesion data summary``."""
    if name == "data":
        parser.add_argument("action", choices=["summary"], help="summary: what was ingested, and what was rejected")
        parser.add_argument("--run", required=True, help="run directory (ingested with `lesion ingest`)")
        parser.add_argument("--config", help="accepted as by every command; the summary reads RUN/data only")
        return
    parser.add_argument("--run", required=True, help="run directory to write (RUN/data/)")
    parser.add_argument("--config", help="YAML config (default: RUN/config.yaml, else the built-in defaults)")
    parser.add_argument("--source", choices=SOURCES, help="data set reader (default: synthetic)")
    parser.add_argument("--root", help="data set folder or file (not needed for synthetic)")
    parser.add_argument("--task", choices=TASKS, help="multiclass (7 dx classes) or binary (malignant vs benign)")
    parser.add_argument("--image-size", type=int, help="side of the cached square images, in pixels")
    parser.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="split fractions")
    parser.add_argument("--seed", type=int, help="seed of the split and of the synthetic generator")
    parser.add_argument("--count", type=int, help="images drawn by the synthetic source")
    toggle = argparse.BooleanOptionalAction
    parser.add_argument("--crop-border", action=toggle, help="crop the black dermatoscope border")
    parser.add_argument("--remove-hair", action=toggle, help="remove hair and small dark artefacts")
    parser.add_argument("--image-column", help="parquet sources: column of image bytes")
    parser.add_argument("--label-column", help="parquet sources: column of labels")
    parser.add_argument("--id-column", help="parquet sources: column of image ids")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started here (default: all)")
    parser.add_argument("--force", action="store_true", help="ingest again even when the fingerprint is unchanged")


def run_command(name: str, args) -> int:
    """Run ``lesion ingest`` or ``lesion data summary``."""
    run = RunDir(args.run)
    if name == "data":
        print_summary(run)
        return 0
    overrides = {
        "data.source": args.source,
        "data.root": str(Path(args.root).expanduser().resolve()) if args.root else None,
        "data.task": args.task,
        "data.image_size": args.image_size,
        "data.split": args.split,
        "data.seed": args.seed,
        "data.synthetic_count": args.count,
        "data.crop_border": args.crop_border,
        "data.remove_hair": args.remove_hair,
        "data.image_column": args.image_column,
        "data.label_column": args.label_column,
        "data.id_column": args.id_column,
    }
    config = resolve_config(run, args.config, overrides)
    if not (run.root / RUN_CONFIG).is_file():  # ingest creates the run: it records the run's config
        record_run_config(run, config)
    summary = ingest(config, run, force=args.force, num_cpus=args.num_cpus)
    state = "unchanged, skipped (use --force to redo)" if summary["skipped"] else f"written in {summary['seconds']} s"
    print(f"data: {run.data} ({state})")
    print(format_counts(shards.read_info(run.root)))
    print(f"rejected: {summary['rejected']} (see `lesion data summary --run {args.run}`)")
    return 0


def print_summary(run: RunDir) -> None:
    """Print what ``run`` holds: source, task, sizes, counts per class and split, and every rejected file."""
    info = shards.read_info(run.root)
    shown = {key: getattr(info, key) for key in ("source", "root", "task", "image_size", "num_images", "num_lesions",
                                                  "has_masks", "split_fractions", "seed")}
    for key, value in {**shown, **info.preprocessing, "fingerprint": info.fingerprint}.items():
        print(f"{key:>15}: {value}")
    print()
    print(format_counts(info))
    rejected_path = run.data / "rejected.csv"
    rejected = pd.read_csv(rejected_path) if rejected_path.is_file() else pd.DataFrame(columns=["file", "reason"])
    print(f"\nrejected: {len(rejected)}")
    for row in rejected.itertuples(index=False):
        print(f"  {row.file}: {row.reason}")
