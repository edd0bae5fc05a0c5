"""DICOM input: dermoscopic and VL photographic images stored as DICOM Part 10 files (PS3.10), as hospital imaging
archives hold them.

Accepted: single-frame Dermoscopic Photography (``1.2.840.10008.5.1.4.1.1.77.1.7``, PS3.3 C.8.12.13) and VL
Photographic (``1.2.840.10008.5.1.4.1.1.77.1.4``) images, 8 bits, three samples per pixel, RGB or YBR_FULL /
YBR_FULL_422, stored uncompressed (implicit or explicit VR little endian) or as JPEG baseline (decoded by Pillow, so
an encapsulated JPEG decodes to the same pixels as the JPEG file). Anything else raises
``DicomError`` naming the SOP class, the transfer syntax or the attribute at fault.

Privacy: only the attributes in ``READ_TAGS`` are parsed (the image pixel module and three UIDs); patient-identifying
attributes (name, ID, birth date, accession number...) are never read, so they cannot reach a log, a run directory or
an answer. ``dicom_uids`` gives the SOP Instance and Study Instance UIDs that let an archive match an answer to its
image. pydicom (the ``dicom`` extra) is imported on first use.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

DICM_OFFSET = 128  # a Part 10 file: a 128-byte preamble, then b"DICM"
DICM_MAGIC = b"DICM"
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.7": "Dermoscopic Photography Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
}
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    JPEG_BASELINE: "JPEG Baseline (Process 1)",
}
PHOTOMETRIC_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422")
UID_TAGS = ("SOPInstanceUID", "StudyInstanceUID")
READ_TAGS = ("SOPClassUID", *UID_TAGS, "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
             "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
             "PixelData")  # the only attributes parsed: the image pixel module and the UIDs, no patient data


class DicomError(ValueError):
    """A DICOM file that cannot be used as a lesion image; the message names the SOP class, syntax or attribute."""


@dataclass(frozen=True)
class DicomUids:
    """The identifiers an imaging archive matches an answer with (no patient data)."""

    sop_instance_uid: str | None
    study_instance_uid: str | None

    def as_dict(self) -> dict[str, str | None]:
        """The UIDs under their DICOM keywords, as answers and prediction files carry them."""
        return {"SOPInstanceUID": self.sop_instance_uid, "StudyInstanceUID": self.study_instance_uid}


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM Part 10 file (``DICM`` at byte 128)."""
    return bytes(data[DICM_OFFSET:DICM_OFFSET + len(DICM_MAGIC)]) == DICM_MAGIC


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:
        raise DicomError("reading DICOM needs pydicom: pip install 'lesion[dicom]'") from exc
    return pydicom


