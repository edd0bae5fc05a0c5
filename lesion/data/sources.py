"""Data set readers: each turns a data set on disk into a list of records plus a list of rejected inputs.

A reader returns ``(records, rejected)``. ``rejected`` is a list of ``(file, reason)`` for every input that was
skipped (an image listed in the metadata but missing, an unknown label, a duplicate image_id, a one-hot row with
zero or several diagnoses). Malformed metadata (a CSV without a required column) raises ValueError naming the file
and the column. Pixels are not decoded here: that happens once, in parallel, at ingest.

A record is a dict with:

- ``image_id`` (str, unique), ``lesion_id`` (str or None: the image is then its own group when splitting),
- ``dx``: the diagnosis code in ``DX_CLASSES`` when the source knows it, else None (benign/malignant-only sources),
- ``benign_malignant``: ``"benign"`` or ``"malignant"`` (from ``dx`` when known),
- ``label``: class index for the task (set by ``read_source``),
- ``file``: what a report names for this record (a path, or ``file.parquet[row N]``),
- the image as ``path`` (str) or ``image_bytes`` (encoded JPEG/PNG/... bytes), the other None,
- an optional lesion mask as ``mask_path`` (PNG, non-zero = lesion) or ``mask_bits`` (``np.packbits`` of the H x W
  bool mask along the width, H rows, as in HAM10000's ``masks.npz``), with ``mask_file`` naming it,
- ``dx_type``, ``age`` (float), ``sex``, ``localization`` (None when unknown).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from lesion.labels import BINARY_CLASSES, DX_CLASSES, DX_NAMES, class_names, is_malignant
from lesion.vocabulary import SOURCES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm")  # .dcm: lesion.data.dicom
HAM_METADATA = ("HAM10000_metadata.csv", "metadata.csv")  # looked for, in this order, at the root
HAM_REQUIRED = ("image_id", "lesion_id", "dx")
ONE_HOT = tuple(dx.upper() for dx in DX_CLASSES)  # ISIC 2018 Task 3 columns MEL, NV, BCC, AKIEC, BKL, DF, VASC
PH2_DX = {"common_nevus": "nv", "atypical_nevus": "nv", "melanoma": "mel"}  # PH2's clinical diagnosis -> dx
PH2_HALVES = ("selection", "report")
MASK_SUFFIX = "_segmentation"  # HAM10000 lesion segmentation release: ISIC_xxxxxxx_segmentation.png
META_FIELDS = ("dx_type", "age", "sex", "localization")

Rejected = list[tuple[str, str]]

# Label spellings accepted in folder names and label columns (case-insensitive): dx codes, their full names,
# and the two binary classes.
_LABEL_ALIASES = {
    **{dx: dx for dx in DX_CLASSES},
    **{name.lower(): dx for dx, name in DX_NAMES.items()},
    **{name: name for name in BINARY_CLASSES},
    **{name: dx for name, dx in PH2_DX.items()},
}


def parse_label(value) -> tuple[str | None, str] | None:
    """A label spelling -> ``(dx or None, "benign"|"malignant")``, or None when it names no known class."""
    key = str(value).strip().lower()
    found = _LABEL_ALIASES.get(key)
    if found is None:
        return None
    if found in BINARY_CLASSES:
        return None, found
    return found, _benign_malignant(found)


def _benign_malignant(dx: str) -> str:
    return "malignant" if is_malignant(dx) else "benign"


def _known_labels() -> str:
    return ", ".join(sorted(_LABEL_ALIASES))


def _record(image_id: str, file: str, dx: str | None, benign_malignant: str, **fields) -> dict:
    record = {
        "image_id": image_id,
        "lesion_id": None,
        "dx": dx,
        "benign_malignant": benign_malignant,
        "file": file,
        "path": None,
        "image_bytes": None,
        "mask_path": None,
        "mask_bits": None,
        "mask_file": None,
        **{name: None for name in META_FIELDS},
    }
    record.update(fields)
    return record


def _clean(value):
    """A CSV/Parquet cell -> None when missing (NaN, empty string), else the value."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _age(value, where: str) -> float | None:
    value = _clean(value)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        log.warning("%s: age %r is not a number; kept as unknown", where, value)
        return None


