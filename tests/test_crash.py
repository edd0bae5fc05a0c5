"""Crash safety of the run directory: atomic artefact writes, the manifest's locked read-modify-write, the run's
one-writer lock (a file here, an object with a heartbeat in remote storage), and `lesion run` killed with SIGKILL at
several points, then re-run to completion."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from test_workflow import bucket, s3_server  # noqa: F401  (moto's S3 stand-in, as fixtures)

from lesion import rundir
from lesion.rundir import locks
from lesion.rundir import TEMP_MARK, RunDir, RunLockedError, atomic_path, write_atomic
from pipelines.local_cluster import node_processes

REPO = Path(__file__).resolve().parents[1]
LESION = Path(sys.executable).with_name("lesion")
LOCK_MESSAGE = r"the run is locked by 'lesion run' \(pid {pid} on host {host}, since .*\); only one command may write"


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(f".*{TEMP_MARK}*"))


# --------------------------------------------------------------------------------------------- atomic writes


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "deep" / "metrics.json"
    write_atomic(target, '{"old": 1}')
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"new": ')  # half written when the writer fails
            raise RuntimeError("disk gone")
    assert json.loads(target.read_text()) == {"old": 1}
    assert _temp_files(tmp_path) == []
    write_atomic(target, b'{"new": 2}')
    assert json.loads(target.read_text()) == {"new": 2} and _temp_files(tmp_path) == []


def test_temporaries_of_ended_writers_are_swept_when_the_lock_is_taken(tmp_path):
    run = RunDir(tmp_path / "run")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    stale = run.model_dir("m") / f".best.pt{TEMP_MARK}{dead}-abcd"
    stale_folder = run.model_dir("m") / f".tb{TEMP_MARK}{dead}-x1y2"
    live = run.eval / f".report.html{TEMP_MARK}{os.getpid()}-abcd"  # a writer of this (running) process
    ray_own = run.model_dir("m") / "ray" / f".state{TEMP_MARK}{dead}-abcd"  # Ray's storage is Ray's business
    for path in (stale, live, ray_own, stale_folder / "events.out"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    with run.lock("lesion run"):
        assert sorted(_temp_files(run.root)) == sorted([live, ray_own])


# --------------------------------------------------------------------------------------------- the manifest


def _record_many(root: str, worker: int, count: int) -> None:
    run = RunDir(root)
    for index in range(count):
        run.record(f"models/w{worker}-{index}", config={"worker": worker}, fingerprint=f"{worker}-{index}")


def test_concurrent_records_lose_no_entry(tmp_path):
    root = tmp_path / "run"
    RunDir(root).record("data", config={}, fingerprint="d")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(str(root), worker, 6)) for worker in range(8)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    entries = RunDir(root).manifest()
    assert set(entries) == {"data"} | {f"models/w{w}-{i}" for w in range(8) for i in range(6)}
    assert all(entries[f"models/w{w}-{i}"]["fingerprint"] == f"{w}-{i}" for w in range(8) for i in range(6))
    assert _temp_files(root) == []


# --------------------------------------------------------------------------------------------- the run lock


def test_a_second_writer_is_refused_naming_the_owner(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock("lesion run"):
        owner = json.loads((run.root / ".lock").read_text())
        assert (owner["pid"], owner["host"], owner["command"]) == (os.getpid(), socket.gethostname(), "lesion run")
        with pytest.raises(RunLockedError, match=LOCK_MESSAGE.format(pid=os.getpid(), host=socket.gethostname())):
            with RunDir(run.root).lock("lesion train"):
                pytest.fail("two holders")
    assert not (run.root / ".lock").exists()
    with run.lock("lesion train"):  # free again once released
        pass


def test_a_lock_left_by_an_ended_process_is_taken_over(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(ended.stdout), "host": socket.gethostname(), "command": "lesion run",
              "since": "2025-01-01T00:00:00+00:00"}
    run.root.mkdir(parents=True)
    (run.root / ".lock").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="lesion.rundir"), run.lock("lesion evaluate"):
        assert json.loads((run.root / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of 'lesion run' (pid {record['pid']}, since 2025-01-01" in caplog.text
    assert "that process has ended" in caplog.text


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    (run.root / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "lesion run",
                                                "since": "2025-01-01T00:00:00+00:00"}))
    with pytest.raises(RunLockedError, match=rf"pid 1 on host elsewhere.*if that process is no longer running, "
                                             rf"delete {run.root / '.lock'}"):
        with run.lock("lesion run"):
            pytest.fail("took another host's lock")


@pytest.mark.timeout(120)
def test_a_remote_run_is_locked_by_an_object_with_a_heartbeat(bucket, monkeypatch, tmp_path, caplog):  # noqa: F811
    name, client = bucket
    monkeypatch.setenv("LESION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(locks, "SETTLE_S", 0.05)  # where the lock reads them
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.2)
    uri = f"s3://{name}/run"
    run = RunDir(uri)

    def owner() -> dict:
        return json.loads(client.get_object(Bucket=name, Key="run/.lock")["Body"].read())

    with run.lock("lesion run"):
        first = owner()
        assert (first["pid"], first["host"], first["command"]) == (os.getpid(), socket.gethostname(), "lesion run")
        time.sleep(0.6)
        assert owner()["heartbeat"] > first["heartbeat"]  # refreshed by the heartbeat thread
        with pytest.raises(RunLockedError, match=rf"{uri}/.lock: the run is locked by 'lesion run'.*last heartbeat"):
            with RunDir(uri).lock("lesion run"):
                pytest.fail("two holders")
        write_atomic(run.manifest_path, json.dumps({"format": rundir.RUN_FORMAT, "artefacts": {}}))
        run.push()  # a push mirrors the run, and leaves the lock object alone
        assert owner()["token"] == first["token"]
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=name).get("Contents", [])}
    assert keys - {"run/"} == {"run/manifest.json"}  # released: the lock object is gone (pyarrow may keep "run/")

    stale = {**first, "pid": 1, "host": "elsewhere", "token": "old", "heartbeat": time.time() - rundir.STALE_S - 5}
    client.put_object(Bucket=name, Key="run/.lock", Body=json.dumps(stale).encode())
    with caplog.at_level(logging.WARNING, logger="lesion.rundir"), RunDir(uri).lock("lesion run"):
        assert owner()["pid"] == os.getpid()
    assert "taking over the lock of 'lesion run' (pid 1 on elsewhere" in caplog.text


# --------------------------------------------------------------------------------------------- `lesion run` killed

TINY = {
    "data": {"source": "synthetic", "image_size": 32, "synthetic_count": 280, "seed": 0},
    "train": {
        "epochs": 1, "batch_size": 32, "lr": 2e-3, "workers": 1, "cpus_per_worker": 0.5,
        "models": {"custom_cnn": {"conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]}, "scratch_cnn": {}},
    },
    "evaluate": {"bootstrap": 20, "cam_methods": ["gradcam"], "cam_images": 4, "cam_score_images": 8},
    "workflow": {"max_parallel_trainings": 1},  # the kill points below follow the trainings in order
}

# Run as the driver instead of the console script: dies (the whole process group, SIGKILL) half-way through
# writing report.html, with the page's temporary file half written.
DIE_IN_REPORT = """
import os, signal, sys
from pathlib import Path
import lesion.report
from lesion.rundir import atomic_path, write_atomic

