"""Explanations: CAMs localise a known object, every method and model yields usable maps, the CAM scores are exact on
hand-made cases, and ``lesion explain`` writes an overlay for a trained run."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lesion import ensemble as ensemble_lib
from lesion import explain, inference
from lesion.data.augment import model_input
from lesion.data.shards import read_info
from lesion.models import MODEL_NAMES, create_model, model_spec
from lesion.records import CheckpointRecord
from lesion.rundir import RunDir

SIZE = 64
MEAN = STD = (0.5, 0.5, 0.5)


def checkpoint(arch: str, outputs: int) -> CheckpointRecord:
    """The record of an ``arch`` model with ``outputs`` logits (1: binary) at SIZE."""
    task = "binary" if outputs == 1 else "multiclass"
    classes = ("benign", "malignant") if outputs == 1 else tuple(f"class{k}" for k in range(outputs))
    return CheckpointRecord(name=arch, arch=arch, task=task, classes=classes, num_classes=outputs, input_size=SIZE,
                            mean=MEAN, std=STD)
SMALL_CNN = {"conv_widths": [8, 16, 32, 64], "fc_widths": [32, 16], "dropout": [0.1]}


def striped_disks(n: int, seed: int):
    """Images with one striped disk (class = stripe pattern: horizontal, vertical, checker) and one plain dark
    distractor disk, both at random places on noisy skin. Returns images, disk masks, distractor masks, labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    patterns = [(yy // 2) % 2 == 0, (xx // 2) % 2 == 0, ((yy // 2) + (xx // 2)) % 2 == 0]
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((n, SIZE, SIZE), bool)
    distractors = np.zeros((n, SIZE, SIZE), bool)
    labels = rng.integers(0, 3, n)
    for i in range(n):
        img = np.full((SIZE, SIZE, 3), (200, 160, 140), np.float32) + rng.normal(0, 12, (SIZE, SIZE, 1))
        r, r2 = rng.uniform(7, 10, 2)
        while True:
            c, d = rng.uniform(r, SIZE - r, 2), rng.uniform(r2, SIZE - r2, 2)
            if np.hypot(*(c - d)) > r + r2 + 2:
                break
        masks[i] = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r
        distractors[i] = (yy - d[0]) ** 2 + (xx - d[1]) ** 2 <= r2 * r2
        img[distractors[i]] = (90, 60, 40)
        stripes = patterns[labels[i]][masks[i]][:, None]
        img[masks[i]] = np.where(stripes, (40, 25, 20), (140, 100, 70))
        images[i] = np.clip(img, 0, 255)
    return images, masks, distractors, labels


@pytest.fixture(scope="module")
def located():
    """custom_cnn (small widths) trained with plain torch until it classifies the striped disks, plus test images."""
    torch.manual_seed(0)
    images, _, _, labels = striped_disks(480, seed=1)
    model = create_model("custom_cnn", 3, input_size=SIZE, **SMALL_CNN)
    info = checkpoint("custom_cnn", 3)
    x, y = model_input(images, MEAN, STD, SIZE), torch.as_tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _epoch in range(6):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_images, masks, distractors, test_labels = striped_disks(64, seed=2)
    x_test = model_input(test_images, MEAN, STD, SIZE)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1).numpy() == test_labels).mean()
    assert accuracy >= 0.9, f"the localisation model did not learn the task (test accuracy {accuracy:.2f})"
    return model, info, x_test, masks, distractors, test_labels


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_finds_the_object_that_decides_the_class(located, method):
    model, info, x, masks, distractors, labels = located
    cams = explain.explain_batch(model, info, x, labels, method=method)
    on_object = explain.cam_mask_scores(cams, masks)
    on_distractor = explain.cam_mask_scores(cams, distractors)
    print(method, "object:", on_object, "distractor:", on_distractor)
    assert on_object["n"] == len(x) and on_object["degenerate"] == 0
    assert on_object["energy_inside"] > 3 * on_object["mask_share"]  # chance level = mask area share
    assert on_object["pointing_game"] >= 0.6
    assert on_object["energy_inside"] > 2 * on_distractor["energy_inside"]
    assert on_object["pointing_game"] > on_distractor["pointing_game"] + 0.4