def _walk_files(root: Path) -> Iterable[Path]:
    """Every file under ``root`` (symbolic links followed), in sorted order, hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _index_images(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Image files under ``root`` by stem, and ``*_segmentation.png`` masks by image stem (first in sorted order)."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    copies = 0
    for path in _walk_files(root):
        if not _is_image(path):
            continue
        if path.stem.endswith(MASK_SUFFIX):
            masks.setdefault(path.stem[: -len(MASK_SUFFIX)], path)
        elif path.stem in images:
            copies += 1
        else:
            images[path.stem] = path
    if copies:
        log.warning("%s: %d image file(s) share a name with another one; the first in path order is used", root, copies)
    return images, masks


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    """Read a CSV as strings, raising ValueError naming the file and each missing required column."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV file: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {', '.join(missing)}; found columns {', '.join(frame.columns)}"
        )
    return frame


def _root(root: str | Path | None, source: str) -> Path:
    if root is None:
        raise ValueError(f"source {source!r} needs a root folder (--root PATH)")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {source!r}: {path} does not exist")
    return path


def read_ham10000(root: str | Path) -> tuple[list[dict], Rejected]:
    """HAM10000 in its official layout: ``HAM10000_metadata.csv`` (or ``metadata.csv``) at ``root`` with columns
    image_id, lesion_id, dx (required) and dx_type, age, sex, localization; images ``<image_id>.jpg`` anywhere under
    ``root`` (e.g. ``HAM10000_images_part_1/`` and ``_part_2/``, or ``images/``). Masks, when present, come from
    ``<image_id>_segmentation.png`` files anywhere under ``root`` (255 = lesion) or from ``masks.npz`` at ``root``
    (``image_id`` strings and ``mask`` uint8 N x H x ceil(W/8), bits packed along the width)."""
    root = _root(root, "ham10000")
    metadata = next((root / name for name in HAM_METADATA if (root / name).is_file()), None)
    if metadata is None:
        raise FileNotFoundError(f"ham10000: no {' or '.join(HAM_METADATA)} in {root}")
    frame = _read_csv(metadata, HAM_REQUIRED)
    images, mask_files = _index_images(root)
    packed = _read_packed_masks(root / "masks.npz")
    records, rejected = [], []
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        image_id = str(row["image_id"]).strip()
        where = f"{metadata} line {row_number}"
        if not image_id:
            rejected.append((where, "empty image_id"))
            continue
        dx = str(row["dx"]).strip().lower()
        if dx not in DX_CLASSES:
            rejected.append((f"{image_id} ({where})",
                             f"unknown dx {row['dx']!r}; expected one of {', '.join(DX_CLASSES)}"))
            continue
        path = images.get(image_id)
        if path is None:
            rejected.append((f"{image_id} ({where})",
                             f"listed in {metadata.name} but no image file {image_id}.* under {root}"))
            continue
        record = _record(
            image_id,
            str(path),
            dx,
            _benign_malignant(dx),
            lesion_id=_clean(str(row["lesion_id"]).strip()),
            path=str(path),
            dx_type=_clean(row.get("dx_type")),
            age=_age(row.get("age"), where),
            sex=_clean(row.get("sex")),
            localization=_clean(row.get("localization")),
        )
        if image_id in mask_files:
            record.update(mask_path=str(mask_files[image_id]), mask_file=str(mask_files[image_id]))
        elif image_id in packed:
            record.update(mask_bits=packed[image_id], mask_file=f"{root / 'masks.npz'}[{image_id}]")
        records.append(record)
    log.info("ham10000: %d images listed in %s, %d with masks", len(frame), metadata,
             sum(r["mask_file"] is not None for r in records))
    return records, rejected


