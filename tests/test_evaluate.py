"""``lesion evaluate`` end to end on the tiny trained run: files, metrics, ISIC format, fitting on validation only."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_config
from lesion import calibration, ensemble, inference
from lesion.config import apply_overrides, dump_yaml
from lesion.data.shards import load_split, read_info
from lesion.metrics import binary_auc
from lesion.rundir import RunDir
from pipelines.cli import main
from pipelines.evaluate import PREPROCESSING, evaluate, ingest_external

ISIC_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """A copy of the trained run, evaluated on its test split, with the splits the ensemble fit read recorded."""
    root = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(trained_run.root, root)
    run = RunDir(root)
    shutil.rmtree(run.eval, ignore_errors=True)  # start from no ensemble spec, whatever other tests left
    checkpoints = {name: _sha(run.model_dir(name) / "best.pt") for name in run.trained_models()}
    fit_splits, fit_sizes = [], []
    real_load, real_fit = inference.load_split, calibration.fit_temperature
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "load_split", lambda r, split: fit_splits.append(split) or real_load(r, split))
        patch.setattr(calibration, "fit_temperature", lambda z, y: fit_sizes.append(len(y)) or real_fit(z, y))
        result = evaluate(tiny_config(), run, "test")
    return run, result, fit_splits, fit_sizes, checkpoints


@pytest.mark.timeout(900)  # includes training the session's trained_run fixture when this test runs first
def test_evaluate_writes_every_artefact(evaluated):
    run, result, _, _, checkpoints = evaluated
    out = run.eval
    models = run.trained_models()
    assert models == ["custom_cnn", "scratch_cnn"]
    for name in (*models, "ensemble"):
        assert (out / "predictions" / f"{name}.csv").is_file()
    for name in ("metrics.json", "predictions_long.csv", "report.html", "model_card.md", "ensemble.json",
                 "plots/confusion_matrices.png", "plots/roc_curves.png", "plots/reliability.png", "plots/cam_grid.png",
                 "plots/learning_curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == result
    assert run.manifest()["eval"]["split"] == "test"
    # evaluation never trains: the checkpoints are byte-identical afterwards
    assert {name: _sha(run.model_dir(name) / "best.pt") for name in models} == checkpoints


def test_ensemble_is_fitted_on_validation_only(evaluated):
    run, result, fit_splits, fit_sizes, _ = evaluated
    assert fit_splits == ["val"]
    n_val = read_info(run.root).split_rows("val")
    assert fit_sizes and set(fit_sizes) == {n_val}  # every temperature was fitted on the validation images
    assert result["ensemble_spec"]["fitted_on"] == "val"
    assert result["ensemble_spec"]["validation"]["n"] == n_val
    spec = ensemble.load(run.eval / "ensemble.json")
    assert spec.models == ["custom_cnn", "scratch_cnn"] and sum(spec.weights.values()) == pytest.approx(1.0)


def test_metrics_json_has_every_field_for_models_and_ensemble(evaluated):
    run, result, _, _, _ = evaluated
    test = load_split(run.root, "test")
    assert set(result["models"]) == {"custom_cnn", "scratch_cnn", "ensemble"}
    for name, m in result["models"].items():
        assert m["n"] == len(test)
        assert sum(m["per_class"][c]["support"] for c in m["classes"]) == len(test)
        assert 0.0 <= m["balanced_accuracy"] <= 1.0 and m["macro"]["auc"] is not None
        assert {"auc", "sensitivity_at_90_specificity", "sensitivity_at_95_specificity"} <= set(m["binary"])
        ci = m["bootstrap"]["balanced_accuracy"]
        assert ci["low"] <= ci["estimate"] <= ci["high"] and m["bootstrap"]["unit"] == "lesion"
        assert m["bootstrap"]["n_groups"] == test.meta["lesion_id"].nunique()
        assert set(m["subgroups"]) == {"sex", "age_band", "localization"}
        assert sum(g["n"] for g in m["subgroups"]["sex"].values()) == len(test)
        assert {"temperature", "ece_before", "ece_after"} <= set(m["calibration"])
    for name in ("custom_cnn", "scratch_cnn"):
        assert result["models"][name]["pretrained"] == "scratch"
    ens = result["models"]["ensemble"]
    assert sum(ens["decision"]["counts"].values()) == len(test)
    assert ens["binary"]["threshold"] == pytest.approx(ens["decision"]["malignant_threshold"])
    # the malignant AUC ranks by the malignant probability the API answers, written beside each decision
    long = pd.read_csv(run.eval / "predictions_long.csv")
    y_mal = np.isin(long["true_label"], ["mel", "bcc", "akiec"])
    assert ens["binary"]["auc"] == pytest.approx(binary_auc(y_mal, long["ensemble_malignant_probability"]), abs=1e-4)
    called = long["ensemble_decision"] == "malignant"
    assert (long.loc[called, "ensemble_malignant_probability"] >= ens["decision"]["malignant_threshold"] - 1e-6).all()
    # arg-max accuracy recomputed from the ISIC CSV agrees with metrics.json
    csv = pd.read_csv(run.eval / "predictions" / "ensemble.csv").set_index("image")
    labels = pd.Series(test.labels, index=test.meta["image_id"])
    assert np.mean(csv.to_numpy().argmax(axis=1) == labels.loc[csv.index].to_numpy()) == pytest.approx(ens["accuracy"])
    explained = result["explanations"]["models"]
    assert set(explained) == {"custom_cnn", "scratch_cnn", "ensemble"}
    for method in tiny_config().evaluate.cam_methods:
        scores = explained["custom_cnn"][method]
        assert 0.0 <= scores["energy_inside"] <= 1.0 and 0.0 <= scores["pointing_game"] <= 1.0
        assert "road" in scores and "energy_inside" in explained["ensemble"][method]


def test_isic_csv_format_exact(evaluated):
    run, _, _, _, _ = evaluated
    test = load_split(run.root, "test")
    for name in ("custom_cnn", "scratch_cnn", "ensemble"):
        path = run.eval / "predictions" / f"{name}.csv"
        assert path.read_text().splitlines()[0] == ISIC_HEADER
        table = pd.read_csv(path)
        assert sorted(table["image"]) == sorted(test.meta["image_id"])
        np.testing.assert_allclose(table.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-4)
    long = pd.read_csv(run.eval / "predictions_long.csv")
    assert {"image_id", "lesion_id", "true_label", "custom_cnn:mel", "ensemble:vasc", "ensemble_decision"} <= set(long)
    assert len(long) == len(test)


def test_report_images_are_embedded_pngs(evaluated):
    run, _, _, _, _ = evaluated
    text = (run.eval / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) >= 5
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.width > 0 and image.height > 0
    card = (run.eval / "model_card.md").read_text()
    assert "CC BY-NC 4.0" in card and "custom_cnn" in card


@pytest.mark.timeout(300)
def test_evaluate_external_data_via_cli(evaluated, ingested_run, tmp_path, capsys):
    run, result, _, _, _ = evaluated
    config = tiny_config()
    config.evaluate.bootstrap = 0
    config.evaluate.cam_score_images = 0
    dump_yaml(config.to_dict(), tmp_path / "config.yaml")
    code = main(["evaluate", "--run", str(run.root), "--config", str(tmp_path / "config.yaml"),
                 "--data", str(ingested_run.root)])
    assert code == 0
    out = run.eval / "external" / ingested_run.root.name
    external = json.loads((out / "metrics.json").read_text())
    assert external["split"] == "all" and external["external"] is True
    assert external["data"]["n_images"] == read_info(ingested_run.root).num_images
    assert (out / "report.html").is_file() and (out / "predictions" / "ensemble.csv").is_file()
    # the run's own evaluation is untouched and the ensemble spec was not refitted on the external data
    assert json.loads((run.eval / "metrics.json").read_text()) == result
    assert external["ensemble_spec"]["validation"] == result["ensemble_spec"]["validation"]
    assert "ensemble" in capsys.readouterr().out


def test_an_external_set_is_ingested_with_the_runs_own_preprocessing(ingested_run, monkeypatch, tmp_path):
    """Whatever config is in hand (here another cache size, colour constancy and hair setting: a run made by a
    script without a recorded config.yaml once gave exactly that), external images get the preprocessing the run's
    training images had, so `lesion evaluate --source` scores what the models were trained on."""
    seen = {}
    monkeypatch.setattr("pipelines.ingest.ingest", lambda config, target: seen.update(config=config))
    recorded = inference.data_config_of(ingested_run, tiny_config())
    other = apply_overrides(tiny_config(), {
        "data.image_size": recorded.image_size * 2, "data.remove_hair": not recorded.remove_hair,
        "data.color_constancy": "shades_of_gray" if recorded.color_constancy == "none" else "none"})
    target = ingest_external(other, ingested_run, "folder", str(tmp_path / "photos"))
    data = seen["config"].data
    assert (data.source, data.root, data.task) == ("folder", str(tmp_path / "photos"), recorded.task)
    assert {key: getattr(data, key) for key in PREPROCESSING} == {key: getattr(recorded, key) for key in PREPROCESSING}
    assert target.root == ingested_run.eval / "external" / "photos"


def test_study_benchmark_reads_every_model_and_explanation(evaluated):
    """benchmarks/study.py's tables come from metrics.json: every model, the ensemble and each CAM method, with
    intervals that bracket their estimates."""
    from benchmarks import study

    run, result, _, _, _ = evaluated
    rows = study.model_rows(result)
    assert set(rows) == {*run.trained_models(), "ensemble"}
    for row in rows.values():
        estimate, low, high = row["balanced_accuracy"]
        assert low <= estimate <= high and row["n"] == result["models"]["ensemble"]["n"]
    cams = study.explanation_rows(result)
    methods = tiny_config().evaluate.cam_methods
    assert {(r["model"], r["method"]) for r in cams} == {(m, k) for m in rows for k in methods}
    assert all(0 <= r["energy_inside"] <= 1 and r["n_images"] > 0 for r in cams)


def test_ensemble_maps_reuse_member_maps_only_where_the_classes_agree(evaluated):
    from lesion import explain
    from lesion.explain_quality import explanation_quality

    run = evaluated[0]
    core = inference.Inference.from_run(run, tiny_config())
    images = load_split(run.root, "test").images[:24]
    _, cams = explanation_quality(core, images, None, ["gradcam"])
    targets = core.combine(core.probabilities(images)).argmax(axis=1)
    fresh = {}
    for name in core.names:  # every member explaining the ensemble's class, computed anew
        member = core.member(name)
        x = member.input_transform(images)
        fresh[name] = explain.explain_batch(member.net, member.checkpoint, x, targets, "gradcam")
        own = explain.predicted_classes(member.net, member.checkpoint, x)
        agree = own == targets
        np.testing.assert_allclose(cams["gradcam"][name][agree], fresh[name][agree], atol=1e-6)
    expected = explain.ensemble_cam(fresh, core.spec.weights, size=images.shape[1:3])
    np.testing.assert_allclose(cams["gradcam"]["ensemble"], expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_a_bundle_on_a_labelled_source_without_a_run(trained_run, ham10000_fullres, tmp_path, capsys):
    """`lesion evaluate --model-uri BUNDLE --source ham10000 --root DIR --out OUT`: an exported ensemble scored on
    real HAM10000 images with no run directory; the source is ingested with the bundle's own preprocessing."""
    from lesion.export import export_bundle
    from lesion.resolve import read_metadata

    run = RunDir(shutil.copytree(trained_run.root, tmp_path / "run"))  # exporting may fit the ensemble spec
    bundle = tmp_path / "bundle"
    export_bundle(run.root, bundle, tiny_config())
    config = tiny_config()
    config.evaluate.bootstrap = 0
    config.evaluate.cam_score_images = 0
    dump_yaml(config.to_dict(), tmp_path / "config.yaml")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model-uri", str(bundle), "--config", str(tmp_path / "config.yaml"),
                 "--source", "ham10000", "--root", str(ham10000_fullres), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    n_images = len(pd.read_csv(ham10000_fullres / "metadata.csv"))
    assert result["model_uri"] == str(bundle) and result["external"] is True and result["split"] == "all"
    assert result["data"]["n_images"] == n_images and result["data"]["source"] == "ham10000"
    assert set(result["models"]) == {"custom_cnn", "scratch_cnn", "ensemble"}
    assert result["models"]["ensemble"]["n"] == n_images
    ingested = read_info(out / "ingested")
    recorded = read_metadata(bundle)["preprocessing"]["data_config"]
    assert ingested.image_size == recorded["image_size"]
    assert len(pd.read_csv(out / "predictions" / "ensemble.csv")) == n_images
    assert (out / "report.html").is_file() and (out / "model_card.md").is_file()
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    # the evaluation needed nothing from the run the bundle came from
    assert not (run.eval / "external").exists()


def test_evaluate_a_bundle_needs_out_and_a_source(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "metadata.json").write_text("{}")
    assert main(["evaluate", "--model-uri", str(bundle), "--source", "ham10000", "--root", str(tmp_path)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["evaluate", "--model-uri", str(bundle), "--out", str(tmp_path / "eval")]) == 2
    assert "labelled --source" in capsys.readouterr().err
