"""``lesion register``: a run's ensemble as one MLflow model in the registry, or an alias moved.

``lesion register --run RUN --name NAME [--alias champion]`` logs the ensemble as a pyfunc model
(``lesion.mlflow_model``: every member, the ensemble spec of its inference mode, preprocessing, class names, model
card and data licence, with the ``lesion`` package as its code and only inference dependencies), registers a new
version of NAME and points the alias at it. ``lesion register --name NAME --version V --alias A`` moves an alias.
The MLflow run that logs the model nests under the run directory's ``lesion run`` parent when there is one; the
version's tags name the run directory, its parent run and the data licence, and its description is the model card.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from lesion.config import Config
from lesion.rundir import RunDir
from pipelines.common import resolve_config
from pipelines.tracking import (DATA_LICENCES, MANIFEST_ENTRY, client_for, ensure_experiment, link_tags, resolve_uri)

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # where the pyfunc model lies in its MLflow run's artifacts


def data_licence(run: RunDir) -> str:
    """The licence of the data the run was trained on (by its source)."""
    source = run.manifest().get("data", {}).get("config", {}).get("source")
    return f"{source}: {DATA_LICENCES.get(source, 'see the data set licence')}"


def register_run(run: RunDir, config: Config, uri: str, name: str, alias: str | None = None) -> dict[str, Any]:
    """Log ``run``'s ensemble as a pyfunc model at ``uri``, register it as a new version of ``name`` and set
    ``alias``; returns name, version, alias, the MLflow run id and the model URI."""
    import mlflow

    import lesion
    from lesion.mlflow_model import INFERENCE_REQUIREMENTS, RUN_ARTIFACT, LesionModel, slim_run

    client = client_for(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(client, uri, config.tracking.experiment)
    recorded = run.manifest().get(MANIFEST_ENTRY, {})
    parent = recorded.get("parent_run_id") if recorded.get("uri") == uri else None
    tags = {**link_tags(run), "lesion.stage": "register", **({"mlflow.parentRunId": parent} if parent else {})}
    licence = data_licence(run)
    with tempfile.TemporaryDirectory() as tmp:
        core = slim_run(run, config, Path(tmp) / RUN_ARTIFACT, licence)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register {name}", tags=tags) as active:
            mlflow.log_params({"members": ",".join(core.names), "tta": core.tta, "classes": ",".join(core.classes)})
            logged = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=LesionModel(), artifacts={RUN_ARTIFACT: str(Path(tmp) / RUN_ARTIFACT)},
                code_paths=[str(Path(lesion.__file__).parent)], pip_requirements=INFERENCE_REQUIREMENTS,
                registered_model_name=name, metadata={"classes": core.classes, "members": core.names,
                                                      "data_licence": licence})
    version = str(logged.registered_model_version)
    card = run.eval / "model_card.md"
    client.update_model_version(name, version, description=card.read_text()[:5000] if card.is_file() else licence)
    for key, value in {"lesion.run_dir": run.uri, "lesion.data_licence": licence,
                       "lesion.members": ",".join(core.names), "lesion.mlflow_run": active.info.run_id,
                       **({"lesion.parent_run": parent} if parent else {})}.items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "run_id": active.info.run_id,
            "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"}


def move_alias(uri: str, name: str, version: str, alias: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``."""
    client_for(uri).set_registered_model_alias(name, alias, version)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``lesion register``."""
    parser.add_argument("--run", help="run directory whose ensemble to register (omit with --version)")
    parser.add_argument("--config", help="config file (default: RUN/config.yaml)")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", help="alias to point at the new version (e.g. champion), or at --version")
    parser.add_argument("--version", help="move --alias to this existing version (no --run)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server or store (default: tracking.uri of the config, else $MLFLOW_TRACKING_URI)")


def run_command(name: str, args: argparse.Namespace) -> int:
    """``lesion register``: register a run's ensemble, or move an alias."""
    if bool(args.run) == bool(args.version):
        raise ValueError("give --run RUN_DIR (register a new version) or --version V --alias A (move an alias)")
    config = resolve_config(RunDir(args.run), args.config) if args.run else None
    uri = resolve_uri(args.tracking_uri, config.tracking.uri if config else None)
    if uri is None:
        raise ValueError("no MLflow registry: give --tracking-uri URI, set tracking.uri or MLFLOW_TRACKING_URI")
    if args.version:
        if not args.alias:
            raise ValueError("--version needs --alias (the alias to move)")
        move_alias(uri, args.name, args.version, args.alias)
        print(f"{args.name}@{args.alias} -> version {args.version}")
        return 0
    result = register_run(RunDir(args.run), config, uri, args.name, args.alias)
    print(f"registered {result['name']} version {result['version']}"
          + (f" as @{result['alias']}" if result["alias"] else "") + f": {result['model_uri']}")
    return 0
