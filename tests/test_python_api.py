"""The Python API (``lesion.load``, ``Classifier.predict`` / ``explain``) on the session's trained run: every input
kind gives the answer of the inference core, typed and frozen; explanations carry the heat map and its overlay; the
docstring examples run as doctests; ``import lesion`` stays light."""

from __future__ import annotations

import dataclasses
import doctest
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lesion
import lesion.api
from lesion.data.preprocess import decode_image
from lesion.data.synthetic import generate
from lesion.rundir import RunDir


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory) -> RunDir:
    """A writable copy of the trained run (loading may fit and save the ensemble spec)."""
    return RunDir(shutil.copytree(trained_run.root, tmp_path_factory.mktemp("python-api") / "run"))


@pytest.fixture(scope="module")
def clf(run_copy) -> lesion.Classifier:
    return lesion.load(run_copy.root)


@pytest.fixture(scope="module")
def jpegs(ham10000_fullres) -> list[Path]:
    return sorted((ham10000_fullres / "images").glob("*.jpg"))[:3]


def test_public_names_come_from_lesion():
    assert {"load", "Classifier", "Prediction", "Explanation", "ImageError"} <= set(dir(lesion))
    assert lesion.Prediction is lesion.api.Prediction and lesion.ImageError.__module__ == "lesion.data.preprocess"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lesion.Nope  # noqa: B018


def test_import_lesion_loads_neither_torch_nor_ray():
    code = "import sys, lesion; print(sorted(m for m in ('torch', 'ray', 'cv2', 'pydicom') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_every_input_kind_gives_the_core_answer(clf, jpegs):
    jpeg = jpegs[0]
    pixels = decode_image(jpeg)
    expected = clf.core.predict(clf.core.preprocess(jpeg.read_bytes())[None])[0]
    inputs = [str(jpeg), jpeg, jpeg.read_bytes(), Image.open(jpeg), pixels]
    for given, prediction in zip(inputs, clf.predict(inputs)):
        assert isinstance(prediction, lesion.Prediction)
        assert prediction.probabilities == pytest.approx(expected["probabilities"], abs=1e-6), type(given)
        assert prediction.label == expected["predicted_class"] and prediction.decision == expected["decision"]
        for name, probs in prediction.model_probabilities.items():
            assert probs == pytest.approx(expected["models"][name], abs=1e-6)
    assert clf.predict(jpeg).source == str(jpeg) and clf.predict(pixels).source is None


def test_prediction_is_typed_frozen_and_says_why(clf, jpegs):
    predictions = clf.predict([*jpegs, next(generate(1, 64, seed=1))["image"]])
    assert len(predictions) == len(jpegs) + 1
    for p in predictions:
        assert p.label in clf.classes and set(p.probabilities) == set(clf.classes)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.malignant_probability == pytest.approx(sum(p.probabilities[c] for c in ("mel", "bcc", "akiec")),
                                                        abs=1e-6)
        assert p.abstained == (p.decision == "uncertain") and p.reason
        assert sorted(p.model_versions) == sorted(clf.models)
        assert all(len(v["checkpoint_sha256"]) == 64 for v in p.model_versions.values())
        assert p.sop_instance_uid is None and p.to_dict()["label"] == p.label
    with pytest.raises(dataclasses.FrozenInstanceError):
        predictions[0].label = "mel"


def test_dicom_input_carries_its_uids(clf, jpegs, tmp_path):
    pytest.importorskip("pydicom", reason="pydicom (the dicom extra) is not installed")
    from dicom_files import dicom_bytes

    path = tmp_path / "lesion.dcm"
    path.write_bytes(dicom_bytes(jpegs[0], "jpeg", study_uid="1.2.40.7", instance_uid="1.2.40.7.1"))
    from_dicom, from_jpeg = clf.predict([path, jpegs[0]])
    assert (from_dicom.sop_instance_uid, from_dicom.study_instance_uid) == ("1.2.40.7.1", "1.2.40.7")
    assert from_dicom.probabilities == pytest.approx(from_jpeg.probabilities, abs=1e-6)
    assert from_jpeg.study_instance_uid is None
    np.testing.assert_array_equal(clf.preprocess(path), clf.preprocess(jpegs[0]))  # the same pixels, exactly


def test_unusable_inputs_are_refused_naming_them(clf, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(lesion.ImageError, match=f"^{missing}: cannot read file"):
        clf.predict(missing)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(lesion.ImageError, match=f"^{bad}: "):
        clf.predict([bad])
    with pytest.raises(ValueError, match="uint8"):
        clf.predict(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(TypeError, match="cannot predict a dict"):
        clf.predict({"image": 1})
    assert clf.predict([]) == []


def test_explain_gives_heatmap_and_overlay_for_the_ensemble_and_each_model(clf, jpegs):
    explained = clf.explain(jpegs[0])
    size = clf.core.data_config.image_size
    assert explained.model == "ensemble" and explained.method == "gradcam"
    assert explained.heatmap.shape == (size, size) and explained.heatmap.dtype == np.float32
    assert 0.0 <= explained.heatmap.min() <= explained.heatmap.max() <= 1.0 and explained.heatmap.max() > 0
    assert explained.overlay.shape == explained.image.shape == (size, size, 3) and explained.overlay.dtype == np.uint8
    assert not np.array_equal(explained.overlay, explained.image)
    assert explained.explained_class == explained.prediction.label
    assert explained.prediction.probabilities == pytest.approx(clf.predict(jpegs[0]).probabilities, abs=1e-6)
    member = clf.models[0]
    alone = clf.explain(jpegs[0], method="eigencam", model=member)
    assert alone.model == member and alone.heatmap.shape == (size, size)
    assert alone.explained_class == max(alone.prediction.model_probabilities[member].items(), key=lambda kv: kv[1])[0]
    with pytest.raises(ValueError, match="not one of this run's models"):
        clf.explain(jpegs[0], model="nope")
    with pytest.raises(ValueError, match="unknown explanation method"):
        clf.explain(jpegs[0], method="nope")


@pytest.mark.parametrize("module", [lesion, lesion.api], ids=lambda m: m.__name__)
def test_docstring_examples_run(module, run_copy, monkeypatch):
    monkeypatch.setenv("LESION_RUN", str(run_copy.root))
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{module.__name__} has no docstring examples"
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= len(tests) and results.failed == 0
