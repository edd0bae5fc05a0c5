"""Pretrained weights: `lesion weights fetch` against a loopback Hugging Face hub, `train.weights_dir`, and the
driver's check that fails at once, before Ray, naming every model without weights and the ways to supply them."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
import yaml

from lesion.config import apply_overrides, load_config
from lesion.models import WeightsError, create_model, hub_repo
from lesion.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ARCH, TIMM_NAME = "mobilenetv2", "mobilenetv2_100"  # the smallest architecture with hub weights (3.5 M parameters)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def served_weights() -> dict[str, torch.Tensor]:
    """What the stand-in hub serves: a fresh timm model's full state dict, classifier included, as the hub holds."""
    torch.manual_seed(7)
    return {k: v.clone() for k, v in timm.create_model(TIMM_NAME).state_dict().items()}


@pytest.fixture
def hub(served_weights):
    """A loopback Hugging Face hub: ``/<repo>/resolve/<revision>/model.safetensors`` of one repo (HEAD and GET, with
    the commit, ETag and size headers huggingface_hub reads); anything else is 404. Yields (endpoint, requests)."""
    from safetensors.torch import save

    body = save(served_weights)
    path = f"/{hub_repo(ARCH)}/resolve/main/model.safetensors"
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, with_body: bool):
            requests.append(f"{self.command} {self.path}")
            if self.path != path:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", requests
    httpd.shutdown()
    httpd.server_close()


def _config_file(tmp_path: Path, models: dict, **train) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"train": {"models": models, **train}}))
    return path


def test_fetch_downloads_what_the_config_needs_and_weights_dir_trains_from_it(tmp_path, hub, served_weights,
                                                                                monkeypatch, caplog):
    endpoint, requests = hub
    config = _config_file(tmp_path, {ARCH: {"pretrained": True}, "scratch_cnn": {},
                                     "efficientnet_lite0": {"pretrained": True}})
    dest = tmp_path / "weights"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the machine's own cache is neither read nor filled
    fetched = subprocess.run([sys.executable, "-m", "pipelines.cli", "weights", "fetch", "--config", str(config),
                              "--dest", str(dest)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    file = dest / f"models--timm--{TIMM_NAME}.ra_in1k" / "snapshots" / COMMIT / "model.safetensors"
    assert file.is_file() and str(file) in fetched.stdout
    assert "efficientnet_lite0" not in fetched.stdout and "scratch_cnn" not in fetched.stdout  # packaged, scratch
    assert any(r.startswith("GET ") for r in requests)
    assert not (tmp_path / "hf-home").exists()

    # the air-gapped side (this process: HF_HUB_OFFLINE as the test environment sets it): train.weights_dir
    from pipelines.train import required_weights, worker_config

    study = apply_overrides(load_config(config), {"train.weights_dir": str(dest)})
    sources = required_weights(study, list(study.train.models))
    assert sources["scratch_cnn"] is None and sources["efficientnet_lite0"].kind == "packaged"
    assert (sources[ARCH].kind, sources[ARCH].location) == ("weights_dir", str(file))
    assert worker_config(study.model_config(ARCH), sources[ARCH]).weights == str(file)  # the workers load that file
    with caplog.at_level(logging.INFO, logger="lesion.models"):
        model = create_model(ARCH, 7, pretrained=True, weights_dir=dest)
    assert f"{ARCH} (7 classes): ImageNet weights from {file} (train.weights_dir)" in caplog.text
    assert model.pretrained_origin == f"imagenet:{file}"
    backbone = model.backbone.state_dict()
    assert set(backbone) == set(served_weights) - {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(backbone[k], served_weights[k]) for k in backbone)


def test_fetch_names_the_hub_when_it_cannot_download(tmp_path, hub, monkeypatch):
    endpoint, _ = hub
    config = _config_file(tmp_path, {"resnet50": {"pretrained": True}})  # the stand-in serves no resnet50
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    failed = subprocess.run([sys.executable, "-m", "pipelines.cli", "weights", "fetch", "--config", str(config),
                             "--dest", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert f"resnet50: could not download {hub_repo('resnet50')} from {endpoint}" in failed.stderr


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, whatever this machine holds."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_missing_weights_fail_on_the_driver_at_once_naming_every_model(tmp_path, offline_empty_cache):
    from pipelines.train import train_all

    study = load_config(ROOT / "cluster" / "configs" / "ham10000.yaml")
    started = time.perf_counter()
    with pytest.raises(WeightsError) as caught:
        train_all(study, RunDir(tmp_path / "run"))  # not ingested: the check comes before anything else
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    for variant in ("resnet50-balanced", "resnet50-imbalanced", "densenet121-balanced", "mobilenetv2",
                    "efficientnet_b0"):
        assert f"  {variant}: " in message
    assert "custom_cnn" not in message and "efficientnet_lite0" not in message  # scratch; packaged weights
    assert "lesion weights fetch" in message and "train.weights_dir" in message and "HF_ENDPOINT" in message
    assert not (tmp_path / "run").exists()


def test_weights_dir_without_a_model_falls_back_and_a_missing_one_is_refused(tmp_path, offline_empty_cache):
    from pipelines.train import required_weights

    (tmp_path / "fetched").mkdir()
    study = load_config(_config_file(tmp_path, {"efficientnet_lite0": {"pretrained": True}},
                                     weights_dir=str(tmp_path / "fetched")))
    assert required_weights(study, ["efficientnet_lite0"])["efficientnet_lite0"].kind == "packaged"
    study = apply_overrides(study, {"train.weights_dir": str(tmp_path / "not-copied")})
    with pytest.raises(WeightsError, match=r"efficientnet_lite0: train.weights_dir .*not-copied is not a directory"):
        required_weights(study, ["efficientnet_lite0"])


def test_the_cli_reports_missing_weights_as_an_error_line(tmp_path, offline_empty_cache, capsys):
    from pipelines.cli import main

    config = _config_file(tmp_path, {"densenet121": {"pretrained": True}})
    assert main(["train", "--run", str(tmp_path / "run"), "--config", str(config), "--all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lesion train: error: pretrained weights missing for 1 model(s):")
    assert "densenet121: no ImageNet weights in the Hugging Face cache, and HF_HUB_OFFLINE is set" in err


@pytest.mark.timeout(120)
def test_lesion_run_stops_before_its_first_stage_when_weights_are_missing(tmp_path, offline_empty_cache, ray_local,
                                                                           capsys):
    from pipelines.cli import main

    config = _config_file(tmp_path, {"scratch_cnn": {}, "efficientnet_b0": {"pretrained": True}})
    run = tmp_path / "run"
    assert main(["run", "--run", str(run), "--config", str(config), "--plan"]) == 0  # --plan checks nothing
    assert main(["run", "--run", str(run), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lesion run: error: pretrained weights missing for 1 model(s):" in err and "  efficientnet_b0: " in err
    assert not (run / "data").exists()  # not even ingest started