def test_faithfulness_removing_the_highlighted_pixels_hurts_most(located):
    model, info, x, _, _, labels = located
    cams = explain.explain_batch(model, info, x[:6], labels[:6])
    scores = explain.faithfulness(model, info, x[:6], cams, labels[:6], percentiles=(30, 70))
    assert all(np.isfinite(v) for v in scores.values()) and scores["n"] == 6
    assert scores["road_morf"] < scores["road_lerf"]  # most relevant first removes more confidence
    assert scores["road"] == pytest.approx((scores["road_lerf"] - scores["road_morf"]) / 2)
    again = explain.faithfulness(model, info, x[:6], cams, labels[:6], percentiles=(30, 70))
    assert again == scores  # ROAD's imputation noise comes from a fixed seed


def test_faithfulness_in_chunks_over_the_cores_does_not_depend_on_their_number(located, monkeypatch):
    from types import SimpleNamespace

    from lesion import explain_quality

    model, info, x, _, _, _ = located
    x = x[:20]  # three chunks of ROAD_CHUNK 8: 8, 8, 4
    cams = {"gradcam": {"m": explain.explain_batch(model, info, x)}}
    members = {"m": SimpleNamespace(net=model, checkpoint=info)}
    scores = []
    for cores in (1, 3):
        monkeypatch.setattr(explain_quality.os, "cpu_count", lambda cores=cores: cores)
        scores.append(explain_quality.faithfulness_by_map(members, {"m": x}, cams))
    assert scores[0] == scores[1] and scores[0][("m", "gradcam")]["n"] == 20
    whole = explain.faithfulness(model, info, x, cams["gradcam"]["m"])
    chunked = scores[0][("m", "gradcam")]
    assert chunked["confidence_change"] == pytest.approx(whole["confidence_change"], abs=1e-6)  # no noise in it
    assert chunked["road"] == pytest.approx(whole["road"], abs=0.05)  # ROAD's noise differs, its value hardly


@pytest.mark.parametrize("method", list(explain.METHODS))
def test_every_method_gives_maps_in_unit_range_for_binary_and_multiclass(located, method):
    model, info, x, *_ = located
    torch.manual_seed(1)
    binary = create_model("custom_cnn", 1, input_size=SIZE, **SMALL_CNN).eval()
    binary_info = checkpoint("custom_cnn", 1)
    for net, net_info in ((model, info), (binary, binary_info)):
        with torch.inference_mode():  # explain_batch turns gradients back on itself, even for inference tensors
            cams = explain.explain_batch(net, net_info, x[:3].clone(), method=method, batch_size=2)
        assert cams.shape == (3, SIZE, SIZE) and cams.dtype == np.float32
        assert cams.min() >= 0.0 and cams.max() <= 1.0
        assert (cams.reshape(3, -1).std(axis=1) > 0).any()
        assert not net.training


def test_default_target_is_the_predicted_class(located):
    model, info, x, *_ = located
    predicted = explain.predicted_classes(model, info, x[:4])
    other = (predicted + 1) % 3
    default = explain.explain_batch(model, info, x[:4])
    np.testing.assert_allclose(default, explain.explain_batch(model, info, x[:4], predicted), atol=1e-6)
    assert not np.allclose(default, explain.explain_batch(model, info, x[:4], other), atol=1e-3)
    with pytest.raises(ValueError, match="one class index"):
        explain.explain_batch(model, info, x[:4], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain.explain_batch(model, info, x[:4], method="guesscam")


def test_binary_targets_explain_opposite_evidence():
    torch.manual_seed(3)
    model = create_model("custom_cnn", 1, input_size=SIZE, **SMALL_CNN).eval()
    info = checkpoint("custom_cnn", 1)
    x = torch.randn(2, 3, SIZE, SIZE)
    malignant = explain.explain_batch(model, info, x, [1, 1])
    benign = explain.explain_batch(model, info, x, [0, 0])
    assert not np.allclose(malignant, benign, atol=1e-3)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if model_spec(n)["timm_name"] else n
                                  for n in MODEL_NAMES])
