"""Decoding (every mode, bad input), black-border crop, hair removal and resize, on real HAM10000 images."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lesion.config import ConfigError, DataConfig, config_from_dict
from lesion.data.preprocess import (
    ImageError,
    crop_black_border,
    decode_image,
    find_border_box,
    hair_mask,
    preprocess,
    preprocess_bytes,
    remove_hair,
    resize_to_square,
    save_preprocess_figure,
    shades_of_gray,
    shrink_to,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def real_images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((folder / "images").glob("*.jpg"))}


def gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


@pytest.fixture(scope="module")
def clean_real(ham10000_fullres) -> np.ndarray:
    """A real 600x450 image with hardly any hair or border (a vascular lesion)."""
    return decode_image(real_images(ham10000_fullres)["ISIC_0024375"])


# --- decoding -------------------------------------------------------------------------------------------------------


def test_decodes_real_jpegs_as_rgb(ham10000_fullres):
    for path in real_images(ham10000_fullres).values():
        img = decode_image(path)
        assert img.shape == (450, 600, 3) and img.dtype == np.uint8
    assert np.array_equal(decode_image(path.read_bytes()), decode_image(str(path)))


RGB = np.array([[[200, 10, 30], [0, 255, 128]], [[12, 34, 56], [90, 180, 250]]], np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_roundtrip(fmt):
    assert np.array_equal(decode_image(encode(Image.fromarray(RGB), fmt)), RGB)


def test_rgba_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[0, 0].tolist() == [200, 200, 200]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert abs(int(out[1, 0, 0]) - 100) <= 1


def test_palette_grayscale_and_la_modes():
    palette = Image.fromarray(RGB).quantize(colors=4)
    assert palette.mode == "P"
    assert np.array_equal(decode_image(encode(palette, "PNG")), np.asarray(palette.convert("RGB")))
    levels = np.array([[0, 64], [128, 255]], np.uint8)
    out = decode_image(encode(Image.fromarray(levels, "L"), "PNG"))
    assert out.shape == (2, 2, 3) and np.array_equal(out[..., 0], levels) and np.array_equal(out[..., 2], levels)
    la = Image.merge("LA", [Image.fromarray(levels), Image.fromarray(np.full((2, 2), 255, np.uint8))])
    assert np.array_equal(decode_image(encode(la, "PNG"))[..., 1], levels)


def test_sixteen_bit_is_scaled_to_eight_bit_not_clipped():
    values = np.array([[0, 257], [32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        out = decode_image(encode(image, fmt))
        assert out[..., 0].tolist() == [[0, 1], [128, 255]], fmt


def test_cmyk_jpeg_is_converted():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(image, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(encode(Image.fromarray(image), "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() > 200 and out[-15:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a CSV file, not an image\n" * 10, "not a decodable image"),
        (encode(Image.new("RGB", (8, 8)), "GIF"), "not a decodable image"),
    ],
)
def test_bad_input_raises_image_error_with_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_raises(ham10000_fullres):
    data = next(iter(real_images(ham10000_fullres).values())).read_bytes()
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(ImageError, match="truncated"):
            decode_image(data[:cut])


def test_missing_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        decode_image(tmp_path / "absent.jpg")


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("RGB", (4000, 3000)), "PNG")
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(data, max_pixels=1_000_000)
    # a header claiming a huge size with no pixel data behind it must fail on the size, not on the missing data
    header = bytearray(encode(Image.new("RGB", (8, 8)), "BMP")[:54])
    header[18:22] = (100_000).to_bytes(4, "little")
    header[22:26] = (100_000).to_bytes(4, "little")
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(bytes(header), max_pixels=50_000_000)


# --- black border -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 3])
def test_frame_is_cropped_to_the_true_box(clean_real, scale):
    """At 600x450 and at 1800x1350 (where the search runs on a downscaled copy)."""
    img = cv2.resize(clean_real, (600 * scale, 450 * scale))
    top, bottom, left, right = 37 * scale, 420 * scale, 52 * scale, 571 * scale
    framed = np.full_like(img, 8)
    framed[top:bottom, left:right] = img[top:bottom, left:right]
    box = find_border_box(framed)
    assert np.abs(np.array(box) - [top, bottom, left, right]).max() <= 2 + scale, box


def test_circular_vignette_is_cropped_to_the_inscribed_box(clean_real):
    img = clean_real.copy()
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    radius = 0.45 * np.hypot(h, w) * 0.75
    outside = np.hypot(yy - h / 2, xx - w / 2) > radius
    img[outside] = 5
    cropped, _ = crop_black_border(img)
    dark_before = (gray(img) < 40).mean()
    dark_after = (gray(cropped) < 40).mean()
    assert dark_before > 0.1
    assert dark_after < 0.01 * dark_before + 0.002
    # the crop keeps most of the bright disc: at least 80% of its inscribed rectangle's area
    inscribed = 0
    for half_w in range(1, w // 2):
        half_h = min(h / 2, np.sqrt(max(radius**2 - half_w**2, 0)))
        inscribed = max(inscribed, 4 * half_w * half_h)
    assert cropped.shape[0] * cropped.shape[1] >= 0.8 * inscribed


def edge_dark_share(img: np.ndarray, band: int = 30) -> float:
    dark = img.max(axis=2) < 60
    return np.concatenate([dark[:band].ravel(), dark[-band:].ravel(), dark[:, :band].ravel(), dark[:, -band:].ravel()]).mean()


def test_real_images_with_a_dark_border_lose_most_of_it(ham10000_fullres):
    cropped_any = 0
    for path in real_images(ham10000_fullres).values():
        img = decode_image(path)
        cropped, _ = crop_black_border(img)
        if cropped.shape == img.shape:
            continue
        cropped_any += 1
        # darkness measured at the image edges, where a vignette lives (dark lesions sit in the middle)
        assert edge_dark_share(cropped) <= 0.5 * edge_dark_share(img), path.name
        assert cropped.shape[0] * cropped.shape[1] >= 0.6 * img.shape[0] * img.shape[1], path.name
    assert cropped_any >= 2  # ISIC_0024367 and ISIC_0024550 have a dark vignette


def test_images_without_a_border_are_left_alone(ham10000_fullres):
    for name in ("ISIC_0024311", "ISIC_0024354", "ISIC_0024688", "ISIC_0024793"):  # incl. a dark melanoma
        img = decode_image(real_images(ham10000_fullres)[name])
        assert find_border_box(img) == (0, 450, 0, 600), name


def test_all_black_image_is_not_cropped_to_nothing():
    img = np.zeros((100, 120, 3), np.uint8)
    img[45:55, 55:65] = 200
    cropped, _ = crop_black_border(img)
    assert cropped.shape == img.shape


def test_mask_follows_the_crop(clean_real):
    img = np.full((300, 400, 3), 5, np.uint8)
    img[20:290, 30:380] = cv2.resize(clean_real, (350, 270))
    mask = np.zeros((300, 400), bool)
    mask[100:200, 150:250] = True
    cropped, cropped_mask = crop_black_border(img, mask)
    assert cropped_mask.shape == cropped.shape[:2]
    assert cropped_mask.sum() == mask.sum()
    top, _, left, _ = find_border_box(img)
    rows, cols = np.nonzero(cropped_mask)
    assert (rows.min() + top, cols.min() + left) == (100, 150)


# --- hair ---------------------------------------------------------------------------------------------------------


def draw_hair(img: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hairy = img.copy()
    for _ in range(12):
        points = np.cumsum(rng.normal(0, 25, (8, 2)), 0) + rng.uniform(0, 1, 2) * [600, 450]
        shade = int(rng.uniform(10, 50))
        cv2.polylines(hairy, [points.astype(np.int32)], False, (shade, shade, shade), 2, cv2.LINE_AA)
    drawn = np.abs(hairy.astype(int) - img.astype(int)).max(axis=2) > 30
    return hairy, drawn


def test_hair_is_really_removed(clean_real):
    hairy, drawn = draw_hair(clean_real)
    assert drawn.mean() > 0.005
    cleaned = remove_hair(hairy)
    error_before = np.abs(hairy.astype(float) - clean_real)[drawn].mean()
    error_after = np.abs(cleaned.astype(float) - clean_real)[drawn].mean()
    assert error_after < 0.5 * error_before, (error_before, error_after)
    assert hair_mask(hairy)[drawn].mean() > 0.9  # the detector finds the hair pixels


def test_hair_removal_leaves_the_rest_of_the_image_alone(ham10000_fullres):
    for name in ("ISIC_0024311", "ISIC_0024354", "ISIC_0024370"):  # nevus, nevus, vascular (red, kept)
        img = decode_image(real_images(ham10000_fullres)[name])
        changed = np.abs(remove_hair(img).astype(int) - img).max(axis=2) > 10
        assert changed.mean() < 0.03, name


def test_real_hairy_image_gets_less_dark_hair(ham10000_fullres):
    img = decode_image(real_images(ham10000_fullres)["ISIC_0024832"])  # dense scalp hair
    cleaned = remove_hair(img)
    assert hair_mask(cleaned).mean() < 0.5 * hair_mask(img).mean()
    assert (gray(cleaned) < 60).mean() < 0.5 * (gray(img) < 60).mean()


# --- resize and colour -------------------------------------------------------------------------------------------


def disc(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a centred dark disc, and the disc's mask."""
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.hypot(yy - height / 2, xx - width / 2) < 0.3 * min(height, width)
    img = np.full((height, width, 3), 180, np.uint8)
    img[mask] = 60
    return img, mask


