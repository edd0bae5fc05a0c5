"""DICOM files for tests, written with pydicom from real JPEG images, with a made-up patient to check privacy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="pydicom (the dicom extra) is not installed")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import convert_color_space  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit  # noqa: E402

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-4417-PRIVATE", "PatientBirthDate": "19610423",
           "AccessionNumber": "ACC99812PRIVATE"}
KINDS = ("rgb", "rgb_implicit", "ybr_full", "jpeg")


def dicom_dataset(jpeg: Path, kind: str = "rgb", sop_class: str = DERMOSCOPIC, study_uid: str = "1.2.826.0.1.1.7",
                  instance_uid: str = "1.2.826.0.1.1.7.1") -> Dataset:
    """A single-frame dataset holding the pixels of ``jpeg``: ``kind`` rgb (explicit VR), rgb_implicit, ybr_full
    (pixels converted to YBR_FULL) or jpeg (the JPEG file's own bytes encapsulated as JPEG baseline)."""
    rgb = np.asarray(Image.open(jpeg).convert("RGB"))
    syntax = {"rgb": ExplicitVRLittleEndian, "rgb_implicit": ImplicitVRLittleEndian, "ybr_full": ExplicitVRLittleEndian,
              "jpeg": JPEGBaseline8Bit}[kind]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = sop_class, instance_uid, study_uid
    ds.SeriesInstanceUID = study_uid + ".2"
    ds.Modality = "XC"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    if kind == "jpeg":
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([jpeg.read_bytes()])
        ds["PixelData"].VR = "OB"
    elif kind == "ybr_full":
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = rgb.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble and DICM marker) of ``ds``."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(jpeg: Path, kind: str = "rgb", **options) -> bytes:
    """``dicom_dataset(jpeg, kind, ...)`` as the bytes of a Part 10 file."""
    return to_bytes(dicom_dataset(jpeg, kind, **options))
