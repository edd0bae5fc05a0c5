"""``lesion predict``: class probabilities and a decision for many images, offline from trained models, or through a
served API.

- ``lesion predict --run RUN INPUT... --out preds.csv|preds.parquet`` (or ``--model-uri URI``: a run directory, an
  export bundle or ``models:/NAME@ALIAS``): the inference core (``lesion.inference.Inference``): every image is
  decoded and preprocessed exactly as at ingest, then every trained model in the spec's inference mode, the calibrated
  ensemble and its decision, the same answers as the served API. An INPUT is an image file, a folder of images, a CSV
  or Parquet list of paths or URIs (local or ``s3://``), or a Parquet of image bytes.
- Where it runs: in this process up to ``IN_PROCESS_UP_TO`` images, on Ray Data above it or when a cluster is given
  (``--address``): ``map_batches`` over the same core in actors (``evaluate``'s actor settings:
  ``--actors``, ``--gpus-per-actor``). The first line on stderr says which and why; then a progress line.
- ``lesion predict --url http://HOST:8000 IMAGE... [--json]``: POSTs each image to ``/v1/predict`` (multipart field
  ``file``) and prints a table (or the JSON responses).

Every row carries its provenance (model URI, member checkpoints, lesion version, engine) and a DICOM file's UIDs. A
file that cannot be used is reported on its own row (``status`` = error, ``error`` = the reason) and listed on stderr;
the others are still predicted. The exit status is 0 when every file was predicted, 1 when some failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from lesion import __version__
from lesion.config import Config
from lesion.data.dicom import DicomUids, dicom_uids
from lesion.inference import Inference
from lesion.resolve import load_inference
from lesion.rundir import RunDir, atomic_path
from pipelines.common import (add_model_source_arguments, inference_actor_options, init_ray, load_core_in_actor,
                              model_uri_of, models_config, resolve_config)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}
LIST_SUFFIXES = {".csv", ".parquet"}
OUTPUT_SUFFIXES = {".csv", ".parquet"}
PATH_COLUMNS = ("path", "file", "uri", "image_path", "filename")  # a list's column of paths or URIs, first found
BYTES_COLUMNS = ("image", "image_bytes", "bytes")  # a Parquet's column of encoded images, first found
NAME_COLUMNS = ("image_id", "file", "path", "name", "id")  # what names a row of a Parquet of bytes
CHUNK = 64  # images decoded and predicted at a time in this process
# Above this many images `lesion predict` runs on Ray Data (benchmarks/predict.py measures both paths on the 1,284
# HAM10000 test images; the choice and its figures: docs/decisions.md, "Batch prediction threshold").
IN_PROCESS_UP_TO = 700
EXECUTORS = ("auto", "in-process", "ray-data")


def collect_files(inputs: list[str]) -> list[Path]:
    """Files named directly (any suffix) plus the image files found under named folders, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def _first(columns, wanted: tuple[str, ...]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[w] for w in wanted if w in lower), None)


def _resolved(entry: str, listing: Path) -> str:
    """A list entry as a readable location: URIs as given, relative paths from the list's folder."""
    if "://" in entry:
        return entry
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else listing.parent / entry)


