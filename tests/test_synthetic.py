"""The synthetic data set: deterministic, every class present, sensible masks, grouped views, and learnable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from lesion.config import DataConfig
from lesion.data.preprocess import preprocess
from lesion.data.synthetic import class_counts, generate
from lesion.labels import DX_CLASSES


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    first = list(generate(40, 32, seed=5))
    second = list(generate(40, 32, seed=5))
    other = list(generate(40, 32, seed=6))
    assert [r["image"].tobytes() for r in first] == [r["image"].tobytes() for r in second]
    assert [r["mask"].tobytes() for r in first] == [r["mask"].tobytes() for r in second]
    assert [r["dx"] for r in first] == [r["dx"] for r in second]
    assert [r["image"].tobytes() for r in first] != [r["image"].tobytes() for r in other]


def test_records_have_the_contract_fields_and_types():
    records = list(generate(30, 48, seed=0))
    assert len(records) == 30
    assert len({r["image_id"] for r in records}) == 30
    for r in records:
        assert r["image"].shape == (48, 48, 3) and r["image"].dtype == np.uint8
        assert r["mask"].shape == (48, 48) and r["mask"].dtype == bool
        assert r["dx"] in DX_CLASSES
        assert r["sex"] in ("male", "female") and isinstance(r["localization"], str) and r["dx_type"]
        assert 0 < r["age"] <= 90


def test_all_classes_present_with_capped_imbalance():
    counts = Counter(r["dx"] for r in generate(280, 16, seed=0))
    assert counts == class_counts(280)
    assert set(counts) == set(DX_CLASSES)
    assert counts.most_common(1)[0][0] == "nv"
    assert min(counts.values()) >= 0.08 * 280


def test_masks_cover_a_plausible_lesion_that_is_darker_or_redder_than_skin():
    for r in generate(60, 64, seed=1):
        share = r["mask"].mean()
        assert 0.01 < share < 0.7, (r["dx"], share)
        lesion = r["image"][r["mask"]].astype(float)
        skin = r["image"][~r["mask"]].astype(float)
        skin = skin[skin.mean(1) > 60]  # leave out the black vignette
        # a lesion differs in colour from its skin: the mean colours are clearly apart
        assert np.abs(lesion.mean(0) - skin.mean(0)).max() > 20, r["dx"]


def test_some_lesions_have_two_views_that_differ():
    records = list(generate(120, 32, seed=2))
    by_lesion: dict[str, list] = {}
    for r in records:
        by_lesion.setdefault(r["lesion_id"], []).append(r)
    pairs = [views for views in by_lesion.values() if len(views) == 2]
    assert len(pairs) >= 10
    assert all(a["dx"] == b["dx"] and a["age"] == b["age"] for a, b in pairs)
    assert all(not np.array_equal(a["image"], b["image"]) for a, b in pairs)


def test_some_images_have_a_black_vignette_and_hair():
    records = list(generate(100, 64, seed=3))
    corner_dark = [r["image"][:4, :4].mean() < 30 or r["image"][-4:, -4:].mean() < 30 for r in records]
    assert 10 <= sum(corner_dark) <= 60


@pytest.mark.timeout(300)
def test_a_tiny_cnn_learns_it_well_above_chance():
    """Through the ingest preprocessing (border crop, hair removal) as in the workflow."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    records = list(generate(420, 32, seed=11))
    config = DataConfig(image_size=32)
    pixels = np.stack([preprocess(r["image"], config)[0] for r in records])
    images = torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255
    labels = torch.as_tensor([DX_CLASSES.index(r["dx"]) for r in records])
    lesions = [r["lesion_id"] for r in records]
    # hold out whole lesions, so a second view of a training lesion cannot leak into validation
    val_lesions = set(sorted(set(lesions))[::4])
    val = torch.as_tensor([lesion in val_lesions for lesion in lesions])
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(DX_CLASSES)),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_train, y_train = images[~val], labels[~val]
    for _epoch in range(8):
        model.train()
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[val]).argmax(1) == labels[val]).float().mean().item()
    print(f"validation accuracy {accuracy:.3f}")
    assert accuracy > 2 / len(DX_CLASSES), accuracy
