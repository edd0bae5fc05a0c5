"""MLflow tracking against a real ``mlflow server`` (its own environment, SQLite backend, an S3 artifact store on
moto): stage runs under a parent, what each stage logs, the manifest's ids, a server that is down or dies, the
token, and the one-line error without the extra."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'lesion[mlflow]')")

from lesion.config import config_from_dict  # noqa: E402
from lesion.rundir import RunDir  # noqa: E402
from pipelines import tracking  # noqa: E402
from tests.mlflow_server import MlflowServer, free_port, tags  # noqa: E402

BUCKET = "lesion-mlflow"


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """An S3 endpoint (moto) with the artifact bucket; the AWS variables the client and server read."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    yield env, s3
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, moto_s3):
    """``mlflow server`` on loopback with a SQLite backend; artifacts in the moto bucket."""
    env, _ = moto_s3
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # a loaded CI machine answers slowly; a dead server at once
    started = MlflowServer(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{BUCKET}/mlflow", env=env)
    yield started
    started.stop()
    mp.undo()


def fake_run(root: Path) -> RunDir:
    """A run directory with the artefacts stages write: ingested data, one trained model, tuning trials."""
    run = RunDir(root)
    run.data.mkdir(parents=True)
    info = {"task": "multiclass", "source": "synthetic", "image_size": 32, "fingerprint": "f00d", "num_images": 20,
            "rejected": 1, "counts": {"train": {"mel": 6, "nv": 8}, "val": {"mel": 3, "nv": 3}}}
    (run.data / "info.json").write_text(json.dumps(info))
    run.record("data", config={"source": "synthetic"}, fingerprint="f00d")
    model = run.model_dir("custom_cnn")
    model.mkdir(parents=True)
    history = [{"epoch": e, "val_loss": 1.0 - 0.1 * e, "train_loss": 1.2 - 0.1 * e, "phase": "all"} for e in range(3)]
    (model / "history.json").write_text(json.dumps(history))
    (model / "config.yaml").write_text("arch: custom_cnn\nepochs: 3\nlr: 0.002\nmodels: {}\n")
    run.record("models/custom_cnn", config={}, fingerprint="beef", best_epoch=2, metrics={"val_loss": 0.8})
    run.tune.mkdir()
    (run.tune / "trials.csv").write_text("# best: trial b\ntrial_id,status,epochs,lr,best_val_loss,error\n"
                                         "a,completed,2,0.001,0.9,\nb,completed,2,0.01,0.7,\n")
    return run


def by_name(runs: list[dict]) -> dict[str, dict]:
    return {run["info"]["run_name"]: run for run in runs}


def test_plain_path_is_a_sqlite_file_and_the_environment_turns_tracking_on(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, None) is None
    assert tracking.resolve_uri(str(tmp_path / "t.db"), None) == f"sqlite:///{tmp_path / 't.db'}"
    assert tracking.resolve_uri("http://a:5000", "http://b:5000") == "http://a:5000"  # the flag beats the config
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    with caplog.at_level(logging.INFO, logger="pipelines.tracking"):
        assert tracking.resolve_uri(None, None) == "http://env:5000"
    assert [r.message for r in caplog.records] == ["MLflow tracking on: MLFLOW_TRACKING_URI=http://env:5000"]


def test_a_tracking_uri_without_the_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--tracking-uri", "http://x:1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "lesion evaluate: error: --tracking-uri http://x:1: MLflow tracking needs the mlflow extra: "
        "pip install 'lesion[mlflow]'"]


def test_a_server_that_is_down_gives_one_warning_and_the_stage_completes(tmp_path, caplog):
    run = fake_run(tmp_path / "run")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        session = tracking.open_session(run, f"http://127.0.0.1:{free_port()}", "lesion", workflow={})
        done = []
        for name, kind in (("ingest", "ingest"), ("train custom_cnn", "train")):
            with session.stage(name, kind):
                done.append(name)
    assert done == ["ingest", "train custom_cnn"]
    assert time.perf_counter() - started < 10
    assert len(caplog.records) == 1 and "MLflow tracking off" in caplog.records[0].message


