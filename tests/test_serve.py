"""The served application end to end: Ray Serve on the session's local Ray, the tiny trained run, real JPEGs."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from lesion.config import dump_yaml
from lesion.labels import DX_CLASSES, MALIGNANT_DX
from conftest import tiny_config

# Each test's timeout covers the module's app start (a minute or two on a loaded 2-core machine) when it runs first.
pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
MAX_BODY = 1_000_000  # the real 600x450 JPEGs are 190-420 kB (560 kB as base64)
MAX_PIXELS = 2_000_000  # 600x450 = 270,000 pixels pass; the bomb test sends 2000x1500
ALLOWED_ORIGIN = "http://clinic.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(run_root: Path, tmp: Path, config: dict | None = None, **serve_fields) -> str:
    """Copy ``run_root``, write ``config`` (default: the tiny config) with ``serve_fields``, start Serve on a free
    loopback port through the ``serve deploy`` path (``app_builder``); returns the base URL."""
    from ray import serve

    from pipelines.serve import APP_NAME, QUIET_LOGS, app_builder

    run = tmp / "run"
    shutil.copytree(run_root, run)
    config = config or tiny_config().to_dict()
    config["serve"].update({"cpus_per_replica": 0.25, "max_replicas": 1, **serve_fields})
    dump_yaml(config, tmp / "serve.yaml")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET_LOGS)
    serve.run(app_builder({"run": str(run), "config": str(tmp / "serve.yaml")}), name=APP_NAME, route_prefix="/",
              logging_config=QUIET_LOGS)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def app(trained_run, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    # a long batch wait keeps requests inside the model replicas, so the fault test kills one with requests in it
    url = start_app(trained_run.root, tmp, api_key=API_KEY, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS,
                    cors_origins=[ALLOWED_ORIGIN], batch_wait_timeout_s=0.25)
    yield {"url": url, "run": tmp / "run"}
    serve.shutdown()


@pytest.fixture(scope="module")
def images(ham10000_fullres) -> dict[str, Path]:
    """One real 600x450 JPEG per diagnosis."""
    import pandas as pd

    meta = pd.read_csv(ham10000_fullres / "metadata.csv").drop_duplicates("dx")
    return {row.dx: ham10000_fullres / "images" / f"{row.image_id}.jpg" for row in meta.itertuples()}


KEY = {"X-API-Key": API_KEY}


def post(app, path: str, data: bytes, name: str = "x.jpg", mime: str = "image/jpeg", fields=None, **kwargs):
    return requests.post(app["url"] + path, files={"file": (name, data, mime)}, data=fields or {},
                         headers=kwargs.pop("headers", KEY), timeout=kwargs.pop("timeout", 120), **kwargs)


def assert_prediction(body: dict, run: Path) -> None:
    probs = body["probabilities"]
    assert list(probs) == list(DX_CLASSES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert body["predicted_class"] == max(probs, key=probs.get)
    assert body["malignant_probability"] == pytest.approx(sum(probs[c] for c in MALIGNANT_DX))
    assert body["decision"] in ("malignant", "benign", "uncertain")
    if body["decision"] != "uncertain":
        assert body["decision"] == body["threshold_decision"]
    assert body["decision_reason"]
    assert 0 < body["malignant_threshold"] <= 1
    assert set(body["models"]) == {"custom_cnn", "scratch_cnn"}
    for model_probs in body["models"].values():
        assert sum(model_probs.values()) == pytest.approx(1.0, abs=1e-5)
    for name, version in body["model_versions"].items():
        checkpoint = run / "models" / name / "best.pt"
        assert version["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert version["run_id"] == json.loads((checkpoint.parent / "model.json").read_text())["run_id"]
    assert body["image_size"] == [32, 32]  # the run's ingest size
    assert body["latency_ms"] > 0


def test_predict_real_images(app, images):
    for dx, path in images.items():
        response = post(app, "/v1/predict", path.read_bytes(), path.name)
        assert response.status_code == 200, (dx, response.text)
        assert_prediction(response.json(), app["run"])


def test_json_raw_and_multipart_give_the_same_answer(app, images):
    data = images["mel"].read_bytes()
    multipart = post(app, "/v1/predict", data).json()
    as_json = requests.post(app["url"] + "/v1/predict", json={"image_base64": base64.b64encode(data).decode()},
                            headers=KEY, timeout=60).json()
    raw = requests.post(app["url"] + "/v1/predict", data=data, headers={**KEY, "Content-Type": "image/jpeg"},
                        timeout=60).json()
    for other in (as_json, raw):
        assert other["probabilities"] == pytest.approx(multipart["probabilities"], abs=1e-6)


def test_concurrent_requests_are_batched_without_changing_answers(app, images):
    data = {dx: path.read_bytes() for dx, path in images.items()}
    alone = {dx: post(app, "/v1/predict", blob).json()["models"] for dx, blob in data.items()}
    with concurrent.futures.ThreadPoolExecutor(len(data)) as pool:
        together = dict(zip(data, pool.map(lambda blob: post(app, "/v1/predict", blob), data.values())))
    for dx, response in together.items():
        assert response.status_code == 200, response.text
        for name, probs in response.json()["models"].items():
            assert probs == pytest.approx(alone[dx][name], abs=1e-5)


@pytest.mark.parametrize("model,method", [("ensemble", "gradcam"), ("custom_cnn", "gradcam++"),
                                          ("scratch_cnn", "eigencam")])
def test_explain_overlay_is_a_png_of_the_preprocessed_size(app, images, model, method):
    response = post(app, "/v1/explain", images["bcc"].read_bytes(), fields={"model": model, "method": method})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_prediction(body, app["run"])
    assert (body["explained_model"], body["method"]) == (model, method)
    # The overlay explains the explained model's own prediction (the ensemble's: the calibrated combination).
    own = body["probabilities"] if model == "ensemble" else body["models"][model]
    assert body["explained_class"] == max(own, key=own.get)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert list(overlay.size) == body["overlay_size"] == body["image_size"]
    assert "exif" not in overlay.info
    assert np.asarray(overlay).std() > 0


def truncated_jpeg(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1500)).save(buffer, format="PNG")  # 3,000,000 pixels in a few kB
    return buffer.getvalue()


def test_bad_inputs_get_4xx_naming_the_problem_and_the_server_keeps_serving(app, images):
    url = app["url"]
    jpeg = images["nv"].read_bytes()
    cases = {
        "not an image": (post(app, "/v1/predict", b"this is a text file, not a picture " * 20, "notes.jpg"),
                         400, "not a decodable image"),
        "truncated JPEG": (post(app, "/v1/predict", truncated_jpeg(images["nv"])), 400, "truncated"),
        "zero bytes": (post(app, "/v1/predict", b""), 400, "empty"),
        "decompression bomb": (post(app, "/v1/predict", huge_png(), "big.png", "image/png"), 400, "exceeds the limit"),
        "body too large": (post(app, "/v1/predict", jpeg * 4), 413, "limit"),
        "body too large, chunked": (
            requests.post(url + "/v1/predict", data=iter([jpeg] * 4), timeout=60,
                          headers={**KEY, "Content-Type": "image/jpeg"}), 413, "limit"),
        "unknown model": (post(app, "/v1/explain", jpeg, fields={"model": "resnet9000"}), 404, "resnet9000"),
        "unknown method": (post(app, "/v1/explain", jpeg, fields={"method": "magic"}), 400, "magic"),
        "wrong content type": (
            requests.post(url + "/v1/predict", data=b"hello", headers={**KEY, "Content-Type": "text/plain"},
                          timeout=60), 415, "text/plain"),
        "multipart without file": (
            requests.post(url + "/v1/predict", files={"image": ("x.jpg", jpeg, "image/jpeg")}, headers=KEY,
                          timeout=60), 400, "'file'"),
        "JSON without image": (requests.post(url + "/v1/predict", json={"img": "x"}, headers=KEY, timeout=60),
                               400, "image_base64"),
        "bad base64": (requests.post(url + "/v1/predict", json={"image_base64": "@@not base64@@"}, headers=KEY,
                                     timeout=60), 400, "base64"),
    }
    for case, (response, status, words) in cases.items():
        assert response.status_code == status, (case, response.status_code, response.text)
        assert words in response.json()["detail"], (case, response.json())
    assert post(app, "/v1/predict", jpeg).status_code == 200


def test_api_key_is_required_where_configured(app, images):
    jpeg = images["df"].read_bytes()
    assert post(app, "/v1/predict", jpeg, headers={}).status_code == 401
    assert post(app, "/v1/explain", jpeg, headers={"X-API-Key": "wrong"}).status_code == 401
    assert requests.get(app["url"] + "/v1/models", timeout=30).status_code == 401
    for open_path in ("/healthz", "/readyz", "/", "/openapi.json", "/docs"):
        assert requests.get(app["url"] + open_path, timeout=30).status_code == 200, open_path


def test_models_health_docs_and_page(app):
    models = requests.get(app["url"] + "/v1/models", headers=KEY, timeout=30).json()
    assert [m["name"] for m in models["models"]] == ["custom_cnn", "scratch_cnn"]
    assert all(len(m["checkpoint_sha256"]) == 64 and m["run_id"] for m in models["models"])
    assert sum(m["ensemble_weight"] for m in models["models"]) == pytest.approx(1.0)
    assert models["explain_targets"] == ["ensemble", "custom_cnn", "scratch_cnn"]
    assert "gradcam" in models["methods"] and models["classes"] == list(DX_CLASSES)
    assert requests.get(app["url"] + "/healthz", timeout=30).json()["status"] == "ok"
    spec = requests.get(app["url"] + "/openapi.json", timeout=30).json()
    assert {"/v1/predict", "/v1/explain", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "Explanation" in spec["components"]["schemas"]
    docs = requests.get(app["url"] + "/docs", timeout=30).text
    assert "static/swagger-ui-bundle.js" in docs and "cdn" not in docs  # served locally: works offline
    bundle = requests.get(app["url"] + "/static/swagger-ui-bundle.js", timeout=30)
    assert bundle.status_code == 200 and len(bundle.content) > 1_000_000
    page = requests.get(app["url"] + "/", timeout=30).text
    assert 'id="file"' in page and "http" not in page.split("<footer")[0]  # no external assets


def test_cors_allows_only_the_configured_origin(app):
    def preflight(origin):
        return requests.options(app["url"] + "/v1/predict", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"})

    assert preflight(ALLOWED_ORIGIN).headers.get("access-control-allow-origin") == ALLOWED_ORIGIN
    assert "access-control-allow-origin" not in preflight("http://elsewhere.example").headers


def test_predict_cli_client_reads_the_api(app, images):
    from pipelines.predict import format_table, predict_url

    rows = predict_url(app["url"], [str(images["vasc"])], api_key=API_KEY)
    assert rows[0]["decision"] in ("malignant", "benign", "uncertain")
    assert images["vasc"].name in format_table(rows)


def test_cluster_serve_config_is_a_valid_deploy_schema_naming_the_deployments(app):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    values = yaml.safe_load((REPO / "cluster" / "serve" / "lesion.yaml").read_text())
    schema = ServeDeploySchema.model_validate(values)
    (application,) = schema.applications
    assert application.import_path == "pipelines.serve:app_builder"
    assert application.args["run"]
    assert values["http_options"]["host"] == "127.0.0.1"
    configured = {d.name for d in application.deployments}
    for d in application.deployments:
        auto = d.autoscaling_config
        assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    served = {f"model_{m}" for m in application.args["models"]} | {"LesionApi", "GradCamDeployment"}
    assert configured == served
    # the running application (built by the same app_builder) uses the same deployment naming
    running = set(serve.status().applications["lesion"].deployments)
    assert running == {"model_custom_cnn", "model_scratch_cnn", "LesionApi", "GradCamDeployment"}


def _replica_pids(deployment: str) -> list[int]:
    """PIDs of the live replicas of a deployment, from the GCS actor table (``ray.util.state.list_actors`` needs
    the dashboard, which the session's Ray runs without)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in actors if a["ActorClassName"] == f"ServeReplica:lesion:{deployment}"]


def _healthy(deployment: str) -> bool:
    from ray import serve

    status = serve.status().applications["lesion"].deployments[deployment]
    return status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) >= 1