def _read_packed_masks(path: Path) -> dict[str, bytes]:
    """``masks.npz`` (image_id, mask N x H x ceil(W/8) packed bits) -> image_id -> packed bytes; {} when absent."""
    if not path.is_file():
        return {}
    with np.load(path) as data:
        missing = [key for key in ("image_id", "mask") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; expected image_id and mask")
        ids, masks = data["image_id"], data["mask"]
    if masks.dtype != np.uint8 or masks.ndim != 3 or len(masks) != len(ids):
        raise ValueError(f"{path}: mask must be uint8 N x H x W/8 with one row per image_id, "
                         f"got {masks.dtype} {masks.shape}")
    return {str(i): masks[n].tobytes() for n, i in enumerate(ids)}


def read_isic_task3(root: str | Path) -> tuple[list[dict], Rejected]:
    """ISIC 2018 Task 3: ground-truth CSV(s) with columns ``image`` and one-hot MEL, NV, BCC, AKIEC, BKL, DF, VASC,
    and the images ``<image>.jpg`` anywhere under ``root``. ``root`` may also be the CSV itself (images are then
    searched beside it). Ground-truth CSVs are the ones named ``*GroundTruth*`` or holding any one-hot column; an
    optional ``*LesionGroupings*.csv`` (image, lesion_id) supplies lesion ids. A row with zero or several diagnoses
    set is rejected."""
    root = _root(root, "isic-task3")
    folder = root.parent if root.is_file() else root
    csvs = [root] if root.is_file() else [p for p in _walk_files(root) if p.suffix.lower() == ".csv"]
    truths, groupings = [], {}
    for path in csvs:
        header = _read_csv(path, ())
        if "lesiongroupings" in path.name.lower() and not root.is_file():
            frame = _read_csv(path, ("image", "lesion_id"))
            groupings.update(zip(frame["image"].str.strip(), frame["lesion_id"].str.strip()))
        elif path == root or "groundtruth" in path.name.lower() or set(ONE_HOT) & set(header.columns):
            truths.append((path, _read_csv(path, ("image", *ONE_HOT))))
    if not truths:
        raise FileNotFoundError(f"isic-task3: no ground-truth CSV (columns image, {', '.join(ONE_HOT)}) under {root}")
    images, _ = _index_images(folder)
    records, rejected = [], []
    for path, frame in truths:
        for row_number, row in enumerate(frame.to_dict("records"), start=2):
            image_id = str(row["image"]).strip()
            where = f"{image_id} ({path} line {row_number})"
            try:
                values = {column: float(row[column]) for column in ONE_HOT}
            except ValueError:
                rejected.append((where, "one-hot diagnosis columns must be numbers (0 or 1)"))
                continue
            hot = [column for column, value in values.items() if value >= 0.5]
            if len(hot) != 1:
                reason = "no diagnosis column is 1" if not hot else f"several diagnosis columns are 1: {', '.join(hot)}"
                rejected.append((where, reason))
                continue
            image = images.get(image_id)
            if image is None:
                rejected.append((where, f"listed in {path.name} but no image file {image_id}.* under {folder}"))
                continue
            dx = hot[0].lower()
            records.append(_record(image_id, str(image), dx, _benign_malignant(dx), path=str(image),
                                   lesion_id=_clean(groupings.get(image_id))))
    return records, rejected


def ph2_halves(image_ids: list[str], diagnoses: list[str], seed: int = 0) -> dict[str, str]:
    """PH2's two fixed halves: image_id -> ``selection`` (to choose among candidates) or ``report`` (scored only
    for the figures). Stratified by PH2's own diagnosis (common nevus, atypical nevus, melanoma), so each half holds
    half of each; the order within a diagnosis is a hash of (seed, image_id), independent of the file's row order."""
    from lesion.data.splits import stable_hash

    halves: dict[str, str] = {}
    for diagnosis in sorted(set(diagnoses)):
        ids = sorted((i for i, d in zip(image_ids, diagnoses) if d == diagnosis), key=lambda i: stable_hash(seed, i))
        for k, image_id in enumerate(ids):
            halves[image_id] = PH2_HALVES[k % 2]
    return halves


def read_ph2(root: str | Path, half: str = "all") -> tuple[list[dict], Rejected]:
    """The PH2 database (Hospital Pedro Hispano; another clinic and dermatoscope than HAM10000): ``metadata.csv``
    at ``root`` with image_id and dx (``common_nevus``, ``atypical_nevus``: both ``nv``; ``melanoma``: ``mel``),
    images ``<image_id>.*`` anywhere under ``root``. One image per lesion. ``half``: ``all``, or one of
    ``PH2_HALVES`` (``ph2_halves``)."""
    root = _root(root, "ph2")
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"ph2: no metadata.csv in {root}")
    frame = _read_csv(metadata, ("image_id", "dx"))
    images, _ = _index_images(root)
    diagnoses = [str(d).strip().lower() for d in frame["dx"]]
    ids = [str(i).strip() for i in frame["image_id"]]
    halves = ph2_halves(ids, diagnoses)
    records, rejected = [], []
    for row_number, (image_id, diagnosis) in enumerate(zip(ids, diagnoses), start=2):
        where = f"{image_id} ({metadata} line {row_number})"
        if diagnosis not in PH2_DX:
            rejected.append((where, f"unknown PH2 diagnosis {diagnosis!r}; expected one of {', '.join(PH2_DX)}"))
        elif image_id not in images:
            rejected.append((where, f"listed in metadata.csv but no image file {image_id}.* under {root}"))
        elif half in ("all", halves[image_id]):
            dx = PH2_DX[diagnosis]
            records.append(_record(image_id, str(images[image_id]), dx, _benign_malignant(dx), lesion_id=image_id,
                                   path=str(images[image_id]), dx_type=diagnosis))
    log.info("ph2 (%s): %d of %d images", half, len(records), len(frame))
    return records, rejected


