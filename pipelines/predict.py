"""``lesion predict``: class probabilities and a decision for image files, offline from a run directory or through a
served API.

- ``lesion predict --run RUN FOLDER_OR_FILES... --out preds.csv``: the run's inference core
  (``lesion.inference.Inference``): every image is decoded and preprocessed exactly as at ingest, then every trained
  model in the spec's inference mode, the calibrated ensemble and its decision, the same answers as the served API.
- ``lesion predict --url http://HOST:8000 IMAGE... [--json]``: POSTs each image to ``/v1/predict`` (multipart field
  ``file``) and prints a table (or the JSON responses).

A file that cannot be used is reported on its own row (``status`` = error, ``error`` = the reason); the others are
still predicted. The exit status is 0 when every file was predicted, 1 when some failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesion.config import Config
from lesion.data.dicom import DicomUids, dicom_uids
from lesion.data.preprocess import ImageError
from lesion.resolve import load_inference
from lesion.rundir import RunDir, atomic_path
from pipelines.common import add_model_source_arguments, model_uri_of, models_config, resolve_config

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}
CHUNK = 64  # images decoded and predicted at a time


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


def answer_row(path: Path, answer: dict, uids: DicomUids | None = None) -> dict[str, Any]:
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


def predict_files(models: RunDir | str | Path, inputs: list[str], config: Config | None = None,
                  device: str = "cpu") -> pd.DataFrame:
    """One row per file: file, status, error, predicted_class, malignant_probability, decision, decision_reason,
    ``ensemble:<class>`` (calibrated) and ``<model>:<class>`` (raw) probabilities. ``models``: a run directory or
    any URI ``lesion.resolve.load_inference`` takes; ``config`` (its ``inference.engine`` included) defaults to the
    run's resolved config."""
    files = collect_files(inputs)
    if not files:
        raise FileNotFoundError(f"no image files found in {', '.join(inputs)}")
    uri = models.root if isinstance(models, RunDir) else models
    core = load_inference(uri, config or (resolve_config(models) if isinstance(models, RunDir) else None),
                          device=device)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):
        good, images = [], []
        for path in files[start:start + CHUNK]:
            try:
                data = path.read_bytes()
                images.append(core.preprocess(data))
                good.append((path, dicom_uids(data)))
            except (ImageError, OSError) as exc:
                rows.append({"file": str(path), "status": "error", "error": str(exc)})
                log.warning("%s: %s", path, exc)
        if good:
            answers = core.predict(np.stack(images))
            rows += [answer_row(path, answer, uids) for (path, uids), answer in zip(good, answers)]
    order = {str(p): i for i, p in enumerate(files)}
    table = pd.DataFrame(rows)
    return table.sort_values("file", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


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
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--run", help="run directory with trained models (offline prediction)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--out", help="CSV file for offline predictions")
    parser.add_argument("--url", help="served API, e.g. http://127.0.0.1:8000 (instead of --run)")
    parser.add_argument("--api-key", help="X-API-Key header for a served API that requires one")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_source_arguments(parser)


def run_command(name: str, args: argparse.Namespace) -> int:
    if bool(args.url) == bool(args.run or args.model_uri):
        raise ValueError("give either --run RUN_DIR or --model-uri URI (offline) or --url http://HOST:PORT "
                         "(served API)")
    if args.url:
        rows = predict_url(args.url, args.inputs, args.api_key)
        print(json.dumps(rows, indent=2) if args.json else format_table(rows))
        return int(any(r.get("error") for r in rows))
    table = predict_files(model_uri_of(args), args.inputs, models_config(args))
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
    records = json.loads(table.to_json(orient="records"))
    print(json.dumps(records, indent=2) if args.json else format_table(records))
    if args.out:
        print(f"predictions: {args.out}")
    return int((table["status"] != "ok").any())
