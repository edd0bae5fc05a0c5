"""The HTTP API of the served models, importable and testable without Ray.

``build_api(backend, settings)`` is the FastAPI app: /v1/predict, /v1/explain, /v1/models, /healthz (liveness),
/readyz (readiness), the web page at / and the offline Swagger UI at /docs. It validates and reads the request
(content types, body and pixel limits, the API key), admits it or sheds it (``Admission``: a bounded number at once,
none while draining; an admitted one unanswered within ``serve.answer_timeout_s`` gets 503 too), decodes and
preprocesses the image as ingest does, and asks a backend, an object with coroutines ``predict(image)``,
``explain(image, model, method)``, ``describe()`` and ``not_ready()``:

- ``LocalBackend`` runs a run's inference core (``lesion.inference.Inference``) in this process: the single-process
  baseline of ``benchmarks/serve.py`` and the Ray-free tests;
- ``pipelines.serve.ServeBackend`` calls the Ray Serve deployments, which run the same core.

Errors are JSON ``{"error": code, "detail": message}`` (``ApiError``); uploads are held in memory only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

import lesion
from lesion.config import DataConfig, ServeConfig
from lesion.data.dicom import DicomError, dicom_uids
from lesion.data.preprocess import ImageError, preprocess_bytes
from lesion.explain import ENSEMBLE, METHODS, Explainer
from lesion.inference import Inference
from lesion.labels import DX_NAMES, class_names

WEB_DIR = Path(lesion.__file__).resolve().parent / "web"


class ApiError(Exception):
    """A request the API refuses: HTTP status, a short machine-readable code and a message naming the problem; a 503
    tells the client when to retry (``retry_after_s``, default 1 s)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


class Admission:
    """The requests this server process is answering (/v1/predict and /v1/explain, from the read body to the answer):
    at most ``limit`` at once (None: no bound), none while draining. A request past the bound is refused at once with
    503 and Retry-After instead of waiting in a queue."""

    def __init__(self, limit: int | None):
        self.limit, self.in_flight, self.draining = limit, 0, False

    def refusal(self) -> ApiError | None:
        """The 503 a new request gets now (draining, or the bound reached), or None: it would be admitted."""
        if self.draining:
            return ApiError(503, "draining", "the server is stopping and takes no new requests; retry shortly "
                                             "(another instance may answer)")
        if self.limit is not None and self.in_flight >= self.limit:
            return ApiError(503, "overloaded", f"the server is answering {self.in_flight} requests, its limit "
                                               "(serve.max_pending_requests); retry after Retry-After seconds")
        return None

    @contextlib.contextmanager
    def admit(self):
        """Hold one place for the request inside the block; ``ApiError`` 503 when draining or full."""
        refused = self.refusal()
        if refused is not None:
            raise refused
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@dataclasses.dataclass
class ApiSettings:
    """What the HTTP layer needs: limits, security, the preprocessing and the names it accepts."""

    data_config: DataConfig
    models: list[str]
    task: str
    max_body_bytes: int
    api_key: str | None
    cors_origins: list[str]
    methods: list[str]
    max_pending_requests: int | None = None  # requests answered at once; past it 503 (None: no bound)
    answer_timeout_s: float | None = None  # an admitted request unanswered after this gets 503 (None: no deadline)
    registered_model: dict[str, str | None] | None = None  # served from the MLflow registry: name, version, ...

    @classmethod
    def of(cls, core: Inference, serve_config: ServeConfig,
           registered_model: dict[str, str | None] | None = None) -> ApiSettings:
        """The settings for serving ``core`` with the limits and security of ``serve_config``; ``registered_model``
        (name, version, alias, run_id) when it is a registered MLflow model version, named in every answer."""
        return cls(
            data_config=dataclasses.replace(core.data_config, max_image_pixels=serve_config.max_image_pixels),
            models=core.names,
            task=core.spec.task,
            max_body_bytes=serve_config.max_body_bytes,
            api_key=serve_config.api_key,
            cors_origins=list(serve_config.cors_origins),
            methods=list(METHODS),
            max_pending_requests=serve_config.max_pending_requests,
            answer_timeout_s=serve_config.answer_timeout_s,
            registered_model=registered_model,
        )


