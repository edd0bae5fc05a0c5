"""Export bundles: a run's ensemble as a folder that describes itself and runs without the run directory.

``export_bundle(run, out)`` writes, into a temporary folder renamed to ``out`` only when every check passed:

- ``metadata.json``: bundle format version, lesion version, classes, preprocessing (every ingest setting), each
  member's checkpoint record (``lesion.records.CheckpointRecord``: architecture, variant, input size, normalisation,
  provenance), the ensemble spec of its inference mode, the training data's fingerprint, the test metrics with
  their intervals (null, with a warning, when the run was not evaluated), the parity figures and the sha256 of every
  other file;
- ``members/<name>/``: ``best.pt`` (state dict and record: torch and Grad-CAM), ``model.json``, ``model.onnx``
  (opset 18, dynamic batch) and/or ``model.pt2`` (``torch.export``), ``model.int8.onnx`` with ``--quantize int8``;
- ``ensemble.json``, ``README.md`` (model card with a Hugging Face YAML header), ``preprocess_reference.py`` (numpy,
  OpenCV and Pillow only: the crop, hair removal, resize and colour constancy the ONNX input assumes) and
  ``samples/`` (a few test images with every engine's expected answers).

Parity: on the run's own test images, ONNX Runtime and ``.pt2`` probabilities must match eager torch within
``PARITY_TOLERANCE`` (max abs) and the ensemble's decisions must agree except within that distance of a threshold;
otherwise ``ExportError`` names the model and the difference and nothing is left at ``out``.
``verify_bundle`` re-checks every checksum and re-runs the samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lesion import ensemble
from lesion.config import Config
from lesion.data import preprocess as preprocess_module
from lesion.data.shards import load_split, read_info
from lesion.engines import (
    INPUT_NAME,
    INT8_FILE,
    ONNX_FILE,
    ONNX_OPSET,
    ExportError,
    OnnxRuntimeLoader,
    export_onnx,
    export_program,
)
from lesion.inference import Inference, file_sha256, predict_proba
from lesion.labels import malignant_indices
from lesion.metrics import balanced_accuracy, binary_auc
from lesion.models import MODEL_RECORD, load_trained
from lesion.resolve import BUNDLE_METADATA, load_inference, read_metadata
from lesion.sites import copy_sites
from lesion.rundir import RunDir

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1  # bump when the layout or metadata of a bundle changes
EXPORT_FORMATS = ("onnx", "pt2", "both")
PARITY_TOLERANCE = 1e-4  # max abs difference of probabilities between an exported model and eager torch
PARITY_IMAGES = 64  # test images each exported member is checked on
SAMPLES = 4  # sample images in the bundle
CALIBRATION_IMAGES = 128  # training images that calibrate INT8 quantization
PT2_FILE = "model.pt2"
REFERENCE_SCRIPT = "preprocess_reference.py"
# licence of the weights, from the training data's (HAM10000 and the ISIC challenge sets: CC BY-NC 4.0)
DATA_LICENCES = {"ham10000": "cc-by-nc-4.0", "isic-task3": "cc-by-nc-4.0", "isic-binary": "cc-by-nc-4.0",
                 "synthetic": "apache-2.0"}


def export_bundle(run_dir: str | Path, out: str | Path, config: Config | str | Path | None = None, *,
                  formats: str = "onnx", quantize: str | None = None, max_drop: float = 0.01) -> dict[str, Any]:
    """Export the ensemble of ``run_dir`` to the bundle folder ``out`` (which must not exist); returns the
    metadata. Raises ExportError (nothing written) when a member fails to export or diverges from eager torch, or
    when INT8 quantization costs more than ``max_drop`` balanced accuracy on validation."""
    if formats not in EXPORT_FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}; got {formats!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize: expected int8; got {quantize!r}")
    if quantize and formats == "pt2":
        raise ValueError("--quantize int8 quantizes the ONNX files: use --format onnx or both")
    out, run = Path(out), RunDir(run_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new folder for the bundle")
    core = load_inference(run.root, config, engine="torch", site="")  # the models as trained; sites travel as files
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would follow the bundle
    try:
        meta = _write_bundle(run, core, tmp, formats, quantize, max_drop)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle written: %s", out)
    return meta


def _write_bundle(run: RunDir, core: Inference, tmp: Path, formats: str, quantize: str | None,
                  max_drop: float) -> dict[str, Any]:
    """Every file of the bundle into ``tmp``, checked; returns the metadata."""
    test = _test_images(run)
    onnx = formats in ("onnx", "both")
    members, parity = {}, {}
    for name in core.names:
        members[name], parity[name] = _export_member(core, name, tmp / "members" / name, formats, test)
    parity["ensemble"] = _decision_parity(core, tmp, test) if onnx else None
    quantization = _quantize(core, run, tmp, max_drop) if quantize else None
    ensemble.save(core.spec, tmp / "ensemble.json")
    meta = _metadata(run, core, members, parity, quantization, formats)
    meta["samples"] = _write_samples(core, tmp, test, onnx, bool(quantization))
    meta["sites"] = copy_sites(run.root, tmp)  # lesion calibrate's profiles: --site NAME works on the bundle
    (tmp / REFERENCE_SCRIPT).write_text(reference_script())
    (tmp / "README.md").write_text(model_card(meta))
    meta["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / BUNDLE_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _test_images(run: RunDir) -> Any:
    """The run's test split (validation when it has no test images): parity and samples run on these."""
    split = load_split(run.root, "test")
    return split if len(split.labels) else load_split(run.root, "val")


