"""Serve the trained models with Ray Serve: one deployment per model, an ensemble, Grad-CAM, an HTTP API and a page.

    client --HTTP--> LesionApi (FastAPI ingress: body limit, API key, decode + the ingest preprocessing)
                       |-- EnsembleDeployment --handles--> ModelDeployment x N   (@serve.batch, one per model)
                       |     calibrated combination, malignancy threshold, OOD score, decision
                       '-- GradCamDeployment   (gradients on; lesion.explain)

The HTTP layer (``build_api``) only talks to a backend object with ``predict``/``explain``/``describe`` coroutines,
so the same app runs on Ray Serve (``ServeBackend``, deployment handles) and in one plain process (the baseline of
``benchmarks/serve.py``). ``lesion serve`` runs it from the command line; ``app_builder`` is the import path for
Serve config files (``serve deploy cluster/serve/lesion.yaml``) and for ``serve run pipelines.serve:app_builder
run=RUN_DIR``.

Image sizes: the models see the image after the ingest preprocessing (border crop, hair removal, resize to the run's
``data.image_size``); the Grad-CAM overlay is returned at that preprocessed size (``overlay_size``), not at the size
of the upload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

import lesion
from lesion import calibration, ensemble, explain
from lesion.config import Config, DataConfig, ServeConfig, apply_overrides, load_config
from lesion.data.augment import model_input
from lesion.data.preprocess import ImageError, preprocess_bytes
from lesion.labels import DX_NAMES, class_names, malignant_indices
from lesion.models import load_trained, logits_to_probs
from lesion.rundir import RunDir
from pipelines.common import RUN_CONFIG, ensure_local_path, init_ray, resolve_config

log = logging.getLogger(__name__)

APP_NAME = "lesion"
ENSEMBLE = explain.ENSEMBLE  # the explain target meaning "all served models, weighted as in the ensemble"
WEB_DIR = Path(lesion.__file__).resolve().parent / "web"
QUIET_LOGS = LoggingConfig(enable_access_log=False)  # request lines are not logged (uploads never are)
# The ingress and the ensemble only await other deployments: let each replica hold enough requests for the model
# batches to fill, instead of queueing them in the proxy.
PASS_THROUGH_ONGOING_REQUESTS = 64


class ApiError(Exception):
    """A request the API refuses: HTTP status, a short machine-readable code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- what the deployments compute: plain PyTorch, also used by the single-process baseline -----------------------


def model_version(info: dict) -> dict:
    """The version of a loaded checkpoint: its sha256 and the training run id."""
    return {"checkpoint_sha256": info["checkpoint_sha256"], "run_id": info.get("run_id")}


def model_summary(info: dict) -> dict:
    """What /v1/models says about one loaded model."""
    return {
        "name": info["name"],
        "task": info["task"],
        "classes": list(info["classes"]),
        "input_size": info["input_size"],
        "pretrained": info.get("pretrained"),
        "best_epoch": info.get("best_epoch"),
        **model_version(info),
    }


def predict_probs(model: torch.nn.Module, info: dict, images: np.ndarray, device: str) -> np.ndarray:
    """Class probabilities (N, C) of preprocessed uint8 images (N, S, S, 3) through the evaluation transform."""
    x = model_input(images, info["mean"], info["std"], info["input_size"], device)
    with torch.inference_mode():
        logits = model(x)
    return logits_to_probs(logits.float(), info["task"]).cpu().numpy()


def answer_for(probs_by_model: dict[str, np.ndarray], spec: ensemble.EnsembleSpec) -> dict:
    """The ensemble's answer for one image from each model's raw probabilities (C,): calibrated probabilities, the
    malignant probability against the validation-chosen threshold, and the decision (``lesion.ensemble.decide``:
    "uncertain" when the image looks out of distribution or the top-2 margin is too small)."""
    classes = list(spec.classes)
    probs = ensemble.combine({name: p[None] for name, p in probs_by_model.items()}, spec)
    decisions, reasons = ensemble.decide(probs, spec)
    probs = probs[0]
    top2 = np.sort(probs)[-2:]
    p_malignant = float(probs[malignant_indices(spec.task)].sum())
    return {
        "predicted_class": classes[int(np.argmax(probs))],
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        "malignant_probability": p_malignant,
        "malignant_threshold": float(spec.malignant_threshold),
        "decision": decisions[0],
        "decision_reason": reasons[0],
        "threshold_decision": "malignant" if p_malignant >= spec.malignant_threshold else "benign",
        "margin": float(top2[1] - top2[0]),
        "ood_score": float(calibration.ood_score(probs[None])[0]),
        "ood_threshold": float(spec.ood_threshold),
        "models": {name: {c: float(p) for c, p in zip(classes, row)} for name, row in probs_by_model.items()},
    }