def test_killed_model_replica_loses_no_retried_request_and_comes_back(app, images):
    (victim,) = _replica_pids("model_custom_cnn")
    blobs = [path.read_bytes() for path in images.values()]

    def client(index: int) -> list[tuple[int, int]]:
        """(first status, final status) per request, a 503 retried after its Retry-After for up to 120 s (the
        replacement replica's start; each try ends within serve.answer_timeout_s); 0 = connection error."""
        codes = []
        for k in range(6):
            data = blobs[(index + k) % len(blobs)]
            try:
                response = post(app, "/v1/predict", data, timeout=120)
                first = response.status_code
            except requests.ConnectionError:
                first, response = 0, None
            final, deadline = first, time.time() + 120
            while final == 503 and time.time() < deadline:
                time.sleep(float(response.headers.get("Retry-After", 1)))
                response = post(app, "/v1/predict", data, timeout=120)
                final = response.status_code
            codes.append((first, final))
        return codes

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        codes = [code for future in futures for code in future.result()]
    print(f"first attempts: {sorted(first for first, _ in codes)}")
    assert {first for first, _ in codes} <= {200, 503}  # a lost replica costs a 503 with Retry-After, never more
    assert [final for _, final in codes] == [200] * 24
    deadline = time.time() + 120
    while time.time() < deadline:
        replacements = [pid for pid in _replica_pids("model_custom_cnn") if pid != victim]
        if replacements and _healthy("model_custom_cnn"):
            break
        time.sleep(1)
    else:
        pytest.fail("the killed model replica did not come back within 120 s")
    assert post(app, "/v1/predict", blobs[0]).status_code == 200


