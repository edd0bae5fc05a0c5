"""DICOM input, with DICOM files written by pydicom from real HAM10000 images: decoding (uncompressed RGB and
YBR_FULL, encapsulated JPEG baseline), clear refusals, and the same predictions as the source JPEG through ingest,
``lesion predict``, the inference core and /v1/predict, with no patient-identifying value anywhere."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_files import KINDS, PATIENT, VL_PHOTOGRAPHIC, dicom_bytes, dicom_dataset, to_bytes
from fastapi.testclient import TestClient
from pydicom.uid import JPEG2000Lossless, RLELossless

from lesion.config import config_from_dict
from lesion.data.dicom import dicom_uids, is_dicom
from lesion.data.preprocess import ImageError, decode_image, preprocess
from lesion.data.shards import SPLITS, load_split
from lesion.data.sources import read_folder, read_ham10000
from lesion.inference import Inference
from lesion.rundir import RunDir
from pipelines.api import ApiSettings, LocalBackend, build_api
from pipelines.cli import main
from pipelines.common import resolve_config
from pipelines.predict import predict_files

YBR_TOLERANCE = 2  # grey levels: YBR_FULL -> RGB rounding (pydicom) against the source's RGB
EXACT = ("rgb", "rgb_implicit", "jpeg")


@pytest.fixture(scope="module")
def jpegs(ham10000) -> list[Path]:
    return sorted((ham10000 / "images").glob("*.jpg"))[:3]


def private_values_in(text: bytes | str) -> list[str]:
    """The made-up patient's values found in ``text``."""
    text = text.decode("latin-1") if isinstance(text, bytes) else text
    return [value for value in PATIENT.values() if value in text]


@pytest.mark.parametrize("kind", KINDS)
def test_dicom_decodes_to_the_pixels_of_its_source_image(jpegs, kind):
    for jpeg in jpegs:
        data = dicom_bytes(jpeg, kind)
        assert is_dicom(data) and not is_dicom(jpeg.read_bytes())
        pixels, source = decode_image(data), decode_image(jpeg)
        assert pixels.shape == source.shape and pixels.dtype == np.uint8
        difference = np.abs(pixels.astype(int) - source).max()
        assert difference == 0 if kind in EXACT else difference <= YBR_TOLERANCE


def test_encapsulated_jpeg_decodes_exactly_like_the_file_at_full_size(ham10000_fullres):
    # pydicom's own YCbCr -> RGB conversion is one grey level off libjpeg's on a few pixels of 3 of these 21 images
    for jpeg in sorted((ham10000_fullres / "images").glob("*.jpg")):
        np.testing.assert_array_equal(decode_image(dicom_bytes(jpeg, "jpeg")), decode_image(jpeg), err_msg=jpeg.name)


def test_vl_photographic_images_and_uids_are_read(jpegs):
    data = dicom_bytes(jpegs[0], "jpeg", sop_class=VL_PHOTOGRAPHIC, study_uid="1.2.3.4", instance_uid="1.2.3.4.5")
    np.testing.assert_array_equal(decode_image(data), decode_image(jpegs[0]))
    assert dicom_uids(data).as_dict() == {"SOPInstanceUID": "1.2.3.4.5", "StudyInstanceUID": "1.2.3.4"}
    assert dicom_uids(jpegs[0].read_bytes()) is None


def _variant(jpeg: Path, change: str) -> bytes:
    ds = dicom_dataset(jpeg, "jpeg" if change in ("jpeg2000", "rle") else "rgb")
    if change == "ct":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    elif change == "frames":
        ds.NumberOfFrames = 2
    elif change == "no_pixels":
        del ds.PixelData
    elif change == "jpeg2000":
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    elif change == "rle":
        ds.file_meta.TransferSyntaxUID = RLELossless
    elif change == "monochrome":
        ds.PhotometricInterpretation = "MONOCHROME2"
    return to_bytes(ds)


@pytest.mark.parametrize("change, expected", [
    ("ct", "SOP class 1.2.840.10008.5.1.4.1.1.2 is not a dermoscopic or VL photographic image"),
    ("frames", "multi-frame image (2 frames)"),
    ("no_pixels", "Dermoscopic Photography Image Storage (1.2.840.10008.5.1.4.1.1.77.1.7): no pixel data"),
    ("jpeg2000", "transfer syntax 1.2.840.10008.1.2.4.90 is not supported"),
    ("rle", "transfer syntax 1.2.840.10008.1.2.5 is not supported"),
    ("monochrome", "photometric interpretation MONOCHROME2 is not supported"),
])
def test_unusable_dicom_is_refused_naming_the_reason(jpegs, change, expected):
    with pytest.raises(ImageError, match="^image bytes: .*" + expected.replace("(", r"\(").replace(")", r"\)")):
        decode_image(_variant(jpegs[0], change))


