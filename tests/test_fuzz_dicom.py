"""Property-based fuzzing of DICOM input: valid dermoscopic DICOM files (uncompressed, YBR, encapsulated JPEG) cut,
with bytes flipped or with a header attribute overwritten reach the decoder and /v1/predict; the decoder raises only
``ImageError`` and the API answers 200 or a 4xx JSON error, never a 5xx."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_files import KINDS, dicom_bytes
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stand_ins import answering_client

from lesion.data.preprocess import ImageError, decode_image

LIMIT = 200_000


@pytest.fixture(scope="module")
def seeds(ham10000) -> list[bytes]:
    """Valid DICOM files of one real image, one per kind."""
    jpeg = sorted((ham10000 / "images").glob("*.jpg"))[0]
    return [dicom_bytes(jpeg, kind) for kind in KINDS]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return answering_client(LIMIT)


@st.composite
def corruptions(draw, seeds: list[bytes]) -> bytes:
    """A valid file cut short, with bytes overwritten in its header or anywhere, or with a short value spliced in."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.one_of(st.integers(132, min(len(data) - 1, 700)), st.integers(132, len(data) - 1)))
        data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def test_corrupt_dicom_raises_only_image_errors(seeds):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(corruptions(seeds))
    def check(data: bytes) -> None:
        try:
            pixels = decode_image(data, max_pixels=4_000_000)
        except ImageError:
            return
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3

    check()


def test_corrupt_dicom_gets_200_or_4xx_never_5xx(client, seeds):
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(corruptions(seeds), st.booleans())
    def check(data: bytes, multipart: bool) -> None:
        if multipart:
            response = client.post("/v1/predict", files={"file": ("x.dcm", data, "application/dicom")})
        else:
            response = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"})
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
        if response.status_code != 200:
            assert response.json()["error"] in ("bad_image", "bad_multipart", "missing_file"), response.text

    check()
