"""Where a trained model comes from: the one resolver that turns a URI into the one inference core.

``load_inference(uri)`` takes a run directory (``RUN/models/*/best.pt``), an export bundle (``lesion export``: a
folder with ``metadata.json``) or a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``: the
``lesion[mlflow]`` extra) and returns ``lesion.inference.Inference`` with the chosen engine as its member loader
(``lesion.engines``). Every command and ``lesion.load`` come through here; nothing else finds models its own way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from lesion import ensemble
from lesion.config import Config, DataConfig, config_from_dict, load_config
from lesion.engines import loader_for
from lesion.inference import Inference
from lesion.rundir import RunDir
from lesion.sites import load_site


BUNDLE_METADATA = "metadata.json"
EXPORT_CACHE = "export-cache"  # RUN/export-cache/<checkpoint sha256>.onnx: run members exported for ONNX Runtime
RUN_CONFIG = "config.yaml"


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is an export bundle (a folder with ``metadata.json``)."""
    return (Path(path) / BUNDLE_METADATA).is_file()


def _config_of(config: Config | str | Path | None, recorded: Path | None) -> Config:
    """``config`` as a Config: given, a file, else the one recorded with the models, else the defaults."""
    if isinstance(config, Config):
        return config
    if config is not None:
        return load_config(config)
    return load_config(recorded) if recorded is not None and recorded.is_file() else Config()


def load_inference(uri: str | Path, config: Config | str | Path | None = None, *, engine: str | None = None,
                   device: str = "cpu", models: list[str] | None = None, tta: bool | None = None,
                   load: bool = True, site: str | None = None) -> Inference:
    """The inference core of the models at ``uri``: a run directory, an export bundle or ``models:/NAME@ALIAS``.

    ``config``: a Config or config file (default: the run's ``config.yaml``; for a bundle, the defaults beside the
    settings it carries); ``engine``: ``torch`` or ``onnxruntime`` (default: ``config.inference.engine``);
    ``models``: a subset of a run's trained models (a bundle is one ensemble: all of its members); ``tta``: a run's
    inference mode (default: ``config.evaluate.tta``; a bundle carries the spec of the mode it was exported with);
    ``load``: load every member on ``device`` now (else each process calls ``core.load``, e.g. in Ray actors);
    ``site``: a site profile of the models (``lesion calibrate``; default: ``config.inference.site``).
    """
    text = str(uri)
    if text.startswith("models:/"):
        uri = registered_run(text)
    path = Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or export bundle")
    bundle = is_bundle(path)
    resolved = _config_of(config, None if bundle else path / RUN_CONFIG)
    if bundle:
        core, int8 = bundle_core(path, resolved, models, tta)
        cache = None
    else:
        core = Inference.from_run(RunDir(path), resolved, models, tta=tta, device=device, load=False)
        int8, cache = False, path / EXPORT_CACHE
    engine = engine or resolved.inference.engine
    loader = loader_for(engine, cache, threads=resolved.inference.threads, int8=int8 and engine == "onnxruntime")
    core = dataclasses.replace(core, loader=loader)
    site = resolved.inference.site if site is None else site
    if site:
        core = core.with_site(load_site(path, site))
    return core.load(device=device) if load else core


def read_metadata(bundle: str | Path) -> dict:
    """A bundle's ``metadata.json``."""
    path = Path(bundle) / BUNDLE_METADATA
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable bundle metadata file ({exc})") from exc


def bundle_core(bundle: Path, config: Config, models: list[str] | None, tta: bool | None
                ) -> tuple[Inference, bool]:
    """The (unloaded) core of an export bundle, and whether its members carry INT8 ONNX files."""
    meta = read_metadata(bundle)
    spec = ensemble.load(bundle / meta["ensemble"]["file"])
    members = meta["members"]
    if models is not None and sorted(models) != sorted(members):
        raise ValueError(f"{bundle}: a bundle is one ensemble ({', '.join(members)}); it cannot serve a subset "
                         f"({', '.join(models)}): export a run with those models only")
    if tta is not None and bool(tta) != spec.tta:
        raise ValueError(f"{bundle}: exported for {'flip TTA' if spec.tta else 'a single pass'}; its thresholds do "
                         f"not hold for {'flip TTA' if tta else 'a single pass'}")
    data_config: DataConfig = config_from_dict({"data": meta["preprocessing"]["data_config"]}).data
    model_dirs = {name: str(bundle / members[name]["path"]) for name in spec.models}
    core = Inference(spec, data_config, model_dirs, str(bundle / meta["ensemble"]["file"]),
                     config.evaluate.batch_size)
    return core, bool(meta.get("quantization"))


@functools.lru_cache(maxsize=8)
def registered_run(uri: str) -> Path:
    """A registered model's run directory (the ``run`` artifact of ``lesion.mlflow_model``), downloaded by MLflow
    once per process and URI."""
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError:
        raise ImportError(f"{uri}: registry URIs need the MLflow extra: pip install 'lesion[mlflow]'") from None
    root = Path(download_artifacts(artifact_uri=uri))
    run = root / "artifacts" / "run"
    if not run.is_dir():
        raise FileNotFoundError(f"{uri}: the registered model has no 'run' artifact (log it with lesion's MLflow "
                                f"support); downloaded to {root}")
    return run