def write_then_die(path, data):
    if Path(path).name == "report.html":
        with atomic_path(path) as tmp:
            tmp.write_text(data[: len(data) // 2])
            os.killpg(0, signal.SIGKILL)
    return write_atomic(path, data)

lesion.report.write_atomic = write_then_die
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    """This environment, with this checkout first on the path (so the console script runs this code)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


class LesionRun:
    """One `lesion run` in a session of its own, its output in a log file. ``started`` lists every one, so a test
    that fails half-way still kills them all (the ``lesion_runs`` fixture)."""

    started: list[LesionRun] = []

    def __init__(self, tmp_path: Path, run: Path, config: Path, attempt: int, driver: list[str] | None = None):
        self.log = tmp_path / f"attempt{attempt}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen([*(driver or [str(LESION)]), "run", "--run", str(run), "--config",
                                             str(config), "--no-tune"], stdout=out, stderr=subprocess.STDOUT,
                                            env=_env(), start_new_session=True, cwd=tmp_path)
        LesionRun.started.append(self)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, what: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"lesion run ended (code {self.process.returncode}) before {what}:\n"
                                     f"{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL every process of the run's session: the driver and the local Ray it started."""
        deadline = time.monotonic() + 30
        while (left := node_processes(self.process.pid)) and time.monotonic() < deadline:
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.process.wait(10)
        assert not node_processes(self.process.pid), "processes of the killed run are left"

    def finish(self, timeout: float = 900) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()  # whatever it left (nothing, after a clean exit)


@pytest.fixture
def lesion_runs():
    """Kill, at the end of the test, every `lesion run` it started and the local Ray of each."""
    yield LesionRun
    while LesionRun.started:
        LesionRun.started.pop().kill()


def _statuses(output: str) -> dict[str, str]:
    """stage -> its last status in a (possibly killed) run's progressive table."""
    statuses = {}
    for line in output.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2:
            found = [i for i, part in enumerate(parts) if part in ("running", "done", "current", "skipped", "failed")]
            if found and found[0] > 0 and parts[0] != "stage":
                statuses[" ".join(parts[: found[0]])] = parts[found[0]]
    return statuses


def _kept(statuses: dict[str, str], *stages: str) -> bool:
    """Whether every stage of ``stages`` was found made already: skipped by the workflow, or by the stage itself
    (``current``, as ingest reports it)."""
    return all(statuses.get(stage) in ("skipped", "current") for stage in stages)


def _check_every_file(root: Path) -> int:
    """Every artefact parses (JSON, YAML, CSV, Parquet, PNG, torch checkpoints, HTML); returns files checked."""
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                json.loads(path.read_text())
            elif suffix in (".yaml", ".yml"):
                yaml.safe_load(path.read_text())
            elif suffix == ".csv":
                pd.read_csv(path)
            elif suffix == ".parquet":
                pq.read_table(path)
            elif suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=False)
            elif suffix == ".html":
                assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), "truncated page"
            else:
                continue
        except Exception as exc:  # the file's name in the failure
            raise AssertionError(f"{path}: {type(exc).__name__}: {exc}") from exc
        checked += 1
    return checked


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 4 minutes on 2 idle cores; far longer on a crowded machine
def test_lesion_run_killed_at_any_point_finishes_on_rerun_and_leaves_no_half_file(tmp_path, lesion_runs):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    root = tmp_path / "run"

    def manifest() -> dict:
        return RunDir(root).manifest() if (root / "manifest.json").is_file() else {}

    def took_over(attempt: LesionRun) -> bool:
        return "taking over the lock of 'lesion run'" in attempt.output and "that process has ended" in attempt.output

    # 1. during ingest: killed while the shards are being written
    first = LesionRun(tmp_path, root, config, 1)
    first.wait_for(lambda: (root / "data.partial" / "train").is_dir(), "ingest writing shards")
    first.kill()
    assert "data" not in manifest()

    # 2. mid-epoch of the second model's training (its loop has opened its TensorBoard log), the first one finished
    second = LesionRun(tmp_path, root, config, 2)
    events = root / "models" / "scratch_cnn" / "tb"
    second.wait_for(lambda: "models/custom_cnn" in manifest() and any(events.glob("events.out.tfevents.*")),
                    "scratch_cnn's training loop after custom_cnn")
    second.kill()
    assert _statuses(second.output)["ingest"] == "done" and took_over(second)
    assert set(manifest()) == {"data", "models/custom_cnn"}

    # 3. during evaluation: killed once the ensemble is fitted, while the test split is scored
    third = LesionRun(tmp_path, root, config, 3)
    third.wait_for(lambda: (root / "eval" / "ensemble.json").is_file(), "evaluation under way")
    third.kill()
    statuses = _statuses(third.output)
    assert _kept(statuses, "ingest", "train custom_cnn") and statuses["train scratch_cnn"] == "done", third.output
    assert took_over(third) and "eval" not in manifest()

    # 4. while writing the report (the driver dies with the page half written)
    fourth = LesionRun(tmp_path, root, config, 4, driver=[sys.executable, "-c", DIE_IN_REPORT])
    assert fourth.finish() == -signal.SIGKILL, fourth.output[-4000:]
    statuses = _statuses(fourth.output)
    assert _kept(statuses, "ingest", "train custom_cnn", "train scratch_cnn"), fourth.output
    assert statuses["evaluate"] == "running", fourth.output
    assert took_over(fourth) and "eval" not in manifest()
    assert [p.name.startswith(".report.html") for p in _temp_files(root)] == [True]  # the half-written page
    assert not (root / "eval" / "report.html").exists()

    # 5. to completion: the finished stages are skipped, the rest is made, nothing half-written remains
    last = LesionRun(tmp_path, root, config, 5)
    assert last.finish() == 0, last.output[-4000:]
    statuses = _statuses(last.output)
    assert _kept(statuses, "ingest", "train custom_cnn", "train scratch_cnn"), last.output
    assert statuses["evaluate"] == "done" and len(statuses) == 4, last.output
    assert took_over(last)
    assert set(manifest()) == {"data", "models/custom_cnn", "models/scratch_cnn", "eval"}
    assert _temp_files(root) == []
    assert not any((root / name).exists() for name in ("data.partial", "data.old", ".lock"))
    assert _check_every_file(root) > 20
    assert (root / "eval" / "report.html").is_file() and (root / "eval" / "model_card.md").is_file()


@pytest.mark.timeout(300)
def test_a_second_lesion_run_on_the_same_run_fails_at_once(tmp_path, lesion_runs):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    root = tmp_path / "run"
    first = LesionRun(tmp_path, root, config, 1)
    first.wait_for(lambda: (root / ".lock").is_file() and (root / ".lock").stat().st_size, "the run lock")
    started = time.monotonic()
    second = subprocess.run([str(LESION), "run", "--run", str(root), "--config", str(config), "--no-tune"],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert time.monotonic() - started < 60
    assert second.returncode == 2, second.stderr[-3000:]
    message = LOCK_MESSAGE.format(pid=first.process.pid, host=socket.gethostname())
    last_line = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"lesion run: error: {re.escape(str(root / '.lock'))}: {message}.*", last_line), last_line
    assert first.process.poll() is None  # the owner is undisturbed
