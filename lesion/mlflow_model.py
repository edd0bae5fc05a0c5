"""A run's ensemble as one MLflow pyfunc model whose ``predict`` is the inference core.

The model's one artifact, ``run``, is a slim run directory (``slim_run``): every member's ``best.pt`` and
``model.json``, the ensemble spec of the inference mode, the data record and the manifest (the preprocessing ingest
recorded), the config, the model card and the data licence. ``LesionModel.load_context`` builds the same
``lesion.inference.Inference`` from it that ``lesion predict`` builds from the run, so they cannot disagree. The code
travels with the model (``code_paths``: the ``lesion`` package); its requirements are the inference dependencies only
(``INFERENCE_REQUIREMENTS``), not Ray.

``predict`` takes encoded image bytes: one, a list, or a one-column DataFrame; it returns a DataFrame with one row
per image: ``label``, ``malignant_probability``, ``decision``, ``decision_reason`` and ``probabilities`` (class ->
calibrated probability).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesion.config import Config, dump_yaml
from lesion.inference import Inference, spec_path
from lesion.rundir import RunDir
from lesion.sites import copy_sites

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # lesion imports without the mlflow extra; logging or loading a model needs it
    PythonModel = object

RUN_ARTIFACT = "run"  # the artifact key of the slim run directory
LICENCE_FILE = "DATA_LICENCE.txt"
REGISTRY_URI = re.compile(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))")  # models:/NAME@ALIAS or models:/NAME/VERSION
INFERENCE_REQUIREMENTS = ["torch>=2.9", "torchvision>=0.24", "timm>=1.0", "numpy", "scipy", "pandas>=2.0",
                          "pillow>=10", "opencv-python-headless>=4.8", "pyarrow>=15", "pyyaml>=6",
                          "mlflow-skinny>=3.0"]


def slim_run(run: RunDir, config: Config, dest: Path, licence: str) -> Inference:
    """Copy into ``dest`` what the inference core of ``run`` needs (fitting the spec first when it is out of date);
    returns the core built from the copy."""
    core = Inference.from_run(run, config, load=False)
    dest.mkdir(parents=True, exist_ok=True)
    for name, folder in core.model_dirs.items():
        target = dest / "models" / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ("best.pt", "model.json", "config.yaml"):
            if (Path(folder) / file).is_file():
                shutil.copy2(Path(folder) / file, target / file)
    copy = RunDir(dest)
    spec_target = spec_path(copy, core.names, core.tta)
    spec_target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(core.spec_file, spec_target)
    (dest / "data").mkdir(exist_ok=True)
    shutil.copy2(run.data / "info.json", dest / "data" / "info.json")
    shutil.copy2(run.manifest_path, dest / "manifest.json")
    for file in ("model_card.md", "report.html"):
        if (run.eval / file).is_file():
            shutil.copy2(run.eval / file, dest / "eval" / file)
    dump_yaml(config.to_dict(), dest / "config.yaml")
    copy_sites(run.root, dest)
    (dest / LICENCE_FILE).write_text(licence + "\n")
    return core_of(dest)


def core_of(root: str | Path) -> Inference:
    """The inference core of a slim run directory through the one resolver (all members loaded, on the CPU)."""
    from lesion.resolve import load_inference

    return load_inference(root)


def registered_version(uri: str) -> dict[str, str | None]:
    """The version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names now, in the registry at
    ``$MLFLOW_TRACKING_URI``: ``name``, ``version``, ``alias`` (or None), ``run_id`` (the MLflow run that logged it)
    and ``uri`` pinned to that version (``models:/NAME/VERSION``: an alias moved later does not change it)."""
    match = REGISTRY_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri}: expected a registered model as models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match.groups()
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ImportError(f"{uri}: registry URIs need the MLflow extra: pip install 'lesion[mlflow]'") from None
    client = MlflowClient()
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return {"name": name, "version": str(found.version), "alias": alias, "run_id": found.run_id,
            "uri": f"models:/{name}/{found.version}"}


def image_bytes(model_input: Any) -> list[bytes]:
    """Encoded images from one bytes object, a list of them, or a one-column DataFrame (or Series)."""
    if isinstance(model_input, (bytes, bytearray)):
        return [bytes(model_input)]
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected a one-column DataFrame of encoded image bytes; got columns "
                             f"{list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    items = list(model_input)
    bad = [type(item).__name__ for item in items if not isinstance(item, (bytes, bytearray))]
    if bad:
        raise ValueError(f"expected encoded image bytes (JPEG, PNG, ...); got {bad[0]}")
    return [bytes(item) for item in items]


def answer_frame(answers: list[dict]) -> pd.DataFrame:
    """The pyfunc output: one row per answer."""
    return pd.DataFrame([{"label": a["predicted_class"], "malignant_probability": a["malignant_probability"],
                          "decision": a["decision"], "decision_reason": a["decision_reason"],
                          "probabilities": a["probabilities"]} for a in answers])


class LesionModel(PythonModel):
    """The pyfunc wrapper of the inference core."""

    def load_context(self, context) -> None:
        self.core = core_of(context.artifacts[RUN_ARTIFACT])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Answers for encoded images (see the module's docstring)."""
        images = np.stack([self.core.preprocess(data) for data in image_bytes(model_input)])
        return answer_frame(self.core.predict(images))
