"""The one inference core: every path (evaluation's Ray Data scoring, ``lesion predict``, the served /v1/predict,
``lesion explain``) gives the same answer for the same real image, with flip TTA on; specs per inference mode; the
HTTP layer without Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests

from conftest import tiny_config
from lesion import ensemble, inference
from lesion.config import apply_overrides, dump_yaml
from lesion.data.shards import records_to_table
from lesion.inference import Inference
from lesion.labels import DX_CLASSES
from lesion.rundir import RunDir

pytestmark = pytest.mark.timeout(900)  # includes training the session's trained_run fixture when run first

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(ham10000) -> Path:
    """One real HAM10000 JPEG."""
    return sorted((ham10000 / "images").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def tta_run(trained_run, tmp_path_factory):
    """A copy of the trained run and a config file with ``evaluate.tta`` on."""
    tmp = tmp_path_factory.mktemp("inference")
    run = RunDir(shutil.copytree(trained_run.root, tmp / "run"))
    shutil.rmtree(run.eval, ignore_errors=True)
    config = apply_overrides(tiny_config(), {"evaluate.tta": True})
    dump_yaml(config.to_dict(), tmp / "tta.yaml")
    return run, config, tmp / "tta.yaml"


def _evaluate_answer(core: Inference, preprocessed: np.ndarray, tmp: Path, config) -> dict:
    """Evaluation's scoring (Ray Data actors over a shard) of one preprocessed image."""
    from pipelines.evaluate import read_meta, score

    row = {"image_id": "img0", "lesion_id": "l0", "label": 0, "image": preprocessed, "mask": None, "dx": "mel"}
    shard = tmp / "shard.parquet"
    pq.write_table(records_to_table([row]), shard)
    _, answers = score(core, [str(shard)], read_meta([str(shard)]), preprocessed.shape[0], config)
    return answers[0]


def _predict_answer(run: RunDir, config_file: Path, image: Path, tmp: Path) -> dict:
    """``lesion predict``'s CSV row, as an answer."""
    from pipelines.cli import main

    assert main(["predict", "--run", str(run.root), "--config", str(config_file), str(image),
                 "--out", str(tmp / "preds.csv")]) == 0
    row = pd.read_csv(tmp / "preds.csv").iloc[0]
    return {"probabilities": {c: row[f"ensemble:{c}"] for c in DX_CLASSES}, "decision": row["decision"],
            "malignant_probability": row["malignant_probability"],
            "models": {n: {c: row[f"{n}:{c}"] for c in DX_CLASSES} for n in run.trained_models()}}


def _served_answer(run: RunDir, config, image: Path, tmp: Path) -> dict:
    """The answer of /v1/predict of a real Ray Serve app on the run."""
    from ray import serve

    from test_serve import start_app

    url = start_app(run.root, tmp / "served", config.to_dict(), cpus_per_replica=0.25, max_replicas=1)
    try:
        response = requests.post(url + "/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")},
                                 timeout=120)
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        serve.shutdown()