def png_base64(image: np.ndarray) -> str:
    """uint8 RGB image -> base64 PNG (pixels only: no metadata travels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def cam_explainer(model_dirs: dict[str, str], spec: ensemble.EnsembleSpec, data_config: DataConfig,
                  device: str = "cpu") -> explain.Explainer:
    """The served models and ensemble spec as a ``lesion.explain.Explainer``, the one Grad-CAM path of the project:
    a model explains its own predicted class, the ensemble its predicted class with the weighted mean of its members'
    maps (as ``lesion explain`` does)."""
    loaded = {name: load_trained(path, device=device) for name, path in model_dirs.items()}
    return explain.Explainer(loaded, list(model_dirs), spec, data_config, device)


def overlay_reply(explainer: explain.Explainer, image: np.ndarray, model: str, method: str) -> dict:
    """The Grad-CAM part of /v1/explain for a preprocessed image (S, S, 3): the overlay as PNG and what it explains."""
    prediction, over = explainer.explain_preprocessed(image, model, method)
    return {
        "explained_model": model,
        "explained_class": prediction["predicted_class"],
        "method": method,
        "overlay_png": png_base64(over),
        "overlay_size": [int(over.shape[1]), int(over.shape[0])],
    }


# --- the served configuration -----------------------------------------------------------------------------------


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


def serving_setup(run: RunDir, config: Config) -> dict:
    """Everything the deployments are built from: model folders, the fitted ensemble spec, the API settings."""
    trained = run.trained_models()
    models = list(config.serve.models or trained)
    if not models:
        raise FileNotFoundError(f"{run.models}: no trained model (best.pt); run `lesion train` first")
    missing = [name for name in models if name not in trained]
    if missing:
        raise FileNotFoundError(f"{run.models}: no trained checkpoint for {', '.join(missing)} (trained: {trained})")
    data_config = dataclasses.replace(explain.run_data_config(run, config), max_image_pixels=config.serve.max_image_pixels)
    spec = ensemble.load_or_fit(run, config, models=models)
    serve_config = config.serve
    return {
        "models": models,
        "model_dirs": {name: str(run.model_dir(name)) for name in models},
        "spec": spec,
        "settings": ApiSettings(
            data_config=data_config,
            models=models,
            task=data_config.task,
            max_body_bytes=serve_config.max_body_bytes,
            api_key=serve_config.api_key,
            cors_origins=list(serve_config.cors_origins),
            methods=list(explain.METHODS),
        ),
    }


# --- Ray Serve deployments -------------------------------------------------------------------------------------


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@serve.deployment
class ModelDeployment:
    """One trained model: its checkpoint loaded weights-only; dynamic batches of preprocessed images -> probabilities."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float):
        self.device = _device()
        self.model, self.info = load_trained(model_dir, device=self.device)
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict:
        return model_summary(self.info)

    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        probs = await asyncio.to_thread(predict_probs, self.model, self.info, np.stack(images), self.device)
        version = model_version(self.info)
        return [{"probs": row, "version": version} for row in probs]


@serve.deployment
class EnsembleDeployment:
    """Asks every model deployment (through its handle) and combines the answers into the decision."""

    def __init__(self, models: dict[str, DeploymentHandle], spec: ensemble.EnsembleSpec):
        self.models, self.spec = models, spec

    async def predict(self, image: np.ndarray) -> dict:
        replies = await asyncio.gather(*(handle.predict.remote(image) for handle in self.models.values()))
        result = answer_for({name: r["probs"] for name, r in zip(self.models, replies)}, self.spec)
        result["model_versions"] = {name: r["version"] for name, r in zip(self.models, replies)}
        return result

    async def describe(self) -> dict:
        summaries = await asyncio.gather(*(handle.describe.remote() for handle in self.models.values()))
        spec = self.spec
        return {
            "models": [{**s, "ensemble_weight": spec.weights[s["name"]]} for s in summaries],
            "malignant_threshold": spec.malignant_threshold,
            "target_sensitivity": spec.target_sensitivity,
            "ood_threshold": spec.ood_threshold,
            "uncertain_margin": spec.uncertain_margin,
            "temperature": spec.temperature,
        }


