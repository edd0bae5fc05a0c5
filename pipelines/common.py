"""Pieces every stage shares: connecting to Ray and resolving the configuration of a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lesion.config import Config, apply_overrides, dump_yaml, load_config
from lesion.rundir import RunDir

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # the configuration a run was made with, beside manifest.json


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address`` or ``$RAY_ADDRESS``), or start a local one.

    A local start uses ``address="local"`` so that a cluster started elsewhere with ``ray start`` is never joined by
    accident, with the dashboard (8265, or the next free port): Ray's State API lives there, and Ray Train's
    placement-group cleaner warns every second without it. Calling it when Ray is already up does nothing.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": True}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    ray.init(**kwargs)


def resolve_config(run: RunDir, config_path: str | None = None, overrides: dict[str, Any] | None = None, *,
                   save: bool = False) -> Config:
    """The configuration of a command: ``--config`` file, else the run's recorded config, else the defaults; then
    flags. A command's flags apply to that command only; with ``save`` (``--save-config``) the result becomes the
    run's recorded config."""
    saved = run.root / RUN_CONFIG
    if config_path:
        config = load_config(config_path)
    elif saved.is_file():
        config = load_config(saved)
    else:
        config = Config()
    config = apply_overrides(config, overrides or {})
    if save:
        record_run_config(run, config)
        log.info("recorded this configuration as the run's config: %s", saved)
    return config


def record_run_config(run: RunDir, config: Config) -> None:
    """Record ``config`` as the run's configuration (``RUN_DIR/config.yaml``): only the command that creates a run,
    ``lesion run --config``, ``--save-config`` and ``lesion config set`` call this."""
    run.root.mkdir(parents=True, exist_ok=True)
    dump_yaml(config.to_dict(), run.root / RUN_CONFIG)


def ensure_local_path(path: str | Path) -> Path:
    """A local filesystem path, with a clear error for URIs where only local paths are supported."""
    text = str(path)
    if "://" in text:
        raise ValueError(f"{text}: only local paths are supported here")
    return Path(text).expanduser().resolve()
