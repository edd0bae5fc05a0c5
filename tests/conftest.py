"""Shared fixtures: a local Ray, the real data folders, and a tiny ingested + trained run used by later stages."""

from __future__ import annotations

import os
import shutil

for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lesion.config import Config, config_from_dict  # noqa: E402
from lesion.rundir import RunDir  # noqa: E402

SHARED_DATA = Path(os.environ.get("LESION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAM10000 = SHARED_DATA / "ham10000"
HAM10000_FULLRES = SHARED_DATA / "ham10000-fullres"


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a real-data folder is absent."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set LESION_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def ham10000() -> Path:
    return require(HAM10000)


@pytest.fixture(scope="session")
def ham10000_fullres() -> Path:
    return require(HAM10000_FULLRES)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, small object store, no dashboard)."""
    import ray

    from pipelines.common import use_local_ray_env

    if not ray.is_initialized():
        use_local_ray_env()  # the Serve mode `lesion serve` runs on a local Ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


def tiny_config() -> Config:
    """A configuration small enough to ingest, train and evaluate in seconds on 2 cores."""
    return config_from_dict(
        {
            "data": {"source": "synthetic", "image_size": 32, "synthetic_count": 280, "seed": 0},
            "train": {
                "epochs": 3,
                "batch_size": 32,
                "lr": 2e-3,
                "workers": 2,
                "cpus_per_worker": 0.5,
                "models": {
                    "custom_cnn": {"conv_widths": [8, 16, 32, 64], "fc_widths": [64, 32]},
                    "scratch_cnn": {},
                },
            },
            "evaluate": {"bootstrap": 50, "cam_images": 4, "cam_score_images": 16},
        }
    )


@pytest.fixture(scope="session")
def ingested_run(tmp_path_factory, ray_local) -> RunDir:
    """The synthetic data set ingested at 32 px into a fresh run dir (read-only for tests)."""
    from pipelines.ingest import ingest

    run = RunDir(tmp_path_factory.mktemp("ingested") / "run")
    ingest(tiny_config(), run)
    return run


@pytest.fixture
def run(ingested_run, tmp_path) -> RunDir:
    """A private copy of ``ingested_run`` that a test may train into and change."""
    return RunDir(shutil.copytree(ingested_run.root, tmp_path / "run"))


@pytest.fixture(scope="session")
def trained_run(ingested_run, ray_local, tmp_path_factory) -> RunDir:
    """A copy of ``ingested_run`` with custom_cnn and scratch_cnn trained for 3 epochs (read-only for tests: copy
    to change); a copy, so that ``run`` stays untrained whichever fixture a session builds first."""
    from pipelines.train import train_model

    trained = RunDir(shutil.copytree(ingested_run.root, tmp_path_factory.mktemp("trained") / "run"))
    config = tiny_config()
    for name in config.train.models:
        train_model(config, trained, name)
    return trained
