"""The best configuration found by ``lesion tune`` (``RUN/tune/best.yaml``), as ``train`` and ``lesion run`` apply it.

``best.yaml`` is a partial config file setting ``train.models.<model>``; ``pipelines.tune`` writes it.
"""

from __future__ import annotations

from typing import Any

import yaml

from lesion.config import Config, ConfigError, apply_overrides
from lesion.rundir import RunDir

BEST_FILE = "best.yaml"  # in RUN/tune/


def best_overrides(run: RunDir) -> dict[str, Any]:
    """``RUN/tune/best.yaml`` as config overrides (``train.models.<name>.<field>: value``)."""
    path = run.tune / BEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lesion tune --run {run.uri}` first")
    best = yaml.safe_load(path.read_text()) or {}
    models = best.get("train", {}).get("models") if isinstance(best, dict) else None
    if not isinstance(models, dict) or not models or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f"{path}: expected train: models: <name>: {{settings}}, got {best!r}")
    return {f"train.models.{name}.{key}": value for name, values in models.items() for key, value in values.items()}


def apply_best(config: Config, run: RunDir) -> Config:
    """``config`` with ``RUN/tune/best.yaml`` (the best trial's settings per model) applied."""
    return apply_overrides(config, best_overrides(run))
