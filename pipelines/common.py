"""Pieces every stage shares: connecting to Ray and resolving the configuration of a run."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from lesion.config import Config, apply_overrides, dump_yaml, flatten, load_config, read_config_file
from lesion.rundir import RunDir

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # the configuration a run was made with, beside manifest.json

# For a Ray this process starts on one machine: Serve's throughput-optimised mode (the ingress replica serves HTTP on
# a port of its own; set the variable to 0 to keep the proxy, and on a `ray start` cluster set it on every node), no
# ingress draining wait, no Train preemption watcher, one Parquet footer reader. Why: docs/decisions.md, "Local Ray
# environment".
LOCAL_RAY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def use_local_ray_env() -> None:
    """Put ``LOCAL_RAY_ENV`` into this process's environment (values already set win), before a local ``ray.init``:
    the Ray processes that start read it."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to a Ray cluster (``address`` or ``$RAY_ADDRESS``), or start a local one.

    A local start uses ``address="local"`` so that a cluster started elsewhere with ``ray start`` is never joined by
    accident, with the dashboard (8265, or the next free port): Ray's State API lives there, and Ray Train's
    placement-group cleaner warns every second without it, and with ``LOCAL_RAY_ENV``. Calling it when Ray is already
    up does nothing.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    use_local_ray_env()
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
    config, _ = resolve_config_sources(run, config_path, overrides)
    if save:
        record_run_config(run, config)
        log.info("recorded this configuration as the run's config: %s", run.root / RUN_CONFIG)
    return config


def resolve_config_sources(run: RunDir, config_path: str | None = None,
                           overrides: dict[str, Any] | None = None) -> tuple[Config, dict[str, str]]:
    """What ``resolve_config`` returns, and where each value came from: ``{dotted.path: source}`` for every leaf of
    the config, the source being ``flag``, ``--config FILE``, ``run config RUN/config.yaml`` or ``default``."""
    saved = run.root / RUN_CONFIG
    base, label = ((Path(config_path), f"--config {config_path}") if config_path
                   else (saved, f"run config {saved}") if saved.is_file() else (None, "default"))
    from_file = flatten(read_config_file(base)) if base else {}
    config = load_config(base)
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    config = apply_overrides(config, flags)
    sources = {}
    for path in flatten(config.to_dict()):
        if any(_covers(key, path) for key in flags):
            sources[path] = "flag"
        elif any(_covers(key, path) for key in from_file):
            sources[path] = label
        else:
            sources[path] = "default"
    return config, sources


def _covers(key: str, path: str) -> bool:
    """Whether setting ``key`` set the leaf ``path`` (itself, or a mapping above it)."""
    return path == key or path.startswith(key + ".")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["data.root=/x", "train.epochs=3"]`` -> ``{"data.root": "/x", "train.epochs": 3}`` (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


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


class StageTimes:
    """Wall-clock seconds per named stage of a command: ``with times("scoring"): ...``; ``str(times)`` reads
    ``scoring 41.2 s, metrics 3.0 s (total 44.2 s)``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        parts = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.seconds.items())
        return f"{parts} (total {sum(self.seconds.values()):.1f} s)"


def add_model_source_arguments(parser) -> None:
    """``--model-uri``, ``--engine`` and ``--site``: where a command's trained models come from, what runs them and
    the site they are calibrated for."""
    from lesion.vocabulary import ENGINES

    parser.add_argument("--model-uri", metavar="URI",
                        help="trained models: a run directory, an export bundle (lesion export) or models:/NAME@ALIAS "
                             "(instead of --run)")
    parser.add_argument("--engine", choices=ENGINES,
                        help="what runs the models' forward passes (default: inference.engine, torch); Grad-CAM "
                             "always runs on torch")
    parser.add_argument("--site", metavar="NAME",
                        help="a site profile of the models (lesion calibrate; default: inference.site, none)")


def model_uri_of(args) -> str:
    """The models a command uses: ``--model-uri``, else ``--run``."""
    uri, run = getattr(args, "model_uri", None), getattr(args, "run", None)
    if uri and run and Path(uri).resolve() != Path(run).resolve():
        raise ValueError("give --run RUN_DIR or --model-uri URI, not both")
    if not (uri or run):
        raise ValueError("give --run RUN_DIR or --model-uri URI (a run directory, an export bundle or "
                         "models:/NAME@ALIAS)")
    return str(uri or run)


def models_config(args, overrides: dict[str, Any] | None = None) -> Config:
    """The config of a command that uses trained models: a run's (``resolve_config``, ``--save-config`` honoured),
    else for a bundle ``--config`` or the defaults, for a registered model ``--config`` or the config of the run it
    was registered from; then the flags, ``--engine`` among them."""
    from lesion.resolve import is_bundle, registered_run

    uri = model_uri_of(args)
    flags = {**(overrides or {}), "inference.engine": getattr(args, "engine", None),
             "inference.site": getattr(args, "site", None)}
    if uri.startswith("models:/") or is_bundle(uri):
        if getattr(args, "save_config", False):
            raise ValueError("--save-config records a run's config: it needs --run, not a bundle")
        config_path = getattr(args, "config", None)
        if not config_path and uri.startswith("models:/"):
            recorded = registered_run(uri) / RUN_CONFIG  # its ensemble spec was fitted for these settings
            config_path = recorded if recorded.is_file() else None
        return apply_overrides(load_config(config_path) if config_path else Config(), flags)
    return resolve_config(RunDir(uri), getattr(args, "config", None), flags,
                          save=getattr(args, "save_config", False))


def core_from_args(args, config: Config, **kwargs):
    """The inference core of a command's ``--model-uri`` / ``--run`` with ``config`` (its engine included);
    ``kwargs`` go to ``lesion.resolve.load_inference`` (models, tta, device, load)."""
    from lesion.resolve import load_inference

    return load_inference(model_uri_of(args), config, **kwargs)


def inference_actor_options(config: Config) -> dict[str, Any]:
    """``map_batches`` arguments of the batch-inference actors that run the inference core (``evaluate`` and
    ``predict`` alike): ``evaluate.actors`` actors of ``evaluate.cpus_per_actor`` / ``evaluate.gpus_per_actor``, batches
    of ``evaluate.batch_size``."""
    import ray

    ev = config.evaluate
    return {"compute": ray.data.ActorPoolStrategy(size=ev.actors), "num_cpus": ev.cpus_per_actor,
            "num_gpus": ev.gpus_per_actor, "batch_size": ev.batch_size}


def load_core_in_actor(core, use_gpu: bool, threads: int | None = None):
    """Load an unloaded inference core's members inside a batch-inference actor: on the GPU when it was given one
    (``use_gpu``) and CUDA is there, else on the CPU with ``threads`` torch threads (None: Ray's default)."""
    import torch

    from lesion.models import set_cpu_threads

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    set_cpu_threads(threads, device)
    return core.load(device=device)