@serve.deployment
class GradCamDeployment:
    """Grad-CAM overlays (all served models loaded; gradients are needed, so no inference mode)."""

    def __init__(self, model_dirs: dict[str, str], spec: ensemble.EnsembleSpec, data_config: DataConfig):
        self.explainer = cam_explainer(model_dirs, spec, data_config, _device())

    def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        return overlay_reply(self.explainer, image, model, method)


class ServeBackend:
    """The HTTP layer's backend on Ray Serve: the ensemble and Grad-CAM deployment handles."""

    UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

    def __init__(self, ensemble_handle: DeploymentHandle, gradcam_handle: DeploymentHandle):
        self.ensemble, self.gradcam = ensemble_handle, gradcam_handle

    async def _call(self, response):
        try:
            return await response
        except self.UNAVAILABLE as exc:
            log.warning("a replica was lost during a request: %s", type(exc).__name__)
            raise ApiError(503, "unavailable", "a model replica was lost during this request; retry it") from exc

    async def predict(self, image: np.ndarray) -> dict:
        return await self._call(self.ensemble.predict.remote(image))

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        return await self._call(self.gradcam.explain.remote(image, model, method))

    async def describe(self) -> dict:
        return await self._call(self.ensemble.describe.remote())


class RayMetrics:
    """Our Prometheus metrics, exported by Ray next to Serve's own (prefixed ``ray_`` by the exporter)."""

    LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "lesion_requests", description="API requests by endpoint and outcome", tag_keys=("endpoint", "outcome")
        )
        self.latency = metrics.Histogram(
            "lesion_request_latency_ms", description="API request latency in ms", boundaries=self.LATENCY_BOUNDARIES_MS,
            tag_keys=("endpoint",),
        )
        self.predictions = metrics.Counter(
            "lesion_predictions", description="answers by predicted class and decision",
            tag_keys=("predicted_class", "decision"),
        )

    def observe(self, endpoint: str, outcome: str, latency_ms: float, result: dict | None) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "outcome": outcome})
        self.latency.observe(latency_ms, tags={"endpoint": endpoint})
        if result is not None:
            self.predictions.inc(tags={"predicted_class": result["predicted_class"], "decision": result["decision"]})


@serve.deployment
@serve.ingress()
class LesionApi:
    """The HTTP ingress: the FastAPI app of ``build_api`` on the ensemble and Grad-CAM handles."""

    def __init__(self, ensemble_handle: DeploymentHandle, gradcam_handle: DeploymentHandle, settings: ApiSettings):
        self.backend = ServeBackend(ensemble_handle, gradcam_handle)
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.backend, self.settings, RayMetrics().observe)


def build_app(config: Config, run: RunDir):
    """The Serve application for ``run``'s trained models, with replicas, batching and GPUs from ``config.serve``."""
    setup = serving_setup(run, config)
    s = config.serve
    autoscaling = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
    }
    cpu_only = {"num_cpus": s.cpus_per_replica}
    with_gpu = {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}
    model_handles = {
        name: ModelDeployment.options(
            name=f"model_{name}",
            autoscaling_config=autoscaling,
            max_ongoing_requests=2 * s.max_batch_size,  # one batch running while the next fills
            ray_actor_options=with_gpu,
        ).bind(path, s.max_batch_size, s.batch_wait_timeout_s)
        for name, path in setup["model_dirs"].items()
    }
    ensemble_app = EnsembleDeployment.options(
        autoscaling_config=autoscaling, max_ongoing_requests=PASS_THROUGH_ONGOING_REQUESTS, ray_actor_options=cpu_only
    ).bind(model_handles, setup["spec"])
    gradcam_app = GradCamDeployment.options(
        # one explanation runs at a time per replica: scale out as soon as one waits
        autoscaling_config={**autoscaling, "target_ongoing_requests": 1},
        max_ongoing_requests=2,
        ray_actor_options=with_gpu,
    ).bind(setup["model_dirs"], setup["spec"], setup["settings"].data_config)
    return LesionApi.options(
        autoscaling_config=autoscaling, max_ongoing_requests=PASS_THROUGH_ONGOING_REQUESTS, ray_actor_options=cpu_only
    ).bind(ensemble_app, gradcam_app, setup["settings"])