def _path_list(table: pd.DataFrame, listing: Path) -> pd.DataFrame:
    column = _first(table.columns, PATH_COLUMNS) or (table.columns[0] if len(table.columns) == 1 else None)
    if column is None:
        raise ValueError(f"{listing}: a list of images needs a column of paths or URIs named one of "
                         f"{', '.join(PATH_COLUMNS)} (or a single column); found {', '.join(map(str, table.columns))}")
    entries = table[column]
    if entries.isna().any():
        raise ValueError(f"{listing}: column {column!r} is empty in row {int(entries.isna().to_numpy().argmax())}")
    return pd.DataFrame({"file": [_resolved(str(e), listing) for e in entries], "image": None})


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' image struct {bytes, path}
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def _parquet_items(listing: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(listing).to_pandas()
    column = _first(table.columns, BYTES_COLUMNS)
    sample = table[column].dropna().head(1).tolist() if column is not None else []
    if not sample or not isinstance(sample[0], (bytes, bytearray, dict)):
        return _path_list(table, listing)
    names = _first([c for c in table.columns if c != column], NAME_COLUMNS)
    files = (table[names].astype(str).tolist() if names is not None
             else [f"{listing}[row {i}]" for i in range(len(table))])
    return pd.DataFrame({"file": files, "image": [_image_bytes(v) for v in table[column]]})


def read_inputs(inputs: list[str]) -> pd.DataFrame:
    """What to predict, one row per image: ``file`` (the path or URI, or the name of a Parquet row) and ``image``
    (encoded bytes from a Parquet of bytes; None: read ``file``). An input is an image file, a folder searched for
    images, a ``.csv`` / ``.parquet`` list of paths or URIs (relative paths from the list's folder) or a Parquet with
    a column of image bytes (``image``, ``image_bytes`` or ``bytes``, named by ``image_id``, ``file``, ``path``...)."""
    parts = []
    for item in inputs:
        path = Path(item).expanduser()
        if "://" not in item and path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            parts.append(pd.read_csv(path).pipe(_path_list, path) if path.suffix.lower() == ".csv"
                         else _parquet_items(path))
        elif "://" in item:
            parts.append(pd.DataFrame({"file": [item], "image": None}))
        else:
            parts.append(pd.DataFrame({"file": [str(p) for p in collect_files([item])], "image": None}))
    items = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"file": [], "image": []})
    if items.empty:
        raise FileNotFoundError(f"no image files found in {', '.join(inputs)}")
    return items


def read_image(location: str) -> bytes:
    """The bytes of a local file or a URI (``s3://``, ``gs://``... through pyarrow's filesystems; S3 honours
    ``AWS_ENDPOINT_URL`` and the usual AWS credentials)."""
    if "://" not in location:
        return Path(location).read_bytes()
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot read {location}: {exc}") from exc


def answer_row(path: Path | str, answer: dict, uids: DicomUids | None = None) -> dict[str, Any]:
    """One CSV row of an answer: decision, ``ensemble:<class>`` (calibrated) and ``<model>:<class>`` (raw); a DICOM
    file's SOPInstanceUID and StudyInstanceUID (no patient data)."""
    row = {"file": str(path), "status": "ok", "error": "", "predicted_class": answer["predicted_class"],
           "malignant_probability": round(answer["malignant_probability"], 6), "decision": answer["decision"],
           "decision_reason": answer["decision_reason"]}
    row.update({f"ensemble:{c}": round(p, 6) for c, p in answer["probabilities"].items()})
    for name, probs in answer["models"].items():
        row.update({f"{name}:{c}": round(p, 6) for c, p in probs.items()})
    if uids is not None:
        row.update(uids.as_dict())
    return row


def predict_chunk(core: Inference, files: list[str], images: list[bytes | None]) -> list[dict[str, Any]]:
    """Rows for one chunk, in its order: each image read (``images`` entry, else ``read_image(file)``), preprocessed
    and predicted by the loaded ``core``; an image that cannot be read or decoded gets an error row with the reason."""
    rows: list[dict[str, Any] | None] = [None] * len(files)
    good, pixels = [], []
    for k, (file, data) in enumerate(zip(files, images)):
        try:
            data = read_image(file) if data is None else data
            pixels.append(core.preprocess(data))
            good.append((k, dicom_uids(data)))
        except (ValueError, OSError) as exc:  # ImageError, DicomError, unreadable files
            rows[k] = {"file": str(file), "status": "error", "error": str(exc)}
            log.warning("%s: %s", file, exc)
    if good:
        for (k, uids), answer in zip(good, core.predict(np.stack(pixels))):
            rows[k] = answer_row(files[k], answer, uids)
    return rows


