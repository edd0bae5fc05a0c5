"""``lesion predict``: offline on real full-size images with a trained run, and through an HTTP API."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

import lesion
from lesion.rundir import RunDir
from pipelines.cli import main
from pipelines.predict import predict_files


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory) -> RunDir:
    """A writable copy of the trained run (prediction may fit and save the ensemble spec)."""
    root = tmp_path_factory.mktemp("predict") / "run"
    shutil.copytree(trained_run.root, root)
    return RunDir(root)


@pytest.mark.timeout(900)  # includes training the session's trained_run fixture when this test runs first
def test_predict_offline_real_images_with_bad_files_reported(run_copy, ham10000_fullres, tmp_path, capsys):
    images = sorted((ham10000_fullres / "images").glob("*.jpg"))[:6]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(images[0].read_bytes()[:2000])
    out = tmp_path / "preds.csv"
    code = main(["predict", "--run", str(run_copy.root), str(folder), "--out", str(out)])
    assert code == 1  # some files failed, the rest were predicted
    table = pd.read_csv(out)
    assert len(table) == len(images) + 2
    bad = table.set_index(table["file"].map(lambda f: f.rsplit("/", 1)[-1]))
    assert bad.loc["empty.jpg", "status"] == "error" and "empty" in bad.loc["empty.jpg", "error"]
    assert bad.loc["truncated.jpg", "status"] == "error"
    ok = table[table["status"] == "ok"]
    assert len(ok) == len(images)
    classes = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
    np.testing.assert_allclose(ok[[f"ensemble:{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-4)
    for model in run_copy.trained_models():
        np.testing.assert_allclose(ok[[f"{model}:{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-4)
    assert set(ok["decision"]) <= {"malignant", "benign", "uncertain"}
    np.testing.assert_allclose(ok["malignant_probability"], ok[["ensemble:mel", "ensemble:bcc", "ensemble:akiec"]]
                               .sum(axis=1), atol=1e-4)
    printed = capsys.readouterr().out
    assert "empty.jpg" in printed and "error" in printed


def _moto_s3(monkeypatch, bucket: str, objects: dict[str, bytes]):
    """A moto S3 server on a free port holding ``objects`` in ``bucket``; this process's AWS settings point at it."""
    boto3 = pytest.importorskip("boto3")
    server = pytest.importorskip("moto.server").ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    s3.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return server


@pytest.mark.timeout(900)  # includes training the session's trained_run fixture when this test runs first
def test_predict_lists_bytes_and_s3_with_provenance_to_parquet(run_copy, ham10000_fullres, tmp_path, monkeypatch,
                                                              capsys):
    """A CSV list of local paths and s3:// URIs and a Parquet of image bytes in one batch: every image predicted
    alike wherever it came from, unreadable ones listed with their reasons, provenance on every row."""
    images = sorted((ham10000_fullres / "images").glob("*.jpg"))[:3]
    server = _moto_s3(monkeypatch, "derm", {f"cases/{p.name}": p.read_bytes() for p in images})
    try:
        pd.DataFrame({"path": [str(images[0]), f"s3://derm/cases/{images[1].name}", "s3://derm/cases/missing.jpg",
                               "gone.jpg"]}).to_csv(tmp_path / "list.csv", index=False)
        pd.DataFrame({"image_id": ["b0", "b1", "junk"],
                      "image": [images[0].read_bytes(), images[2].read_bytes(), b"not an image"]}
                     ).to_parquet(tmp_path / "bytes.parquet")
        out = tmp_path / "preds.parquet"
        code = main(["predict", "--run", str(run_copy.root), str(tmp_path / "list.csv"),
                     str(tmp_path / "bytes.parquet"), "--out", str(out)])
    finally:
        server.stop()
    assert code == 1
    table = pd.read_parquet(out)
    assert table["file"].tolist() == [str(images[0]), f"s3://derm/cases/{images[1].name}",
                                      "s3://derm/cases/missing.jpg", str(tmp_path / "gone.jpg"), "b0", "b1", "junk"]
    by_file = table.set_index("file")
    assert by_file.loc[["s3://derm/cases/missing.jpg", str(tmp_path / "gone.jpg"), "junk"], "status"].eq("error").all()
    ok = table[table["status"] == "ok"]
    assert len(ok) == 4
    # the same image from a path and from Parquet bytes gets the same answer
    assert by_file.loc["b0", "ensemble:mel"] == by_file.loc[str(images[0]), "ensemble:mel"]
    assert set(table["model_uri"]) == {str(run_copy.root)} and set(table["engine"]) == {"torch"}
    assert set(table["lesion_version"]) == {lesion.__version__}
    assert json.loads(table["model_versions"][0]).keys() == set(run_copy.trained_models())
    err = capsys.readouterr().err
    first = next(line for line in err.splitlines() if line.startswith("predict: "))
    assert first == "predict: 7 images in this process (7 images, at most the in-process limit of 700)"
    assert "predict: 7/7 images (100%)" in err and "images/s, ETA" in err
    assert "3 of 7 images could not be predicted" in err and "junk: " in err and "missing.jpg" in err