def _read(data: bytes, tags: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """The dataset of a Part 10 file with only ``tags`` parsed, and their values (``PixelData``: whether present)
    with the file meta's TransferSyntaxUID and MediaStorageSOPClassUID. Values are converted here, with pydicom's
    warnings (which quote values) silenced."""
    pydicom = _pydicom()
    if not is_dicom(data):
        raise DicomError("not a DICOM Part 10 file (no 'DICM' marker at byte 128)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data), specific_tags=list(tags))
            values = {tag: dataset.get(tag) for tag in tags if tag != "PixelData"}
            values["PixelData"] = "PixelData" in dataset
            meta = dataset.get("file_meta") or {}
            values.update({tag: meta.get(tag) for tag in ("TransferSyntaxUID", "MediaStorageSOPClassUID")})
    except Exception as exc:  # a malformed file fails in many ways inside the parser (EOFError, struct.error...)
        raise DicomError(f"corrupt DICOM file: {type(exc).__name__}") from exc
    return dataset, values


def _text(values: dict[str, Any], keyword: str) -> str | None:
    value = values.get(keyword)
    return None if value is None or str(value) == "" else str(value)


def dicom_uids(data: bytes) -> DicomUids | None:
    """The SOP Instance and Study Instance UIDs of a DICOM file's bytes (pixels are not decoded); None when ``data``
    is not a DICOM file. Raises DicomError for a corrupt one."""
    if not is_dicom(data):
        return None
    _, values = _read(data, UID_TAGS)
    return DicomUids(_text(values, "SOPInstanceUID"), _text(values, "StudyInstanceUID"))


def _number(values: dict[str, Any], keyword: str, default: int | None = None) -> int:
    value = values.get(keyword)
    value = default if value is None else value
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"attribute {keyword} is {'missing' if value is None else 'not a number'}") from exc


def _check_sop_and_syntax(values: dict[str, Any]) -> str:
    """Refuse other SOP classes, multi-frame images, missing pixel data and other transfer syntaxes; the syntax."""
    sop_class = _text(values, "SOPClassUID") or _text(values, "MediaStorageSOPClassUID")
    if sop_class not in SOP_CLASSES:
        raise DicomError(f"SOP class {sop_class or '(missing)'} is not a dermoscopic or VL photographic image; "
                         f"accepted: {', '.join(f'{n} ({u})' for u, n in SOP_CLASSES.items())}")
    sop = f"{SOP_CLASSES[sop_class]} ({sop_class})"
    frames = _number(values, "NumberOfFrames", 1)
    if frames != 1:
        raise DicomError(f"{sop}: multi-frame image ({frames} frames); one frame is expected")
    if not values["PixelData"]:
        raise DicomError(f"{sop}: no pixel data (7FE0,0010)")
    syntax = _text(values, "TransferSyntaxUID") or "(missing)"
    if syntax not in TRANSFER_SYNTAXES:
        raise DicomError(f"{sop}: transfer syntax {syntax} is not supported; accepted: "
                         f"{', '.join(f'{n} ({u})' for u, n in TRANSFER_SYNTAXES.items())}")
    return syntax


def _check_pixel_module(values: dict[str, Any], max_pixels: int) -> None:
    """Refuse anything but 8-bit three-sample RGB/YBR images, and images over ``max_pixels`` (before decoding)."""
    photometric = _text(values, "PhotometricInterpretation") or "(missing)"
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        raise DicomError(f"photometric interpretation {photometric} is not supported; accepted: "
                         f"{', '.join(PHOTOMETRIC_INTERPRETATIONS)}")
    samples, bits = _number(values, "SamplesPerPixel"), _number(values, "BitsAllocated")
    if samples != 3 or bits != 8:
        raise DicomError(f"{samples} samples per pixel of {bits} bits allocated; 3 samples of 8 bits are expected")
    rows, columns = _number(values, "Rows"), _number(values, "Columns")
    if rows < 1 or columns < 1:
        raise DicomError(f"image of {columns}x{rows} pixels (Columns x Rows)")
    if rows * columns > max_pixels:
        raise DicomError(f"{columns}x{rows} = {rows * columns} pixels exceeds the limit {max_pixels}")


def _decode_jpeg_frame(dataset: Any, values: dict[str, Any]) -> np.ndarray:
    """The JPEG baseline frame of a YBR image decoded by Pillow into RGB with libjpeg's own colour conversion, as a
    JPEG file is: the same pixels as the JPEG it encapsulates. (pydicom's Pillow handler asks for the raw YCbCr and
    converts it itself, one grey level off libjpeg on a few pixels of some HAM10000 images.)"""
    from PIL import Image
    from pydicom.encaps import get_frame

    frame = get_frame(dataset.PixelData, 0, number_of_frames=1)
    image = Image.open(io.BytesIO(frame), formats=("JPEG",))
    size = (_number(values, "Columns"), _number(values, "Rows"))
    if image.size != size:
        raise DicomError(f"the JPEG frame is {image.size[0]}x{image.size[1]}; Columns x Rows say {size[0]}x{size[1]}")
    return np.asarray(image.convert("RGB"))


def decode_dicom(data: bytes, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode a dermoscopic or VL photographic DICOM file's bytes into uint8 H x W x 3 RGB.

    Uncompressed YBR images are converted to RGB by pydicom; JPEG baseline frames are decoded by Pillow, YBR ones
    with libjpeg's colour conversion (``_decode_jpeg_frame``), RGB ones through pydicom's Pillow handler. The
    size is checked against ``max_pixels`` from the header, before any pixel is decoded. Raises DicomError for a
    corrupt file, another SOP class, several frames, no pixel data, another transfer syntax or pixel format.
    """
    dataset, values = _read(data, READ_TAGS)
    syntax = _check_sop_and_syntax(values)
    _check_pixel_module(values, max_pixels)
    from pydicom.pixels import pixel_array

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if syntax == JPEG_BASELINE and values["PhotometricInterpretation"] != "RGB":
                pixels = _decode_jpeg_frame(dataset, values)
            else:
                pixels = pixel_array(dataset, decoding_plugin="pillow", as_rgb=True)
    except Exception as exc:  # truncated or malformed pixel data fails inside the decoder in many ways
        raise DicomError(f"cannot decode the pixel data ({TRANSFER_SYNTAXES[syntax]}): {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from exc
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DicomError(f"decoded pixels are {pixels.dtype} {pixels.shape}; uint8 rows x columns x 3 expected")
    return np.ascontiguousarray(pixels)
