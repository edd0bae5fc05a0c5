"""Load and lifecycle of the served API: readiness, a bounded number of requests at once (503 + Retry-After past it,
at once), and draining before a stop. The HTTP layer alone (no Ray) first, then the Ray Serve application with
`lesion serve --stop` (slow)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image
from stand_ins import CLASSES, fixed_prediction

from lesion.config import DataConfig
from pipelines.api import Admission, ApiSettings, build_api

REPO = Path(__file__).resolve().parents[1]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (150, 90, 70)).save(buffer, format="PNG")
    return buffer.getvalue()


class HeldBackend:
    """Answers a prediction only once ``release`` is set; reports the parts in ``missing`` as not loaded."""

    def __init__(self):
        self.release = threading.Event()
        self.missing = ["model m", "Grad-CAM"]

    async def predict(self, image: np.ndarray) -> dict:
        assert await asyncio.to_thread(self.release.wait, 30)
        return fixed_prediction("held")

    async def explain(self, image: np.ndarray, model: str, method: str) -> dict:
        raise AssertionError("not asked")

    async def describe(self) -> dict:
        return {"models": []}

    async def not_ready(self) -> list[str]:
        return list(self.missing)


@pytest.fixture
def held():
    """(backend, admission, client factory): the API on a ``HeldBackend``; the factory takes the bound."""
    backend = HeldBackend()
    made = []

    def client(limit: int | None, timeout_s: float | None = None) -> tuple[Admission, TestClient]:
        settings = ApiSettings(data_config=DataConfig(image_size=32), models=["m"], task="multiclass",
                               max_body_bytes=100_000, api_key=None, cors_origins=[], methods=["gradcam"],
                               max_pending_requests=limit, answer_timeout_s=timeout_s)
        admission = Admission(limit)
        made.append(TestClient(build_api(backend, settings, admission=admission)).__enter__())
        return admission, made[-1]

    yield backend, client
    backend.release.set()
    for test_client in made:
        test_client.__exit__(None, None, None)


def until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def predict(client: TestClient):
    return client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})


def test_readyz_is_503_naming_what_is_not_loaded_until_everything_is_while_healthz_is_200(held):
    backend, make = held
    _, client = make(None)
    starting, live = client.get("/readyz"), client.get("/healthz")
    backend.missing = []
    ready = client.get("/readyz")
    assert starting.status_code == 503 and starting.headers["retry-after"]
    assert starting.json()["error"] == "not_ready" and "model m, Grad-CAM" in starting.json()["detail"]
    assert live.status_code == 200
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_past_the_bound_requests_get_503_with_retry_after_at_once_and_admitted_ones_are_answered(held):
    backend, make = held
    admission, client = make(2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        admitted = [pool.submit(predict, client) for _ in range(2)]
        until(lambda: admission.in_flight == 2)
        started = time.perf_counter()
        refused = [predict(client) for _ in range(4)]
        refused_in = time.perf_counter() - started
        backend.release.set()
        answered = [future.result(timeout=30) for future in admitted]
    assert [r.status_code for r in answered] == [200, 200]
    for reply in refused:
        assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"] == "overloaded" and "serve.max_pending_requests" in reply.json()["detail"]
    assert refused_in < 2.0  # refused at once, not queued behind the held ones
    assert admission.in_flight == 0


def test_an_admitted_request_unanswered_within_the_deadline_gets_503_and_frees_its_place(held):
    _, make = held
    admission, client = make(1, timeout_s=0.3)
    started = time.perf_counter()
    reply = predict(client)  # the backend never answers
    assert time.perf_counter() - started < 5
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert reply.json()["error"] == "timeout" and "serve.answer_timeout_s" in reply.json()["detail"]
    assert admission.in_flight == 0


def test_draining_refuses_new_requests_while_the_in_flight_one_finishes(held):
    backend, make = held
    admission, client = make(None)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(predict, client)
        until(lambda: admission.in_flight == 1)
        admission.draining = True
        new, readiness = predict(client), client.get("/readyz")
        backend.release.set()
        finished = in_flight.result(timeout=30)
    assert finished.status_code == 200 and finished.json()["predicted_class"] in CLASSES
    assert new.status_code == 503 and new.json()["error"] == "draining" and new.headers["retry-after"]
    assert readiness.status_code == 503 and readiness.json()["error"] == "draining"


# --- the Ray Serve application (slow) ---------------------------------------------------------------------------

BOUND = 2
HOLD_S = 2.0  # a lone request waits this long in the model replica for a batch: requests stay in flight


@pytest.fixture(scope="module")
def held_app(trained_run, tmp_path_factory, ray_local):
    """The application with at most BOUND requests at once, whose requests each stay in flight about HOLD_S."""
    from ray import serve

    from test_serve import start_app

    url = start_app(trained_run.root, tmp_path_factory.mktemp("lifecycle"), max_pending_requests=BOUND,
                    batch_wait_timeout_s=HOLD_S, answer_timeout_s=60)
    yield url
    serve.shutdown()


def jpeg(ham10000_fullres: Path) -> bytes:
    return next((ham10000_fullres / "images").glob("*.jpg")).read_bytes()


def post_timed(url: str, data: bytes) -> tuple[int, float, dict, str]:
    """(status or 0 for no answer, seconds, headers, error code)."""
    started = time.perf_counter()
    try:
        reply = requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=60)
    except requests.RequestException:
        return 0, time.perf_counter() - started, {}, ""
    code = reply.json().get("error", "") if reply.status_code != 200 else ""
    return reply.status_code, time.perf_counter() - started, dict(reply.headers), code


def replica_pid(deployment: str) -> int:
    from ray._private import state

    (pid,) = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
              if a["ActorClassName"] == f"ServeReplica:lesion:{deployment}"]
    return pid


@pytest.mark.slow
@pytest.mark.timeout(900)  # includes the session's trained run and the module's app start on a loaded machine
def test_served_readyz_names_a_lost_gradcam_replica_until_it_is_back(held_app):
    assert requests.get(held_app + "/readyz", timeout=30).status_code == 200
    os.kill(replica_pid("GradCamDeployment"), signal.SIGKILL)
    seen, deadline = [], time.time() + 120
    while time.time() < deadline:
        reply = requests.get(held_app + "/readyz", timeout=30)
        seen.append((reply.status_code, reply.json().get("detail", "")))
        assert requests.get(held_app + "/healthz", timeout=30).status_code == 200  # liveness is unaffected
        if reply.status_code == 200 and any(status == 503 for status, _ in seen):
            break
        time.sleep(0.5)
    not_ready = [detail for status, detail in seen if status == 503]
    assert not_ready and all("Grad-CAM" in d and "model" not in d for d in not_ready), seen[:5]
    assert seen[-1][0] == 200, seen[-5:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_served_overload_gets_503_with_retry_after_at_once_and_loses_nothing(held_app, ham10000_fullres):
    data = jpeg(ham10000_fullres)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post_timed(held_app, data), range(8)))
    statuses = sorted(status for status, *_ in replies)
    assert set(statuses) == {200, 503} and statuses.count(200) <= BOUND + 1, statuses  # nothing lost
    for status, seconds, headers, code in replies:
        if status == 503:
            assert code == "overloaded" and int(headers["retry-after"]) >= 1
            assert seconds < HOLD_S, seconds  # refused at once, not after waiting behind the admitted ones


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_stop_lets_in_flight_requests_finish_while_new_ones_get_503(held_app, ham10000_fullres):
    import ray

    data = jpeg(ham10000_fullres)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(post_timed, held_app, data) for _ in range(BOUND - 1)]  # room left: not overloaded
        time.sleep(0.5)  # admitted, waiting in the model replica
        stopping = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--stop", "--grace", "60"],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        refused = []
        deadline = time.time() + 60
        while "draining" not in [code for code, _ in refused] and time.time() < deadline and stopping.poll() is None:
            status, _, headers, code = post_timed(held_app, data)
            if status == 503:
                refused.append((code, headers.get("retry-after")))
            time.sleep(0.2)
        finished = [future.result() for future in in_flight]
        output, _ = stopping.communicate(timeout=120)
    assert stopping.returncode == 0, output
    assert [status for status, *_ in finished] == [200] * (BOUND - 1)  # in flight: answered, not cut off
    draining = [retry_after for code, retry_after in refused if code == "draining"]
    assert draining and draining[0], refused
    assert "stopped 'lesion' (every in-flight request finished)" in output, output
    with pytest.raises(requests.RequestException):  # the last application: Serve itself is gone with it
        requests.get(held_app + "/healthz", timeout=10)
