"""Engines behind the one inference core: every architecture exports to ONNX and ``torch.export`` and gives eager
torch's probabilities on real HAM10000 images; the ONNX Runtime loader caches a run member's export."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lesion.data.preprocess import decode_image, preprocess
from lesion.config import DataConfig
from lesion.engines import ExportError, OnnxRuntimeLoader, export_program, loader_for
from lesion.export import PARITY_TOLERANCE
from lesion.inference import Inference, Member, predict_proba
from lesion.models import MODEL_NAMES, create_model, model_spec, save_checkpoint
from lesion.records import CheckpointRecord

SIZE = 32  # small input: every architecture in seconds


def real_images(ham10000, count: int, size: int) -> np.ndarray:
    """``count`` HAM10000 images preprocessed as at ingest to ``size`` px."""
    files = sorted((ham10000 / "images").glob("*.jpg"))[:count]
    return np.stack([preprocess(decode_image(f), DataConfig(image_size=size))[0] for f in files])


def save_member(folder, arch: str, input_size: int = SIZE, **arch_kwargs) -> None:
    """A randomly initialised 7-class ``arch`` saved as a run member (``best.pt`` and ``model.json``)."""
    torch.manual_seed(0)
    kwargs = {"zero_init_last": False} if arch == "resnet50" else {}
    net = create_model(arch, 7, input_size=input_size, **arch_kwargs, **kwargs).eval()
    spec = model_spec(arch)
    record = CheckpointRecord(name=arch, arch=arch, task="multiclass", classes=("mel", "nv", "bcc", "akiec", "bkl",
                              "df", "vasc"), num_classes=7, input_size=input_size, mean=spec["mean"],
                              std=spec["std"], arch_kwargs=arch_kwargs)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "best.pt", net, record)


HEAVY = {"resnet50", "densenet121"}  # minutes of export on 2 cores: parity checked in the slow suite


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in MODEL_NAMES])
def test_every_architecture_exports_with_parity_on_real_images(arch, ham10000, tmp_path):
    images = real_images(ham10000, 6, SIZE + 8)  # the cached size above the input size: the resize runs too
    loader = OnnxRuntimeLoader(cache_dir=str(tmp_path / "cache"))
    folder = tmp_path / arch
    save_member(folder, arch, **({"conv_widths": [8, 16, 32, 64], "fc_widths": [32, 16]}
                                 if arch == "custom_cnn" else {}))
    eager = Member.load(arch, folder)
    onnx = loader(arch, folder)
    for tta in (False, True):
        reference = eager.probs(images, tta=tta, batch_size=4)
        got = onnx.probs(images, tta=tta, batch_size=4)
        assert got.shape == reference.shape == (6, 7)
        assert np.abs(got - reference).max() <= PARITY_TOLERANCE, (arch, tta)
    program = export_program(eager.net, SIZE, arch)
    pt2 = predict_proba(program.module(), eager.checkpoint, images, tta=False)
    assert np.abs(pt2 - eager.probs(images, tta=False)).max() <= PARITY_TOLERANCE, arch
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1  # one export per checkpoint sha256


def test_the_onnx_cache_is_reused_and_keyed_by_checkpoint(tmp_path):
    save_member(tmp_path / "m", "scratch_cnn")
    loader = OnnxRuntimeLoader(cache_dir=str(tmp_path / "cache"))
    first = loader("m", tmp_path / "m")
    made = (tmp_path / "cache").stat().st_mtime_ns, sorted((tmp_path / "cache").iterdir())
    second = loader("m", tmp_path / "m")
    assert second.onnx_file == first.onnx_file and made[1] == sorted((tmp_path / "cache").iterdir())
    assert first.onnx_file.endswith(f"{first.checkpoint.checkpoint_sha256}.onnx")
    assert first.net is None and first.summary()["arch"] == "scratch_cnn"
    batch = np.random.default_rng(0).integers(0, 256, (130, SIZE, SIZE, 3), dtype=np.uint8)
    probs = first.probs(batch, tta=True, batch_size=64)  # chunks of 64, the last one short
    assert probs.shape == (130, 7) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_engine_choice_and_its_errors(tmp_path):
    assert loader_for("torch") is None
    assert loader_for("onnxruntime", tmp_path).cache_dir == str(tmp_path)
    with pytest.raises(ValueError, match="unknown engine 'tvm'.*torch, onnxruntime"):
        loader_for("tvm")
    save_member(tmp_path / "m", "scratch_cnn")
    with pytest.raises(ValueError, match="runs on the CPU"):
        OnnxRuntimeLoader(str(tmp_path / "c"))("m", tmp_path / "m", device="cuda")
    with pytest.raises(FileNotFoundError, match="no export cache"):
        OnnxRuntimeLoader()("m", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="--quantize int8"):
        OnnxRuntimeLoader(str(tmp_path / "c"), int8=True)("m", tmp_path / "m")


def test_a_failing_export_names_the_model_and_the_cause(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(x.sum().item()).expand(len(x), 7)  # data-dependent Python: torch.export refuses

    with pytest.raises(ExportError, match="odd_model: torch.export failed"):
        export_program(Unexportable(), SIZE, "odd_model")


def test_the_core_answers_alike_on_both_engines(tmp_path):
    """The engine is a member loader: the same core, the same answers (to the parity tolerance)."""
    from lesion import ensemble

    for name in ("a", "b"):
        save_member(tmp_path / name, "scratch_cnn")
    classes = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
    spec = ensemble.EnsembleSpec(models=["a", "b"], weights={"a": 0.5, "b": 0.5}, temperature=1.0,
                                 temperatures={"a": 1.0, "b": 1.0}, malignant_threshold=0.3, ood_threshold=2.0,
                                 uncertain_margin=0.0, task="multiclass", classes=classes, target_sensitivity=0.95,
                                 ood_quantile=0.99, tta=True)
    dirs = {name: str(tmp_path / name) for name in ("a", "b")}
    torch_core = Inference(spec, DataConfig(image_size=SIZE), dirs).load()
    onnx_core = Inference(spec, DataConfig(image_size=SIZE), dirs, loader=loader_for("onnxruntime", tmp_path / "c"))
    assert onnx_core.engine == "onnxruntime" and torch_core.engine == "torch"
    images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    a, b = torch_core.predict(images), onnx_core.load().predict(images)
    assert [x["decision"] for x in a] == [x["decision"] for x in b]
    assert max(abs(x["malignant_probability"] - y["malignant_probability"]) for x, y in zip(a, b)) <= 1e-4
    assert onnx_core.on_torch().engine == "torch" and not onnx_core.on_torch().members
    # the one-process server predicts on ONNX Runtime and explains on eager torch (Grad-CAM needs gradients)
    import asyncio

    from pipelines.api import LocalBackend

    backend = LocalBackend(onnx_core.unloaded())
    explained = asyncio.run(backend.explain(images[0], "a", "gradcam"))
    assert backend.core.engine == "onnxruntime" and explained["overlay_png"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_laptop_members_keep_parity_at_their_sizes(ham10000, tmp_path):
    """The laptop recipe's members (ImageNet-initialised EfficientNet-Lite0 at 128 and 96 px from 144 px images),
    flip TTA, on 32 real images: ONNX Runtime and torch.export within the tolerance of eager torch."""
    images = real_images(ham10000, 32, 144)
    for size in (128, 96):
        folder = tmp_path / f"lite0_{size}"
        torch.manual_seed(0)
        net = create_model("efficientnet_lite0", 7, pretrained=True, input_size=size).eval()
        spec = model_spec("efficientnet_lite0")
        record = CheckpointRecord(name=folder.name, arch="efficientnet_lite0", task="multiclass",
                                  classes=("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"), num_classes=7,
                                  input_size=size, mean=spec["mean"], std=spec["std"])
        folder.mkdir()
        save_checkpoint(folder / "best.pt", net, record)
        eager = Member.load(folder.name, folder)
        reference = eager.probs(images, tta=True, batch_size=16)
        onnx = OnnxRuntimeLoader(cache_dir=str(tmp_path / "cache"))(folder.name, folder)
        assert np.abs(onnx.probs(images, tta=True, batch_size=16) - reference).max() <= PARITY_TOLERANCE
        program = export_program(eager.net, size, folder.name)
        pt2 = predict_proba(program.module(), eager.checkpoint, images, tta=True, batch_size=16)
        assert np.abs(pt2 - reference).max() <= PARITY_TOLERANCE


def test_an_onnx_member_pickles_and_answers_alike_after(tmp_path):
    # Ray Serve pickles a replica's attributes (to find handles in them): a loaded ORT member must survive that
    import cloudpickle

    save_member(tmp_path / "m", "scratch_cnn")
    member = OnnxRuntimeLoader(cache_dir=str(tmp_path / "cache"), threads=1)("m", tmp_path / "m")
    copy = pickle.loads(cloudpickle.dumps(member))
    batch = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    assert copy.threads == 1 and np.array_equal(copy.probs(batch, tta=False), member.probs(batch, tta=False))
