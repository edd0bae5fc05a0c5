"""Property-based fuzzing of the HTTP layer (pipelines/api.py, no Ray): whatever arrives at /v1/predict or
/v1/explain — any content type, body, multipart shape, JSON or base64 — the answer is a 2xx or a 4xx JSON error,
never a 5xx. The backend is a stand-in that answers every image it is given: the parser and the preprocessing in
front of it are what is fuzzed."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stand_ins import CLASSES, answering_client

LIMIT = 100_000


@pytest.fixture(scope="module")
def client() -> TestClient:
    return answering_client(LIMIT)


def encoded(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "I;16") else (120, 80, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = st.builds(encoded, st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]),
                   st.tuples(st.integers(1, 90), st.integers(1, 90)), st.sampled_from(["RGB", "L"]))


@st.composite
def payloads(draw) -> bytes:
    """Real images, cut or with bytes flipped, or plain noise."""
    data = draw(st.one_of(IMAGES, st.binary(max_size=2000)))
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    return data


CONTENT_TYPES = st.sampled_from(["image/jpeg", "image/png", "image/", "application/json", "text/plain", "",
                                 "multipart/form-data", "multipart/form-data; boundary=fuzz", "application/octet-stream",
                                 "IMAGE/PNG; charset=utf-8"])


@st.composite
def requests_(draw) -> dict:
    """Keyword arguments of one TestClient.post: raw bodies, JSON, base64 and multipart of every shape."""
    kind = draw(st.sampled_from(["raw", "json", "multipart", "handmade-multipart"]))
    data = draw(payloads())
    if kind == "raw":
        return {"content": data, "headers": {"content-type": draw(CONTENT_TYPES)}}
    if kind == "json":
        value = draw(st.one_of(st.just(base64.b64encode(data).decode()), st.text(max_size=200),
                               st.just("data:image/png;base64," + base64.b64encode(data).decode()),
                               st.integers(), st.none()))
        doc = draw(st.one_of(st.just({"image_base64": value}), st.dictionaries(st.text(max_size=10), st.text(max_size=10)),
                             st.lists(st.integers(), max_size=3)))
        extra = draw(st.dictionaries(st.sampled_from(["model", "method"]), st.text(max_size=12), max_size=2))
        if isinstance(doc, dict):
            doc.update(extra)
        return {"json": doc}
    if kind == "multipart":
        name = draw(st.sampled_from(["file", "image", "upload"]))
        mime = draw(st.sampled_from(["image/jpeg", "application/octet-stream", "text/plain", ""]))
        fields = draw(st.dictionaries(st.sampled_from(["model", "method", "x"]), st.text(max_size=12), max_size=3))
        return {"files": {name: ("f.bin", data, mime)}, "data": fields}
    boundary = draw(st.sampled_from(["fuzz", "", "a" * 80]))
    body = draw(st.sampled_from([b"--fuzz\r\n", b"--fuzz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n",
                                 b"", b"--fuzz--\r\n"])) + data + draw(st.sampled_from([b"", b"\r\n--fuzz--\r\n"]))
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests_(), path=st.sampled_from(["/v1/predict", "/v1/explain"]))
def test_any_request_gets_a_2xx_or_a_4xx_json_error_never_a_5xx(client, request, path):
    reply = client.post(path, **request)
    assert reply.status_code < 500, (reply.status_code, reply.text[:300])
    body = reply.json()
    if reply.status_code >= 400:
        assert set(body) == {"error", "detail"} and body["detail"]
    else:
        assert body["predicted_class"] in CLASSES


def test_oversized_and_lying_bodies_are_refused_with_413_or_400(client):
    big = b"\xff" * (LIMIT + 1)
    assert client.post("/v1/predict", content=big, headers={"content-type": "image/jpeg"}).status_code == 413
    lying = client.post("/v1/predict", content=b"x", headers={"content-type": "image/jpeg", "content-length": "abc"})
    assert lying.status_code == 400


def test_a_public_bind_without_an_api_key_is_named_as_a_risk():
    from lesion.config import ServeConfig
    from pipelines.api import exposure_warning

    assert exposure_warning(ServeConfig()) is None  # loopback
    assert exposure_warning(ServeConfig(host="0.0.0.0", api_key="k")) is None
    warning = exposure_warning(ServeConfig(host="0.0.0.0"))
    assert "0.0.0.0 without serve.api_key" in warning and "TLS" in warning
