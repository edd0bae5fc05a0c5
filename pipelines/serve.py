"""Serve the trained models with Ray Serve: one deployment per model, Grad-CAM, an HTTP API and a page.

    client --HTTP--> LesionApi (FastAPI ingress of pipelines.api: body limit, API key, decode + ingest preprocessing;
                       |        the ensemble: calibrated combination, malignancy threshold, OOD score, decision)
                       |--handles--> ModelDeployment x N   (@serve.batch, one per model)
                       '-- GradCamDeployment   (gradients on; lesion.explain)

Every deployment runs the run's inference core (``lesion.inference.Inference``), sent to it without weights: a
model replica loads its one member, the Grad-CAM replica all of them, the ingress none (it builds the ensemble's
answer from the members' probabilities, so a request crosses one process boundary each way, not two). The HTTP
layer lives in ``pipelines.api`` (no Ray); ``ServeBackend`` connects it to the deployment handles. ``lesion serve``
runs it from the command line; ``app_builder`` is the import path for Serve config files (``serve deploy
cluster/serve/lesion.yaml``) and for ``serve run pipelines.serve:app_builder run=RUN_DIR``.

Where the models come from (``ModelSource``): a run directory, an export bundle, or a registered MLflow model
(``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``): the alias is read once, the version it names is served and
downloaded by the one resolver (``lesion.resolve``), and /v1/models and every answer name that registered version.
A replica on a node without the download resolves the same version there.

Load and lifecycle: /readyz answers 200 once every model and the Grad-CAM replica answer (``ServeBackend.not_ready``);
the ingress answers at most ``serve.max_pending_requests`` API requests at once and refuses the rest with 503 and
Retry-After (``pipelines.api.Admission``); ``lesion serve --stop`` (and Ctrl-C) drains: a named ``DrainSignal`` actor
tells every ingress replica to refuse new requests, the in-flight ones finish within the grace period, then the
application is deleted.

Image sizes: the models see the image after the ingest preprocessing (border crop, hair removal, resize to the run's
``data.image_size``); the Grad-CAM overlay is returned at that preprocessed size (``overlay_size``), not at the size
of the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.config import BackpressureConfig
from ray.serve.schema import LoggingConfig

from lesion.config import Config, ServeConfig, apply_overrides
from lesion.explain import Explainer
from lesion.inference import Inference
from lesion.models import set_cpu_threads
from lesion.resolve import load_inference
from lesion.rundir import RunDir
from pipelines import capacity
from pipelines.api import Admission, ApiError, ApiSettings, build_api, exposure_warning, overlay_reply
from pipelines.common import (
    add_model_source_arguments,
    ensure_local_path,
    init_ray,
    model_uri_of,
    models_config,
)

log = logging.getLogger(__name__)

APP_NAME = "lesion"
QUIET_LOGS = LoggingConfig(enable_access_log=False)  # request lines are not logged (uploads never are)
# Model and Grad-CAM replicas take this many requests at once and hold in their batch queue or lock what they cannot
# compute yet: tighter caps left Serve's router backing off while the replicas idled (docs/decisions.md)
REPLICA_MAX_ONGOING_REQUESTS = 64
DRAIN_SIGNAL = "lesion-drain"  # the named actor `lesion serve --stop` raises (namespace DRAIN_NAMESPACE)
DRAIN_NAMESPACE = "lesion"
DRAIN_POLL_S = 0.25  # how often an ingress replica looks for the drain signal
DRAIN_GRACE_S = 30.0  # default time in-flight requests get to finish when the server stops


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the served models come from: ``uri``, a run directory or export bundle, or for a registered model the
    URI pinned to its version, with ``registered`` (name, version, alias, the MLflow run id) for the answers."""

    uri: str
    registered: dict[str, str | None] | None = None

    @classmethod
    def of(cls, uri: str | Path | RunDir) -> ModelSource:
        """The source of ``uri``: a ``RunDir``, a local path, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
        (the alias read now, in the registry at ``$MLFLOW_TRACKING_URI``)."""
        if isinstance(uri, ModelSource):
            return uri
        if isinstance(uri, RunDir):
            return cls(str(uri.root))
        if str(uri).startswith("models:/"):
            from lesion.mlflow_model import registered_version

            found = registered_version(str(uri))
            return cls(str(found["uri"]), {k: v for k, v in found.items() if k != "uri"})
        return cls(str(ensure_local_path(uri)))


