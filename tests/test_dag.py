"""``lesion run`` as a graph: the plan on a simulated 8-GPU cluster and on a 2-CPU laptop, the capacity check of
every node before anything starts, two trainings at once on a local 2-CPU Ray, one failed training that leaves its
sibling's results intact, and ``lesion status``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from lesion.config import Config, apply_overrides, load_config
from lesion.rundir import RunDir
from pipelines.capacity import CapacityError, Cluster
from pipelines.cli import main
from pipelines.loop import format_duration, progress_line
from pipelines.status import read_status
from pipelines.workflow import build_graph, check_graph, plan_waves

ROOT = Path(__file__).resolve().parents[1]
HAM10000 = load_config(ROOT / "cluster" / "configs" / "ham10000.yaml")
EIGHT_GPUS = Cluster.parse('{"GPU": 8, "CPU": 64, "nodes": 2}')
LAPTOP = Cluster(cpu=2.0)


def _names(waves) -> list[list[str]]:
    return [[node.name for node in wave] for wave in waves]


def test_the_ham10000_study_runs_in_parallel_waves_on_eight_gpus():
    nodes = build_graph(HAM10000, EIGHT_GPUS)
    check_graph(nodes, EIGHT_GPUS)
    waves = _names(plan_waves(nodes, EIGHT_GPUS))
    assert waves[0] == ["ingest"] and waves[-1] == ["evaluate"]
    # tuning the custom CNN (16 trials x 0.25 GPU) runs beside a training of another architecture
    assert "tune custom_cnn" in waves[1] and len(waves[1]) == 2
    # 12 trainings (the study's grid) of 4 GPUs each on 8 GPUs: two at a time, and both variants of the tuned
    # architecture only after its tuning
    trainings = [wave for wave in waves if any(name.startswith("train ") for name in wave)]
    assert sum(len(wave) for wave in waves) == len(nodes) == 15
    assert all(len(wave) <= 2 for wave in trainings) and len(waves) == 9
    tune_wave = next(i for i, wave in enumerate(waves) if "tune custom_cnn" in wave)
    for variant in ("custom_cnn-balanced", "custom_cnn-imbalanced"):
        assert next(i for i, wave in enumerate(waves) if f"train {variant}" in wave) > tune_wave


def test_a_cap_on_parallel_trainings_is_kept():
    capped = apply_overrides(HAM10000, {"workflow.max_parallel_trainings": 1})
    waves = plan_waves(build_graph(capped, EIGHT_GPUS), EIGHT_GPUS, capped.workflow.max_parallel_trainings)
    assert all(sum(node.kind == "train" for node in wave) <= 1 for wave in waves)


def test_a_two_cpu_laptop_runs_one_stage_at_a_time():
    laptop = load_config(ROOT / "benchmarks" / "configs" / "ham10000-laptop.yaml")  # two members at 0.5 CPU per worker
    nodes = build_graph(laptop, LAPTOP)
    check_graph(nodes, LAPTOP)
    assert _names(plan_waves(nodes, LAPTOP)) == [["ingest"], ["train efficientnet_lite0"],
                                                  ["train efficientnet_lite0_96"], ["evaluate"]]


def test_the_demo_runs_two_small_trainings_at_once_on_a_two_cpu_laptop():
    waves = _names(plan_waves(build_graph(Config(), LAPTOP), LAPTOP))  # 0.25 CPU per DDP worker
    assert waves[:2] == [["ingest"], ["tune custom_cnn"]]  # tuning (4 trials) takes the laptop: nothing beside it
    assert [len(wave) for wave in waves[2:-1]] == [2, 2] and waves[-1] == ["evaluate"]


def test_a_node_that_cannot_fit_fails_before_anything_starts():
    # moved from test_workflow's resource_warnings test: the capacity model names what cannot be placed
    config = apply_overrides(Config(), {"train.workers": 4, "train.gpus_per_worker": 1.0, "train.cpus_per_worker": 0.5,
                                        "train.models": {"resnet50": {}, "custom_cnn": {}},
                                        "tune.gpus_per_trial": 0.25})
    with pytest.raises(CapacityError) as err:
        check_graph(build_graph(config, LAPTOP), LAPTOP)
    problems = str(err.value).split(" | ")
    assert len(problems) == 3  # tune custom_cnn, train resnet50, train custom_cnn: every one named
    assert "tune custom_cnn: GPU: needs 0.25" in problems[0] and "tune.gpus_per_trial" in problems[0]
    assert "train resnet50: CPU: needs 3" in problems[1]
    assert "GPU: needs 4 (train resnet50: DDP workers 4 x 1), the cluster has 0" in problems[1]
    assert "train.gpus_per_worker" in problems[1]
    check_graph(build_graph(Config(), LAPTOP), LAPTOP)  # the demo fits a 2-core laptop


def test_plan_command_prints_waves_with_resources_and_starts_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", "--run", str(run), "--config", str(ROOT / "cluster" / "configs" / "ham10000.yaml"), "--plan"]
    assert main([*argv, "--plan-gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan on 64 CPU, 8 GPU, 2 node(s): 15 stages in 9 wave(s)"), out
    assert "4 x (1 CPU, 1 GPU) DDP workers" in out and "16 x (1 CPU, 0.25 GPU) tune trials" in out
    assert main([*argv, "--cluster-resources", '{"CPU": 64, "GPU": 8, "nodes": 2}']) == 0
    assert capsys.readouterr().out == out
    assert main([*argv, "--cluster-resources", '{"CPU": 2}']) == 2  # GPU workers on a laptop: refused, named
    assert "GPU: needs" in capsys.readouterr().err
    assert not run.exists()  # a plan writes nothing


def test_progress_line_reads_like_a_sentence():
    row = {"epoch": 6, "train_loss": 0.8213, "val_balanced_accuracy": 0.612, "val_roc_auc": 0.9011,
           "images_per_second": 412.3}
    assert progress_line("resnet50-balanced", row, 40, 5.0) == (
        "resnet50-balanced  epoch 7/40  train loss 0.82  val bal.acc 0.61  val AUC 0.90  412 img/s  eta 2m45s")  # 33 epochs x 5 s
    assert format_duration(4000) == "1h06m" and format_duration(42) == "42s"


DAG = {
    "data": {"source": "synthetic", "image_size": 32, "synthetic_count": 280, "seed": 0},
    "train": {
        "epochs": 2, "batch_size": 32, "lr": 2e-3, "workers": 2, "cpus_per_worker": 0.25,
        "models": {"custom_cnn": {"conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]}, "scratch_cnn": {},
                   # fails on its worker when the model is built: the test writes a file there that the driver's
                   # check finds and no torch can read
                   "mobilenetv2": {"weights": "mobilenetv2.pth", "max_failures": 0}},
    },
    "evaluate": {"bootstrap": 20, "cam_methods": ["gradcam"], "cam_images": 4, "cam_score_images": 8},
    "workflow": {"tune": False},
}


def _window(history: pd.DataFrame) -> tuple[float, float]:
    return float((history["time"] - history["epoch_seconds"]).min()), float(history["time"].max())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_trainings_run_at_once_and_a_failed_one_leaves_the_others(tmp_path, ray_local, capfd):
    config_file = tmp_path / "dag.yaml"
    broken = tmp_path / "mobilenetv2.pth"
    broken.write_bytes(b"not a weights file")
    dag = yaml.safe_dump(DAG, sort_keys=False).replace("mobilenetv2.pth", str(broken))
    config_file.write_text(dag)  # custom_cnn and scratch_cnn start first
    run = RunDir(tmp_path / "run")
    argv = ["run", "--run", str(run.root), "--config", str(config_file)]
    assert main(argv) == 1
    captured = capfd.readouterr()  # fd level: the workers' lines reach this process through Ray's log monitor
    log_path = run.root / "logs" / "train-mobilenetv2.log"
    assert "lesion run: train mobilenetv2 failed" in captured.err and str(log_path) in captured.err, captured.err
    assert "mobilenetv2.pth" in log_path.read_text()  # the traceback names the missing file

    # both good trainings finished, were recorded, and overlapped in time (each in its own TorchTrainer)
    histories = {name: pd.read_csv(run.model_dir(name) / "history.csv") for name in ("custom_cnn", "scratch_cnn")}
    for name in histories:
        assert (run.model_dir(name) / "best.pt").is_file() and f"models/{name}" in run.manifest()
    (a_start, a_end), (b_start, b_end) = (_window(h) for h in histories.values())
    assert a_start < b_end and b_start < a_end, f"no overlap: {histories}"
    shown = captured.out + captured.err
    assert shown.count("custom_cnn  epoch 2/2  train loss") == 1  # one progress line per epoch, once
    assert "Reporting training result" not in shown  # Ray Train's per-report dictionaries are off without -v

    status = {row.name: row.status for row in read_status(run)["rows"]}
    assert status == {"ingest": "done", "train custom_cnn": "done", "train scratch_cnn": "done",
                      "train mobilenetv2": "failed", "evaluate": "blocked"}, status
    assert main(["status", "--run", str(run.root)]) == 1
    shown = capfd.readouterr().out
    assert "state: failed" in shown and f"train mobilenetv2 failed; log: {log_path}" in shown

    # a re-run retries only the failed node: the others are current
    before = {name: run.manifest()[f"models/{name}"] for name in histories}
    assert main(argv) == 1
    again = {row.name: row.status for row in read_status(run)["rows"]}
    assert again == {"ingest": "current", "train custom_cnn": "skipped", "train scratch_cnn": "skipped",
                     "train mobilenetv2": "failed", "evaluate": "blocked"}, again
    assert {name: run.manifest()[f"models/{name}"] for name in histories} == before


@pytest.mark.timeout(300)
def test_train_on_gpus_the_cluster_lacks_fails_at_once_naming_the_setting(run, ray_local, capsys):
    assert main(["train", "--run", str(run.root), "--model", "scratch_cnn", "--gpu"]) == 2
    err = capsys.readouterr().err
    assert "train scratch_cnn cannot start on this cluster: GPU: needs 2" in err and "the cluster has 0" in err
    assert "train.gpus_per_worker" in err
    assert not run.model_dir("scratch_cnn").exists()  # no worker started, nothing written
