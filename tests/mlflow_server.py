"""A real MLflow server for the tracking and registry tests: ``mlflow server`` from its own environment
(``.venv-mlflow``, made by ``make install``), on loopback, a free port, a SQLite backend."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / ".venv-mlflow" / "bin" / "mlflow"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ok(url: str, timeout: float, process: subprocess.Popen) -> bool:
    """Poll ``url`` until it answers 2xx (True), or ``process`` exits or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url, timeout=5).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


class MlflowServer:
    """``mlflow server`` as a subprocess; ``url`` once it answers ``/health``."""

    def __init__(self, folder: Path, *, artifacts: str | None = None, env: dict[str, str] | None = None):
        if not SERVER.is_file():
            pytest.skip(f"no MLflow server environment ({SERVER} missing): `make install` creates it")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(SERVER), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        if artifacts and artifacts.startswith("s3://"):  # clients write straight to the bucket
            args += ["--default-artifact-root", artifacts, "--no-serve-artifacts"]
        else:
            args += ["--artifacts-destination", artifacts or str(folder / "artifacts")]
        self.log = folder / "server.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **(env or {})})
        self._wait(timeout=240)

    def _wait(self, timeout: float) -> None:
        if wait_until_ok(f"{self.url}/health", timeout, self.process):
            return
        if self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
        self.stop()
        raise TimeoutError(f"mlflow server not up after {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def api(self, endpoint: str, **params) -> dict:
        """GET ``/api/2.0/mlflow/<endpoint>``."""
        answer = requests.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=60)
        answer.raise_for_status()
        return answer.json()

    def search(self, experiment: str = "lesion") -> list[dict]:
        """Every run of ``experiment``."""
        experiment_id = self.api("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        answer = requests.post(f"{self.url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id],
                                                                                "max_results": 1000}, timeout=30)
        answer.raise_for_status()
        return answer.json().get("runs", [])

    def stop(self) -> None:
        """End the server's process group (its gunicorn/uvicorn workers too)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)


def tags(run: dict) -> dict[str, str]:
    """A REST run's tags as a dict."""
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