def test_lesion_run_stages_are_child_runs_with_their_metrics_artifacts_and_links(tmp_path, server, moto_s3):
    run = fake_run(tmp_path / "run")
    session = tracking.open_session(run, server.url, "lesion", workflow=config_from_dict({}).to_dict())
    tracking._ACTIVE[str(run.root)] = session
    try:
        with tracking.stage_run(run, "ingest", "ingest"):
            pass
        with tracking.stage_run(run, "tune custom_cnn", "tune", cached=True):
            pass
        with tracking.stage_run(run, "train custom_cnn", "train"):
            pass
    finally:
        tracking._ACTIVE.pop(str(run.root))
    session.tracker.end(session.parent)
    runs = by_name(server.search())
    parent = runs[f"lesion run {run.root.name}"]
    for name in ("ingest", "tune custom_cnn", "train custom_cnn"):
        child = tags(runs[name])
        assert child["mlflow.parentRunId"] == parent["info"]["run_id"] and child["lesion.run_dir"] == run.uri
    assert tags(runs["tune custom_cnn"])["cached"] == "true"
    assert tags(runs["train custom_cnn"])["lesion.fingerprint"] == "beef"
    assert tags(parent)["lesion.version"] and parent["data"]["params"]  # the workflow config as params
    ingest = runs["ingest"]["data"]
    assert {m["key"]: m["value"] for m in ingest["metrics"]}["count.train.nv"] == 8
    assert tags(runs["ingest"])["lesion.data_fingerprint"] == "f00d"
    train_id = runs["train custom_cnn"]["info"]["run_id"]
    history = server.api("metrics/get-history", run_id=train_id, metric_key="val_loss")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]
    from mlflow import MlflowClient

    files = MlflowClient(server.url).list_artifacts(train_id, "models/custom_cnn")  # read from S3 by the client
    assert {"history.json", "config.yaml"} <= {Path(f.path).name for f in files}
    _, s3 = moto_s3
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(key.endswith("models/custom_cnn/history.json") for key in keys)  # the artifact store is S3
    recorded = run.manifest()[tracking.MANIFEST_ENTRY]
    assert recorded["parent_run_id"] == parent["info"]["run_id"]
    assert recorded["stages"]["train custom_cnn"] == train_id


def test_a_stage_command_nests_under_the_recorded_parent_and_resume_continues_its_run(tmp_path, server):
    run = fake_run(tmp_path / "run")
    first = tracking.open_session(run, server.url, "lesion", workflow={})
    with first.stage("train custom_cnn", "train"):
        pass
    later = tracking.open_session(run, server.url, "lesion", workflow=None)
    assert later.parent == first.parent
    with later.stage("tune custom_cnn", "tune"):
        pass
    with later.stage("train custom_cnn", "train", resume=True):
        pass
    runs = server.search()
    mine = [r for r in runs if tags(r).get("mlflow.parentRunId") == first.parent]
    assert sorted(r["info"]["run_name"] for r in mine) == ["train custom_cnn", "tune custom_cnn"]  # resumed, not new
    trials = [r for r in runs if r["info"]["run_name"].startswith("trial ")
              and tags(r)["mlflow.parentRunId"] == run.manifest()["tracking"]["stages"]["tune custom_cnn"]]
    assert sorted(r["info"]["run_name"] for r in trials) == ["trial a", "trial b"]
    assert {p["key"]: p["value"] for p in trials[0]["data"]["params"]}.keys() == {"lr"}


def test_epochs_are_logged_live_during_training_and_never_twice(tmp_path, server):
    run = fake_run(tmp_path / "run")
    session = tracking.open_session(run, server.url, "lesion", workflow={})
    assert tracking.live_run("custom_cnn") is None
    with session.stage("train custom_cnn", "train"):
        uri, run_id = tracking.live_run("custom_cnn")  # what loop_spec hands the training's rank 0
        live = tracking.EpochLogger(uri, run_id)
        live.log({"epoch": 0, "val_loss": 1.0, "epoch_seconds": 2.0, "phase": "all"})
        live.close()
        during = server.api("metrics/get-history", run_id=run_id, metric_key="val_loss")["metrics"]
        assert [(m["step"], m["value"]) for m in during] == [(0, 1.0)]  # in MLflow while the stage still runs
    assert tracking.live_run("custom_cnn") is None
    history = server.api("metrics/get-history", run_id=run_id, metric_key="val_loss")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2]  # the stage's end added only what live logging lacked


def test_live_logging_to_a_dead_server_warns_once_and_never_holds_the_training(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        started = time.perf_counter()
        live = tracking.EpochLogger(f"http://127.0.0.1:{free_port()}", "0" * 32)
        for epoch in range(3):
            live.log({"epoch": epoch, "val_loss": 1.0})
        queued = time.perf_counter() - started
        live.close()
    assert queued < 0.1 and time.perf_counter() - started < tracking.EpochLogger.CLOSE_WAIT_S
    assert len(caplog.records) == 1 and "live logging off" in caplog.records[0].message


class _TokenProxy(BaseHTTPRequestHandler):
    """Forwards to the MLflow server only requests that carry ``Authorization: Bearer <token>``."""

    target, token, seen = "", "", []

    def _forward(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = requests.request(self.command, self.target + self.path, data=body, timeout=30,
                                  headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_the_tracking_token_is_sent(tmp_path, server, monkeypatch):
    _TokenProxy.target, _TokenProxy.token, _TokenProxy.seen = server.url, "s3cret", []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _TokenProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
        session = tracking.open_session(fake_run(tmp_path / "a"), uri, "tokens", workflow={})
        assert session.tracker.ok and session.parent
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
        refused = tracking.open_session(fake_run(tmp_path / "b"), uri, "tokens", workflow={})
        assert not refused.tracker.ok and refused.parent is None
    finally:
        proxy.shutdown()
    assert "Bearer s3cret" in _TokenProxy.seen and None in _TokenProxy.seen
