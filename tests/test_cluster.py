"""A real multi-node Ray cluster on this machine (`lesion cluster up`'s code): a head and a worker node, each a
separate `ray start` with its own ports, CPUs, object store and temp dir. The demo workflow is submitted through
the Jobs API with the project's runtime_env; then a training job loses the worker node mid-way (its raylet is
killed) and finishes on the head from the last checkpoint. Teardown ends exactly the process groups started here
(never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from faults import REGISTERED_FILE
from pipelines.local_cluster import node_processes, start_local_cluster, stop_local_cluster

ROOT = Path(__file__).resolve().parents[1]
LESION = str(Path(sys.executable).with_name("lesion"))  # the venv's console script (nodes share this machine)
TINY = {
    "data": {"source": "synthetic", "image_size": 32, "synthetic_count": 280, "seed": 0},
    "train": {"epochs": 2, "batch_size": 32, "workers": 2, "cpus_per_worker": 0.5, "max_failures": 2,
              "models": {"custom_cnn": {"conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]}, "scratch_cnn": {}}},
    "tune": {"trials": 2, "epochs": 1, "grace_period": 1, "cpus_per_trial": 0.5,
             "search_space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}}},
    "evaluate": {"bootstrap": 20, "cam_methods": ["gradcam"], "cam_images": 4, "cam_score_images": 8},
}

pytestmark = pytest.mark.slow


def _wait(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s; log tail:\n"
                       f"{client.get_job_logs(job_id)[-3000:]}")


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs) + one worker node (2 CPUs) on loopback; yields (state, JobSubmissionClient, work dir)."""
    from ray.job_submission import JobSubmissionClient

    # Short paths: Ray's unix sockets live under each node's temp dir.
    work = Path(tempfile.mkdtemp(prefix="lc", dir="/tmp"))
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "1"}
    sessions = []
    try:
        state = start_local_cluster(workers=1, cpus_per_node=2, object_store_mb=200, state_dir=work / "cluster",
                                    env=env, timeout=240)
        sessions = [node["pid"] for node in state["nodes"]]
        yield state, JobSubmissionClient(state["dashboard"]), work
    finally:
        stop_local_cluster(work / "cluster")
        leftovers = [process for session in sessions for process in node_processes(session)]
        shutil.rmtree(work, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster survived teardown: {leftovers}"


@pytest.fixture
def three_nodes():
    """Head + two worker nodes (2 CPUs each) on loopback, for one test (torn down before `cluster` starts)."""
    from ray.job_submission import JobSubmissionClient

    work = Path(tempfile.mkdtemp(prefix="l3", dir="/tmp"))
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "1"}
    sessions = []
    try:
        state = start_local_cluster(workers=2, cpus_per_node=2, object_store_mb=200, state_dir=work / "cluster",
                                    env=env, timeout=240)
        sessions = [node["pid"] for node in state["nodes"]]
        yield state, JobSubmissionClient(state["dashboard"]), work
    finally:
        stop_local_cluster(work / "cluster")
        leftovers = [process for session in sessions for process in node_processes(session)]
        shutil.rmtree(work, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster survived teardown: {leftovers}"


# Two trainings of 2 workers x 0.5 CPU (+ the shared Ray Data CPU, + each Ray Train controller) fit 6 CPUs together
# with room to spare; mobilenetv2 fails when its model is built (no such weights file) and must leave the others'
# results intact.
PARALLEL = {**TINY, "workflow": {"tune": False},
            "train": {**TINY["train"], "cpus_per_worker": 0.5,
                      "models": {**TINY["train"]["models"],
                                 # fails on its worker: the test writes a file there that the driver's weights
                                 # check finds and no torch can read
                                 "mobilenetv2": {"weights": "mobilenetv2.pth", "max_failures": 0}}}}


@pytest.mark.timeout(1800)
def test_two_trainings_run_at_once_on_three_nodes_and_a_failure_keeps_the_rest(three_nodes):
    state, client, work = three_nodes
    config = work / "parallel.yaml"
    broken = work / "mobilenetv2.pth"
    broken.write_bytes(b"not a weights file")
    config.write_text(yaml.safe_dump(PARALLEL).replace("mobilenetv2.pth", str(broken)))
    run = work / "run"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    job = client.submit_job(entrypoint=f"{LESION} run --run {run} --config {config}",
                            runtime_env={**runtime_env, "working_dir": str(ROOT)})
    status = _wait(client, job, timeout=1500)
    logs = client.get_job_logs(job)
    assert status == "FAILED", logs[-4000:]  # `lesion run` exits 1 naming the failed node
    assert "lesion run: train mobilenetv2 failed" in logs and str(run / "logs" / "train-mobilenetv2.log") in logs
    for name in ("custom_cnn", "scratch_cnn"):
        assert (run / "models" / name / "best.pt").is_file(), f"{name} lost its result:\n{logs[-4000:]}"
    # The workflow ran the three trainings at once (each row's wall-clock window overlaps the others'); how Ray then
    # interleaves their epochs on 3 nodes sharing 2 cores is its scheduler's business (test_dag checks epochs overlap
    # on one node).
    stage_rows = json.loads((run / "status.json").read_text())["rows"]
    windows = {row["name"]: (row["started_at"], row["started_at"] + row["seconds"])
               for row in stage_rows if row["name"].startswith("train ")}
    assert len(windows) == 3 and max(start for start, _ in windows.values()) < min(end for _, end in windows.values()), \
        f"the trainings did not run at once: {windows}"
    rows = {row["name"]: row["status"] for row in stage_rows}
    assert rows == {"ingest": "done", "train custom_cnn": "done", "train scratch_cnn": "done",
                    "train mobilenetv2": "failed", "evaluate": "blocked"}, rows


@pytest.fixture(scope="module")
def workflow_job(cluster):
    """The demo workflow (tiny config) submitted with the project's runtime_env; yields (status, logs, run dir)."""
    _, client, work = cluster
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = work / "run"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    job = client.submit_job(entrypoint=f"{LESION} run --run {run} --config {config}",
                            runtime_env={**runtime_env, "working_dir": str(ROOT)})
    status = _wait(client, job, timeout=1200)
    return status, client.get_job_logs(job), run


@pytest.mark.timeout(1800)
def test_demo_workflow_runs_as_a_job_on_two_nodes(cluster, workflow_job):
    from ray.util.state import list_nodes

    state, _, _ = cluster
    status, logs, run = workflow_job
    assert status == "SUCCEEDED", logs[-4000:]
    assert len(list_nodes(address=state["dashboard"], filters=[("state", "=", "ALIVE")])) == 2
    for path in ("data/info.json", "tune/best.yaml", "models/custom_cnn/best.pt", "models/scratch_cnn/best.pt",
                 "eval/metrics.json", "eval/report.html", "manifest.json"):
        assert (run / path).is_file(), f"{path} missing from the run dir"
    # The job ran the submitted code (working_dir first on PYTHONPATH) and printed the stage table.
    assert "evaluate" in logs and "total" in logs and f"report: {run}/eval/report.html" in logs


@pytest.mark.timeout(1500)
def test_training_survives_losing_the_worker_node(cluster, workflow_job):
    state, client, _ = cluster
    status, _, run = workflow_job
    assert status == "SUCCEEDED", "needs the workflow job's ingested run"
    worker_node = state["nodes"][1]["pid"]  # leads the worker node's session

    # Hold the head's CPUs so the training workers are placed on the worker node.
    blocker = client.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep(1200)'",
                                entrypoint_num_cpus=2, entrypoint_resources={"node:__internal_head__": 0.01})
    deadline = time.monotonic() + 120
    while client.get_job_status(blocker) != "RUNNING":
        assert time.monotonic() < deadline, "the blocking job did not start"
        time.sleep(1)

    checkpoints = run / "models" / "scratch_cnn" / "ray" / "train"
    shutil.rmtree(checkpoints)  # the workflow's checkpoints: only the new job's may trigger the kill
    job = client.submit_job(entrypoint=f"{LESION} train --run {run} --model scratch_cnn --epochs 12")
    # Only a checkpoint Ray Train has registered (not merely written) is resumed from after a restart.
    snapshot = checkpoints / REGISTERED_FILE
    deadline = time.monotonic() + 600
    while not snapshot.is_file():
        assert client.get_job_status(job) in ("PENDING", "RUNNING"), client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline, "no registered checkpoint after 600 s"
        time.sleep(0.2)

    # Free the head, then take the worker node down: SIGKILL its raylet.
    client.stop_job(blocker)
    raylets = [pid for pid, name in node_processes(worker_node) if name == "raylet"]
    assert len(raylets) == 1
    os.kill(raylets[0], signal.SIGKILL)

    final = _wait(client, job, timeout=900)
    job_logs = client.get_job_logs(job)
    assert final == "SUCCEEDED", job_logs[-4000:]
    history = pd.read_csv(run / "models" / "scratch_cnn" / "history.csv")
    assert history["attempt"].max() >= 1, f"training was not resumed after the node loss:\n{history}\n{job_logs[-4000:]}"
    resumed = history[history["attempt"] >= 1]["epoch"].min()
    assert resumed > 0, "the restart began at epoch 0 instead of resuming from the checkpoint"
    assert list(history["epoch"]) == list(range(len(history)))  # every epoch once, none repeated
    assert (run / "models" / "scratch_cnn" / "best.pt").is_file()