def exposure_warning(serve_config: ServeConfig) -> str | None:
    """The risk of binding ``serve.host`` beyond loopback without ``serve.api_key``, in one sentence (None: none)."""
    if serve_config.host in ("127.0.0.1", "localhost", "::1") or serve_config.api_key:
        return None
    return (f"serving on {serve_config.host} without serve.api_key: anyone who can reach this address can use the API "
            "and its models; set serve.api_key, and put TLS in front of it at a gateway")


def png_base64(image: np.ndarray) -> str:
    """uint8 RGB image -> base64 PNG (pixels only: no metadata travels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_reply(explainer: Explainer, image: np.ndarray, model: str, method: str) -> dict:
    """The Grad-CAM part of /v1/explain for a preprocessed image (S, S, 3): the overlay as PNG and what it explains."""
    answer, over = explainer.explain_preprocessed(image, model, method)
    return {
        "explained_model": model,
        "explained_class": answer["explained_class"],
        "method": method,
        "overlay_png": png_base64(over),
        "overlay_size": [int(over.shape[1]), int(over.shape[0])],
    }


class LocalBackend:
    """The API's backend in this process: a run's inference core with its members loaded, no batching."""

    def __init__(self, core: Inference):
        self.core = core.load()
        # Grad-CAM needs gradients: eager torch whatever engine predicts (as the Grad-CAM deployment)
        self.explainer = Explainer(self.core.on_torch().load())

    async def predict(self, image: np.ndarray) -> dict:
        return (await asyncio.to_thread(self.core.predict, image[None]))[0]

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        return await asyncio.to_thread(overlay_reply, self.explainer, image, model, method)

    async def describe(self) -> dict:
        return self.core.describe()

    async def not_ready(self) -> list[str]:
        return []  # every member is loaded in the constructor


# --- schemas ------------------------------------------------------------------------------------------------------


class ModelVersion(BaseModel):
    checkpoint_sha256: str
    run_id: str | None


class RegisteredModel(BaseModel):
    """The MLflow registry's model version the server answers with."""

    name: str
    version: str
    alias: str | None  # the alias it was served by (read at start: a later move needs a redeploy)
    run_id: str | None  # the MLflow run that logged it


class DicomIds(BaseModel):
    SOPInstanceUID: str | None
    StudyInstanceUID: str | None


class Prediction(BaseModel):
    """The ensemble's answer for one image."""

    predicted_class: str
    probabilities: dict[str, float]  # calibrated ensemble probabilities, sum 1
    malignant_probability: float
    malignant_threshold: float  # chosen on validation for the target sensitivity
    decision: Literal["malignant", "benign", "uncertain"]
    decision_reason: str
    threshold_decision: Literal["malignant", "benign"]  # the decision by the threshold alone
    margin: float  # gap between the two most probable classes
    ood_score: float
    ood_threshold: float
    tta: bool  # the inference mode: flip test-time augmentation (the mode the thresholds were fitted for)
    models: dict[str, dict[str, float]]  # each model's probabilities
    model_versions: dict[str, ModelVersion]
    image_size: list[int]  # width, height of the preprocessed image the models saw
    dicom: DicomIds | None = None  # a DICOM image's UIDs, for an archive to match the answer (no patient data)
    registered_model: RegisteredModel | None = None  # when served from the MLflow registry
    site: str | None = None  # the site profile the answer is calibrated with (lesion calibrate; --site)
    latency_ms: float  # time in the server, from request to answer


class Explanation(Prediction):
    """The prediction plus a Grad-CAM overlay."""

    explained_model: str
    explained_class: str  # the class the overlay explains: the explained model's own prediction
    method: str
    overlay_png: str  # base64 PNG at the preprocessed image size
    overlay_size: list[int]  # width, height


class ErrorBody(BaseModel):
    error: str  # short code, e.g. bad_image, body_too_large
    detail: str  # what was wrong


ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "not a usable image, or a malformed body or field",
        401: "missing or wrong X-API-Key (only when the server has an API key)",
        404: "unknown model",
        413: "body larger than the limit",
        415: "unsupported Content-Type",
        503: "overloaded, stopping, or a model replica was lost or is starting: retry after Retry-After seconds",
    }.items()
}


def _request_body(explain_fields: bool) -> dict:
    fields = {}
    if explain_fields:
        fields = {
            "model": {"type": "string", "default": ENSEMBLE, "description": "a served model name or 'ensemble'"},
            "method": {"type": "string", "default": "gradcam", "description": "CAM method (see /v1/models)"},
        }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image_base64"],
                        "properties": {"image_base64": {"type": "string", "description": "base64 image file"}, **fields},
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 when Content-Length or the bytes actually sent exceed ``limit``."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            raise ApiError(413, "body_too_large", f"request body is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes):
    yield body