def _export_member(core: Inference, name: str, folder: Path, formats: str, test) -> tuple[dict, dict]:
    """Write one member's files and check its exports against eager torch; returns its metadata and parity."""
    folder.mkdir(parents=True)
    source = Path(core.model_dirs[name])
    shutil.copy2(source / "best.pt", folder / "best.pt")
    net, record = load_trained(folder / "best.pt")
    (folder / MODEL_RECORD).write_text(json.dumps(
        {k: v for k, v in record.to_dict().items() if k != "checkpoint_sha256"}, indent=2) + "\n")
    program = export_program(net, record.input_size, name)
    images = test.images[:PARITY_IMAGES]
    reference = core.member(name).probs(images, tta=core.tta, batch_size=core.batch_size)
    parity: dict[str, Any] = {"images": len(images)}
    if formats in ("pt2", "both"):
        torch.export.save(program, folder / PT2_FILE)
        loaded = torch.export.load(folder / PT2_FILE).module()
        probs = predict_proba(loaded, record, images, tta=core.tta, batch_size=core.batch_size)
        parity["pt2_max_abs"] = _check_parity(name, "torch.export (.pt2)", probs, reference)
    if formats in ("onnx", "both"):
        export_onnx(program, folder / ONNX_FILE, name)
        member = OnnxRuntimeLoader()(name, folder)
        probs = member.probs(images, tta=core.tta, batch_size=core.batch_size)
        parity["onnxruntime_max_abs"] = _check_parity(name, "ONNX Runtime", probs, reference)
    entry = {"path": f"members/{name}", "checkpoint": record.to_dict(),
             "files": sorted(p.name for p in folder.iterdir())}
    return entry, parity


def _check_parity(name: str, engine: str, probs: np.ndarray, reference: np.ndarray) -> float:
    """Max abs difference of ``engine``'s probabilities from eager torch; ExportError above the tolerance."""
    diff = np.abs(probs.astype(np.float64) - reference)
    worst = float(diff.max()) if diff.size else 0.0
    if not worst <= PARITY_TOLERANCE:
        row, col = np.unravel_index(int(np.nanargmax(diff)), diff.shape)
        raise ExportError(f"{name}: {engine} probabilities differ from eager torch by {worst:.3g} (max abs, image "
                          f"{row}, class {col}: {probs[row, col]:.6f} vs {reference[row, col]:.6f}); tolerance "
                          f"{PARITY_TOLERANCE}")
    log.info("%s: %s matches eager torch (max abs %.2e)", name, engine, worst)
    return worst


def near_threshold(answer: dict, uncertain_margin: float, tolerance: float = PARITY_TOLERANCE) -> bool:
    """Whether an answer lies within ``tolerance`` of one of the thresholds that make its decision (the top-2 margin
    is a difference of two probabilities: twice the tolerance)."""
    return (abs(answer["malignant_probability"] - answer["malignant_threshold"]) <= tolerance
            or abs(answer["margin"] - uncertain_margin) <= 2 * tolerance
            or abs(answer["ood_score"] - answer["ood_threshold"]) <= tolerance)


