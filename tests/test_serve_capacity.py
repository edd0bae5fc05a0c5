"""`lesion serve` fits itself to a small machine, and refuses what can never start before starting anything."""

import shutil

import requests

from lesion.config import dump_yaml
from pipelines import cli
from conftest import tiny_config
from test_serve import free_port


def running_replicas() -> int:
    """Replicas of every Serve application that are RUNNING now (0 when Serve is not up)."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # Serve not started: nothing runs
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for a in applications.values() for d in a.deployments.values())


def test_a_gpu_share_without_gpus_fails_before_any_replica_starts(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run.root, tmp_path / "run")
    code = cli.main(["serve", "--run", str(run), "--gpus-per-replica", "1", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2
    assert "lesion serve cannot start on this cluster: GPU: needs 3" in err  # 2 models + Grad-CAM, 1 GPU each
    assert "the cluster has 0" in err and "serve.gpus_per_replica" in err
    assert running_replicas() == 0


def test_replica_shares_that_overflow_two_cpus_are_fitted_and_the_api_answers(trained_run, tmp_path, capsys,
                                                                               ham10000_fullres):
    # The reported hang: replicas whose CPU shares add up to more than a 2-CPU Ray has (here two models + Grad-CAM
    # + ingress at 0.6 CPU each: 2.4 CPUs) never all start.
    from ray import serve

    from pipelines.serve import APP_NAME, deploy
    from pipelines.common import resolve_config
    from lesion.rundir import RunDir

    run = RunDir(shutil.copytree(trained_run.root, tmp_path / "run"))
    dump_yaml(tiny_config().to_dict(), run.root / "config.yaml")
    config = resolve_config(run, None, {"serve.port": free_port(), "serve.max_replicas": 1,
                                        "serve.cpus_per_replica": 0.6})
    try:
        url = deploy(config, run)
        note = capsys.readouterr().out
        assert "4 replicas x 0.6 CPU need 2.4 CPU, this single-node cluster has 2" in note
        assert "each replica asks for 0.5 CPU instead" in note
        image = next((ham10000_fullres / "images").glob("*.jpg")).read_bytes()
        reply = requests.post(f"{url}/v1/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=120)
        assert reply.status_code == 200 and reply.json()["decision"] in ("malignant", "benign", "uncertain")
        assert running_replicas() == 4
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
