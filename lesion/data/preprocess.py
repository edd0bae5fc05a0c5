"""Per-image preprocessing, done once at ingest: decode, crop the black dermatoscope border, remove hair, resize
(aspect kept: centre crop or pad), optionally correct the colour cast (Shades of Gray).

Every function takes and returns plain numpy arrays (uint8 H x W x 3 RGB images, bool H x W masks), so the same code
runs in a notebook, in a Ray Data ``map_batches`` and in the serving path.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lesion.config import RESIZE_FITS, DataConfig
from lesion.data.dicom import DicomError, decode_dicom, is_dicom

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # formats decode_image accepts besides DICOM (lesion.data.dicom)
BORDER_WORK_SIDE = 512  # the border is searched on a copy whose longer side is at most this many pixels
BORDER_MAX_LINE_DARK = 0.02  # an edge row/column may keep this share of border pixels (inscribed box of a circle)
BORDER_MIN_FOV = 0.1  # a field of view (non-border pixels) below this share of the image is refused (kept whole)
BORDER_MIN_KEEP = 0.5  # a box keeping less than this share of the field of view is refused (a disc's box keeps 2/pi)
HAIR_KERNEL_FRACTION = 0.03  # black-hat kernel side as a share of the shorter image side (17 px at 600 x 450)
HAIR_THRESHOLD = 15  # black-hat response (grey levels) above which a pixel is hair or a dark artefact
HAIR_MIN_AREA = 1e-4  # hair/artefact components smaller than this share of the image are texture, not hair
WORK_SIDE = 1024  # after the border crop, larger images are shrunk to this longer side (or image_size if larger)
MIN_IMAGE_SIDE = DataConfig.min_image_side  # images with a shorter side are refused


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the reason."""


