"""``lesion train`` through Ray Train with 2 CPU workers on the tiny synthetic run: artefacts, the best weights,
class balance, a killed worker, determinism and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_config
from faults import REGISTERED_FILE, KillWorkerOnce
from lesion.config import TrainConfig, apply_overrides, dump_yaml
from lesion.data.shards import load_split, read_info
from lesion.models import load_trained
from lesion.rundir import RunDir
from lesion.training import LoopSettings, array_batches, predict_logits, validation_metrics
from pipelines.train import RAY_RUN_NAME, ray_storage, train_model

NAME = "custom_cnn"
DETERMINISM_RTOL = 1e-5  # two 2-worker runs with one seed: losses and metrics agree to this relative tolerance


def config(**train):
    """The tiny config with ``train`` settings for the custom CNN."""
    return apply_overrides(tiny_config(), {f"train.models.{NAME}.{k}": v for k, v in train.items()})


def history_of(run: RunDir) -> list[dict]:
    return json.loads((run.model_dir(NAME) / "history.json").read_text())


def seen_shares(history: list[dict], classes: list[str]) -> np.ndarray:
    seen = np.array([[row[f"seen_{c}"] for c in classes] for row in history]).sum(axis=0)
    return seen / seen.sum()


@pytest.mark.timeout(300)
def test_two_workers_train_and_write_the_best_model(run):
    result = train_model(config(balance="weights"), run, NAME)
    folder = run.model_dir(NAME)
    history = history_of(run)
    train_rows = read_info(run.root).split_rows("train")

    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(row["images"] == 2 * (train_rows // 2) for row in history)  # each epoch covers the split
    for name in ("best.pt", "model.json", "config.yaml", "history.csv", "learning_curve.png"):
        assert (folder / name).stat().st_size > 0, name
    assert list((folder / "tb").glob("events.out.tfevents.*"))
    assert TrainConfig(**yaml.safe_load((folder / "config.yaml").read_text())).balance == "weights"
    assert run.manifest()[f"models/{NAME}"]["run_id"] == result["run_id"]

    model, checkpoint = load_trained(folder)
    assert checkpoint.best_epoch == result["best_epoch"] and checkpoint.pretrained_origin == "scratch"
    assert checkpoint.num_classes == 7 and checkpoint.input_size == 32
    # best.pt holds the best epoch's weights, and validation under DDP scored every image exactly once
    assert_best_pt_scores_as_recorded(run, history, result["best_epoch"])


def assert_best_pt_scores_as_recorded(run: RunDir, history: list[dict], best_epoch: int) -> None:
    """Scoring the validation split again with best.pt in one process gives the numbers the best epoch recorded."""
    model, checkpoint = load_trained(run.model_dir(NAME))
    best = next(row for row in history if row["epoch"] == best_epoch)
    val = load_split(run.root, "val")
    settings = LoopSettings("multiclass", 7, checkpoint.mean, checkpoint.std, 32, torch.device("cpu"))
    logits, labels = predict_logits(model, array_batches(val.images, val.labels, 50), settings)
    again = validation_metrics(logits, labels, "multiclass", 7)
    for key in ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_roc_auc"):
        assert again[key] == pytest.approx(best[key], rel=1e-4, abs=1e-6), key


@pytest.mark.timeout(300)
def test_with_train_ema_the_averaged_weights_are_validated_kept_and_saved(run):
    result = train_model(config(ema=0.9, epochs=3), run, NAME)
    history = history_of(run)
    assert_best_pt_scores_as_recorded(run, history, result["best_epoch"])  # what was validated is what is saved
    states = [torch.load(f, map_location="cpu", weights_only=True)
              for f in Path(ray_storage(run, NAME)).rglob("train_state.pt")]
    raw = max(states, key=lambda state: state["epoch"])  # the last checkpoint
    saved, _ = load_trained(run.model_dir(NAME))
    averaged = raw["ema"]
    name = next(k for k in raw["model"] if k.endswith("weight"))
    assert not torch.equal(saved.state_dict()[name], raw["model"][name])  # not the raw weights ...
    if raw["epoch"] == result["best_epoch"]:  # ... but the average, when the last epoch was the best
        assert torch.equal(saved.state_dict()[name], averaged[f"module.{name}"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_oversampling_balances_classes_and_two_worker_runs_agree(run):
    classes = read_info(run.root).classes
    counts = read_info(run.root).counts["train"]
    data_shares = np.array([counts[c] for c in classes]) / sum(counts.values())
    assert data_shares.max() > 0.25  # nv dominates the synthetic split

    cfg = config(balance="oversample", epochs=2)
    train_model(cfg, run, NAME)
    first = history_of(run)
    train_model(cfg, run, NAME)
    second = history_of(run)

    shares = seen_shares(first, classes)
    assert np.all(np.abs(shares - 1 / 7) < 0.06), shares  # drawn evenly, whatever the split's imbalance
    for a, b in zip(first, second):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_balanced_accuracy", "val_roc_auc"):
            assert b[key] == pytest.approx(a[key], rel=DETERMINISM_RTOL), key
        assert [a[f"seen_{c}"] for c in classes] == [b[f"seen_{c}"] for c in classes]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_worker_resumes_from_the_last_checkpoint(run, tmp_path):
    marker = tmp_path / "fault-injected"
    snapshot = Path(ray_storage(run, NAME)) / RAY_RUN_NAME / REGISTERED_FILE
    kill = KillWorkerOnce(epoch=1, marker=marker, snapshot=snapshot)  # the last worker exits in epoch 1, once
    result = train_model(config(epochs=3), run, NAME, step_hook=kill)
    history = history_of(run)
    assert marker.exists()  # the failure did happen
    assert [row["epoch"] for row in history] == [0, 1, 2]  # epoch 0 was not trained again
    assert [row["attempt"] for row in history] == [0, 1, 1]  # epochs 1-2 ran on the restarted worker group
    assert result["attempts"] == 2 and (run.model_dir(NAME) / "best.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_trains_with_flags_and_the_tuned_config(run):
    dump_yaml(tiny_config().to_dict(), run.root / "config.yaml")
    run.tune.mkdir()
    (run.tune / "best.yaml").write_text(yaml.safe_dump({"train": {"models": {NAME: {"lr": 7e-4, "fc_widths": [48, 24]}}}}))
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--run", str(run.root), "--model", NAME,
                           "--from-tune", "--epochs", "1", "--workers", "1", "--balance", "oversample"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NAME in done.stdout and "scratch" in done.stdout
    used = yaml.safe_load((run.model_dir(NAME) / "config.yaml").read_text())
    assert used["lr"] == 7e-4 and used["epochs"] == 1 and used["workers"] == 1 and used["balance"] == "oversample"
    assert json.loads((run.model_dir(NAME) / "model.json").read_text())["arch_kwargs"]["fc_widths"] == [48, 24]
    assert len(history_of(run)) == 1


def test_arrow_image_columns_are_viewed_without_copies():
    import pyarrow as pa

    from lesion.data.shards import arrow_images

    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    column = pa.array([im.tobytes() for im in images], type=pa.binary())
    view = arrow_images(pa.chunked_array([column]), 4)
    assert np.array_equal(view, images) and not view.flags.owndata  # a view of the Arrow buffer
    assert np.array_equal(arrow_images(column.slice(1, 3), 4), images[1:4])  # sliced batches keep their offset
    assert np.array_equal(arrow_images(pa.chunked_array([column.slice(0, 2), column.slice(2)]), 4), images)


def fake_session(cache_mb: int, rows: int = 40, val_rows: int = 12):
    """A Train session over in-memory 'shards' of 1-pixel images numbered 0..rows-1, counting its Ray Data reads."""
    from types import SimpleNamespace

    from pipelines.loop import TrainSession, keeps_data

    session = object.__new__(TrainSession)
    session.rank, session.world_size = 0, 2
    session.loop = SimpleNamespace(train=SimpleNamespace(batch_size=8, seed=0, cache_mb=cache_mb), train_rows=2 * rows,
                                   val_rows=val_rows, image_size=1)
    session.kept, session.keeps = {}, keeps_data(session.loop, 2)
    session.reads = []
    data = {"train": np.arange(rows), "val": np.arange(100, 100 + val_rows)}

    def read(name, batch_size, **kwargs):
        session.reads.append(name)
        order = np.random.default_rng(len(session.reads)).permutation(data[name]) if name == "train" else data[name]
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            yield torch.from_numpy(np.repeat(ids.astype(np.uint8).reshape(-1, 1, 1, 1), 3, axis=3)), torch.from_numpy(ids)

    session._batches = read
    return session


def epoch_rows(batches) -> list[int]:
    return [int(i) for images, labels in batches for i in labels]


def test_a_worker_reads_a_small_share_once_and_replays_it_reshuffled_every_later_epoch():
    session = fake_session(cache_mb=1)
    epochs = [epoch_rows(session.train_batches(epoch)) for epoch in range(3)]
    vals = [epoch_rows(session.val_batches()) for _ in range(3)]
    assert session.reads == ["train", "val"]  # Ray Data's streaming read started once per split, not per epoch
    assert all(sorted(rows) == list(range(40)) for rows in epochs)  # the same share every epoch ...
    assert epochs[1] != epochs[2]  # ... in a new order
    assert vals[0] == vals[1] == vals[2] == list(range(100, 112))  # validation replayed in order


def test_a_share_over_train_cache_mb_is_streamed_every_epoch():
    session = fake_session(cache_mb=0)
    for epoch in range(3):
        assert sorted(epoch_rows(session.train_batches(epoch))) == list(range(40))
    assert session.reads == ["train"] * 3 and not session.kept