async def read_image(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The encoded image and the text fields of a multipart, JSON or raw ``image/*`` request (held in memory only)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json", "application/dicom") and not kind.startswith("image/"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind or '(none)'} is not accepted: send multipart/form-data with a 'file' field, "
            "application/json with 'image_base64', or the image itself as image/* or application/dicom",
        )
    body = await read_body(request, limit)
    fields = dict(request.query_params)
    if kind.startswith("image/") or kind == "application/dicom":
        return body, fields
    if kind == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("image_base64"), str):
            raise ApiError(400, "missing_image", "JSON body needs a string field 'image_base64'")
        encoded = doc["image_base64"]
        if encoded.startswith("data:"):  # a data URL: data:image/png;base64,....
            encoded = encoded.partition(",")[2]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "bad_base64", "field 'image_base64' is not valid base64") from exc
        fields.update({k: v for k, v in doc.items() if k in ("model", "method") and isinstance(v, str)})
        return data, fields
    parser = MultiPartParser(Headers(raw=request.headers.raw), _once(body), max_files=1, max_fields=8, max_part_size=limit)
    parser.spool_max_size = limit + 1  # keep the upload in memory: never spooled to a temporary file on disk
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc.message}") from exc
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_file", "multipart body has no file field named 'file'")
        data = await upload.read()
        fields.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
    finally:
        await form.close()
    return data, fields


# --- the app ------------------------------------------------------------------------------------------------------


Observe = Callable[[str, str, float, "dict | None"], None]


def check_key(request: Request, settings: ApiSettings) -> None:
    """401 unless the server has no API key or the request's X-API-Key matches it."""
    if settings.api_key is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


def _explain_fields(fields: dict[str, str], settings: ApiSettings) -> tuple[str, str]:
    """The (model, method) of an explain request, refused when unknown."""
    model = fields.get("model", ENSEMBLE)
    method = fields.get("method", "gradcam")
    targets = [ENSEMBLE, *settings.models]
    if model not in targets:
        raise ApiError(404, "unknown_model", f"model {model!r} is not served; choose one of {targets}")
    if method not in settings.methods:
        raise ApiError(400, "unknown_method", f"method {method!r} is unknown; choose one of {settings.methods}")
    return model, method


async def _answer_image(data: bytes, fields: dict[str, str], endpoint: str, backend, settings: ApiSettings) -> dict:
    """The backend's answer for an uploaded image: preprocessing, the prediction and, for explain, the overlay."""
    if endpoint == "explain":
        model, method = _explain_fields(fields, settings)
    try:
        image = await asyncio.to_thread(preprocess_bytes, data, settings.data_config)
        uids = dicom_uids(data)
    except (ImageError, DicomError) as exc:
        raise ApiError(400, "bad_image", str(exc)) from exc
    if endpoint == "explain":
        result, explanation = await asyncio.gather(backend.predict(image), backend.explain(image, model, method))
        result.update(explanation)
    else:
        result = await backend.predict(image)
    result["image_size"] = [int(image.shape[1]), int(image.shape[0])]
    if settings.registered_model is not None:
        result["registered_model"] = settings.registered_model
    if uids is not None:
        result["dicom"] = uids.as_dict()
    return result


async def discard_body(request: Request, limit: int) -> None:
    """Read and drop the request body (up to ``limit`` bytes), so that a refused client's upload completes."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return


async def in_time(answering, seconds: float | None):
    """The result of the awaitable ``answering``, or ``ApiError`` 503 (and the work cancelled) after ``seconds``."""
    if seconds is None:
        return await answering
    try:
        return await asyncio.wait_for(answering, seconds)
    except asyncio.TimeoutError as exc:
        raise ApiError(503, "timeout", f"no answer within {seconds:g} s (serve.answer_timeout_s): the server is "
                                       "overloaded or a model replica is restarting; retry after Retry-After "
                                       "seconds") from exc


async def answer(request: Request, endpoint: str, backend, settings: ApiSettings, observe: Observe | None,
                 admission: Admission) -> dict:
    """One /v1/predict or /v1/explain request: checks, admission (a refusal reads the body without parsing it),
    reading, the backend's answer within the deadline, the metrics."""
    start = time.perf_counter()
    outcome, result = "error", None
    try:
        check_key(request, settings)
        refused = admission.refusal()
        if refused is not None:
            await discard_body(request, settings.max_body_bytes)
            raise refused
        with admission.admit():
            data, fields = await read_image(request, settings.max_body_bytes)
            result = await in_time(_answer_image(data, fields, endpoint, backend, settings), settings.answer_timeout_s)
        result["latency_ms"] = (time.perf_counter() - start) * 1000
        outcome = "ok"
        return result
    except ApiError as exc:
        outcome = exc.code
        raise
    finally:
        if observe is not None:
            observe(endpoint, outcome, (time.perf_counter() - start) * 1000, result if outcome == "ok" else None)


def _new_app(settings: ApiSettings) -> FastAPI:
    """The FastAPI app with CORS, the static files and the JSON error handler, before the routes."""
    app = FastAPI(
        title="lesion",
        version=lesion.__version__,
        description="Skin-lesion classification with a calibrated ensemble, abstention and Grad-CAM explanations. "
        "Decision support, not a diagnosis.",
        docs_url=None,
        redoc_url=None,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key"],
        )
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.status == 503 else None
        return JSONResponse(status_code=exc.status, content={"error": exc.code, "detail": exc.message}, headers=headers)

    return app


def _add_pages(app: FastAPI) -> None:
    """The web page at / and the Swagger UI at /docs, both served from ``WEB_DIR`` (they work offline)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="openapi.json",
            title="lesion API",
            swagger_js_url="static/swagger-ui-bundle.js",
            swagger_css_url="static/swagger-ui.css",
            swagger_favicon_url="static/favicon.svg",
        )


def build_api(backend, settings: ApiSettings, observe: Observe | None = None,
              admission: Admission | None = None) -> FastAPI:
    """The FastAPI app: /v1/predict, /v1/explain, /v1/models, /healthz, /readyz, the page at /, offline /docs.

    ``backend`` has coroutines ``predict(image)``, ``explain(image, model, method)``, ``describe()`` and
    ``not_ready()`` (the parts not loaded yet); ``observe`` (optional) is called with (endpoint, outcome, latency_ms,
    result or None) after every API request; ``admission`` (default: bounded by ``settings.max_pending_requests``)
    admits or sheds the API requests, and drains them when told to.
    """
    app = _new_app(settings)
    admission = admission or Admission(settings.max_pending_requests)

    @app.post("/v1/predict", response_model=Prediction, responses=ERRORS, openapi_extra=_request_body(False))
    async def predict(request: Request) -> dict:
        """Classify one image (multipart field `file`, JSON `image_base64`, or a raw image/* body)."""
        return await answer(request, "predict", backend, settings, observe, admission)

    @app.post("/v1/explain", response_model=Explanation, responses=ERRORS, openapi_extra=_request_body(True))
    async def explain_image(request: Request) -> dict:
        """Classify one image and return a CAM overlay for `model` (a name or `ensemble`) with `method`."""
        return await answer(request, "explain", backend, settings, observe, admission)

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models(request: Request) -> dict:
        """The served models with their versions (and the registered model version, when served from the MLflow
        registry), the ensemble's thresholds, the CAM methods and the limits."""
        check_key(request, settings)
        described = await backend.describe()
        classes = list(class_names(settings.task))
        return {
            **described,
            "task": settings.task,
            "classes": classes,
            "class_names": {c: DX_NAMES.get(c, c) for c in classes},
            "explain_targets": [ENSEMBLE, *settings.models],
            "methods": settings.methods,
            "image_size": settings.data_config.image_size,
            "max_body_bytes": settings.max_body_bytes,
            **({"registered_model": settings.registered_model} if settings.registered_model else {}),
        }

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: 200 while this server process answers, loaded or not (no API key needed; /readyz says whether
        it can answer predictions)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: ERRORS[503]})
    async def readyz() -> dict:
        """Readiness: 200 when every model and the Grad-CAM explainer are loaded and the server takes requests; 503
        naming what is missing while it starts, or while it drains before stopping (no API key needed)."""
        if admission.draining:
            raise ApiError(503, "draining", "the server is stopping and takes no new requests")
        missing = await backend.not_ready()
        if missing:
            raise ApiError(503, "not_ready", f"not loaded yet: {', '.join(missing)}", retry_after_s=2)
        return {"status": "ready", "models": settings.models, "in_flight": admission.in_flight,
                "max_pending_requests": admission.limit}

    _add_pages(app)
    return app