def compare_answers(expected: list[dict], got: list[dict], what: str, uncertain_margin: float) -> dict[str, Any]:
    """Probabilities within ``PARITY_TOLERANCE`` and decisions equal except near a threshold; ExportError
    otherwise. Returns the max abs difference and how many decisions differed near a threshold."""
    worst, near = 0.0, 0
    for k, (a, b) in enumerate(zip(expected, got, strict=True)):
        diff = max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"])
        diff = max(diff, abs(a["malignant_probability"] - b["malignant_probability"]))
        worst = max(worst, diff)
        if diff > PARITY_TOLERANCE:
            raise ExportError(f"{what}: image {k}: ensemble probabilities differ by {diff:.3g} (tolerance "
                              f"{PARITY_TOLERANCE})")
        if a["decision"] != b["decision"]:
            if not (near_threshold(a, uncertain_margin) or near_threshold(b, uncertain_margin)):
                raise ExportError(f"{what}: image {k}: decision {b['decision']} instead of {a['decision']}, "
                                  f"away from every threshold")
            near += 1
    return {"max_abs": worst, "decisions_differing_near_threshold": near, "images": len(expected)}


def _decision_parity(core: Inference, tmp: Path, test) -> dict[str, Any]:
    """The ensemble's answers on the parity images, eager torch against ONNX Runtime."""
    images = test.images[:PARITY_IMAGES]
    reference = core.predict(images)
    onnx_core = _bundle_members_core(core, tmp, OnnxRuntimeLoader())
    return compare_answers(reference, onnx_core.predict(images), "ensemble on ONNX Runtime",
                           core.spec.uncertain_margin)


def _bundle_members_core(core: Inference, tmp: Path, loader) -> Inference:
    """``core`` with its members loaded from the bundle being written, by ``loader``."""
    dirs = {name: str(tmp / "members" / name) for name in core.names}
    return dataclasses.replace(core, model_dirs=dirs, members={}, loader=loader).load()


def _quantize(core: Inference, run: RunDir, tmp: Path, max_drop: float) -> dict[str, Any]:
    """INT8 ONNX files (static quantization calibrated on training images); the validation figures of float and
    INT8 side by side; ExportError when balanced accuracy drops by more than ``max_drop``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    train = load_split(run.root, "train")
    pick = np.random.default_rng(0).permutation(len(train.labels))[:CALIBRATION_IMAGES]
    calibration = train.images[np.sort(pick)]
    for name in core.names:
        folder = tmp / "members" / name
        quantize_static(str(folder / ONNX_FILE), str(folder / INT8_FILE),
                        _CalibrationImages(core.member(name).checkpoint, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    val = load_split(run.root, "val")
    figures = {}
    for label, loader in (("float", OnnxRuntimeLoader()), ("int8", OnnxRuntimeLoader(int8=True))):
        answers = _bundle_members_core(core, tmp, loader).predict(val.images)
        figures[label] = _validation_figures(core, answers, val.labels)
    drop = figures["float"]["balanced_accuracy"] - figures["int8"]["balanced_accuracy"]
    report = {"method": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations (MinMax)",
              "calibration_images": len(calibration), "calibration_split": "train", "validation_images":
              len(val.labels), **figures, "balanced_accuracy_drop": drop, "max_drop": max_drop}
    log.info("INT8 on validation: balanced accuracy %.4f (float %.4f), malignant AUC %.4f (float %.4f)",
             figures["int8"]["balanced_accuracy"], figures["float"]["balanced_accuracy"],
             figures["int8"]["malignant_auc"], figures["float"]["malignant_auc"])
    if drop > max_drop:
        raise ExportError(f"INT8 quantization costs {drop:.4f} balanced accuracy on validation "
                          f"({figures['float']['balanced_accuracy']:.4f} -> {figures['int8']['balanced_accuracy']:.4f}), "
                          f"more than --max-drop {max_drop}: {json.dumps(figures)}")
    return report


def _validation_figures(core: Inference, answers: list[dict], labels: np.ndarray) -> dict[str, float]:
    """Balanced accuracy of the ensemble's probabilities and the AUC of its malignant probability."""
    probs = np.array([[a["probabilities"][c] for c in core.classes] for a in answers])
    p_mal = np.array([a["malignant_probability"] for a in answers])
    return {"balanced_accuracy": balanced_accuracy(labels, probs),
            "malignant_auc": binary_auc(np.isin(labels, malignant_indices(core.spec.task)), p_mal)}


