"""End to end on a real MLflow server: ``lesion run`` with tracking on (its run page rendered by the MLflow UI in
headless Chromium), then ``lesion register``, the registered model loaded by alias in a fresh process and served by
``lesion serve --model-uri models:/NAME@ALIAS``, and their answers against ``lesion predict`` on real HAM10000
images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import requests

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'lesion[mlflow]')")

from lesion.config import dump_yaml  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.mlflow_server import ROOT, MlflowServer, free_port, tags, wait_until_ok  # noqa: E402

HAM10000 = ROOT.parent / "shared" / "data" / "ham10000" / "images"
CHROMIUM = Path("/usr/bin/chromium")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "HF_HUB_OFFLINE": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}

LOAD_BY_ALIAS = """
import json, sys
import mlflow.pyfunc
model = mlflow.pyfunc.load_model("models:/{name}@champion")
answers = model.predict([open(path, "rb").read() for path in sys.argv[1:]])
print(json.dumps(answers["probabilities"].tolist()))
"""


def lesion(*args: str, env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on loopback, SQLite backend, a local artifact root (served through the server)."""
    started = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield started
    started.stop()


def rendered_page(url: str) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts (the MLflow UI is a single-page app)."""
    if not CHROMIUM.exists():
        pytest.skip(f"the MLflow UI check needs {CHROMIUM} (apt-get install chromium)")
    done = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def serving_registered(uri: str, tracking_uri: str, image: Path) -> tuple[dict, dict]:
    """``lesion serve --model-uri uri`` as a user runs it (Ctrl-C stops it): its /v1/models and the /v1/predict
    answer for ``image``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serving = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model-uri", uri, "--port",
                                str(port)], cwd=ROOT, env={**ENV, "MLFLOW_TRACKING_URI": tracking_uri},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_ok(f"{url}/readyz", 600, serving)
        assert serving.poll() is None, serving.stdout.read()[-3000:]
        models = requests.get(f"{url}/v1/models", timeout=60).json()
        answer = requests.post(f"{url}/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")},
                               timeout=120)
        assert answer.ok, answer.text
        return models, answer.json()
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            serving.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait(timeout=30)


def register_and_compare(run, uri: str, images: list[Path]) -> None:
    """Register ``run`` as ``lesion-test`` @champion at ``uri``, load it by alias, and compare its answers with
    ``lesion predict``'s; then move the alias to a second version."""
    import mlflow
    import mlflow.pyfunc

    from lesion.config import load_config
    from pipelines.predict import predict_files
    from pipelines.register import move_alias, register_run

    config = load_config(run.root / "config.yaml") if (run.root / "config.yaml").is_file() else load_config()
    first = register_run(run, config, uri, "lesion-test", "champion")
    assert first["model_uri"] == "models:/lesion-test@champion"
    mlflow.set_tracking_uri(uri)
    answers = mlflow.pyfunc.load_model(first["model_uri"]).predict(
        pd.DataFrame({"image": [path.read_bytes() for path in images]}))
    predicted = predict_files(run, [str(path) for path in images], config)
    for (_, mine), (_, theirs) in zip(answers.iterrows(), predicted.iterrows(), strict=True):
        assert mine["label"] == theirs["predicted_class"] and mine["decision"] == theirs["decision"]
        assert max(abs(p - theirs[f"ensemble:{c}"]) for c, p in mine["probabilities"].items()) < 1e-5
    second = register_run(run, config, uri, "lesion-test")
    move_alias(uri, "lesion-test", second["version"], "champion")
    version = mlflow.MlflowClient(uri).get_model_version_by_alias("lesion-test", "champion")
    assert str(version.version) == second["version"] == "2"
    assert version.tags["lesion.run_dir"] == run.uri and "lesion.data_licence" in version.tags


def test_registered_model_answers_as_lesion_predict_and_its_alias_moves(trained_run, tmp_path):
    images = sorted(HAM10000.glob("*.jpg"))[:2] if HAM10000.is_dir() else []
    if not images:
        pytest.skip(f"real HAM10000 images not found in {HAM10000}")
    register_and_compare(trained_run, f"sqlite:///{tmp_path / 'registry.db'}", images)


@pytest.mark.slow
def test_tracked_run_registered_and_loaded_by_alias_answers_as_lesion_predict(tmp_path, server):
    images = sorted(HAM10000.glob("*.jpg"))[:3] if HAM10000.is_dir() else []
    if not images:
        pytest.skip(f"real HAM10000 images not found in {HAM10000}")
    config = tiny_config().to_dict()
    config["tune"].update(trials=2, epochs=2, grace_period=1, cpus_per_trial=1.0)
    dump_yaml(config, tmp_path / "config.yaml")
    run = tmp_path / "run"
    lesion("run", "--config", str(tmp_path / "config.yaml"), "--run", str(run), "--tracking-uri", server.url)

    runs = server.search()
    parents = [r for r in runs if tags(r).get("lesion.stage") == "run"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    children = {r["info"]["run_name"]: r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"ingest", "tune custom_cnn", "train custom_cnn", "train scratch_cnn", "evaluate"}
    assert all(r["info"]["status"] == "FINISHED" for r in children.values())
    train = children["train scratch_cnn"]["info"]["run_id"]
    history = server.api("metrics/get-history", run_id=train, metric_key="val_loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(config["train"]["epochs"]))
    evaluated = server.api("artifacts/list", run_id=children["evaluate"]["info"]["run_id"], path="eval")
    assert {"report.html", "model_card.md", "metrics.json"} <= {Path(f["path"]).name for f in evaluated["files"]}
    trials = [r for r in runs if tags(r).get("mlflow.parentRunId") == children["tune custom_cnn"]["info"]["run_id"]]
    assert len(trials) == 2
    manifest = json.loads((run / "manifest.json").read_text())["artefacts"]["tracking"]
    assert manifest["parent_run_id"] == parent_id and manifest["stages"]["evaluate"] == children["evaluate"]["info"][
        "run_id"]
    page = rendered_page(f"{server.url}/#/experiments/{parents[0]['info']['experiment_id']}/runs/{parent_id}")
    assert parents[0]["info"]["run_name"] in page  # the MLflow UI shows the run

    done = lesion("register", "--run", str(run), "--name", "lesion-demo", "--alias", "champion",
                  "--tracking-uri", server.url)
    assert "registered lesion-demo version 1 as @champion" in done.stdout
    loaded = subprocess.run([sys.executable, "-c", LOAD_BY_ALIAS.format(name="lesion-demo"), *map(str, images)],
                            cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": server.url}, capture_output=True,
                            text=True, timeout=900)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    registered = json.loads(loaded.stdout.strip().splitlines()[-1])
    predicted = json.loads(lesion("predict", "--run", str(run), "--json", *map(str, images)).stdout)
    classes = list(registered[0])
    for mine, theirs in zip(registered, predicted, strict=True):
        assert max(abs(mine[c] - theirs[f"ensemble:{c}"]) for c in classes) < 1e-5

    models, served = serving_registered("models:/lesion-demo@champion", server.url, images[0])
    named = {"name": "lesion-demo", "version": "1", "alias": "champion"}
    assert named.items() <= models["registered_model"].items() and named.items() <= served["registered_model"].items()
    assert max(abs(served["probabilities"][c] - predicted[0][f"ensemble:{c}"]) for c in classes) < 1e-5