def test_every_model_has_a_target_layer_with_a_spatial_map(name):
    kwargs = SMALL_CNN if name == "custom_cnn" else {"zero_init_last": False} if name == "resnet50" else {}
    torch.manual_seed(0)
    model = create_model(name, 7, input_size=SIZE, **kwargs).eval()
    layer = explain.target_layer(model, name)
    assert any(layer is module for module in model.backbone.modules())
    cams = explain.explain_batch(model, checkpoint(name, 7), torch.randn(1, 3, SIZE, SIZE),
                                 method="gradcam++")
    assert cams.shape == (1, SIZE, SIZE)
    assert cams.std() > 0.01, f"{name}: constant Grad-CAM++ map at {SIZE} px"


def test_ensemble_cam_is_the_weighted_mean_of_resized_members():
    rng = np.random.default_rng(0)
    small = rng.random((2, 4, 4)).astype(np.float32)
    large = rng.random((2, 8, 8)).astype(np.float32)
    flat = np.ones((2, 2, 2), np.float32)
    out = explain.ensemble_cam({"a": flat, "b": large}, {"a": 3.0, "b": 1.0})
    np.testing.assert_allclose(out, 0.75 + 0.25 * large, atol=1e-6)
    out = explain.ensemble_cam({"a": small, "b": large}, None, size=8)
    np.testing.assert_allclose(out, (explain._resize_maps(small, (8, 8)) + large) / 2, atol=1e-6)
    assert explain.ensemble_cam({"a": small, "b": large}, {"a": 0.0, "b": 2.0}).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="weights name"):
        explain.ensemble_cam({"a": small, "b": large}, {"a": 1.0})


def test_overlay_is_rgb_at_image_size_with_hot_regions_red():
    image = np.full((40, 30, 3), 128, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[:2, :2] = 1.0
    out = explain.overlay(image, cam)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2]  # hot: red in RGB order
    assert out[-1, -1, 2] > out[-1, -1, 0]  # cold: blue
    with pytest.raises(ValueError, match="uint8"):
        explain.overlay(image.astype(np.float32), cam)


def test_cam_mask_scores_exact_values():
    masks = np.zeros((4, 4, 4), bool)
    cams = np.zeros((4, 4, 4), np.float32)
    masks[0, :, :2] = True  # left half
    cams[0, :, 0] = 1.0  # half the energy inside; the first maximum (0, 0) inside
    cams[0, :, 3] = 1.0
    masks[1, :2, :2] = True  # top-left quarter
    cams[1, 3, 3] = 1.0  # all energy outside, maximum 2 pixels (Chebyshev) away from the mask
    masks[2, 0, 0] = True  # a zero map: degenerate, scores 0
    cams[3] = 1.0  # empty mask: not scored
    scores = explain.cam_mask_scores(cams, masks)
    assert scores == {"energy_inside": pytest.approx(0.5 / 3), "pointing_game": pytest.approx(1 / 3),
                      "mask_share": pytest.approx((8 + 4 + 1) / 16 / 3), "n": 3, "degenerate": 1}
    assert explain.cam_mask_scores(cams, masks, tolerance=1)["pointing_game"] == pytest.approx(1 / 3)
    assert explain.cam_mask_scores(cams, masks, tolerance=2)["pointing_game"] == pytest.approx(2 / 3)
    upsampled = explain.cam_mask_scores(np.ones((1, 2, 2), np.float32), masks[:1].repeat(2, 1).repeat(2, 2))
    assert upsampled["energy_inside"] == pytest.approx(0.5)  # maps are resized to the mask size
    with pytest.raises(ValueError, match="every mask is empty"):
        explain.cam_mask_scores(cams[3:], masks[3:])