class _CalibrationImages:
    """ONNX Runtime's calibration reader: the member's inputs of the calibration images, 16 at a time."""

    def __init__(self, record, images: np.ndarray, batch: int = 16):
        self.inputs = [record.input_transform(np.array(images[i:i + batch])).numpy()
                       for i in range(0, len(images), batch)]
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.batches = iter(self.inputs)


def _metadata(run: RunDir, core: Inference, members: dict, parity: dict, quantization: dict | None,
              formats: str) -> dict[str, Any]:
    """The bundle's description: what it takes, what it holds, how it was checked (``metadata.json``)."""
    data = read_info(run.root)
    test_metrics = _test_metrics(run)
    return {
        "bundle_format": BUNDLE_FORMAT,
        "lesion_version": _version("lesion"),
        "exported_with": {name: _version(name) for name in ("torch", "onnx", "onnxruntime", "timm", "numpy")},
        "task": core.spec.task,
        "classes": core.classes,
        "licence": DATA_LICENCES.get(data.source, "other"),
        "data": {"source": data.source, "fingerprint": data.fingerprint, "num_images": data.num_images,
                 "counts": {k: dict(v) for k, v in data.counts.items()}},
        "preprocessing": preprocessing_record(core),
        "ensemble": {"file": "ensemble.json", "inference_mode": "flip TTA" if core.tta else "single pass",
                     **dataclasses.asdict(core.spec)},
        "members": members,
        "formats": {"onnx": formats in ("onnx", "both"), "pt2": formats in ("pt2", "both"),
                    "onnx_opset": ONNX_OPSET, "dynamic_batch": True, "input": "input", "output": "logits"},
        "parity": {"tolerance": PARITY_TOLERANCE, "reference": "eager torch", **parity},
        "quantization": quantization,
        "test_metrics": test_metrics,
        "warnings": [] if test_metrics else [f"{run.root} was not evaluated: no test metrics in this bundle "
                                             f"(run `lesion evaluate --run {run.root}` before exporting)"],
    }


def preprocessing_record(core: Inference) -> dict[str, Any]:
    """Every preprocessing step and setting between an image file and a member's input, in order."""
    data_config = core.data_config
    steps = ["decode (EXIF orientation applied, RGB)",
             f"refuse images with a side under {data_config.min_image_side} px"]
    if data_config.crop_border:
        steps.append("crop the black dermatoscope border (find_border_box)")
    steps.append(f"shrink to a longer side of at most {max(preprocess_module.WORK_SIDE, data_config.image_size)} px")
    if data_config.remove_hair:
        steps.append("remove hair: black-hat detection, Telea inpainting")
    steps.append(f"square by {data_config.resize} and area-resize to {data_config.image_size} px (uint8)")
    if data_config.color_constancy != "none":
        steps.append(f"colour constancy: {data_config.color_constancy}")
    steps += ["per member: scale to [0, 1], bilinear antialiased resize to its input_size, (x - mean) / std, "
              "NCHW float32", "flip TTA: mean of the probabilities of the 4 flips" if core.tta else "single pass"]
    return {"steps": steps, "data_config": dataclasses.asdict(data_config),
            "inputs": {name: {"input_size": m.checkpoint.input_size, "mean": list(m.checkpoint.mean),
                              "std": list(m.checkpoint.std)} for name, m in core.members.items()},
            "reference_script": REFERENCE_SCRIPT}