class Progress:
    """A progress line on ``stream`` (stderr): done/total, images/s and the time left, at most every ``every`` s and
    at the end; rewritten in place on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None, every: float = 2.0):
        self.total, self.done, self.every = total, 0, every
        self.stream = stream or sys.stderr
        self.start = self.shown = time.perf_counter()

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / seconds
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = "-" if eta != eta else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        return (f"predict: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.1f} images/s, ETA {eta_text}")

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.shown >= self.every or self.done >= self.total:
            self.shown = now
            end = "\r" if self.stream.isatty() and self.done < self.total else "\n"
            print(self.line(), end=end, file=self.stream, flush=True)


class BatchPredictor:
    """Ray Data actor: the inference core loaded once, applied to batches of ``position, file, image`` rows ->
    ``position`` and each row of ``predict_chunk`` as JSON (rows differ in columns: errors, DICOM UIDs)."""

    def __init__(self, core: Inference, use_gpu: bool, threads: int | None = None):
        self.core = load_core_in_actor(core, use_gpu, threads)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images = [None if v is None or v != v else bytes(v) for v in batch["image"]]
        rows = predict_chunk(self.core, [str(f) for f in batch["file"]], images)
        return pd.DataFrame({"position": batch["position"].to_numpy(), "row": [json.dumps(r) for r in rows]})


def predict_in_process(core: Inference, items: pd.DataFrame, progress: Progress) -> list[dict]:
    """Every row of ``items`` predicted here, ``CHUNK`` images at a time."""
    rows: list[dict] = []
    for start in range(0, len(items), CHUNK):
        chunk = items.iloc[start:start + CHUNK]
        rows += predict_chunk(core, chunk["file"].tolist(), chunk["image"].tolist())
        progress.update(len(chunk))
    return rows


def predict_on_ray(core: Inference, items: pd.DataFrame, config: Config, progress: Progress) -> list[dict]:
    """Every row of ``items`` predicted on Ray Data: ``map_batches`` of ``BatchPredictor`` actors (evaluate's actor
    settings), after the capacity check; rows come back in ``items``' order."""
    import ray

    from pipelines import capacity

    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    capacity.check("predict", capacity.evaluate_needs(config), cluster)  # before any actor starts
    ev = config.evaluate
    table = items.assign(position=np.arange(len(items)))
    blocks = [table.iloc[i:i + ev.batch_size] for i in range(0, len(table), ev.batch_size)]
    scored = ray.data.from_pandas(blocks).map_batches(
        BatchPredictor, fn_constructor_kwargs={"core": core.unloaded(), "use_gpu": ev.gpus_per_actor > 0,
                                               "threads": ev.threads_per_actor},
        batch_format="pandas", **inference_actor_options(config))
    rows: list[dict | None] = [None] * len(items)
    with capacity.waiting_notice("predict"):
        for batch in scored.iter_batches(batch_format="pandas", batch_size=None):
            for position, row in zip(batch["position"], batch["row"]):
                rows[int(position)] = json.loads(row)
            progress.update(len(batch))
    return rows


def provenance(core: Inference, uri: str) -> dict[str, str]:
    """The columns every prediction row carries: where the models came from, each member's checkpoint, the lesion
    version, the engine and the site profile ("" for none)."""
    versions = {name: (v.get("checkpoint_sha256") or "")[:12] for name, v in core.versions().items()}
    return {"model_uri": uri, "model_versions": json.dumps(versions, sort_keys=True), "lesion_version": __version__,
            "engine": core.engine, "site": core.site.name if core.site is not None else ""}