def decode_image(data: bytes | str | Path, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode JPEG/PNG/BMP/TIFF/WebP or DICOM bytes or a file into uint8 H x W x 3 RGB, EXIF orientation applied.

    DICOM Part 10 files (``DICM`` at byte 128) are decoded by ``lesion.data.dicom.decode_dicom``.

    Any mode is accepted: RGBA/LA/PA are composited on black (transparent = outside the field of view, which the
    border crop then removes), P and 1 are expanded, L is replicated, 16-bit (I;16*, and I up to 65535) is scaled by
    1/257 (65535 -> 255), wider I by 255/(2^31 - 1), float F is clipped to 0..255 (NaN -> 0), CMYK/YCbCr/LAB are
    converted. The pixel count is checked against ``max_pixels`` from the header, before any pixel is decoded, so
    memory stays within a few bytes per allowed pixel. Raises ImageError for empty, truncated, non-image,
    unsupported-format or too large input.
    """
    name = str(data) if isinstance(data, (str, Path)) else "image bytes"
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise ImageError(f"{name}: cannot read file: {exc}") from exc
    if len(data) == 0:
        raise ImageError(f"{name}: empty (0 bytes)")
    if is_dicom(data):
        try:
            return decode_dicom(data, max_pixels)
        except DicomError as exc:
            raise ImageError(f"{name}: {exc}") from exc
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would decode silently")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit {max_pixels}")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no second copy of a large image
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a decodable image (expected one of {', '.join(FORMATS)})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too many pixels, exceeds the limit of PIL's bomb guard: {exc}") from exc
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image: {exc}") from exc
    except Exception as exc:  # a decoder plugin failing on malformed input (struct.error, IndexError, ...)
        raise ImageError(f"{name}: cannot decode: {type(exc).__name__}: {exc}") from exc
    return _to_rgb(image, name)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """uint8 H x W x 3 of a decoded image of any mode (see decode_image), without float copies of 8-bit data."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(image), mode)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size)  # black
        rgb.paste(rgba, mask=rgba.getchannel("A"))  # composite on black
        return np.asarray(rgb, dtype=np.uint8)
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def _scale_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of an integer or float PIL image as uint8: 16-bit / 257, 32-bit / (2^31-1) * 255, float clipped."""
    values = pixels.astype(np.float32)  # 4 bytes a pixel, whatever the source type
    if mode == "F":
        np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        peak = float(values.max(initial=0))
        if mode.startswith("I;16") or (mode == "I" and 255 < peak <= 65535):
            values /= 257.0
        elif mode == "I" and peak > 65535:
            values *= 255.0 / (2**31 - 1)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def find_border_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """The box ``(top, bottom, left, right)`` (exclusive ends) inside the black dermatoscope border of ``img``.

    Border pixels are dark pixels (below a third of the image's bright level) in dark regions that touch an image
    corner, after an opening that drops thin structures such as hair. Edge rows and columns are then peeled off, the
    darkest edge first, until no edge line holds more than ``BORDER_MAX_LINE_DARK`` border pixels: for a rectangular
    frame this is the frame's inside (a square or rectangular field of view), for a circular vignette the box
    inscribed in the bright disc, whether the disc is cut by the image edges or lies wholly inside them. Without a
    border, when the field of view (the non-border pixels) is under ``BORDER_MIN_FOV`` of the image (a dark image
    with a bright spot), or when the box would keep less than ``BORDER_MIN_KEEP`` of the field of view, the whole
    image is returned.
    """
    height, width = img.shape[:2]
    whole = (0, height, 0, width)
    scale = min(1.0, BORDER_WORK_SIDE / max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))  # at least 1 pixel, even for 1 x 10000
    small = img if scale == 1.0 else cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    bright = float(np.percentile(gray, 90))
    dark = (gray < max(10.0, bright / 3)).astype(np.uint8)
    side = max(3, round(min(gray.shape) * 0.02) | 1)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    count, labels = cv2.connectedComponents(dark, connectivity=8)
    corners = {labels[0, 0], labels[0, w - 1], labels[h - 1, 0], labels[h - 1, w - 1]} - {0}
    if count <= 1 or not corners:
        return whole
    border = np.isin(labels, list(corners)).astype(np.int64)
    field = h * w - int(border.sum())
    top, bottom, left, right = _peel(border)
    if field < BORDER_MIN_FOV * h * w or (bottom - top) * (right - left) < BORDER_MIN_KEEP * field:
        log.debug("border crop refused: box %s, field of view %d pixels of %dx%d", (top, bottom, left, right),
                  field, w, h)
        return whole
    if scale == 1.0:
        return top, bottom, left, right
    rows, cols = height / h, width / w
    return (min(height, round(top * rows)), min(height, round(bottom * rows)),
            min(width, round(left * cols)), min(width, round(right * cols)))


def _peel(border: np.ndarray) -> tuple[int, int, int, int]:
    """Shrink a box from the image edges until no edge line has more than BORDER_MAX_LINE_DARK border pixels."""
    h, w = border.shape
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = border.cumsum(0).cumsum(1)
    integral = table.tolist()

    def count(r0: int, r1: int, c0: int, c1: int) -> int:
        return integral[r1][c1] - integral[r0][c1] - integral[r1][c0] + integral[r0][c0]

    top, bottom, left, right = 0, h, 0, w
    while bottom - top > 1 and right - left > 1:
        cols, rows = right - left, bottom - top
        shares = (
            count(top, top + 1, left, right) / cols,
            count(bottom - 1, bottom, left, right) / cols,
            count(top, bottom, left, left + 1) / rows,
            count(top, bottom, right - 1, right) / rows,
        )
        worst = max(range(4), key=shares.__getitem__)
        if shares[worst] <= BORDER_MAX_LINE_DARK:
            break
        if worst == 0:
            top += 1
        elif worst == 1:
            bottom -= 1
        elif worst == 2:
            left += 1
        else:
            right -= 1
    return top, bottom, left, right


def crop_black_border(img: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop the dark dermatoscope border (frame or circular vignette); ``mask`` is cropped identically."""
    _check_mask(img, mask)
    top, bottom, left, right = find_border_box(img)
    cropped = img[top:bottom, left:right]
    return cropped, None if mask is None else mask[top:bottom, left:right]


def hair_mask(img: np.ndarray) -> np.ndarray:
    """Bool mask of hair and small dark artefacts: black-hat of the smoothed brightest channel, thresholded, specks
    smaller than ``HAIR_MIN_AREA`` of the image dropped, dilated by one pixel.

    The brightest channel (HSV value) is used rather than grey so that red vessels, which are diagnostic, are kept.
    """
    height, width = img.shape[:2]
    red, green, blue = cv2.split(img)
    value = cv2.max(cv2.max(red, green), blue)  # = img.max(axis=2), and much faster
    blur = round(min(height, width) * 0.01) | 1  # 5 px at 600 x 450, none on small images
    value = cv2.GaussianBlur(value, (blur, blur), 0) if blur > 1 else value
    side = max(5, round(min(height, width) * HAIR_KERNEL_FRACTION) | 1)
    blackhat = cv2.morphologyEx(value, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats((blackhat > HAIR_THRESHOLD).astype(np.uint8))
    keep = stats[:, cv2.CC_STAT_AREA] >= max(2.0, HAIR_MIN_AREA * height * width)
    keep[0] = False
    hair = keep[labels].astype(np.uint8)
    return cv2.dilate(hair, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))).astype(bool)


def remove_hair(img: np.ndarray) -> np.ndarray:
    """DullRazor-style hair and dark-artefact removal: black-hat detection, then inpainting (Telea) of those pixels."""
    hair = hair_mask(img)
    if not hair.any():
        return img
    radius = max(1, round(min(img.shape[:2]) / 150))
    return cv2.inpaint(np.ascontiguousarray(img), hair.astype(np.uint8), radius, cv2.INPAINT_TELEA)


def resize_to_square(img: np.ndarray, size: int, mask: np.ndarray | None = None, fit: str = "crop"):
    """Resize to size x size keeping the aspect ratio: ``fit="crop"`` takes the centred square of the shorter side,
    ``fit="pad"`` puts the whole image on a black square. Area interpolation for the image, nearest for the mask.

    Crop is the default: after the border crop the lesion sits near the centre of the field of view, the cached pixels
    all carry skin (padding would spend a quarter of a 4:3 image on black bars that look like a dermatoscope border),
    and no shape is stretched, so a round lesion stays round whatever camera took it. Returns (image, mask or None).
    """
    if fit not in RESIZE_FITS:
        raise ValueError(f"resize fit must be one of {', '.join(RESIZE_FITS)}, got {fit!r}")
    height, width = img.shape[:2]
    side = min(height, width) if fit == "crop" else max(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    if fit == "crop":
        img = img[top:top + side, left:left + side]
        mask = None if mask is None else mask[top:top + side, left:left + side]
    else:
        pad = ((-top, side - height + top), (-left, side - width + left))
        img = np.pad(img, (*pad, (0, 0)))
        mask = None if mask is None else np.pad(mask, pad)
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if mask is None:
        return out, None
    small = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return out, small.astype(bool)


def shades_of_gray(img: np.ndarray, p: float = 6) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi, 2004): remove the colour cast of the light source.

    The illuminant is estimated per channel as the Minkowski p-norm mean of the pixels (p=1: grey world, p=inf:
    max-RGB; 6 is the usual choice for dermoscopy) and each channel is scaled so the illuminant becomes neutral grey
    of the same length. Returns uint8 H x W x 3 (clipped).
    """
    if p <= 0:
        raise ValueError(f"shades_of_gray: p must be > 0, got {p}")
    values = img.astype(np.float32)
    illuminant = np.power(np.mean(np.power(values / 255.0, p), axis=(0, 1), dtype=np.float64), 1.0 / p)
    length = float(np.linalg.norm(illuminant))
    if length == 0.0:  # an all-black image has no colour cast
        return img.copy()
    gains = length / (np.sqrt(3.0) * np.maximum(illuminant, 1e-6))
    values *= gains.astype(np.float32)
    return np.clip(np.rint(values, out=values), 0, 255).astype(np.uint8)


def check_image_side(img: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> None:
    """Raise ImageError when the image's shorter side is below ``min_side`` pixels (too small to be scored)."""
    height, width = img.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(f"image {width}x{height} is smaller than the minimum side of {min_side} px "
                         f"(data.min_image_side)")


def shrink_to(img: np.ndarray, longest: int, mask: np.ndarray | None = None):
    """Shrink (area interpolation; nearest for the mask) so the longer side is at most ``longest``, aspect kept."""
    height, width = img.shape[:2]
    if max(height, width) <= longest:
        return img, mask
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if mask is None:
        return small, None
    return small, cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def preprocess(img: np.ndarray, data_config, mask: np.ndarray | None = None):
    """Refuse images smaller than ``data_config.min_image_side`` (ImageError), crop the border (if
    ``crop_border``), shrink to WORK_SIDE, remove hair (if ``remove_hair``), resize to ``image_size`` keeping the
    aspect (``resize``: crop or pad), correct the colour cast (``color_constancy``: none or shades_of_gray).

    Shrinking before hair removal keeps a large photo's hair kernel near the scale the detector was tuned on
    (HAM10000's 600 x 450: skin texture of a 4000 px photo is otherwise taken for hair) and bounds cost and memory.
    Returns (uint8 S x S x 3, bool S x S mask or None).
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {img.dtype} {img.shape}")
    _check_mask(img, mask)
    check_image_side(img, data_config.min_image_side)
    if data_config.crop_border:
        img, mask = crop_black_border(img, mask)
    img, mask = shrink_to(img, max(WORK_SIDE, data_config.image_size), mask)
    if data_config.remove_hair:
        img = remove_hair(img)
    img, mask = resize_to_square(img, data_config.image_size, mask, data_config.resize)
    if data_config.color_constancy == "shades_of_gray":
        img = shades_of_gray(img)
    return img, mask


def preprocess_bytes(data: bytes, data_config) -> np.ndarray:
    """Decode encoded image bytes and preprocess them as at ingest (the serving path). Returns uint8 S x S x 3."""
    img = decode_image(data, max_pixels=data_config.max_image_pixels)
    return preprocess(img, data_config)[0]


def _check_mask(img: np.ndarray, mask: np.ndarray | None) -> None:
    if mask is not None and mask.shape != img.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {img.shape[:2]}")


def save_pairs_figure(pairs, path: str | Path, titles: list[tuple[str, str]], width: float = 6) -> Path:
    """Write a PNG of image pairs, one pair per row, with a (left, right) title per row."""
    from matplotlib.figure import Figure

    pairs = list(pairs)
    fig = Figure(figsize=(width, width / 2 * len(pairs)))
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (pair, pair_titles) in enumerate(zip(pairs, titles)):
        for ax, image, title in zip(axes[row], pair, pair_titles):
            ax.imshow(image)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_preprocess_figure(pairs, path: str | Path, titles: list[str] | None = None) -> Path:
    """Write a PNG of (original, preprocessed) image pairs, one pair per row."""
    pairs = list(pairs)
    row_titles = []
    for row, (original, processed) in enumerate(pairs):
        name = f"{titles[row]}: " if titles else ""
        row_titles.append((f"{name}original {original.shape[1]}x{original.shape[0]}",
                           f"preprocessed {processed.shape[1]}x{processed.shape[0]}"))
    return save_pairs_figure(pairs, path, row_titles)