def test_predict_refuses_local_paths_for_a_remote_cluster_before_starting(ham10000_fullres, tmp_path, capsys):
    """Refused before any model is loaded or any cluster joined (the run here has no models at all)."""
    folder = ham10000_fullres / "images"
    code = main(["predict", "--run", str(tmp_path), str(folder), "--address", "ray://10.255.255.1:10001"])
    assert code == 2
    err = capsys.readouterr().err
    assert "are local files" in err and "10.255.255.1" in err and "s3://" in err
    assert main(["predict", "--run", str(tmp_path), str(folder), "--out", "preds.txt"]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_predict_on_ray_data_answers_as_in_process(run_copy, ham10000_fullres, ray_local, capsys):
    """The Ray Data path is map_batches over the same inference core: the same rows, in input order."""
    images = [str(p) for p in sorted((ham10000_fullres / "images").glob("*.jpg"))[:5]] + ["/no/such.jpg"]
    local = predict_files(run_copy, images)
    on_ray = predict_files(run_copy, images, executor="ray-data")
    assert "on Ray Data (--executor ray-data)" in capsys.readouterr().err
    assert on_ray["file"].tolist() == images
    columns = [c for c in local.columns if c != "error"]
    pd.testing.assert_frame_equal(on_ray[columns], local[columns])


def test_predict_offline_is_deterministic_per_file(run_copy, ham10000_fullres):
    image = sorted((ham10000_fullres / "images").glob("*.jpg"))[0]
    alone = predict_files(run_copy, [str(image)])
    together = predict_files(run_copy, [str(image), str(ham10000_fullres / "images")])
    assert alone.loc[0, "ensemble:mel"] == pytest.approx(together.loc[0, "ensemble:mel"], abs=1e-6)


RESPONSE = {"predicted_class": "nv", "probabilities": {"mel": 0.1, "nv": 0.9}, "malignant_probability": 0.1,
            "decision": "benign", "decision_reason": "below threshold", "models": {}, "model_versions": {},
            "latency_ms": 12.5}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/predict" or b'name="file"' not in body:
            status, payload = 400, {"detail": "expected a multipart field named file"}
        elif b'filename="notes.txt"' in body:
            status, payload = 415, {"detail": "not an image"}
        else:
            status, payload = 200, RESPONSE
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_predict_url_prints_table_and_json_with_per_file_errors(api, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8fake")
    (tmp_path / "notes.txt").write_text("hello")
    code = main(["predict", "--url", api, str(tmp_path / "a.jpg"), str(tmp_path / "notes.txt")])
    assert code == 1
    table = capsys.readouterr().out
    assert "a.jpg" in table and "benign" in table and "12 ms" in table
    assert "notes.txt" in table and "HTTP 415: not an image" in table
    assert main(["predict", "--url", api, str(tmp_path / "a.jpg"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["predicted_class"] == "nv" and rows[0]["file"].endswith("a.jpg")


def test_predict_url_unreachable_server_is_an_error_row(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert main(["predict", "--url", "http://127.0.0.1:9", str(tmp_path / "a.jpg")]) == 1
    assert "error" in capsys.readouterr().out


def test_predict_needs_run_or_url(tmp_path, capsys):
    assert main(["predict", str(tmp_path)]) == 2
    assert "--run" in capsys.readouterr().err
