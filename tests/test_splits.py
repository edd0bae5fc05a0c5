"""The lesion-grouped, class-stratified split: no lesion in two splits, ratios, stratification, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesion.data.splits import split_by_lesion

HAM_DX = {"nv": 5713, "mel": 954, "bkl": 943, "bcc": 440, "akiec": 284, "vasc": 118, "df": 101}


def ham_like(seed: int = 0) -> pd.DataFrame:
    """HAM10000's class counts, with lesions of 1 to 6 images (about 1.35 images per lesion, as in HAM10000)."""
    rng = np.random.default_rng(seed)
    rows = []
    for dx, count in HAM_DX.items():
        lesion = 0
        while count > 0:
            size = min(count, int(rng.choice([1, 1, 1, 2, 2, 3, 4, 6])))
            rows += [(dx, f"{dx}-{lesion}")] * size
            count -= size
            lesion += 1
    return pd.DataFrame(rows, columns=["dx", "lesion_id"]).sample(frac=1, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def ham():
    frame = ham_like()
    frame["split"] = split_by_lesion(frame["dx"].tolist(), frame["lesion_id"].tolist(), seed=0)
    return frame


def test_no_lesion_in_two_splits(ham):
    assert ham.groupby("lesion_id")["split"].nunique().max() == 1


def test_ratios_close_overall_and_per_class(ham):
    overall = ham["split"].value_counts(normalize=True)
    assert overall["train"] == pytest.approx(0.70, abs=0.01)
    assert overall["val"] == pytest.approx(0.15, abs=0.01)
    assert overall["test"] == pytest.approx(0.15, abs=0.01)
    per_class = pd.crosstab(ham["dx"], ham["split"], normalize="index")
    assert (per_class["train"] - 0.70).abs().max() < 0.03
    assert (per_class[["val", "test"]] - 0.15).abs().max().max() < 0.03


def test_every_class_in_every_split_when_it_has_enough_lesions():
    labels = ["common"] * 50 + ["rare"] * 3
    groups = [f"c{i}" for i in range(50)] + ["r0", "r1", "r2"]
    split = split_by_lesion(labels, groups, seed=0)
    assert sorted(split[50:]) == ["test", "train", "val"]


def test_deterministic_and_independent_of_row_order(ham):
    again = split_by_lesion(ham["dx"].tolist(), ham["lesion_id"].tolist(), seed=0)
    assert (again == ham["split"].to_numpy()).all()
    reversed_rows = split_by_lesion(ham["dx"].tolist()[::-1], ham["lesion_id"].tolist()[::-1], seed=0)
    assert (reversed_rows[::-1] == ham["split"].to_numpy()).all()
    other_seed = split_by_lesion(ham["dx"].tolist(), ham["lesion_id"].tolist(), seed=1)
    assert (other_seed != ham["split"].to_numpy()).mean() > 0.2


def test_missing_lesion_ids_are_their_own_groups():
    labels = ["a"] * 40
    split = split_by_lesion(labels, [None] * 20 + [float("nan")] * 10 + [""] * 10, seed=0)
    assert pd.Series(split).value_counts().to_dict() == {"train": 28, "val": 6, "test": 6}


def test_custom_fractions_and_an_empty_split():
    labels = ["a"] * 100
    split = split_by_lesion(labels, list(range(100)), fractions=(0.8, 0.2, 0.0), seed=0)
    assert pd.Series(split).value_counts().to_dict() == {"train": 80, "val": 20}


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        split_by_lesion(["a"], ["g"], fractions=fractions)


def test_real_ham10000_split(ham10000):
    meta = pd.read_csv(ham10000 / "metadata.csv")
    split = split_by_lesion(meta["dx"].tolist(), meta["lesion_id"].tolist(), seed=0)
    meta["split"] = split
    assert meta.groupby("lesion_id")["split"].nunique().max() == 1
    shares = pd.crosstab(meta["dx"], meta["split"], normalize="index")
    assert (shares["test"] - 0.15).abs().max() < 0.02 and (shares["train"] - 0.70).abs().max() < 0.02