def test_truncated_and_oversized_dicom_are_refused(jpegs, tmp_path):
    data = dicom_bytes(jpegs[0], "rgb")
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:2000])
    with pytest.raises(ImageError, match=f"^{path}: cannot decode the pixel data"):
        decode_image(path)
    with pytest.raises(ImageError, match="200x150 = 30000 pixels exceeds the limit 20000"):
        decode_image(data, max_pixels=20_000)


def test_sources_find_dicom_files_by_stem_with_their_labels(ham10000, jpegs, tmp_path):
    metadata = pd.read_csv(ham10000 / "metadata.csv").set_index("image_id")
    root = tmp_path / "ham"
    (root / "images").mkdir(parents=True)
    for jpeg in jpegs:
        (root / "images" / f"{jpeg.stem}.dcm").write_bytes(dicom_bytes(jpeg, "jpeg"))
    metadata.loc[[j.stem for j in jpegs]].reset_index().to_csv(root / "metadata.csv", index=False)
    records, rejected = read_ham10000(root)
    assert not rejected
    assert {r["image_id"]: r["dx"] for r in records} == {j.stem: metadata.loc[j.stem, "dx"] for j in jpegs}
    assert all(r["path"].endswith(".dcm") for r in records)
    folder = tmp_path / "folder"
    (folder / "mel").mkdir(parents=True)
    (folder / "mel" / "a.dcm").write_bytes(dicom_bytes(jpegs[0], "rgb"))
    records, rejected = read_folder(folder)
    assert not rejected and [(r["image_id"], r["dx"]) for r in records] == [("mel/a", "mel")]


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory) -> RunDir:
    """A writable copy of the trained run (prediction may fit and save the ensemble spec)."""
    return RunDir(shutil.copytree(trained_run.root, tmp_path_factory.mktemp("dicom") / "run"))


@pytest.fixture(scope="module")
def core(run_copy) -> Inference:
    return Inference.from_run(run_copy, resolve_config(run_copy))


def test_predict_reads_dicom_like_its_source_and_writes_uids_without_patient_data(run_copy, jpegs, tmp_path,
                                                                                   caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    for n, jpeg in enumerate(jpegs):
        shutil.copy(jpeg, folder / jpeg.name)
        for kind in ("rgb", "ybr_full", "jpeg"):
            uid = f"1.2.826.0.1.{n}"
            data = dicom_bytes(jpeg, kind, study_uid=uid, instance_uid=f"{uid}.{KINDS.index(kind)}")
            (folder / f"{jpeg.stem}-{kind}.dcm").write_bytes(data)
    (folder / "ct.dcm").write_bytes(_variant(jpegs[0], "ct"))
    out = tmp_path / "preds.csv"
    with caplog.at_level(logging.DEBUG):
        code = main(["predict", "--run", str(run_copy.root), str(folder), "--out", str(out)])
    assert code == 1  # the CT image is reported, the others predicted
    table = pd.read_csv(out, dtype={"SOPInstanceUID": str, "StudyInstanceUID": str})
    table.index = table["file"].map(lambda f: Path(f).stem)
    assert "1.2.840.10008.5.1.4.1.1.2" in table.loc["ct", "error"]
    columns = [c for c in table.columns if c.startswith("ensemble:") or c.endswith(":mel")]
    for n, jpeg in enumerate(jpegs):
        source = table.loc[jpeg.stem, columns].to_numpy(float)
        for kind in ("rgb", "ybr_full", "jpeg"):
            row = table.loc[f"{jpeg.stem}-{kind}"]
            assert (row["SOPInstanceUID"], row["StudyInstanceUID"]) == (f"1.2.826.0.1.{n}.{KINDS.index(kind)}",
                                                                        f"1.2.826.0.1.{n}")
            # the same pixels (see the decoding tests); the batch position may move the 7th decimal
            np.testing.assert_allclose(row[columns].to_numpy(float), source, atol=2e-6 if kind != "ybr_full" else 0.02)
    assert not private_values_in(out.read_bytes()) and not private_values_in(caplog.text)
    for path in run_copy.root.rglob("*"):
        assert not path.is_file() or not private_values_in(path.read_bytes()), path


def test_core_answers_dicom_exactly_as_its_encapsulated_jpeg(core, jpegs):
    for jpeg in jpegs:
        images = np.stack([core.preprocess(jpeg.read_bytes()), core.preprocess(dicom_bytes(jpeg, "jpeg"))])
        np.testing.assert_array_equal(images[0], images[1])
        first, second = core.predict(images)
        assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-6)


