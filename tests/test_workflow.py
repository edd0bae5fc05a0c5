"""``lesion run``: the whole workflow end to end on a tiny config, resumed by fingerprint, with the run directory in
an S3 stand-in (moto's server on loopback); plus the flag handling and the remote run directory's sync."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
import yaml

from lesion.config import config_from_dict
from lesion.rundir import RunDir
from pipelines.cli import main
from pipelines.common import parse_sets
from pipelines.workflow import record_workflow_config, workflow_config

TINY = {
    "data": {"source": "synthetic", "image_size": 32, "synthetic_count": 280, "seed": 0},
    "train": {
        "epochs": 2, "batch_size": 32, "lr": 2e-3, "workers": 2, "cpus_per_worker": 0.5,
        "models": {"custom_cnn": {"conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]}, "scratch_cnn": {}},
    },
    "tune": {
        "trials": 2, "epochs": 1, "grace_period": 1, "cpus_per_trial": 0.5,
        "search_space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3},
                         "batch_size": {"type": "choice", "values": [16, 32]}},
    },
    "evaluate": {"bootstrap": 20, "cam_methods": ["gradcam"], "cam_images": 4, "cam_score_images": 8},
}


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket on the stand-in, with the AWS environment pyarrow and boto3 read pointed at it."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = f"lesion-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture
def ray_s3(bucket):
    """A local Ray started after the AWS environment is set, so that its workers (Ray Train's controller reads the
    run's URI itself) reach the stand-in too; a Ray already up in this session is restarted for that."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield bucket
    ray.shutdown()


def _keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _rows(output: str) -> dict[str, str]:
    """stage -> status, from the final table of `lesion run`."""
    table = output[output.rindex("  stage "):]
    rows = {}
    for line in table.splitlines()[1:]:
        parts = line.split()
        if parts[0] == "total":
            return rows
        status = next(p for p in parts if p in ("done", "current", "skipped", "failed", "blocked"))
        rows[" ".join(parts[: parts.index(status)])] = status
    raise AssertionError(f"no total line in:\n{table}")


LOCAL = {**TINY, "train": {**TINY["train"], "epochs": 1,
                            "models": {"custom_cnn": TINY["train"]["models"]["custom_cnn"]}}}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_docs_help_and_plots_rerun_nothing_a_version_bump_retrains(tmp_path, ray_local, monkeypatch, capsys):
    import lesion.training
    import pipelines.cli
    import pipelines.train
    import pipelines.tune

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(LOCAL))
    argv = ["run", "--run", str(tmp_path / "run"), "--config", str(config_file)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert _rows(first) == {"ingest": "done", "tune custom_cnn": "done", "train custom_cnn": "done",
                            "evaluate": "done"}, first

    # Edit docs, help text and plotting code: nothing is made again (a plot call would raise).
    monkeypatch.setattr(pipelines.train.train_model, "__doc__", "Edited docstring.")
    monkeypatch.setattr(pipelines.tune, "__doc__", "Edited module docstring.")
    monkeypatch.setitem(pipelines.cli.COMMANDS, "run", ("workflow", "edited help text"))
    with monkeypatch.context() as patch:
        patch.setattr(lesion.training, "plot_learning_curve", lambda *a, **k: pytest.fail("plotted again"))
        patch.setattr(pipelines.train, "plot_learning_curve", lambda *a, **k: pytest.fail("plotted again"))
        assert main(argv) == 0
    second = capsys.readouterr().out
    assert _rows(second) == {"ingest": "current", "tune custom_cnn": "skipped", "train custom_cnn": "skipped",
                             "evaluate": "skipped"}, second
    assert "replaced the run's recorded config" not in second

    # A training change, declared by bumping TRAIN_VERSION: the model is trained and evaluated again, nothing else.
    monkeypatch.setattr(pipelines.train, "TRAIN_VERSION", pipelines.train.TRAIN_VERSION + 1)
    assert main(argv) == 0
    third = capsys.readouterr().out
    assert _rows(third) == {"ingest": "current", "tune custom_cnn": "skipped", "train custom_cnn": "done",
                            "evaluate": "done"}, third

    # A different --config on the existing run replaces its recorded config, and says so in one line.
    changed = {**LOCAL, "serve": {"port": 8123}}
    config_file.write_text(yaml.safe_dump(changed))
    assert main(argv) == 0
    fourth = capsys.readouterr().out
    lines = [line for line in fourth.splitlines() if "replaced the run's recorded config" in line]
    assert len(lines) == 1 and f"--config {config_file}" in lines[0] and "changed: serve" in lines[0], fourth
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["serve"]["port"] == 8123
    assert set(_rows(fourth).values()) <= {"current", "skipped"}, fourth

    # evaluate.split is the split the workflow scores (an ablation scores validation, never test)
    config_file.write_text(yaml.safe_dump({**changed, "evaluate": {**changed.get("evaluate", {}), "split": "val"}}))
    assert main(argv) == 0
    fifth = capsys.readouterr().out
    assert _rows(fifth)["evaluate"] == "done" and "val: ensemble bal.acc" in fifth, fifth
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["split"] == "val"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_lesion_run_end_to_end_on_s3_then_resumes_by_fingerprint(tmp_path, ray_s3, monkeypatch, capsys):
    name, client = ray_s3
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    uri = f"s3://{name}/runs/tiny"
    monkeypatch.setenv("LESION_CACHE", str(tmp_path / "cache-a"))

    started = time.perf_counter()
    assert main(["run", "--run", uri, "--config", str(config_file)]) == 0
    first = capsys.readouterr().out
    first_seconds = time.perf_counter() - started
    assert _rows(first) == {"ingest": "done", "tune custom_cnn": "done", "train custom_cnn": "done",
                            "train scratch_cnn": "done", "evaluate": "done"}, first

    keys = _keys(client, name)
    for key in ("manifest.json", "config.yaml", "data/info.json", "data/split.csv", "tune/best.yaml",
                "models/custom_cnn/best.pt", "models/custom_cnn/history.csv", "models/scratch_cnn/best.pt",
                "eval/metrics.json", "eval/report.html"):
        assert f"runs/tiny/{key}" in keys, f"{key} was not pushed to {uri}"
    assert any(k.startswith("runs/tiny/data/train/part-") for k in keys)

    # A second machine (a fresh staging folder) pulls the run and finds every stage current.
    manifest = json.loads(client.get_object(Bucket=name, Key="runs/tiny/manifest.json")["Body"].read())
    monkeypatch.setenv("LESION_CACHE", str(tmp_path / "cache-b"))
    run = RunDir(uri)
    assert not run.root.exists()
    started = time.perf_counter()
    assert main(["run", "--run", uri]) == 0  # the config now comes from the run's config.yaml
    second = capsys.readouterr().out
    assert _rows(second) == {"ingest": "current", "tune custom_cnn": "skipped", "train custom_cnn": "skipped",
                             "train scratch_cnn": "skipped", "evaluate": "skipped"}, second
    assert time.perf_counter() - started < first_seconds
    after = run.manifest()
    for artefact in ("data", "tune", "models/custom_cnn", "models/scratch_cnn", "eval"):
        assert after[artefact] == manifest["artefacts"][artefact], f"{artefact} was made again"

    # The custom CNN was trained with the tuned settings.
    best = yaml.safe_load((run.tune / "best.yaml").read_text())["train"]["models"]["custom_cnn"]
    trained = yaml.safe_load((run.model_dir("custom_cnn") / "config.yaml").read_text())
    assert trained["lr"] == pytest.approx(best["lr"]) and trained["batch_size"] == best["batch_size"]
    assert trained["conv_widths"] == [8, 16, 32, 64]  # the config's own per-model settings still hold


def test_lesion_run_records_a_new_runs_config_and_replaces_a_different_one_loudly(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    config = config_from_dict(TINY)
    record_workflow_config(run, config, None)
    assert capsys.readouterr().out == ""  # a new run: recorded silently
    assert config_from_dict(yaml.safe_load((run.root / "config.yaml").read_text())) == config
    record_workflow_config(run, config, "same.yaml")
    assert capsys.readouterr().out == ""  # unchanged: nothing written, nothing said
    other = config_from_dict({**TINY, "evaluate": {**TINY["evaluate"], "bootstrap": 99}})
    record_workflow_config(run, other, "other.yaml")
    out = capsys.readouterr().out
    assert out == (f"replaced the run's recorded config {run.root / 'config.yaml'} with --config other.yaml "
                   f"(changed: evaluate)\n")
    assert yaml.safe_load((run.root / "config.yaml").read_text())["evaluate"]["bootstrap"] == 99


def test_remote_run_dir_pushes_changes_only_and_mirrors_deletions(tmp_path, bucket, monkeypatch):
    name, client = bucket
    monkeypatch.setenv("LESION_CACHE", str(tmp_path / "a"))
    run = RunDir(f"s3://{name}/run/")
    assert run.is_remote and run.uri == f"s3://{name}/run" and str(tmp_path / "a") in str(run.root)
    assert run.pull() == 0  # nothing there yet
    (run.models / "m").mkdir(parents=True)
    (run.models / "m" / "best.pt").write_bytes(b"x" * 100)
    (run.models / "m" / "old.txt").write_text("stale")
    run.record("models/m", config={}, fingerprint="f1")
    assert run.push("models/m") == 3  # two files + the manifest
    assert run.push("models/m") == 0  # unchanged: nothing copied
    # Ray Train writes its checkpoints straight to the URI: syncing must neither delete nor download them.
    client.put_object(Bucket=name, Key="run/models/m/ray/train/checkpoint_000000/state.pt", Body=b"ckpt")
    (run.models / "m" / "old.txt").unlink()
    (run.models / "m" / "best.pt").write_bytes(b"y" * 100)  # same size, newer
    assert run.push("models/m") == 1
    keys = _keys(client, name)
    assert "run/models/m/old.txt" not in keys and "run/models/m/ray/train/checkpoint_000000/state.pt" in keys

    monkeypatch.setenv("LESION_CACHE", str(tmp_path / "b"))
    other = RunDir(f"s3://{name}/run")
    assert other.pull() == 2
    assert (other.models / "m" / "best.pt").read_bytes() == b"y" * 100
    assert not (other.models / "m" / "ray").exists()
    assert other.is_current("models/m", "f1") and other.trained_models() == ["m"]
    assert other.pull() == 0 and other.push() == 0  # in sync both ways


def test_local_run_dir_needs_no_sync(tmp_path):
    run = RunDir(f"file://{tmp_path}/run")
    assert not run.is_remote and run.root == tmp_path / "run" and run.uri == str(tmp_path / "run")
    assert run.pull() == 0 and run.push("data") == 0


def test_run_flags_override_the_config_everywhere_they_apply():
    config = config_from_dict({"train": {"models": {"resnet50": {"workers": 8, "gpus_per_worker": 1.0},
                                                    "scratch_cnn": {}}}})
    changed = workflow_config(config, workers=3, gpus=0.5, tune=False, serve=True)
    assert changed.model_config("resnet50").workers == 3 and changed.model_config("scratch_cnn").workers == 3
    assert changed.model_config("resnet50").gpus_per_worker == 0.5
    assert (changed.tune.gpus_per_trial, changed.evaluate.gpus_per_actor, changed.serve.gpus_per_replica) == (0.5,) * 3
    assert not changed.workflow.tune and changed.workflow.serve
    assert workflow_config(config) == config  # no flags: nothing changes


def test_set_values_are_read_as_yaml_and_bad_ones_are_named():
    assert parse_sets(["data.root=/mnt/x", "train.epochs=3", "train.dropout=[0.1, 0.2]"]) == {
        "data.root": "/mnt/x", "train.epochs": 3, "train.dropout": [0.1, 0.2]}
    with pytest.raises(ValueError, match="'train.epochs': expected KEY=VALUE"):
        parse_sets(["train.epochs"])
