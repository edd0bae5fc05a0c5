"""The simulated second dermatoscope (lesion.data.shift): each shift changes images the way it says, keeps their
size, is reproducible, is undone where a measure claims to undo it, and writes a folder the HAM10000 reader takes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lesion.data.preprocess import shades_of_gray
from lesion.data.shift import SHIFTS, colour_cast, shift_image, write_shifted_ham10000
from lesion.data.sources import read_ham10000
from lesion.data.synthetic import generate

HAM_HEADER = "image_id,lesion_id,dx,dx_type,age,sex,localization\n"


@pytest.fixture(scope="module")
def image():
    """A 200 x 150 synthetic dermoscopy image, the dev copy's size."""
    square = next(generate(1, 200, seed=4))["image"]
    return np.ascontiguousarray(square[25:175])


@pytest.mark.parametrize("shift", SHIFTS)
def test_each_shift_changes_the_image_keeps_its_size_and_is_reproducible(image, shift):
    first = shift_image(image, shift, np.random.default_rng([0, 7]))
    again = shift_image(image, shift, np.random.default_rng([0, 7]))
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - image).mean() > 2, f"{shift} hardly changes the image"


def test_the_colour_cast_warms_the_image_and_shades_of_gray_undoes_most_of_it(image):
    cast = colour_cast(image)
    red_over_blue = lambda img: img[..., 0].mean() / img[..., 2].mean()  # noqa: E731
    assert red_over_blue(cast) > 1.3 * red_over_blue(image)
    corrected = np.abs(shades_of_gray(cast).astype(int) - shades_of_gray(image)).mean()
    assert corrected < 0.3 * np.abs(cast.astype(int) - image).mean()


def test_the_scale_shift_enlarges_the_central_two_thirds(image):
    shifted = shift_image(image, "scale", np.random.default_rng(0))
    height, width = image.shape[:2]
    h, w = round(height / 1.5), round(width / 1.5)
    top, left = (height - h) // 2, (width - w) // 2
    centre = image[top:top + h, left:left + w].astype(int)
    shrunk = np.asarray(Image.fromarray(shifted).resize((w, h), Image.BILINEAR)).astype(int)
    whole = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)).astype(int)
    assert np.abs(shrunk - centre).mean() < 0.5 * np.abs(whole - centre).mean()


def test_unknown_shift_is_refused(image):
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        shift_image(image, "fog", np.random.default_rng(0))


def test_shifted_copy_reads_as_the_same_labelled_lesions(tmp_path, image):
    root = tmp_path / "ham"
    (root / "images").mkdir(parents=True)
    rows = [("ISIC_1", "HAM_1", "mel"), ("ISIC_2", "HAM_1", "mel"), ("ISIC_3", "HAM_2", "nv"),
            ("ISIC_4", "HAM_3", "bcc")]
    for k, (image_id, _, _) in enumerate(rows):
        Image.fromarray(np.roll(image, 10 * k, axis=1)).save(root / "images" / f"{image_id}.jpg", quality=95)
    (root / "metadata.csv").write_text(
        HAM_HEADER + "".join(f"{i},{lesion},{dx},histo,50,male,back\n" for i, lesion, dx in rows))

    chosen = ["ISIC_3", "ISIC_1", "ISIC_4"]
    clean = write_shifted_ham10000(root, chosen, tmp_path / "clean", None)
    shifted = write_shifted_ham10000(root, chosen, tmp_path / "blur", "blur")
    assert (clean / "images" / "ISIC_1.jpg").read_bytes() == (root / "images" / "ISIC_1.jpg").read_bytes()
    for folder in (clean, shifted):
        records, rejected = read_ham10000(folder)
        assert not rejected
        assert {(r["image_id"], r["lesion_id"], r["dx"]) for r in records} == {
            ("ISIC_3", "HAM_2", "nv"), ("ISIC_1", "HAM_1", "mel"), ("ISIC_4", "HAM_3", "bcc")}
    original = np.asarray(Image.open(root / "images" / "ISIC_4.jpg"))
    blurred = np.asarray(Image.open(shifted / "images" / "ISIC_4.png"))
    assert blurred.shape == original.shape
    sharpness = lambda img: np.abs(np.diff(img.astype(int), axis=1)).mean()  # noqa: E731
    assert sharpness(blurred) < 0.8 * sharpness(original)