def is_local_address(address: str | None) -> bool:
    """Whether a Ray address (None, ``local``, ``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) is a cluster on this
    machine, whose workers read this machine's files."""
    if address in (None, "", "local", "auto"):
        return True
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    names = {"localhost", "127.0.0.1", "0.0.0.0", "::1", socket.gethostname(), socket.getfqdn()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return host in names


def check_readable_by_workers(items: pd.DataFrame, address: str | None, shared: bool) -> None:
    """Refuse, before anything starts, local image paths that the workers of a cluster on another machine cannot
    read (unless ``shared``: every node mounts them at the same path)."""
    if shared or is_local_address(address):
        return
    local = [f for f, image in zip(items["file"], items["image"]) if image is None and "://" not in f]
    if local:
        raise ValueError(f"{len(local)} of {len(items)} images are local files (e.g. {local[0]}) but the Ray cluster "
                         f"at {address} is on another machine, whose workers cannot read them: put them where every "
                         "node can (s3://...), give a Parquet of image bytes, or pass --paths-shared if every node "
                         "mounts them at the same path")


def choose_executor(count: int, executor: str, address: str | None) -> tuple[str, str]:
    """Where ``count`` images are predicted, ``in-process`` or ``ray-data``, and why."""
    if executor != "auto":
        return executor, f"--executor {executor}"
    if address:
        return "ray-data", f"a Ray cluster was given ({address})"
    if count > IN_PROCESS_UP_TO:
        return "ray-data", f"{count} images, more than the in-process limit of {IN_PROCESS_UP_TO}"
    return "in-process", f"{count} images, at most the in-process limit of {IN_PROCESS_UP_TO}"


def predict_files(models: RunDir | str | Path, inputs: list[str], config: Config | None = None,
                  device: str = "cpu", *, executor: str = "in-process", address: str | None = None,
                  paths_shared: bool = False, stream: TextIO | None = None) -> pd.DataFrame:
    """One row per image (``read_inputs``), in input order: file, status, error, predicted_class,
    malignant_probability, decision, decision_reason, ``ensemble:<class>`` (calibrated) and ``<model>:<class>`` (raw)
    probabilities, DICOM UIDs and the ``provenance`` columns. ``models``: a run directory or any URI
    ``lesion.resolve.load_inference`` takes; ``config`` (its ``inference.engine`` included) defaults to the run's
    resolved config. ``executor``: ``in-process``, ``ray-data`` or ``auto`` (``choose_executor``); the choice and
    the progress go to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    address = address or os.environ.get("RAY_ADDRESS") or None
    items = read_inputs(inputs)
    where, why = choose_executor(len(items), executor, address)
    print(f"predict: {len(items)} images {'on Ray Data' if where == 'ray-data' else 'in this process'} ({why})",
          file=stream, flush=True)
    if where == "ray-data":
        check_readable_by_workers(items, address, paths_shared)
    uri = str(models.root if isinstance(models, RunDir) else models)
    config = config or (resolve_config(models) if isinstance(models, RunDir) else None)
    progress = Progress(len(items), stream)
    if where == "ray-data":
        init_ray(address)
        core = load_inference(uri, config, device=device, load=False)
        rows = predict_on_ray(core, items, config or Config(), progress)
    else:
        core = load_inference(uri, config, device=device)
        rows = predict_in_process(core, items, progress)
    table = pd.DataFrame(rows)
    return table.assign(**provenance(core, uri))


def output_suffix(out: str | Path) -> str:
    """``.csv`` or ``.parquet``: the format ``out`` names; ValueError for any other."""
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a .csv or .parquet file")
    return suffix


def write_predictions(table: pd.DataFrame, out: str | Path) -> None:
    """The predictions as CSV or Parquet, by ``out``'s suffix, written atomically."""
    suffix = output_suffix(out)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False) if suffix == ".csv" else table.to_parquet(tmp, index=False)


def report_failures(table: pd.DataFrame, stream: TextIO, shown: int = 20) -> None:
    """List the images that could not be predicted, with the reasons (the first ``shown``; all are in the table)."""
    failed = table[table["status"] != "ok"]
    if failed.empty:
        return
    print(f"predict: {len(failed)} of {len(table)} images could not be predicted:", file=stream)
    for file, error in zip(failed["file"].head(shown), failed["error"].head(shown)):
        print(f"  {file}: {error}", file=stream)
    if len(failed) > shown:
        print(f"  ... and {len(failed) - shown} more (status = error in the predictions)", file=stream)