@pytest.fixture(scope="module")
def client(core, run_copy) -> TestClient:
    config = resolve_config(run_copy)
    return TestClient(build_api(LocalBackend(core), ApiSettings.of(core, config.serve)), raise_server_exceptions=False)


def test_api_predicts_dicom_bodies_and_parts_with_uids(client, jpegs):
    jpeg = jpegs[0]
    source = client.post("/v1/predict", content=jpeg.read_bytes(), headers={"Content-Type": "image/jpeg"})
    data = dicom_bytes(jpeg, "jpeg", study_uid="1.2.3", instance_uid="1.2.3.9")
    raw = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"})
    part = client.post("/v1/predict", files={"file": ("lesion.dcm", data, "application/dicom")})
    assert source.status_code == raw.status_code == part.status_code == 200, (raw.text, part.text)
    assert source.json().get("dicom") is None
    for answer in (raw.json(), part.json()):
        assert answer["dicom"] == {"SOPInstanceUID": "1.2.3.9", "StudyInstanceUID": "1.2.3"}
        assert answer["probabilities"] == pytest.approx(source.json()["probabilities"], abs=1e-6)
        assert not private_values_in(str(answer))


def test_api_refuses_unusable_dicom_with_a_4xx_naming_it(client, jpegs):
    ct = client.post("/v1/predict", content=_variant(jpegs[0], "ct"), headers={"Content-Type": "application/dicom"})
    assert ct.status_code == 400 and ct.json()["error"] == "bad_image"
    assert "SOP class 1.2.840.10008.5.1.4.1.1.2" in ct.json()["detail"]
    frames = client.post("/v1/predict", files={"file": ("x.dcm", _variant(jpegs[0], "frames"), "application/dicom")})
    assert frames.status_code == 400 and "multi-frame" in frames.json()["detail"]


def test_ingest_reads_a_dicom_folder_like_the_jpegs(ham10000, ray_local, tmp_path, caplog):
    from pipelines.ingest import ingest

    metadata = pd.read_csv(ham10000 / "metadata.csv")
    chosen = metadata.groupby("dx").head(4)
    root = tmp_path / "ham"
    (root / "images").mkdir(parents=True)
    kinds = {}
    for n, image_id in enumerate(chosen["image_id"]):
        kinds[image_id] = KINDS[n % len(KINDS)]
        data = dicom_bytes(ham10000 / "images" / f"{image_id}.jpg", kinds[image_id], instance_uid=f"1.2.9.{n}")
        (root / "images" / f"{image_id}.dcm").write_bytes(data)
    chosen.to_csv(root / "metadata.csv", index=False)
    config = config_from_dict({"data": {"source": "ham10000", "root": str(root), "image_size": 32}})
    run = RunDir(tmp_path / "run")
    with caplog.at_level(logging.DEBUG):
        info = ingest(config, run)
    assert info["num_images"] == len(chosen) and info["rejected"] == 0
    for split in SPLITS:
        arrays = load_split(run.root, split)
        for image_id, image in zip(arrays.meta["image_id"], arrays.images):
            source = preprocess(decode_image(ham10000 / "images" / f"{image_id}.jpg"), config.data)[0]
            difference = np.abs(image.astype(int) - source).max()
            assert difference == 0 if kinds[image_id] in EXACT else difference <= 8, (image_id, kinds[image_id])
    assert not private_values_in(caplog.text)
    for path in run.root.rglob("*"):
        assert not path.is_file() or not private_values_in(path.read_bytes()), path


def test_patient_attributes_are_never_parsed(jpegs, monkeypatch):
    import pydicom

    seen = []
    read = pydicom.dcmread

    def spy(*args, **kwargs):
        dataset = read(*args, **kwargs)
        seen.append({element.keyword for element in dataset})
        return dataset

    monkeypatch.setattr(pydicom, "dcmread", spy)
    data = dicom_bytes(jpegs[0], "jpeg")
    decode_image(data)
    dicom_uids(data)
    assert len(seen) == 2 and not any(set(PATIENT) & keywords for keywords in seen)
    assert "PixelData" in seen[0] and "SOPInstanceUID" in seen[1]
    assert set(PATIENT) <= {element.keyword for element in read(io.BytesIO(data))}  # the file does hold them