def _png_bytes(size: int, seed: int) -> bytes:
    from lesion.data.synthetic import generate

    record = next(generate(1, size, seed=seed))
    buffer = io.BytesIO()
    Image.fromarray(record["image"]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.timeout(600)
def test_cli_writes_overlay_and_prints_prediction(trained_run, tmp_path, capsys):
    from pipelines.cli import main

    run = RunDir(shutil.copytree(trained_run.root, tmp_path / "run"))
    size = read_info(run.root).image_size
    image = tmp_path / "lesion.png"
    image.write_bytes(_png_bytes(96, seed=5))
    out = tmp_path / "overlay.png"
    assert main(["explain", "--run", str(run.root), "--image", str(image), "--model", "custom_cnn",
                 "--method", "gradcam++", "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.size == (size, size) and written.mode == "RGB"
    printed = capsys.readouterr().out
    assert "by custom_cnn" in printed and str(out) in printed

    assert main(["explain", "--run", str(run.root), "--image", str(image)]) == 0
    assert (run.eval / "explain" / "lesion-ensemble-gradcam.png").is_file()
    assert "scratch_cnn" in capsys.readouterr().out  # the ensemble lists its members

    assert main(["explain", "--run", str(run.root), "--image", str(image), "--model", "resnet50"]) == 2
    error = capsys.readouterr().err
    assert "not trained" in error and "custom_cnn" in error and "scratch_cnn" in error


@pytest.mark.timeout(600)
def test_explainer_uses_the_runs_ensemble_spec_and_refits_a_stale_one(trained_run, tmp_path):
    from conftest import tiny_config

    run = RunDir(shutil.copytree(trained_run.root, tmp_path / "run"))
    config = tiny_config()
    members = run.trained_models()
    spec = ensemble_lib.EnsembleSpec(
        models=members, weights={members[0]: 0.8, members[1]: 0.2}, temperature=1.0,
        temperatures={name: 1.0 for name in members}, malignant_threshold=0.5, ood_threshold=1.0,
        uncertain_margin=0.0, task="multiclass", classes=list(read_info(run.root).classes),
        target_sensitivity=0.95, ood_quantile=0.99,
        fingerprint=inference.spec_fingerprint(run, config, members, tta=False),
        model_versions={name: {"checkpoint_sha256": inference.checkpoint_sha256(run.model_dir(name))}
                        for name in members})
    path = inference.spec_path(run, members, tta=False)
    ensemble_lib.save(spec, path)
    image = _png_bytes(80, seed=7)
    explainer = explain.Explainer(inference.Inference.from_run(run, config))
    answer, picture = explainer.explain(image, "ensemble", "eigencam")
    assert explainer.core.spec.weights == spec.weights
    expected = sum(spec.weights[n] * np.array(list(answer["models"][n].values())) for n in members)
    np.testing.assert_allclose(list(answer["probabilities"].values()), expected, atol=1e-5)
    assert answer["predicted_class"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert answer["explained_class"] == answer["predicted_class"]
    size = read_info(run.root).image_size
    assert picture.shape == (size, size, 3) and picture.dtype == np.uint8

    spec.fingerprint = "stale"  # a stale spec is refitted, as predict and serve refit it (no equal-weight fallback)
    ensemble_lib.save(spec, path)
    answer, _ = explain.Explainer(inference.Inference.from_run(run, config)).explain(image)
    refitted = ensemble_lib.load(path)
    assert refitted.fingerprint == inference.spec_fingerprint(run, config, members, tta=False)
    assert refitted.weights != spec.weights and refitted.validation["n"] > 0
    np.testing.assert_allclose(
        list(answer["probabilities"].values()),
        ensemble_lib.combine({n: np.array([list(answer["models"][n].values())]) for n in members}, refitted)[0],
        atol=1e-5)


def test_linear_infill_solves_grad_cams_road_system_and_keeps_kept_pixels():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(0)
    img = torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(0))
    yy, xx = np.mgrid[:40, :30]
    blob = np.exp(-((yy - 18) ** 2 + (xx - 12) ** 2) / 80.0)
    masks = [blob < np.percentile(blob, p) for p in (20, 50, 80)] + [rng.random((40, 30)) > 0.5]
    for keep in masks:  # 1 = keep: large contiguous holes (the CAM's) and scattered ones
        mask = torch.from_numpy(keep.astype(np.float32))
        ours = explain.LinearInfill(noise=0.0)(img, mask)
        assert torch.allclose(ours, NoisyLinearImputer(noise=0.0)(img, mask), atol=1e-6)
        assert torch.equal(ours[:, torch.from_numpy(keep)], img[:, torch.from_numpy(keep)])
    everything = explain.LinearInfill(noise=0.0)(img, torch.zeros(40, 30))  # nothing kept: the channel means
    assert torch.allclose(everything, img.mean(dim=(1, 2), keepdim=True).expand_as(img))
    noisy = [explain.LinearInfill(seed=3)(img, mask) for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], ours)  # seeded noise