def predict_url(url: str, inputs: list[str], api_key: str | None = None, timeout: float = 60.0) -> list[dict]:
    """POST each image to ``URL/v1/predict``; one dict per file: ``{"file", **response}`` or ``{"file", "error"}``."""
    import requests

    endpoint = url.rstrip("/") + "/v1/predict"
    headers = {"X-API-Key": api_key} if api_key else {}
    results = []
    for path in collect_files(inputs):
        try:
            data = path.read_bytes()
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            response = requests.post(endpoint, files={"file": (path.name, data, mime)}, headers=headers,
                                     timeout=timeout)
        except (OSError, requests.RequestException) as exc:
            results.append({"file": str(path), "error": str(exc)})
            continue
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:200]}
        if response.status_code != 200:
            detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else body
            results.append({"file": str(path), "error": f"HTTP {response.status_code}: {detail}"})
        else:
            results.append({"file": str(path), **body})
    return results


def format_table(rows: list[dict]) -> str:
    """A plain-text table: file, predicted class, malignant probability, decision (or the error)."""
    lines = [f"{'file':<32} {'class':<6} {'p(mal)':>7} {'decision':<10} note"]
    for row in rows:
        name = Path(row["file"]).name[-32:]
        if row.get("error"):
            lines.append(f"{name:<32} {'-':<6} {'-':>7} {'error':<10} {row['error']}")
            continue
        note = f"{row['latency_ms']:.0f} ms" if isinstance(row.get("latency_ms"), (int, float)) else ""
        lines.append(f"{name:<32} {row['predicted_class']:<6} {row['malignant_probability']:>7.3f} "
                     f"{row['decision']:<10} {note}")
    return "\n".join(lines)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders of images, CSV/Parquet lists of paths or URIs (local, s3://), or "
                             "a Parquet of image bytes")
    parser.add_argument("--run", help="run directory with trained models (offline prediction)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--out", help="predictions file: .csv or .parquet")
    parser.add_argument("--url", help="served API, e.g. http://127.0.0.1:8000 (instead of --run)")
    parser.add_argument("--api-key", help="X-API-Key header for a served API that requires one")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help=f"where to predict: in this process, on Ray Data, or auto: Ray Data above "
                             f"{IN_PROCESS_UP_TO} images or when a cluster is given (default)")
    parser.add_argument("--address", help="Ray cluster to predict on (default: $RAY_ADDRESS; none: a local Ray "
                                          "when Ray Data is chosen)")
    parser.add_argument("--actors", type=int, help="Ray Data inference actors (default: evaluate.actors)")
    parser.add_argument("--gpus-per-actor", "--gpu-per-actor", type=float, dest="gpus_per_actor",
                        help="GPU share of each Ray Data actor, e.g. 0.5 (default: evaluate.gpus_per_actor)")
    parser.add_argument("--paths-shared", action="store_true",
                        help="local paths are mounted at the same place on every node of a remote cluster")
    add_model_source_arguments(parser)


def run_command(name: str, args: argparse.Namespace) -> int:
    if bool(args.url) == bool(args.run or args.model_uri):
        raise ValueError("give either --run RUN_DIR or --model-uri URI (offline) or --url http://HOST:PORT "
                         "(served API)")
    if args.url:
        rows = predict_url(args.url, args.inputs, args.api_key)
        print(json.dumps(rows, indent=2) if args.json else format_table(rows))
        return int(any(r.get("error") for r in rows))
    if args.out:
        output_suffix(args.out)  # refused before anything runs
    config = models_config(args, {"evaluate.actors": args.actors, "evaluate.gpus_per_actor": args.gpus_per_actor})
    table = predict_files(model_uri_of(args), args.inputs, config, executor=args.executor, address=args.address,
                          paths_shared=args.paths_shared)
    if args.out:
        write_predictions(table, args.out)
    report_failures(table, sys.stderr)
    records = json.loads(table.to_json(orient="records"))
    print(json.dumps(records, indent=2) if args.json else format_table(records))
    if args.out:
        print(f"predictions: {args.out}")
    return int((table["status"] != "ok").any())
