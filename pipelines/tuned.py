"""The best configuration found by ``lesion tune`` (``RUN/tune/best.yaml``), as ``train`` and ``lesion run`` apply it.

``best.yaml`` is a partial config file setting ``train.models.<arch>`` (``tune.model``, an architecture);
``pipelines.tune`` writes it. Tuning is per architecture: the settings go to every variant of ``train.models`` whose
``arch`` is the tuned one. Tuned values beat the config's (as ``--from-tune`` always did), except the fields that make
a variant what it is (``VARIANT_FIELDS``: its ``arch`` and ``balance``), so a balanced and an imbalanced variant get
the same tuned hyperparameters and keep their own balancing.
"""

from __future__ import annotations

from typing import Any

import yaml

from lesion.config import Config, ConfigError, apply_overrides
from lesion.rundir import RunDir

BEST_FILE = "best.yaml"  # in RUN/tune/
VARIANT_FIELDS = ("arch", "balance")  # a variant's own; tuning never overrides them


def best_settings(run: RunDir) -> dict[str, dict[str, Any]]:
    """``RUN/tune/best.yaml`` as ``{arch: {train field: value}}``."""
    path = run.tune / BEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lesion tune --run {run.uri}` first")
    best = yaml.safe_load(path.read_text()) or {}
    models = best.get("train", {}).get("models") if isinstance(best, dict) else None
    if not isinstance(models, dict) or not models or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f"{path}: expected train: models: <arch>: {{settings}}, got {best!r}")
    return models


def best_overrides(run: RunDir, config: Config) -> dict[str, Any]:
    """The tuned settings as config overrides (``train.models.<variant>.<field>: value``) for every variant of
    ``config`` whose architecture was tuned, leaving out the ``VARIANT_FIELDS`` a variant sets itself."""
    overrides = {}
    for arch, settings in best_settings(run).items():
        for variant in config.variants_of(arch):
            own = config.train.models.get(variant, {})
            overrides.update({f"train.models.{variant}.{key}": value for key, value in settings.items()
                              if not (key in VARIANT_FIELDS and key in own)})
    return overrides


def apply_best(config: Config, run: RunDir) -> Config:
    """``config`` with ``RUN/tune/best.yaml`` applied to every variant of each tuned architecture (see the module
    docstring: a variant keeps its own arch and balance)."""
    return apply_overrides(config, best_overrides(run, config))