def app_builder(args: dict[str, Any]):
    """Application builder for Serve config files (``import_path: pipelines.serve:app_builder``).

    ``args``: ``run`` (run directory, required), ``config`` (YAML; default RUN/config.yaml), ``models`` (list or
    comma-separated names), ``gpus_per_replica``. Replicas, autoscaling and actor options in the config file's
    ``deployments`` section override the ones derived here.
    """
    known = {"run", "config", "models", "gpus_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown or "run" not in args:
        raise ValueError(f"app_builder args: 'run' is required; unknown {unknown}; known {sorted(known)}")
    run = RunDir(ensure_local_path(args["run"]))
    saved = run.root / RUN_CONFIG
    config = load_config(args.get("config") or (saved if saved.is_file() else None))
    models = args.get("models")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    config = apply_overrides(config, {"serve.models": models, "serve.gpus_per_replica": args.get("gpus_per_replica")})
    return build_app(config, run)


def deploy(config: Config, run: RunDir) -> str:
    """Start Serve (HTTP on ``config.serve.host:port``) and run the application; returns the base URL."""
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, logging_config=QUIET_LOGS)
    serve.run(build_app(config, run), name=APP_NAME, route_prefix="/", logging_config=QUIET_LOGS)
    return f"http://{config.serve.host}:{config.serve.port}"


# --- the HTTP layer (Ray-free: also the single-process baseline) ------------------------------------------------


class ModelVersion(BaseModel):
    checkpoint_sha256: str
    run_id: str | None


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
    models: dict[str, dict[str, float]]  # each model's probabilities
    model_versions: dict[str, ModelVersion]
    image_size: list[int]  # width, height of the preprocessed image the models saw
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
        503: "a model replica was lost or is starting: retry",
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
    if kind not in ("multipart/form-data", "application/json") and not kind.startswith("image/"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind or '(none)'} is not accepted: send multipart/form-data with a 'file' field, "
            "application/json with 'image_base64', or the image itself as image/*",
        )
    body = await read_body(request, limit)
    fields = dict(request.query_params)
    if kind.startswith("image/"):
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