def _test_metrics(run: RunDir) -> dict[str, Any] | None:
    """The run's test metrics with their intervals (``eval/metrics.json``), or None when it was not evaluated."""
    path = run.eval / "metrics.json"
    if not path.is_file():
        log.warning("%s was not evaluated (no %s): the bundle's test_metrics are null", run.root, path)
        return None
    metrics = json.loads(path.read_text())
    return {"file": "eval/metrics.json", "split": metrics.get("split"),
            "ensemble": metrics.get("ensemble", {}).get("metrics", metrics.get("ensemble")),
            "models": {name: entry.get("metrics", entry) for name, entry in metrics.get("models", {}).items()}}


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _write_samples(core: Inference, tmp: Path, test, onnx: bool, int8: bool) -> dict[str, Any]:
    """A few test images as PNG files and each engine's answers to them (``samples/expected.json``)."""
    folder = tmp / "samples"
    folder.mkdir()
    files = []
    for k in range(min(SAMPLES, len(test.labels))):
        image_id = str(test.meta["image_id"].iloc[k]) if "image_id" in test.meta else str(k)
        path = folder / f"{k:02d}_{image_id}.png"
        Image.fromarray(np.asarray(test.images[k])).save(path)
        files.append(path.name)
    expected = {"files": files, "labels": [core.classes[int(y)] for y in test.labels[:len(files)]],
                "torch": sample_answers(core, folder, files)}
    if onnx:
        expected["onnxruntime"] = sample_answers(_bundle_members_core(core, tmp, OnnxRuntimeLoader(int8=int8)),
                                                 folder, files)
    (folder / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return {"folder": "samples", "files": files, "expected": "samples/expected.json",
            "engines": [e for e in ("torch", "onnxruntime") if e in expected]}


def sample_answers(core: Inference, folder: Path, files: list[str]) -> list[dict]:
    """The core's answers to sample image files, preprocessed as any new image is."""
    images = np.stack([core.preprocess((folder / name).read_bytes()) for name in files])
    return [{k: v for k, v in answer.items() if k != "model_versions"} for answer in core.predict(images)]


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Check every file's sha256 against ``metadata.json`` and re-run the samples on each engine they were
    recorded with; raises ExportError naming the first file or answer that does not match."""
    bundle = Path(bundle)
    meta = read_metadata(bundle)
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {BUNDLE_METADATA}
    missing, extra = sorted(set(meta["files"]) - present), sorted(present - set(meta["files"]))
    if missing or extra:
        raise ExportError(f"{bundle}: files missing {missing or 'none'}, not in the metadata {extra or 'none'}")
    for name, sha in meta["files"].items():
        if file_sha256(bundle / name) != sha:
            raise ExportError(f"{bundle / name}: sha256 differs from metadata.json (changed since export)")
    expected = json.loads((bundle / meta["samples"]["expected"]).read_text())
    report: dict[str, Any] = {"files": len(meta["files"]), "samples": len(expected["files"])}
    for engine in meta["samples"]["engines"]:
        core = load_inference(bundle, engine=engine)
        got = sample_answers(core, bundle / meta["samples"]["folder"], expected["files"])
        report[engine] = compare_answers(expected[engine], got, f"{bundle}: samples on {engine}",
                                         core.spec.uncertain_margin)
    return report


def model_card(meta: dict[str, Any]) -> str:
    """README.md: a Hugging Face style YAML header, then what the model is, takes and scored."""
    names = ", ".join(f"{n} ({m['checkpoint']['arch']}, {m['checkpoint']['input_size']} px)"
                      for n, m in meta["members"].items())
    header = {"license": meta["licence"], "library_name": "onnx" if meta["formats"]["onnx"] else "pytorch",
              "pipeline_tag": "image-classification", "tags": ["dermatology", "skin-lesion", "dermoscopy", "lesion"],
              "datasets": [meta["data"]["source"]], "metrics": ["balanced_accuracy", "roc_auc"]}
    metrics = meta["test_metrics"]
    scored = (json.dumps(metrics["ensemble"], indent=2) if metrics else
              "not evaluated: " + "; ".join(meta["warnings"]))
    return (f"---\n{yaml_dump(header)}---\n\n# Skin-lesion classifier: {meta['task']} ensemble\n\n"
            f"An ensemble of {names}, exported by lesion {meta['lesion_version']} (bundle format "
            f"{meta['bundle_format']}). Classes: {', '.join(meta['classes'])}. Inference mode: "
            f"{meta['ensemble']['inference_mode']}.\n\n"
            "**Research use only: not a medical device.** Trained on dermoscopic images; photographs of other kinds "
            "are outside what it has seen (the answers carry an out-of-distribution score).\n\n"
            f"## Licence\n\nThe weights carry the training data's licence: {meta['licence']} "
            f"({meta['data']['source']}).\n\n## Input\n\n" + "\n".join(
                f"{i + 1}. {step}" for i, step in enumerate(meta["preprocessing"]["steps"]))
            + f"\n\n`{REFERENCE_SCRIPT}` reproduces these steps with numpy, OpenCV and Pillow only. Run it with "
            "`lesion predict --model-uri BUNDLE` or `lesion.load(BUNDLE)`; check it with `lesion verify BUNDLE`.\n\n"
            f"## Test metrics (with intervals)\n\n```\n{scored}\n```\n")


def yaml_dump(values: dict[str, Any]) -> str:
    """A small YAML mapping (the model card header)."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


_REFERENCE_FUNCTIONS = ("find_border_box", "_peel", "crop_black_border", "hair_mask", "remove_hair", "resize_to_square",
                        "shades_of_gray", "check_image_side", "shrink_to", "_check_mask", "preprocess")
_REFERENCE_CONSTANTS = ("BORDER_WORK_SIDE", "BORDER_MAX_LINE_DARK", "BORDER_MIN_FOV", "BORDER_MIN_KEEP",
                        "HAIR_KERNEL_FRACTION", "HAIR_THRESHOLD", "HAIR_MIN_AREA", "WORK_SIDE", "MIN_IMAGE_SIDE")
_REFERENCE_HEAD = '''"""Reference preprocessing of this bundle's ONNX inputs, with numpy, OpenCV and Pillow only.

    python preprocess_reference.py IMAGE [IMAGE ...] [--out inputs.npz]

For each image: decode (EXIF orientation applied), then the steps of metadata.json's ``preprocessing`` (border crop,
shrink, hair removal, square resize, colour constancy) with its ``data_config``, then per member: [0, 1], bilinear
antialiased resize to its input size, (x - mean) / std, NCHW float32: the array its ONNX file takes as ``input``.
Flip TTA, when the ensemble uses it, is the mean of the probabilities of the four flips of that array. The functions
below are copied from lesion.data.preprocess by ``lesion export``.
"""

import argparse
import json
import logging
import types
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger("preprocess_reference")
RESIZE_FITS = ("crop", "pad")


class ImageError(ValueError):
    """An image that cannot be used."""


'''
_REFERENCE_TAIL = '''

def decode(path):
    """uint8 H x W x 3 RGB of an image file, EXIF orientation applied (transparency composited on black)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            rgb = Image.new("RGB", rgba.size)
            rgb.paste(rgba, mask=rgba.getchannel("A"))
            return np.asarray(rgb, dtype=np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def member_input(img, input_size, mean, std):
    """A preprocessed uint8 image -> one member's input (1, 3, S, S) float32."""
    x = img.astype(np.float32) / 255.0
    if x.shape[0] != input_size:
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
            (input_size, input_size), Image.BILINEAR)) for c in range(3)], axis=-1)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--out", default="inputs.npz")
    args = parser.parse_args()
    meta = json.loads((Path(args.bundle) / "metadata.json").read_text())
    data_config = types.SimpleNamespace(**meta["preprocessing"]["data_config"])
    arrays = {}
    for k, path in enumerate(args.images):
        img = preprocess(decode(path), data_config)[0]
        arrays[f"{k}/preprocessed"] = img
        for name, spec in meta["preprocessing"]["inputs"].items():
            arrays[f"{k}/{name}"] = member_input(img, spec["input_size"], spec["mean"], spec["std"])
    np.savez(args.out, **arrays)
    print(f"{len(args.images)} image(s): {args.out}")


if __name__ == "__main__":
    main()
'''


def reference_script() -> str:
    """``preprocess_reference.py``: the preprocessing functions of ``lesion.data.preprocess``, copied with their
    constants, and a decoder and member-input builder of numpy, OpenCV and Pillow only."""
    constants = "".join(f"{name} = {getattr(preprocess_module, name)!r}\n" for name in _REFERENCE_CONSTANTS)
    functions = "\n\n".join(inspect.getsource(getattr(preprocess_module, name)) for name in _REFERENCE_FUNCTIONS)
    return _REFERENCE_HEAD + constants + "\n\n" + functions + _REFERENCE_TAIL