def box_ratio(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    return (np.ptp(cols) + 1) / (np.ptp(rows) + 1)


@pytest.mark.parametrize("height, width", [(767, 1022), (640, 480), (300, 300), (40, 2000)])
def test_resize_keeps_the_aspect_crop_takes_the_centre(height, width):
    img, mask = disc(height, width)
    out, out_mask = resize_to_square(img, 64, mask)
    assert out.shape == (64, 64, 3) and out_mask.shape == (64, 64)
    assert 0.9 <= box_ratio(out_mask) <= 1.1  # a round lesion stays round (stretching 1022x767 would give 1.33)
    assert box_ratio(out[..., 0] < 120) == box_ratio(out_mask)  # the mask follows the image
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    expected = cv2.resize(img[top:top + side, left:left + side], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out, expected)


def test_resize_pad_keeps_the_whole_image_on_black():
    img, mask = disc(300, 600)
    out, out_mask = resize_to_square(img, 60, mask, fit="pad")
    assert 0.9 <= box_ratio(out_mask) <= 1.1
    assert out[:14].max() == 0 and out[-14:].max() == 0  # 150 px bars above and below = 15 of 60 rows
    assert (out[16:44] > 0).all()  # the whole width of the image is kept
    assert out_mask.sum() == pytest.approx(mask.sum() / 100, rel=0.1)  # all of the lesion kept, at 1/10 scale
    with pytest.raises(ValueError, match="resize fit must be one of crop, pad, got 'stretch'"):
        resize_to_square(img, 60, fit="stretch")


def test_large_images_are_shrunk_with_their_mask_and_aspect():
    img, mask = disc(1500, 2000)
    small, small_mask = shrink_to(img, 1024, mask)
    assert small.shape == (768, 1024, 3) and small_mask.shape == (768, 1024)
    assert 0.95 <= box_ratio(small_mask) <= 1.05
    assert shrink_to(img[:500, :600], 1024)[0].shape == (500, 600, 3)  # small enough already: untouched


def with_cast(img: np.ndarray, gains) -> np.ndarray:
    return np.clip(img.astype(np.float32) * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)


def chromaticity(img: np.ndarray) -> np.ndarray:
    return img / np.maximum(img.sum(axis=2, keepdims=True, dtype=np.float64), 1.0)


def test_shades_of_gray_removes_a_colour_cast(clean_real):
    neutral = np.clip(np.random.default_rng(0).normal(128, 30, (120, 160, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
    cast = with_cast(neutral, (1.25, 1.0, 0.7))  # warm light
    means = cast.reshape(-1, 3).mean(0)
    assert means.max() / means.min() > 1.7
    fixed = shades_of_gray(cast).reshape(-1, 3).mean(0)
    assert fixed.max() / fixed.min() < 1.03  # channel means equalise
    assert np.abs(shades_of_gray(neutral).astype(int) - neutral).max() <= 1  # no cast, nothing to do
    # the same lesion under two lights comes out in (nearly) the same colours (chromaticity; brightness may differ)
    warm, cold = with_cast(clean_real, (1.1, 0.95, 0.8)), with_cast(clean_real, (0.8, 0.95, 1.1))
    before = np.abs(chromaticity(warm) - chromaticity(cold)).mean()
    assert np.abs(chromaticity(shades_of_gray(warm)) - chromaticity(shades_of_gray(cold))).mean() < 0.1 * before
    assert np.array_equal(shades_of_gray(np.zeros((4, 4, 3), np.uint8)), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="p must be > 0"):
        shades_of_gray(neutral, p=0)


def settings(**fields) -> DataConfig:
    """DataConfig at 32 px with ``fields`` changed."""
    return dataclasses.replace(DataConfig(image_size=32), **fields)


def test_preprocess_applies_colour_constancy_and_the_resize_fit_when_asked(clean_real):
    cast = with_cast(clean_real, (1.2, 1.0, 0.75))
    plain, _ = preprocess(cast, settings())
    assert np.array_equal(plain, preprocess(cast, DataConfig(image_size=32))[0])  # off by default
    corrected, _ = preprocess(cast, settings(color_constancy="shades_of_gray"))
    assert np.array_equal(corrected, shades_of_gray(plain))
    padded, _ = preprocess(cast, settings(resize="pad", crop_border=False, remove_hair=False))
    assert padded[:3].max() == 0 and padded[-3:].max() == 0  # 600x450 padded to a square: bars above and below
    with pytest.raises(ConfigError, match="data.color_constancy: expected one of none, shades_of_gray; got 'retinex'"):
        config_from_dict({"data": {"color_constancy": "retinex"}})


# --- the whole step -----------------------------------------------------------------------------------------------


def test_preprocess_honours_the_config(clean_real):
    framed = np.full((450, 600, 3), 5, np.uint8)
    framed[40:410, 50:550] = cv2.resize(clean_real, (500, 370))
    hairy, _ = draw_hair(framed)
    mask = np.zeros((450, 600), bool)
    mask[200:260, 250:350] = True
    out, out_mask = preprocess(hairy, DataConfig(image_size=32), mask)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out_mask.shape == (32, 32) and out_mask.dtype == bool
    assert (gray(out) < 40).mean() < 0.01  # border gone
    off, _ = preprocess(hairy, DataConfig(image_size=32, crop_border=False, remove_hair=False))
    assert (gray(off) < 40).mean() > 0.1  # border kept when the step is off
    expected = cv2.resize(hairy[:, 75:525], (32, 32), interpolation=cv2.INTER_AREA)  # the centred 450x450 square
    assert np.array_equal(off, expected)


def test_preprocess_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError, match="mask shape"):
        preprocess(np.zeros((10, 10, 3), np.uint8), DataConfig(), np.zeros((5, 5), bool))


def test_preprocess_bytes_matches_decode_then_preprocess(ham10000_fullres):
    path = real_images(ham10000_fullres)["ISIC_0024550"]
    config = DataConfig(image_size=48)
    expected, _ = preprocess(decode_image(path), config)
    assert np.array_equal(preprocess_bytes(path.read_bytes(), config), expected)
    with pytest.raises(ImageError):
        preprocess_bytes(b"", config)


def test_figure_of_pairs_is_written(tmp_path, clean_real):
    pairs = [(clean_real, preprocess(clean_real, DataConfig(image_size=64))[0])]
    path = save_preprocess_figure(pairs, tmp_path / "f.png")
    assert Image.open(path).size[0] > 100
