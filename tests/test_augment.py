"""Batch augmentation and the evaluation transform: shapes, ranges, identity at strength 0, real flips, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesion.data import augment
from lesion.data.augment import augment_batch, model_input, normalize, resize, save_augment_figure, to_float

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Asymmetric test images: a bright square in the top-left quadrant over a smooth gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 0.5, size).view(1, 1, 1, size).expand(n, 3, size, size).clone()
    x += 0.1 * torch.rand(n, 3, size, size, generator=gen)
    x[:, :, 2:10, 3:12] = 0.95
    return x.clamp(0, 1)


def test_to_float_layout_range_and_errors():
    images = torch.randint(0, 256, (4, 8, 10, 3), dtype=torch.uint8)
    x = to_float(images)
    assert x.shape == (4, 3, 8, 10) and x.dtype == torch.float32
    assert torch.equal(x[:, 1], images[..., 1].float() / 255)
    assert torch.equal(to_float(images.permute(0, 3, 1, 2), channels_last=False), x)
    with pytest.raises(ValueError, match="3 colour channels"):
        to_float(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))


def test_strength_zero_is_the_identity():
    x = batch()
    assert augment_batch(x, 0.0, torch.Generator().manual_seed(1)) is x


@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_range_and_change(device):
    x = batch(16).to(device)
    out = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.01


def test_same_generator_seed_same_result_and_samples_differ():
    x = batch(8)
    a = augment_batch(x, 1.0, torch.Generator().manual_seed(3))
    b = augment_batch(x, 1.0, torch.Generator().manual_seed(3))
    c = augment_batch(x, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample parameters: identical inputs come out differently within one batch
    same = batch(1).expand(8, -1, -1, -1).contiguous()
    out = augment_batch(same, 1.0, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) == 8


def test_flips_really_flip(monkeypatch):
    """With rotation, zoom and colour off, each output is the input, its h-flip, v-flip or both."""
    monkeypatch.setitem(augment.POLICIES, "basic", dict.fromkeys(augment.POLICIES["basic"], 0.0))
    x = batch(64)
    out = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    seen = set()
    for original, result in zip(x, out):
        candidates = {
            "none": original,
            "h": original.flip(-1),
            "v": original.flip(-2),
            "hv": original.flip(-1).flip(-2),
        }
        matches = [k for k, c in candidates.items() if torch.allclose(result, c, atol=1e-5)]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert seen == {"none", "h", "v", "hv"}


def test_rotation_stays_small_and_keeps_the_centre(monkeypatch):
    monkeypatch.setitem(augment.POLICIES, "basic", {**augment.POLICIES["basic"], "brightness": 0.0, "contrast": 0.0})
    x = torch.zeros(32, 3, 33, 33)
    x[:, :, 14:19, 14:19] = 1.0  # a centred square stays centred under flips, rotation and zoom
    out = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    centre = out[:, :, 15:18, 15:18]
    assert centre.min() > 0.5
    assert out[:, :, :8].max() < 1e-6  # nothing from the centre is thrown to the edge
    # reflection padding: no black corners appear on a bright image
    bright = torch.full((8, 3, 32, 32), 0.8)
    assert augment_batch(bright, 1.0, torch.Generator().manual_seed(0)).min() > 0.7


def test_the_dermoscopy_policy_turns_lesions_any_way_recolours_and_defocuses():
    """A lesion has no up: the dermoscopy policy rotates past the basic policy's 18 degrees, shifts hue and
    saturation (a grey image stays grey) and defocuses about a quarter of the images."""
    x = torch.zeros(256, 3, 33, 33)
    x[:, :, 15:18, 4:29] = 1.0  # a horizontal bar through the centre
    vertical = torch.zeros(33, 33)
    vertical[4:29, 15:18] = 1.0
    basic = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    derm = augment_batch(x, 1.0, torch.Generator().manual_seed(0), "dermoscopy")

    def near_vertical(out):
        return int(((out[:, 0] * vertical).sum(dim=(1, 2)) > 0.5 * vertical.sum()).sum())

    assert near_vertical(basic) == 0 and near_vertical(derm) > 10
    grey = torch.full((64, 3, 16, 16), 0.5)
    out = augment_batch(grey, 1.0, torch.Generator().manual_seed(1), "dermoscopy")
    assert (out.amax(dim=1) - out.amin(dim=1)).max() < 1e-5  # hue and saturation leave grey alone
    colour = (0.2 + 0.6 * torch.rand(64, 3, 1, 1, generator=torch.Generator().manual_seed(2))).expand(-1, -1, 16, 16)
    hue_only = {key: 0.0 for key in augment.POLICIES["dermoscopy"]} | {"hue": 0.03}
    augment.POLICIES["hue-only"] = hue_only
    try:
        shifted = augment_batch(colour, 1.0, torch.Generator().manual_seed(3), "hue-only")
    finally:
        del augment.POLICIES["hue-only"]
    assert (shifted - colour).abs().mean() > 1e-3  # hues moved
    assert torch.allclose(shifted.mean(dim=1), colour.mean(dim=1), atol=1e-3)  # brightness kept
    flat = torch.zeros(200, 3, 17, 17)
    flat[:, :, 8, 8] = 1.0  # a point: blurred images spread it
    spread = augment_batch(flat, 1.0, torch.Generator().manual_seed(4), "dermoscopy")
    blurred = (spread[:, 0].amax(dim=(1, 2)) < 0.6).float().mean()
    assert 0.1 < blurred < 0.45


def test_the_config_offers_exactly_the_policies_augment_knows():
    from lesion.config import AUGMENT_POLICIES

    assert AUGMENT_POLICIES == tuple(augment.POLICIES)


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="dermoscopy"):
        augment_batch(batch(2), 1.0, None, "strong")


def test_normalize_and_resize():
    x = torch.full((2, 3, 8, 8), 0.5)
    out = normalize(x, [0.5, 0.25, 0.0], [0.5, 0.25, 1.0])
    assert torch.allclose(out[:, 0], torch.zeros(2, 8, 8)) and torch.allclose(out[:, 1], torch.ones(2, 8, 8))
    assert torch.allclose(out[:, 2], torch.full((2, 8, 8), 0.5))
    assert resize(x, 8) is x
    assert resize(x, 16).shape == (2, 3, 16, 16) and torch.allclose(resize(x, 16), torch.full((2, 3, 16, 16), 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_model_input_from_numpy_and_tensor(device):
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    out = model_input(images, [0.5] * 3, [0.5] * 3, 32, device=device)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32 and out.device.type == device
    assert out.min() >= -1 and out.max() <= 1
    same = model_input(torch.as_tensor(images), [0.5] * 3, [0.5] * 3, 32, device=device)
    assert torch.equal(out, same)
    flat = model_input(np.full((1, 8, 8, 3), 255, np.uint8), [0.5] * 3, [0.25] * 3, 8)
    assert torch.allclose(flat, torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="uint8"):
        model_input(images.astype(np.float32), [0.5] * 3, [0.5] * 3, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_with_a_cpu_generator_matches_cpu():
    x = batch(8)
    cpu = augment_batch(x, 1.0, torch.Generator().manual_seed(0))
    gpu = augment_batch(x.cuda(), 1.0, torch.Generator().manual_seed(0))
    assert (gpu.cpu() - cpu).abs().max() < 1e-4


def test_augment_figure_is_written(tmp_path):
    images = (batch(3) * 255).byte().permute(0, 2, 3, 1).numpy()
    path = save_augment_figure(images, tmp_path / "aug.png", strength=1.0, seed=0)
    assert path.stat().st_size > 1000