def _explain_answer(run: RunDir, config_file: Path, image: Path, capsys) -> dict:
    """``lesion explain --json``'s answer for the ensemble."""
    from pipelines.cli import main

    capsys.readouterr()
    assert main(["explain", "--run", str(run.root), "--config", str(config_file), "--image", str(image),
                 "--method", "eigencam", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_path_gives_the_same_answer_with_tta(tta_run, image, tmp_path, capsys):
    run, config, config_file = tta_run
    core = Inference.from_run(run, config)
    assert core.tta and core.spec.tta and Path(core.spec_file).name == "ensemble-tta.json"
    preprocessed = core.preprocess(image.read_bytes())
    # the mode matters for this image: a path that skipped the flips would not agree below
    single = Inference.from_run(run, config, tta=False)
    assert not single.spec.tta and Path(single.spec_file).name == "ensemble.json"
    assert any(np.abs(core.member_probs(n, preprocessed[None]) - single.member_probs(n, preprocessed[None])).max()
               > 1e-4 for n in core.names)

    answers = {
        "core": core.predict(preprocessed[None])[0],
        "evaluate": _evaluate_answer(core, preprocessed, tmp_path, config),
        "predict": _predict_answer(run, config_file, image, tmp_path),
        "serve": _served_answer(run, config, image, tmp_path),
        "explain": _explain_answer(run, config_file, image, capsys),
    }
    reference = answers["core"]
    for path, answer in answers.items():
        assert answer["decision"] == reference["decision"], path
        assert answer["malignant_probability"] == pytest.approx(reference["malignant_probability"], abs=1e-5), path
        assert answer["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-5), path
        for name in core.names:
            assert answer["models"][name] == pytest.approx(reference["models"][name], abs=1e-5), (path, name)
    assert answers["serve"]["tta"] and answers["explain"]["tta"]
    assert answers["serve"]["malignant_threshold"] == pytest.approx(core.spec.malignant_threshold)


def test_each_mode_and_subset_has_its_own_spec_refitted_only_when_stale(tta_run, monkeypatch):
    run, config, _ = tta_run
    names = run.trained_models()
    specs = {(tuple(models), tta): Inference.from_run(run, config, models, tta=tta, load=False)
             for models in (names, names[:1]) for tta in (False, True)}
    files = {key: Path(core.spec_file).name for key, core in specs.items()}
    assert files == {(tuple(names), False): "ensemble.json", (tuple(names), True): "ensemble-tta.json",
                     (tuple(names[:1]), False): f"ensemble-{names[0]}.json",
                     (tuple(names[:1]), True): f"ensemble-{names[0]}-tta.json"}
    for (models, tta), core in specs.items():
        assert core.spec.tta == tta and core.spec.models == list(models) and not core.members
        assert ensemble.load(core.spec_file).fingerprint == inference.spec_fingerprint(run, config, list(models), tta)

    def no_refit(*args, **kwargs):
        raise AssertionError("a current spec was refitted")

    monkeypatch.setattr(inference, "fit_spec", no_refit)
    again = Inference.from_run(run, config, load=False)
    assert again.spec.weights == specs[(tuple(names), True)].spec.weights
    changed = apply_overrides(config, {"serve.target_sensitivity": 0.8})
    with pytest.raises(AssertionError, match="refitted"):
        Inference.from_run(run, changed, load=False)


def test_unknown_models_are_refused_naming_the_trained_ones(tta_run):
    run, config, _ = tta_run
    with pytest.raises(FileNotFoundError, match="resnet50.*custom_cnn, scratch_cnn"):
        Inference.from_run(run, config, ["resnet50"])


API_SCRIPT = """
import json, sys
sys.modules["ray"] = None  # any import of Ray fails from here on
from fastapi.testclient import TestClient
from lesion.config import apply_overrides
from lesion.inference import Inference
from lesion.rundir import RunDir
from pipelines.api import ApiSettings, LocalBackend, build_api
from pipelines.common import resolve_config

run = RunDir(sys.argv[1])
config = apply_overrides(resolve_config(run, sys.argv[2]), {"serve.api_key": "k", "serve.max_body_bytes": 500000})
core = Inference.from_run(run, config)
client = TestClient(build_api(LocalBackend(core), ApiSettings.of(core, config.serve)))
jpeg = open(sys.argv[3], "rb").read()
key = {"X-API-Key": "k"}
def post(path, data, fields=None, headers=key):
    r = client.post(path, files={"file": ("x.jpg", data, "image/jpeg")}, data=fields or {}, headers=headers)
    return {"status": r.status_code, "body": r.json()}
print(json.dumps({
    "predict": post("/v1/predict", jpeg),
    "explain": post("/v1/explain", jpeg, {"model": "custom_cnn", "method": "gradcam++"}),
    "models": client.get("/v1/models", headers=key).json(),
    "healthz": client.get("/healthz").status_code,
    "page": client.get("/").status_code,
    "no_key": post("/v1/predict", jpeg, headers={}),
    "bad_image": post("/v1/predict", b"not an image at all"),
    "too_large": post("/v1/predict", jpeg * 200),
    "unknown_model": post("/v1/explain", jpeg, {"model": "resnet9000"}),
    "core": core.predict(core.preprocess(jpeg)[None])[0],
    "ray_loaded": sorted(m for m, v in sys.modules.items() if (m == "ray" or m.startswith("ray.")) and v is not None),
}))
"""


def test_http_api_runs_without_ray_on_the_inference_core(tta_run, image):
    run, _, config_file = tta_run
    done = subprocess.run([sys.executable, "-c", API_SCRIPT, str(run.root), str(config_file), str(image)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ray_loaded"] == []
    predicted = out["predict"]
    assert predicted["status"] == 200
    assert predicted["body"]["probabilities"] == pytest.approx(out["core"]["probabilities"], abs=1e-6)
    assert predicted["body"]["decision"] == out["core"]["decision"] and predicted["body"]["tta"]
    explained = out["explain"]
    assert explained["status"] == 200 and explained["body"]["explained_model"] == "custom_cnn"
    own = explained["body"]["models"]["custom_cnn"]
    assert explained["body"]["explained_class"] == max(own, key=own.get)
    assert [m["name"] for m in out["models"]["models"]] == run.trained_models() and out["models"]["tta"]
    assert (out["healthz"], out["page"]) == (200, 200)
    for case, status, words in (("no_key", 401, "X-API-Key"), ("bad_image", 400, "not a decodable image"),
                                ("too_large", 413, "limit"), ("unknown_model", 404, "resnet9000")):
        assert out[case]["status"] == status, (case, out[case])
        assert words in out[case]["body"]["detail"], (case, out[case])


def test_serving_can_use_a_faster_mode_with_its_own_spec(tta_run):
    from pipelines.serve import serving_core

    run, config, _ = tta_run  # evaluated with flip TTA
    assert serving_core(run, config).spec.tta  # by default serving applies the mode evaluation used
    fast = serving_core(run, apply_overrides(config, {"serve.tta": False}))
    assert not fast.spec.tta and Path(fast.spec_file).name == "ensemble.json"