def serving_core(source: ModelSource | RunDir, config: Config) -> Inference:
    """The inference core of the served models (``serve.models``, default every trained one) of a run directory,
    export bundle or registered model, on ``inference.engine``, without weights."""
    return load_inference(ModelSource.of(source).uri, config, models=config.serve.models, tta=config.serve.tta,
                          load=False)


def on_this_node(core: Inference, refetch: Callable[[], Inference] | None) -> Inference:
    """``core``, or where its files are missing (a registered model downloaded on another node) ``refetch()``: the
    same version resolved on this node."""
    if refetch is None or all(Path(folder).is_dir() for folder in core.model_dirs.values()):
        return core
    return refetch()


# --- Ray Serve deployments -------------------------------------------------------------------------------------


def _device(threads: int | None = None) -> str:
    """The replica's torch device, with ``serve.threads_per_replica`` torch threads when that is the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_cpu_threads(threads, device)
    return device


@serve.deployment
class ModelDeployment:
    """One member of the core, loaded once per replica: dynamic batches of preprocessed images -> probabilities."""

    def __init__(self, core: Inference, name: str, max_batch_size: int, batch_wait_timeout_s: float,
                 threads: int | None = None, refetch: Callable[[], Inference] | None = None):
        self.core, self.name = on_this_node(core, refetch).load([name], _device(threads)), name
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict:
        return self.core.member(self.name).summary()

    def ready(self) -> bool:
        return True  # a replica answers only once its constructor has loaded the member

    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        probs = await asyncio.to_thread(self.core.member_probs, self.name, np.stack(images))
        version = self.core.member(self.name).version
        return [{"probs": row, "version": version} for row in probs]


@serve.deployment
class GradCamDeployment:
    """Grad-CAM overlays (every member loaded; gradients are needed, so no inference mode)."""

    def __init__(self, core: Inference, threads: int | None = None, refetch: Callable[[], Inference] | None = None):
        # Grad-CAM needs gradients: eager torch whatever engine predicts
        self.explainer = Explainer(on_this_node(core, refetch).on_torch().load(device=_device(threads)))

    def ready(self) -> bool:
        return True  # a replica answers only once its constructor has loaded every member

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        # in a thread, as the model replicas compute: the replica's event loop stays free (health checks, the next
        # request) also when Serve runs user code on it; the explainer's lock keeps one explanation at a time
        return await asyncio.to_thread(overlay_reply, self.explainer, image, model, method)


class ServeBackend:
    """The HTTP layer's backend on Ray Serve: asks every model deployment (through its handle) and builds the core's
    ensemble answer from their probabilities; explanations go to the Grad-CAM deployment."""

    UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
    READY_TIMEOUT_S = 2.0  # a deployment with no replica answering within this is not ready

    def __init__(self, models: dict[str, DeploymentHandle], gradcam_handle: DeploymentHandle, core: Inference):
        self.models, self.gradcam, self.core = models, gradcam_handle, core

    async def _call(self, response):
        try:
            return await response
        except self.UNAVAILABLE as exc:
            log.warning("a replica was lost during a request: %s", type(exc).__name__)
            raise ApiError(503, "unavailable", "a model replica was lost during this request; retry it") from exc

    async def predict(self, image: np.ndarray) -> dict:
        replies = await self._call(asyncio.gather(*(h.predict.remote(image) for h in self.models.values())))
        probs = {name: r["probs"][None] for name, r in zip(self.models, replies)}
        return self.core.answers(probs, {name: r["version"] for name, r in zip(self.models, replies)})[0]

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        return await self._call(self.gradcam.explain.remote(image, model, method))

    async def describe(self) -> dict:
        replies = await self._call(asyncio.gather(*(h.describe.remote() for h in self.models.values())))
        return self.core.describe(replies)

    async def not_ready(self) -> list[str]:
        """The deployments with no replica that answers yet (loading, or lost and restarting)."""
        async def answers(handle: DeploymentHandle) -> bool:
            try:
                return await asyncio.wait_for(self._ready(handle), self.READY_TIMEOUT_S)
            except (asyncio.TimeoutError, *self.UNAVAILABLE):
                return False

        parts = {**{f"model {name}": h for name, h in self.models.items()}, "Grad-CAM": self.gradcam}
        replies = await asyncio.gather(*(answers(h) for h in parts.values()))
        return [part for part, ok in zip(parts, replies) if not ok]

    @staticmethod
    async def _ready(handle: DeploymentHandle) -> bool:
        return await handle.ready.remote()


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
    """The HTTP ingress: the FastAPI app of ``pipelines.api.build_api`` on the model and Grad-CAM handles."""

    def __init__(self, models: dict[str, DeploymentHandle], gradcam_handle: DeploymentHandle, core: Inference,
                 settings: ApiSettings):
        self.backend = ServeBackend(models, gradcam_handle, core)
        self.settings = settings
        self.admission = Admission(settings.max_pending_requests)
        threading.Thread(target=watch_drain_signal, args=(self.admission, uuid.uuid4().hex), daemon=True).start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.backend, self.settings, RayMetrics().observe, self.admission)


@ray.remote(num_cpus=0)
class DrainSignal:
    """Raised by ``lesion serve --stop``: while it exists every ingress replica refuses new requests and reports how
    many it is still answering."""

    def __init__(self):
        self.in_flight: dict[str, int] = {}

    def report(self, replica: str, in_flight: int) -> None:
        self.in_flight[replica] = in_flight

    def reports(self) -> dict[str, int]:
        return dict(self.in_flight)


def watch_drain_signal(admission: Admission, replica: str) -> None:
    """An ingress replica's watcher (a thread): once the drain signal exists, refuse new requests and report the
    in-flight count to it until the replica stops."""
    while True:
        try:
            signal = ray.get_actor(DRAIN_SIGNAL, namespace=DRAIN_NAMESPACE)
        except ValueError:  # no drain signal: the usual case, or a stop that gave up
            admission.draining = False
        else:
            # reports from the second look on, so a request admitted while the first look raised the flag is counted
            if admission.draining:
                try:
                    ray.get(signal.report.remote(replica, admission.in_flight), timeout=10)
                except (RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # the signal went away: the next look says whether to keep draining
            admission.draining = True
        time.sleep(DRAIN_POLL_S)


def fit_to_cluster(config: Config, models: int) -> Config:
    """``config`` with each replica's CPU share fitted to the cluster (one line says so when it shrinks), after
    checking that the application can start at all: a request no node can hold fails here, before any replica."""
    cluster = capacity.Cluster.of_ray(autoscaling=config.workflow.autoscaling)
    share, note = capacity.serve_replica_cpus(config, models, cluster)
    if note:
        print(note, flush=True)
    capacity.check("lesion serve", capacity.serve_needs(config, models, share), cluster)
    return apply_overrides(config, {"serve.cpus_per_replica": share})


def build_app(config: Config, run: ModelSource | RunDir):
    """The Serve application for the trained models of ``run`` (a ``ModelSource`` or run directory), with replicas,
    batching and GPUs from ``config.serve`` (fitted to the cluster)."""
    source = ModelSource.of(run)
    core = serving_core(source, config)
    refetch = functools.partial(serving_core, source, config) if source.registered else None
    config = fit_to_cluster(config, len(core.names))
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
            max_ongoing_requests=REPLICA_MAX_ONGOING_REQUESTS,
            ray_actor_options=with_gpu,
        ).bind(core, name, s.max_batch_size, s.batch_wait_timeout_s, s.threads_per_replica, refetch)
        for name in core.names
    }
    gradcam_app = GradCamDeployment.options(
        # one explanation runs at a time per replica (the explainer's lock; the others wait in the replica, as at the
        # models): scale out as soon as one waits
        autoscaling_config={**autoscaling, "target_ongoing_requests": 1},
        max_ongoing_requests=REPLICA_MAX_ONGOING_REQUESTS,
        ray_actor_options=with_gpu,
    ).bind(core, s.threads_per_replica, refetch)
    # the ingress refuses what it cannot answer itself (Admission: JSON 503), so Serve's proxy passes it more than
    # its bound. Serve's own queue bound is only a guard far above it: Serve counts requests still being assigned to
    # a replica as queued and refuses a burst of simultaneous ones early (router.py says so), as plain text
    bound = s.max_pending_requests or 0
    ingress_room = max(2 * bound, REPLICA_MAX_ONGOING_REQUESTS)
    return LesionApi.options(
        autoscaling_config=autoscaling, max_ongoing_requests=ingress_room,
        max_queued_requests=ingress_room, backpressure_config=BackpressureConfig(retry_after_s=1),
        graceful_shutdown_timeout_s=DRAIN_GRACE_S, ray_actor_options=cpu_only,
    ).bind(model_handles, gradcam_app, core, ApiSettings.of(core, s, source.registered))


def app_builder(args: dict[str, Any]):
    """Application builder for Serve config files (``import_path: pipelines.serve:app_builder``).

    ``args``: ``run`` (run directory) or ``model_uri`` (a run directory, export bundle or ``models:/NAME@ALIAS``:
    one is required), ``config`` (YAML; default RUN/config.yaml, for a bundle or registered model the defaults),
    ``models`` (list or comma-separated names), ``gpus_per_replica``. Replicas, autoscaling and actor options in the
    config file's ``deployments`` section override the ones derived here.
    """
    known = {"run", "model_uri", "config", "models", "gpus_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown or ("run" in args) == ("model_uri" in args):
        raise ValueError(f"app_builder args: 'run' is required (or 'model_uri' instead); unknown {unknown}; known "
                         f"{sorted(known)}")
    models = args.get("models")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    flags = argparse.Namespace(run=args.get("run"), model_uri=args.get("model_uri"), config=args.get("config"))
    config = models_config(flags, {"serve.models": models, "serve.gpus_per_replica": args.get("gpus_per_replica")})
    return build_app(config, ModelSource.of(model_uri_of(flags)))


def deploy(config: Config, run: ModelSource | RunDir) -> str:
    """Start Serve (HTTP on ``config.serve.host:port``) and run the application; returns the base URL."""
    warning = exposure_warning(config.serve)
    if warning:
        log.warning(warning)
    app = build_app(config, run)  # checks capacity before Serve starts anything
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, logging_config=QUIET_LOGS)
    with capacity.waiting_notice("lesion serve"):
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=QUIET_LOGS)
    return f"http://{config.serve.host}:{config.serve.port}"


# --- command line --------------------------------------------------------------------------------------------------


def add_arguments(name: str, parser) -> None:
    parser.add_argument("--run", help="run directory with trained models (or --model-uri; one is required unless "
                        "--stop)")
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
    parser.add_argument("--stop", action="store_true", help="stop the served application on the running cluster: "
                        "new requests get 503 while the in-flight ones finish (within --grace), then it stops")
    parser.add_argument("--grace", type=float, default=DRAIN_GRACE_S, metavar="SECONDS",
                        help=f"how long in-flight requests may take to finish when stopping "
                        f"(default {DRAIN_GRACE_S:g})")
    add_model_source_arguments(parser)


def drain(grace_s: float) -> dict[str, int]:
    """Stop taking requests and let the in-flight ones finish: raise the drain signal and wait until every ingress
    replica reports none in flight, or ``grace_s`` passes. Returns the last reports (replica -> in flight)."""
    signal = DrainSignal.options(name=DRAIN_SIGNAL, namespace=DRAIN_NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote()
    deadline = time.monotonic() + grace_s
    reports: dict[str, int] = {}
    while time.monotonic() < deadline:
        reports = ray.get(signal.reports.remote(), timeout=10)
        ingress = serve.status().applications[APP_NAME].deployments["LesionApi"]
        if len(reports) >= ingress.replica_states.get("RUNNING", 0) and not any(reports.values()):
            break
        time.sleep(DRAIN_POLL_S)
    return reports


def drain_and_delete(grace_s: float) -> dict[str, int]:
    """``drain``, then delete the application (its replicas, Serve's route); the drain signal goes with it."""
    try:
        reports = drain(grace_s)
        serve.delete(APP_NAME)
    finally:
        try:
            ray.kill(ray.get_actor(DRAIN_SIGNAL, namespace=DRAIN_NAMESPACE))
        except ValueError:
            pass
    return reports


def stop(address: str | None, grace_s: float = DRAIN_GRACE_S) -> int:
    """Drain and delete the application (and Serve when nothing else runs) on the cluster at ``address`` (default:
    auto): new requests get 503 while the in-flight ones finish, for at most ``grace_s`` seconds."""
    try:
        init_ray(address or "auto")
    except ConnectionError as exc:
        print(f"no running Ray cluster to stop '{APP_NAME}' on: {exc}")
        return 1
    if APP_NAME not in serve.status().applications:
        print(f"no '{APP_NAME}' application is running")
        return 0
    reports = drain_and_delete(grace_s)
    left = sum(reports.values())
    if not serve.status().applications:
        serve.shutdown()
    ray.shutdown()
    print(f"stopped '{APP_NAME}'" + (f" ({left} requests still in flight after {grace_s:g} s were cut off)"
                                    if left else " (every in-flight request finished)"))
    return 0


def run_command(name: str, args) -> int:
    if args.stop:
        return stop(args.address, args.grace)
    detached = not args.blocking
    if detached and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--detach needs a running Ray cluster (`ray start --head` or `lesion cluster up`): "
                         "pass --address or set RAY_ADDRESS")
    run = ModelSource.of(model_uri_of(args))
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    overrides = {
        "serve.models": models,
        "serve.gpus_per_replica": args.gpus_per_replica,
        "serve.host": args.host,
        "serve.port": args.port,
    }
    config = models_config(args, overrides)
    init_ray(args.address)
    serve_until_interrupted(config, run, detach=detached, grace_s=args.grace)
    return 0


def serve_until_interrupted(config: Config, run: ModelSource | RunDir, *, detach: bool,
                            grace_s: float = DRAIN_GRACE_S) -> None:
    """Deploy the models of ``run`` (a ``ModelSource`` or run directory) and say where; unless ``detach``, serve until Ctrl-C, then drain (in-flight requests
    get ``grace_s`` seconds) and stop serving."""
    url = deploy(config, run)
    registered = ModelSource.of(run).registered
    if registered:
        print(f"serving registered model {registered['name']} version {registered['version']}", flush=True)
    print(f"serving {APP_NAME} at {url}/  (API docs {url}/docs, OpenAPI {url}/openapi.json)", flush=True)
    if detach:
        print("detached: `lesion serve --stop` stops it")
        return
    print("Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"stopping: in-flight requests get up to {grace_s:g} s", flush=True)
        drain_and_delete(grace_s)
        serve.shutdown()
