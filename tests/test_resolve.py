"""The one resolver (``lesion.resolve.load_inference``): a run directory or an export bundle becomes the one
inference core on the chosen engine; commands take ``--model-uri`` and ``--engine`` and need no run directory."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from lesion.config import Config, apply_overrides
from lesion.export import export_bundle
from lesion.resolve import EXPORT_CACHE, load_inference
from pipelines.cli import main
from test_export import make_mini_run


@pytest.fixture(scope="module")
def run_and_bundle(ham10000, tmp_path_factory):
    root = tmp_path_factory.mktemp("resolve")
    run = make_mini_run(root / "run", ham10000)
    export_bundle(run.root, root / "bundle")
    return run, root / "bundle"


def test_a_bundle_and_its_run_give_the_same_answers_on_every_engine(run_and_bundle, ham10000):
    run, bundle = run_and_bundle
    image = sorted((ham10000 / "images").glob("*.jpg"))[3].read_bytes()
    answers = {}
    for uri in (run.root, bundle):
        for engine in ("torch", "onnxruntime"):
            core = load_inference(uri, engine=engine)
            assert core.engine == engine and core.names == ["custom_cnn", "scratch_cnn"]
            answers[(str(uri), engine)] = core.predict(core.preprocess(image)[None])[0]
    reference = answers[(str(run.root), "torch")]
    for answer in answers.values():
        assert answer["decision"] == reference["decision"]
        assert abs(answer["malignant_probability"] - reference["malignant_probability"]) <= 1e-4
    cached = list((run.root / EXPORT_CACHE).glob("*.onnx"))
    assert len(cached) == 2  # the run's members exported once into its cache, keyed by checkpoint sha256


def test_the_engine_comes_from_the_config_unless_given(run_and_bundle):
    _, bundle = run_and_bundle
    config = apply_overrides(Config(), {"inference.engine": "onnxruntime"})
    assert load_inference(bundle, config, load=False).engine == "onnxruntime"
    assert load_inference(bundle, config, engine="torch", load=False).engine == "torch"
    assert load_inference(bundle, load=False).engine == "torch"


def test_a_bundle_is_one_ensemble_in_one_mode(run_and_bundle):
    _, bundle = run_and_bundle
    with pytest.raises(ValueError, match="cannot serve a subset"):
        load_inference(bundle, models=["custom_cnn"])
    with pytest.raises(ValueError, match="exported for a single pass"):
        load_inference(bundle, tta=True)


def test_unknown_places_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such run directory or export bundle"):
        load_inference(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "mlflow.artifacts", None)  # as without the extra
    with pytest.raises(ImportError, match=r"lesion\[mlflow\]"):
        load_inference("models:/lesion@champion")


def test_predict_and_explain_from_a_bundle_without_a_run(run_and_bundle, ham10000, tmp_path, capsys):
    _, bundle = run_and_bundle
    image = sorted((ham10000 / "images").glob("*.jpg"))[5]
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model-uri", str(bundle), "--engine", "onnxruntime", str(image), "--out",
                 str(out)]) == 0
    table = pd.read_csv(out)
    assert table["status"].tolist() == ["ok"] and 0 <= table["malignant_probability"][0] <= 1
    overlay = tmp_path / "cam.png"
    assert main(["explain", "--model-uri", str(bundle), "--engine", "onnxruntime", "--image", str(image),
                 "--out", str(overlay)]) == 0
    assert overlay.stat().st_size > 0 and "gradcam overlay" in capsys.readouterr().out
    assert main(["predict", "--model-uri", str(bundle), str(image), "--save-config"]) == 2
    assert "--save-config records a run's config" in capsys.readouterr().err
    assert np.isfinite(table["ensemble:mel"][0])