def _class_folders(root: Path, accept) -> tuple[list[dict], Rejected]:
    """Records of images in class folders ``(folder, dx, benign_malignant)`` from ``accept``; image_id = path relative
    to ``root`` without extension (unique even when two folders hold the same file name)."""
    records, rejected = [], []
    for folder, dx, benign_malignant in accept:
        for path in _walk_files(folder):
            if not _is_image(path):
                rejected.append((str(path), f"not an image file (extension {path.suffix or 'none'}; "
                                            f"expected one of {', '.join(IMAGE_EXTENSIONS)})"))
                continue
            image_id = path.relative_to(root).with_suffix("").as_posix()
            records.append(_record(image_id, str(path), dx, benign_malignant, path=str(path)))
    return records, rejected


def read_folder(root: str | Path, task: str = "multiclass") -> tuple[list[dict], Rejected]:
    """ImageFolder layout: one sub-folder of ``root`` per class, named by dx code (mel, nv, ...), full diagnosis name
    (``melanocytic nevus``) or, for the binary task, benign/malignant (case-insensitive); images anywhere inside it.
    A folder name that names no class of ``task`` is a ValueError listing the accepted names."""
    root = _root(root, "folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"folder: {root} has no class sub-folders")
    parsed = {p: parse_label(p.name) for p in folders}
    unknown = [p.name for p, label in parsed.items() if label is None]
    if unknown:
        raise ValueError(f"folder: {root}: sub-folder(s) {', '.join(unknown)} name no known class; "
                         f"accepted names: {_known_labels()}")
    binary = [p.name for p, (dx, _) in parsed.items() if dx is None]
    if task == "multiclass" and binary:
        raise ValueError(f"folder: {root}: sub-folder(s) {', '.join(binary)} hold benign/malignant labels only: the "
                         "multiclass task needs diagnosis folders (mel, nv, bcc, akiec, bkl, df, vasc); "
                         "use --task binary")
    return _class_folders(root, [(p, *parsed[p]) for p in folders])


def read_isic_binary(root: str | Path, image_column: str = "image", label_column: str = "label",
                     id_column: str = "image_id") -> tuple[list[dict], Rejected]:
    """ISIC binary sets: folders named ``benign`` and ``malignant`` anywhere under ``root`` (e.g. ``train/benign``,
    ``test/malignant``), or Parquet file(s) with image bytes and a label (the Hugging Face layout; see
    ``read_parquet``; integer labels are 0 = benign, 1 = malignant unless the file's class names say otherwise)."""
    root = _root(root, "isic-binary")
    if root.is_file() or not _class_dirs(root):
        if not _parquet_files(root):
            raise FileNotFoundError(f"isic-binary: no benign/ or malignant/ folder and no .parquet file under {root}")
        return read_parquet(root, image_column, label_column, id_column, int_classes=BINARY_CLASSES)
    accept = [(path, None, path.name.lower()) for path in _class_dirs(root)]
    return _class_folders(root, accept)


def _class_dirs(root: Path) -> list[Path]:
    found = []
    for folder, dirs, _ in os.walk(root, followlinks=True):
        for name in sorted(dirs):
            if name.lower() in BINARY_CLASSES:
                found.append(Path(folder) / name)
        dirs[:] = sorted(d for d in dirs if d.lower() not in BINARY_CLASSES and not d.startswith("."))
    return found


def _parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return [p for p in _walk_files(root) if p.suffix.lower() == ".parquet"]


def read_parquet(root: str | Path, image_column: str = "image", label_column: str = "label",
                 id_column: str = "image_id", int_classes: Iterable[str] = DX_CLASSES) -> tuple[list[dict], Rejected]:
    """Parquet file(s): ``root`` is one ``.parquet`` file or a folder searched for them (all are read and merged).

    Schema (column names configurable):
    - ``image_column`` (required): encoded image bytes (binary), a struct ``{bytes, path}`` as written by Hugging Face
      ``datasets`` (``path`` is used, relative to the Parquet file, when ``bytes`` is null), or a string path;
    - ``label_column`` (required): a class name (dx code, full diagnosis name, benign/malignant) or an integer index
      into ``int_classes`` (the Hugging Face ClassLabel names stored in the file take precedence);
    - ``id_column`` (optional): image ids (default: ``<file stem>-<row>``);
    - optional ``lesion_id``, ``dx_type``, ``age``, ``sex``, ``localization``.
    """
    import pyarrow.parquet as pq

    root = _root(root, "parquet")
    files = _parquet_files(root)
    if not files:
        raise FileNotFoundError(f"parquet: no .parquet file under {root}")
    records, rejected = [], []
    for path in files:
        schema = pq.read_schema(path)
        missing = [c for c in (image_column, label_column) if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}; "
                             f"found columns {', '.join(schema.names)} (set data.image_column / data.label_column)")
        names = _hf_class_names(schema, label_column) or tuple(int_classes)
        optional = [c for c in (id_column, "lesion_id", *META_FIELDS) if c in schema.names]
        table = pq.read_table(path, columns=[image_column, label_column, *optional])
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        for row in range(table.num_rows):
            where = f"{path}[row {row}]"
            label = _parquet_label(columns[label_column][row], names)
            if label is None:
                rejected.append((where, f"unknown label {columns[label_column][row]!r}; expected one of "
                                        f"{_known_labels()} or an index into {', '.join(names)}"))
                continue
            image_id = str(columns[id_column][row]) if id_column in columns else f"{path.stem}-{row}"
            image, problem = _parquet_image(columns[image_column][row], path)
            if problem:
                rejected.append((where, problem))
                continue
            source = {"image_bytes": image} if isinstance(image, bytes) else {"path": image}
            records.append(_record(
                image_id, where, *label, **source,
                lesion_id=_clean(columns["lesion_id"][row]) if "lesion_id" in columns else None,
                age=_age(columns["age"][row], where) if "age" in columns else None,
                **{f: _clean(columns[f][row]) for f in ("dx_type", "sex", "localization") if f in columns},
            ))
    return records, rejected