def test_lost_replica_becomes_503_with_retry_after():
    from ray.exceptions import ActorDiedError

    from pipelines.serve import ApiError, ServeBackend

    async def dies():
        raise ActorDiedError()

    async def answers():
        return {"probs": np.full(7, 1 / 7), "version": "v"}

    def handle(reply):  # a model deployment's handle: handle.predict.remote(image) is awaitable
        return SimpleNamespace(predict=SimpleNamespace(remote=lambda image: reply()))

    backend = ServeBackend({"alive": handle(answers), "lost": handle(dies)}, None, None)
    with pytest.raises(ApiError) as caught:  # one member's replica lost during the request is enough
        asyncio.run(backend.predict(np.zeros((8, 8, 3), np.uint8)))
    assert caught.value.status == 503 and "retry" in caught.value.message


def test_cli_and_builder_refuse_bad_arguments(monkeypatch):
    from pipelines.cli import build_parser
    from pipelines.serve import app_builder, run_command

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = build_parser("serve").parse_args(["serve", "--run", "somewhere", "--detach"])
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        run_command("serve", args)
    with pytest.raises(ValueError, match="'run' is required"):
        app_builder({"models": "custom_cnn"})
    with pytest.raises(ValueError, match="unknown"):
        app_builder({"run": "x", "replicas": 3})
