"""Source readers on tiny data sets written by the tests (and the real HAM10000 folder when present)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lesion.config import DataConfig
from lesion.data.sources import input_files, read_ham10000, read_source
from lesion.labels import BINARY_CLASSES, DX_CLASSES

HAM_HEADER = "image_id,lesion_id,dx,dx_type,age,sex,localization\n"


def write_image(path: Path, seed: int = 0, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def image_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def config(source: str, root, **fields) -> DataConfig:
    return DataConfig(source=source, root=str(root), **fields)


def by_id(records):
    return {r["image_id"]: r for r in records}


@pytest.fixture
def ham_official(tmp_path) -> Path:
    """The official layout: HAM10000_metadata.csv, two image folders, segmentation PNGs, and bad rows."""
    root = tmp_path / "HAM10000"
    write_image(root / "HAM10000_images_part_1" / "ISIC_1.jpg", 1)
    write_image(root / "HAM10000_images_part_1" / "ISIC_2.jpg", 2)
    write_image(root / "HAM10000_images_part_2" / "ISIC_3.jpg", 3)
    write_image(root / "HAM10000_images_part_2" / "ISIC_5.jpg", 5)
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 255
    (root / "masks").mkdir()
    Image.fromarray(mask).save(root / "masks" / "ISIC_1_segmentation.png")
    (root / "HAM10000_metadata.csv").write_text(
        HAM_HEADER
        + "ISIC_1,HAM_A,mel,histo,55,male,back\n"
        + "ISIC_2,HAM_A,mel,histo,,female,back\n"  # same lesion, unknown age
        + "ISIC_3,HAM_B,NV,follow_up,40,male,trunk\n"  # upper-case dx is accepted
        + "ISIC_4,HAM_C,bkl,consensus,50,male,face\n"  # no image file
        + "ISIC_5,HAM_D,xyz,histo,50,male,face\n"  # unknown dx
        + "ISIC_3,HAM_B,nv,follow_up,40,male,trunk\n"  # duplicate image_id
    )
    return root


def test_ham10000_official_layout(ham_official):
    records, rejected = read_source(config("ham10000", ham_official))
    found = by_id(records)
    assert sorted(found) == ["ISIC_1", "ISIC_2", "ISIC_3"]
    assert found["ISIC_1"]["lesion_id"] == found["ISIC_2"]["lesion_id"] == "HAM_A"
    assert found["ISIC_3"]["dx"] == "nv" and found["ISIC_3"]["label"] == DX_CLASSES.index("nv")
    assert found["ISIC_2"]["age"] is None and found["ISIC_1"]["age"] == 55.0
    assert found["ISIC_1"]["mask_path"].endswith("ISIC_1_segmentation.png") and found["ISIC_2"]["mask_path"] is None
    reasons = {file.split(" ")[0]: reason for file, reason in rejected}
    assert set(reasons) == {"ISIC_4", "ISIC_5", str(found["ISIC_3"]["path"])}
    assert "no image file" in reasons["ISIC_4"] and "unknown dx 'xyz'" in reasons["ISIC_5"]
    assert "duplicate image_id 'ISIC_3'" in reasons[found["ISIC_3"]["path"]]


def test_ham10000_binary_labels_follow_malignancy(ham_official):
    records, _ = read_source(config("ham10000", ham_official, task="binary"))
    labels = {r["image_id"]: BINARY_CLASSES[r["label"]] for r in records}
    assert labels == {"ISIC_1": "malignant", "ISIC_2": "malignant", "ISIC_3": "benign"}


def test_ham10000_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "metadata.csv").write_text("image_id,dx\nISIC_1,nv\n")
    with pytest.raises(ValueError, match=r"metadata\.csv: missing required column\(s\) lesion_id"):
        read_ham10000(tmp_path)


def test_ham10000_masks_npz_is_read(tmp_path):
    write_image(tmp_path / "images" / "ISIC_1.jpg")
    (tmp_path / "metadata.csv").write_text(HAM_HEADER + "ISIC_1,HAM_1,df,histo,30,female,leg\n")
    mask = np.zeros((1, 24, 32), bool)
    mask[0, 2:4, 30:] = True
    np.savez(tmp_path / "masks.npz", image_id=np.array(["ISIC_1"]), mask=np.packbits(mask, axis=-1))
    (record,), rejected = read_ham10000(tmp_path)
    unpacked = np.unpackbits(np.frombuffer(record["mask_bits"], np.uint8).reshape(24, -1), axis=1)[:, :32]
    assert rejected == [] and np.array_equal(unpacked.astype(bool), mask[0])


def test_real_ham10000_loads_with_masks(ham10000):
    records, rejected = read_ham10000(ham10000)
    assert len(records) == 8553 and rejected == []
    assert all(r["mask_bits"] is not None for r in records)
    counts = {dx: sum(r["dx"] == dx for r in records) for dx in DX_CLASSES}
    assert counts == {"nv": 5713, "mel": 954, "bkl": 943, "bcc": 440, "akiec": 284, "vasc": 118, "df": 101}
    assert len({r["lesion_id"] for r in records}) == 6350  # (the data README says 6,330; the CSV holds 6,350)


def test_isic_task3_one_hot_rows(tmp_path):
    for i in range(1, 5):
        write_image(tmp_path / "ISIC2018_Task3_Training_Input" / f"ISIC_{i}.jpg", i)
    (tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv").write_text(
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
        "ISIC_1,0.0,0.0,1.0,0.0,0.0,0.0,0.0\n"
        "ISIC_2,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"  # no diagnosis
        "ISIC_3,1.0,1.0,0.0,0.0,0.0,0.0,0.0\n"  # two diagnoses
        "ISIC_4,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
        "ISIC_9,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"  # no image
    )
    (tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv").write_text(
        "image,lesion_id,diagnosis_confirm_type\nISIC_1,HAM_X,histopathology\n")
    records, rejected = read_source(config("isic-task3", tmp_path))
    found = by_id(records)
    assert {k: v["dx"] for k, v in found.items()} == {"ISIC_1": "bcc", "ISIC_4": "vasc"}
    assert found["ISIC_1"]["lesion_id"] == "HAM_X" and found["ISIC_4"]["lesion_id"] is None
    reasons = {file.split(" ")[0]: reason for file, reason in rejected}
    assert reasons["ISIC_2"] == "no diagnosis column is 1"
    assert reasons["ISIC_3"] == "several diagnosis columns are 1: MEL, NV"
    assert "no image file" in reasons["ISIC_9"]


def test_isic_task3_missing_one_hot_column(tmp_path):
    (tmp_path / "GroundTruth.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF\nISIC_1,1,0,0,0,0,0\n")
    with pytest.raises(ValueError, match=r"GroundTruth\.csv: missing required column\(s\) VASC"):
        read_source(config("isic-task3", tmp_path))


def test_isic_binary_folders(tmp_path):
    write_image(tmp_path / "train" / "benign" / "1.jpg", 1)
    write_image(tmp_path / "train" / "malignant" / "2.jpg", 2)
    write_image(tmp_path / "test" / "benign" / "1.jpg", 3)  # same name as in train: still its own image
    (tmp_path / "test" / "malignant").mkdir(parents=True)
    (tmp_path / "test" / "malignant" / "notes.txt").write_text("not an image")
    records, rejected = read_source(config("isic-binary", tmp_path, task="binary"))
    assert {r["image_id"]: r["label"] for r in records} == {"train/benign/1": 0, "train/malignant/2": 1,
                                                           "test/benign/1": 0}
    assert all(r["dx"] is None for r in records)
    assert len(rejected) == 1 and rejected[0][0].endswith("notes.txt") and "not an image file" in rejected[0][1]
    with pytest.raises(ValueError, match="use --task binary"):
        read_source(config("isic-binary", tmp_path, task="multiclass"))


def test_isic_binary_hugging_face_parquet(tmp_path):
    images = pa.array([{"bytes": image_bytes(1), "path": "a.png"}, {"bytes": image_bytes(2), "path": "b.png"},
                       {"bytes": None, "path": "gone.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": images, "label": pa.array([1, 0, 0], pa.int64())})
    # Hugging Face datasets store ClassLabel names in the schema metadata; here they are in reverse order.
    features = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"_type": "ClassLabel", "names": ["malignant", "benign"]}}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(features)})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    records, rejected = read_source(config("isic-binary", tmp_path, task="binary"))
    assert [(r["image_bytes"], BINARY_CLASSES[r["label"]]) for r in records] == [
        (image_bytes(1), "benign"), (image_bytes(2), "malignant")]
    assert len(rejected) == 1 and "row 2" in rejected[0][0] and "'gone.png' not found" in rejected[0][1]


def test_folder_source(tmp_path):
    write_image(tmp_path / "mel" / "a.jpg", 1)
    write_image(tmp_path / "NV" / "sub" / "b.png", 2, "PNG")
    write_image(tmp_path / "melanocytic nevus" / "c.jpg", 3)
    multiclass, rejected = read_source(config("folder", tmp_path))
    assert {r["image_id"]: r["dx"] for r in multiclass} == {"mel/a": "mel", "NV/sub/b": "nv",
                                                          "melanocytic nevus/c": "nv"}
    binary, _ = read_source(config("folder", tmp_path, task="binary"))
    assert {r["image_id"]: r["label"] for r in binary} == {"mel/a": 1, "NV/sub/b": 0, "melanocytic nevus/c": 0}
    (tmp_path / "benign").mkdir()
    with pytest.raises(ValueError, match="use --task binary"):
        read_source(config("folder", tmp_path))
    (tmp_path / "freckle").mkdir()
    with pytest.raises(ValueError, match="sub-folder.* freckle name no known class"):
        read_source(config("folder", tmp_path, task="binary"))


def test_generic_parquet_with_configured_columns(tmp_path):
    table = pa.table({"img": [image_bytes(1), image_bytes(2), image_bytes(3), b""],
                      "diagnosis": ["mel", "bcc", "sunburn", "nv"],
                      "name": ["p1", "p2", "p3", "p4"], "lesion_id": ["L1", "L1", None, "L4"],
                      "age": [30, None, 50, 60]})
    pq.write_table(table, tmp_path / "set.parquet")
    cfg = config("parquet", tmp_path / "set.parquet", image_column="img", label_column="diagnosis", id_column="name")
    records, rejected = read_source(cfg)
    assert [(r["image_id"], r["dx"], r["lesion_id"], r["age"]) for r in records] == [
        ("p1", "mel", "L1", 30.0), ("p2", "bcc", "L1", None)]
    reasons = dict(rejected)
    assert "unknown label 'sunburn'" in reasons[f"{tmp_path / 'set.parquet'}[row 2]"]
    assert "empty image bytes" in reasons[f"{tmp_path / 'set.parquet'}[row 3]"]
    with pytest.raises(ValueError, match=r"set\.parquet: missing required column\(s\) image"):
        read_source(config("parquet", tmp_path / "set.parquet"))


def test_synthetic_source_records(tmp_path):
    records, rejected = read_source(DataConfig(source="synthetic", image_size=32, synthetic_count=30, seed=3))
    assert len(records) == 30 and rejected == []
    assert {r["dx"] for r in records} == set(DX_CLASSES)
    decoded = Image.open(io.BytesIO(records[0]["image_bytes"]))
    assert decoded.size == (32, 32)
    assert len(records[0]["mask_bits"]) == 32 * 4
    again, _ = read_source(DataConfig(source="synthetic", image_size=32, synthetic_count=30, seed=3))
    assert [r["image_bytes"] for r in again] == [r["image_bytes"] for r in records]


def test_input_files_see_changes(ham_official):
    cfg = config("ham10000", ham_official)
    before = input_files(cfg)
    assert ("HAM10000_images_part_1/ISIC_1.jpg" in {name for name, _, _ in before})
    path = ham_official / "HAM10000_images_part_1" / "ISIC_1.jpg"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert input_files(cfg) != before


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a root"):
        read_source(DataConfig(source="folder"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source(config("ham10000", tmp_path / "nowhere"))
