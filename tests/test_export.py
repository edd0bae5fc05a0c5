"""Export bundles (``lesion export`` / ``lesion verify``): a run of real HAM10000 images with two small members is
exported, checked for parity, verified, tampered with, quantized; failures leave nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lesion import export as export_module
from lesion.config import DataConfig
from lesion.data.preprocess import decode_image, preprocess, preprocess_bytes
from lesion.data.shards import records_to_table, write_info, write_shards
from lesion.engines import ExportError, OnnxMember
from lesion.export import export_bundle, verify_bundle
from lesion.labels import class_names
from lesion.models import create_model, model_spec, save_checkpoint
from lesion.records import CheckpointRecord, DataRecord, preprocessing_of
from lesion.rundir import RunDir
from pipelines.cli import main

IMAGE_SIZE = 40  # cached side
PER_CLASS = {"train": 3, "val": 3, "test": 2}
MEMBERS = {"custom_cnn": (32, {"conv_widths": [8, 16, 32, 64], "fc_widths": [32, 16]}), "scratch_cnn": (40, {})}


def make_mini_run(root: Path, ham10000: Path) -> RunDir:
    """A run of real HAM10000 images (a few per class and split, preprocessed at 40 px) with two randomly
    initialised members; no Ray (the shards are written directly)."""
    meta = pd.read_csv(ham10000 / "metadata.csv")
    classes = class_names("multiclass")
    data_config = DataConfig(source="ham10000", root=str(ham10000), image_size=IMAGE_SIZE)
    counts, offset = {}, 0
    for split, per_class in PER_CLASS.items():
        rows = []
        for label, dx in enumerate(classes):
            for _, row in meta[meta["dx"] == dx].iloc[offset:offset + per_class].iterrows():
                image = preprocess(decode_image(ham10000 / "images" / f"{row.image_id}.jpg"), data_config)[0]
                rows.append({**row.to_dict(), "label": label, "image": image})
        offset += per_class
        write_shards(records_to_table(rows), root / "data" / split, 64)
        counts[split] = {dx: per_class for dx in classes}
    write_info(root / "data", DataRecord(task="multiclass", classes=classes, image_size=IMAGE_SIZE, counts=counts,
                                         source="ham10000", fingerprint="mini", root=str(ham10000),
                                         preprocessing=preprocessing_of(data_config)))
    torch.manual_seed(0)
    for name, (size, kwargs) in MEMBERS.items():
        spec = model_spec(name)
        record = CheckpointRecord(name=name, arch=name, task="multiclass", classes=classes, num_classes=7,
                                  input_size=size, mean=spec["mean"], std=spec["std"], image_size=IMAGE_SIZE,
                                  arch_kwargs=kwargs, data_fingerprint="mini")
        (root / "models" / name).mkdir(parents=True)
        save_checkpoint(root / "models" / name / "best.pt", create_model(name, 7, input_size=size, **kwargs), record)
    return RunDir(root)


@pytest.fixture(scope="module")
def mini_run(ham10000, tmp_path_factory) -> RunDir:
    return make_mini_run(tmp_path_factory.mktemp("export") / "run", ham10000)


@pytest.fixture(scope="module")
def bundle(mini_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    assert main(["export", "--run", str(mini_run.root), "--out", str(out), "--format", "both"]) == 0
    return out


def test_the_bundle_describes_itself(bundle, mini_run):
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["bundle_format"] == export_module.BUNDLE_FORMAT and meta["classes"] == list(class_names("multiclass"))
    assert meta["licence"] == "cc-by-nc-4.0" and meta["data"]["fingerprint"] == "mini"
    assert meta["test_metrics"] is None and "not evaluated" in meta["warnings"][0]
    assert meta["preprocessing"]["data_config"]["image_size"] == IMAGE_SIZE
    assert any("hair" in step for step in meta["preprocessing"]["steps"])
    assert meta["ensemble"]["models"] == list(MEMBERS) and meta["formats"]["onnx_opset"] >= 17
    for name, (size, _) in MEMBERS.items():
        member = meta["members"][name]
        assert member["checkpoint"]["arch"] == name and member["checkpoint"]["input_size"] == size
        assert {"best.pt", "model.json", "model.onnx", "model.pt2"} <= set(member["files"])
        assert meta["parity"][name]["onnxruntime_max_abs"] <= 1e-4 and meta["parity"][name]["pt2_max_abs"] <= 1e-4
    assert meta["parity"]["ensemble"]["images"] == 14
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"metadata.json"}
    assert set(meta["files"]) == files
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-4.0\n") and "not a medical device" in card
    assert not list(bundle.parent.glob(".bundle.*"))  # no temporary folder left


def test_the_onnx_files_have_a_dynamic_batch_axis(bundle):
    import onnx

    model = onnx.load(bundle / "members" / "custom_cnn" / "model.onnx")
    assert model.opset_import[0].version >= 17
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value


def test_verify_passes_then_names_a_changed_file(bundle, tmp_path, capsys):
    assert main(["verify", str(bundle)]) == 0
    assert "every checksum and sample answer matches" in capsys.readouterr().out
    changed = shutil.copytree(bundle, tmp_path / "changed")
    (changed / "members" / "scratch_cnn" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="scratch_cnn/model.onnx: sha256 differs"):
        verify_bundle(changed)
    assert main(["verify", str(changed)]) == 1


def test_the_reference_script_reproduces_the_model_input(bundle, ham10000, tmp_path):
    image = sorted((ham10000 / "images").glob("*.jpg"))[0]
    out = tmp_path / "inputs.npz"
    subprocess.run([sys.executable, str(bundle / "preprocess_reference.py"), str(image), "--out", str(out)],
                   check=True, capture_output=True)
    arrays = np.load(out)
    meta = json.loads((bundle / "metadata.json").read_text())
    expected = preprocess_bytes(image.read_bytes(), DataConfig(**meta["preprocessing"]["data_config"]))
    np.testing.assert_array_equal(arrays["0/preprocessed"], expected)
    for name in MEMBERS:
        record = CheckpointRecord.from_dict(meta["members"][name]["checkpoint"])
        np.testing.assert_allclose(arrays[f"0/{name}"], record.input_transform(expected[None]).numpy(), atol=1e-5)


def test_a_failing_export_names_the_model_and_leaves_nothing(mini_run, tmp_path, monkeypatch):
    def refuse(program, path, name):
        raise ExportError(f"{name}: ONNX export failed (opset 18): no symbolic for aten::odd_op")

    monkeypatch.setattr(export_module, "export_onnx", refuse)
    out = tmp_path / "failed"
    with pytest.raises(ExportError, match="custom_cnn: ONNX export failed.*aten::odd_op"):
        export_bundle(mini_run.root, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_diverging_export_names_the_model_and_the_difference(mini_run, tmp_path, monkeypatch):
    logits = OnnxMember.logits
    monkeypatch.setattr(OnnxMember, "logits", lambda self, x: logits(self, x) + (self.name == "scratch_cnn")
                        * np.linspace(0, 1, 7, dtype=np.float32))
    with pytest.raises(ExportError, match=r"scratch_cnn: ONNX Runtime probabilities differ from eager torch by "):
        export_bundle(mini_run.root, tmp_path / "diverged")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_int8_reports_validation_figures_and_refuses_a_large_drop(mini_run, tmp_path):
    meta = export_bundle(mini_run.root, tmp_path / "int8", quantize="int8", max_drop=1.0)
    report = meta["quantization"]
    assert report["calibration_split"] == "train" and report["validation_images"] == 21
    for precision in ("float", "int8"):
        assert 0 <= report[precision]["balanced_accuracy"] <= 1 and 0 <= report[precision]["malignant_auc"] <= 1
    assert (tmp_path / "int8" / "members" / "custom_cnn" / "model.int8.onnx").is_file()
    assert verify_bundle(tmp_path / "int8")["onnxruntime"]["images"] == export_module.SAMPLES
    with pytest.raises(ExportError, match="INT8 quantization costs .* more than --max-drop -1"):
        export_bundle(mini_run.root, tmp_path / "refused", quantize="int8", max_drop=-1.0)
    assert not (tmp_path / "refused").exists()


def test_export_refuses_an_existing_folder_and_bad_options(mini_run, tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError, match="choose a new folder"):
        export_bundle(mini_run.root, tmp_path / "there")
    with pytest.raises(ValueError, match="--format: expected one of onnx, pt2, both"):
        export_bundle(mini_run.root, tmp_path / "x", formats="tflite")
    with pytest.raises(ValueError, match="quantizes the ONNX files"):
        export_bundle(mini_run.root, tmp_path / "x", formats="pt2", quantize="int8")