def build_api(backend, settings: ApiSettings, observe=None) -> FastAPI:
    """The FastAPI app: /v1/predict, /v1/explain, /v1/models, /healthz, the page at /, offline /docs.

    ``backend`` has coroutines ``predict(image)``, ``explain(image, model, method)`` and ``describe()``; ``observe``
    (optional) is called with (endpoint, outcome, latency_ms, result or None) after every API request.
    """
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
    explain_targets = [ENSEMBLE, *settings.models]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(status_code=exc.status, content={"error": exc.code, "detail": exc.message}, headers=headers)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    async def answer(request: Request, endpoint: str) -> dict:
        start = time.perf_counter()
        outcome, result = "error", None
        try:
            check_key(request)
            data, fields = await read_image(request, settings.max_body_bytes)
            model = fields.get("model", ENSEMBLE)
            method = fields.get("method", "gradcam")
            if endpoint == "explain":
                if model not in explain_targets:
                    raise ApiError(404, "unknown_model", f"model {model!r} is not served; choose one of {explain_targets}")
                if method not in settings.methods:
                    raise ApiError(400, "unknown_method", f"method {method!r} is unknown; choose one of {settings.methods}")
            try:
                image = await asyncio.to_thread(preprocess_bytes, data, settings.data_config)
            except ImageError as exc:
                raise ApiError(400, "bad_image", str(exc)) from exc
            if endpoint == "explain":
                result, explanation = await asyncio.gather(backend.predict(image), backend.explain(image, model, method))
                result.update(explanation)
            else:
                result = await backend.predict(image)
            result["image_size"] = [int(image.shape[1]), int(image.shape[0])]
            result["latency_ms"] = (time.perf_counter() - start) * 1000
            outcome = "ok"
            return result
        except ApiError as exc:
            outcome = exc.code
            raise
        finally:
            if observe is not None:
                observe(endpoint, outcome, (time.perf_counter() - start) * 1000, result if outcome == "ok" else None)

    @app.post("/v1/predict", response_model=Prediction, responses=ERRORS, openapi_extra=_request_body(False))
    async def predict(request: Request) -> dict:
        """Classify one image (multipart field `file`, JSON `image_base64`, or a raw image/* body)."""
        return await answer(request, "predict")

    @app.post("/v1/explain", response_model=Explanation, responses=ERRORS, openapi_extra=_request_body(True))
    async def explain_image(request: Request) -> dict:
        """Classify one image and return a CAM overlay for `model` (a name or `ensemble`) with `method`."""
        return await answer(request, "explain")

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models(request: Request) -> dict:
        """The served models with their versions, the ensemble's thresholds, the CAM methods and the limits."""
        check_key(request)
        described = await backend.describe()
        return {
            **described,
            "task": settings.task,
            "classes": list(class_names(settings.task)),
            "class_names": {c: DX_NAMES.get(c, c) for c in class_names(settings.task)},
            "explain_targets": explain_targets,
            "methods": settings.methods,
            "image_size": settings.data_config.image_size,
            "max_body_bytes": settings.max_body_bytes,
        }

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: 200 when the ensemble answers (no API key needed)."""
        described = await backend.describe()
        return {"status": "ok", "models": [m["name"] for m in described["models"]]}

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

    return app


# --- command line --------------------------------------------------------------------------------------------------


def add_arguments(name: str, parser) -> None:
    parser.add_argument("--run", help="run directory with trained models (required unless --stop)")
    parser.add_argument("--config", help="config YAML (default: RUN/config.yaml)")
    parser.add_argument("--models", help="comma-separated model names (default: serve.models, else every trained one)")
    parser.add_argument("--gpus-per-replica", "--gpu-per-replica", type=float, dest="gpus_per_replica",
                        help="GPU share of each model and Grad-CAM replica, e.g. 0.25")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--blocking", dest="blocking", action="store_true", default=True,
                      help="serve until Ctrl-C, then stop (default)")
    mode.add_argument("--detach", dest="blocking", action="store_false",
                      help="deploy to a running Ray cluster and return (needs --address or $RAY_ADDRESS)")
    parser.add_argument("--stop", action="store_true", help="stop the served application on the running cluster")


def stop(address: str | None) -> int:
    """Delete the application (and Serve when nothing else runs) on the cluster at ``address`` (default: auto)."""
    import ray

    try:
        init_ray(address or "auto")
    except ConnectionError as exc:
        print(f"no running Ray cluster to stop '{APP_NAME}' on: {exc}")
        return 1
    if APP_NAME not in serve.status().applications:
        print(f"no '{APP_NAME}' application is running")
        return 0
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
    ray.shutdown()
    print(f"stopped '{APP_NAME}'")
    return 0


def run_command(name: str, args) -> int:
    if args.stop:
        return stop(args.address)
    if not args.run:
        raise ValueError("--run RUN_DIR is required (the run whose trained models to serve)")
    detached = not args.blocking
    if detached and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--detach needs a running Ray cluster (`ray start --head` or `lesion cluster up`): "
                         "pass --address or set RAY_ADDRESS")
    run = RunDir(ensure_local_path(args.run))
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    overrides = {
        "serve.models": models,
        "serve.gpus_per_replica": args.gpus_per_replica,
        "serve.host": args.host,
        "serve.port": args.port,
    }
    config = resolve_config(run, args.config, overrides)
    init_ray(args.address)
    url = deploy(config, run)
    print(f"serving {APP_NAME} at {url}/  (API docs {url}/docs, OpenAPI {url}/openapi.json)")
    if detached:
        print("detached: `lesion serve --stop` stops it")
        return 0
    print("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
        serve.shutdown()
    return 0