def _hf_class_names(schema, column: str) -> tuple[str, ...] | None:
    """ClassLabel names of ``column`` from the Hugging Face ``datasets`` metadata of a Parquet schema, if any."""
    blob = (schema.metadata or {}).get(b"huggingface")
    if not blob:
        return None
    try:
        feature = json.loads(blob)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return tuple(names) if names else None


def _parquet_label(value, names: tuple[str, ...]) -> tuple[str | None, str] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return parse_label(names[value]) if 0 <= value < len(names) else None
    return parse_label(value)


def _parquet_image(value, parquet: Path) -> tuple[bytes | str | None, str | None]:
    """Image cell -> (bytes or a path, None), or (None, the reason the cell is unusable)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], None
        value = value.get("path")
    if isinstance(value, bytes):
        return (value, None) if value else (None, "empty image bytes (0 bytes)")
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else parquet.parent / value
        if path.is_file():
            return str(path), None
        return None, f"image path {value!r} not found (relative to {parquet.parent})"
    return None, "no image bytes or path"


def read_synthetic(count: int, image_size: int, seed: int) -> tuple[list[dict], Rejected]:
    """The built-in procedural data set (``lesion.data.synthetic``), images PNG-encoded, masks bit-packed."""
    import cv2

    from lesion.data.synthetic import generate

    records = []
    for item in generate(count, image_size, seed):
        ok, png = cv2.imencode(".png", cv2.cvtColor(item["image"], cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"synthetic: cannot PNG-encode {item['image_id']}")
        records.append(_record(
            item["image_id"], f"synthetic:{item['image_id']}", item["dx"], _benign_malignant(item["dx"]),
            lesion_id=item["lesion_id"], image_bytes=png.tobytes(),
            mask_bits=np.packbits(item["mask"], axis=-1).tobytes(), mask_file=f"synthetic:{item['image_id']}:mask",
            **{f: item.get(f) for f in META_FIELDS},
        ))
    return records, []


def read_source(data_config) -> tuple[list[dict], Rejected]:
    """Read the source named by ``data_config.source``, drop duplicate image_ids, and set each record's ``label``
    for ``data_config.task``. A multiclass task on a source with benign/malignant labels only is a ValueError."""
    source, root = data_config.source, data_config.root
    columns = (data_config.image_column, data_config.label_column, data_config.id_column)
    if source == "ham10000":
        records, rejected = read_ham10000(root)
    elif source == "isic-task3":
        records, rejected = read_isic_task3(root)
    elif source == "isic-binary":
        records, rejected = read_isic_binary(root, *columns)
    elif source == "folder":
        records, rejected = read_folder(root, data_config.task)
    elif source == "parquet":
        records, rejected = read_parquet(root, *columns, int_classes=class_names(data_config.task))
    elif source.startswith("ph2"):
        records, rejected = read_ph2(root, source.partition("-")[2] or "all")
    elif source == "synthetic":
        records, rejected = read_synthetic(data_config.synthetic_count, data_config.image_size, data_config.seed)
    else:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    records, duplicates = drop_duplicates(records)
    return assign_labels(records, data_config.task, source), rejected + duplicates


def drop_duplicates(records: list[dict]) -> tuple[list[dict], Rejected]:
    """Keep the first record of each image_id; later ones are rejected naming the first."""
    first: dict[str, str] = {}
    kept, rejected = [], []
    for record in records:
        if record["image_id"] in first:
            rejected.append((record["file"], f"duplicate image_id {record['image_id']!r} "
                                             f"(first seen: {first[record['image_id']]})"))
        else:
            first[record["image_id"]] = record["file"]
            kept.append(record)
    return kept, rejected


def assign_labels(records: list[dict], task: str, source: str) -> list[dict]:
    """Set ``label`` (class index in ``class_names(task)`` order) on every record."""
    names = class_names(task)
    if task == "multiclass":
        binary_only = sorted({r["benign_malignant"] for r in records if r["dx"] is None})
        if binary_only:
            raise ValueError(f"source {source!r} has images labelled only {' / '.join(binary_only)} (no diagnosis): "
                             "the multiclass task needs dx labels; use --task binary")
        for record in records:
            record["label"] = names.index(record["dx"])
    else:
        for record in records:
            record["label"] = names.index(record["benign_malignant"])
    return records


def input_files(data_config) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under the source root: the data part of ingest's fingerprint."""
    if data_config.source == "synthetic" or data_config.root is None:
        return []
    root = Path(data_config.root).expanduser()
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    listing = []
    for path in _walk_files(root):
        stat = path.stat()
        listing.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return listing
