"""A simulated second dermatoscope: images re-coloured, re-illuminated, blurred, JPEG-compressed, vignetted and
re-scaled, to measure how a model trained on one source copes with another when no second source is at hand.

Every shift is a transform family, or a strength, that the training augmentation (``lesion.data.augment``: flips,
rotations, zoom within +-10%, brightness and contrast within +-10%) never shows the model:

- ``colour``: a white-balance cast (red up 18%, blue down 22%), as from another light source or sensor;
- ``illumination``: a linear falloff of light across the field (60% to 115% of the original), in a random direction;
- ``blur``: Gaussian defocus, sigma 1% of the longer side;
- ``jpeg``: JPEG compression at quality 15;
- ``vignette``: darkening towards the corners (to 40% of the original there), softer than a dermatoscope's black ring;
- ``scale``: another magnification: the central 2/3 of the field enlarged to the full image (lesions 1.5x larger);
- ``device``: milder forms of all of these at once (a cast, falloff, defocus, vignette and quality 40), like a
  second device whose every part differs a little.

Sizes and lesion positions are kept, so labels, lesion ids and masks stay valid.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

SHIFTS = ("colour", "illumination", "blur", "jpeg", "vignette", "scale", "device")


def colour_cast(img: np.ndarray, gains=(1.18, 1.0, 0.78)) -> np.ndarray:
    """Scale the R, G, B channels of a uint8 RGB image by ``gains`` (clipped)."""
    return np.clip(img * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)


def illumination(img: np.ndarray, rng: np.random.Generator, low: float = 0.6, high: float = 1.15) -> np.ndarray:
    """Multiply by a linear ramp from ``low`` to ``high`` across the image, in a direction drawn from ``rng``."""
    height, width = img.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = (xs - width / 2) * np.cos(angle) + (ys - height / 2) * np.sin(angle)
    ramp = low + (high - low) * (along - along.min()) / max(float(np.ptp(along)), 1.0)
    return np.clip(img * ramp[..., None], 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma_share: float = 0.01) -> np.ndarray:
    """Gaussian defocus with sigma ``sigma_share`` x the longer side."""
    sigma = sigma_share * max(img.shape[:2])
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)


def jpeg(img: np.ndarray, quality: int = 15) -> np.ndarray:
    """Encode as JPEG at ``quality`` and decode again."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def vignette(img: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Darken by ``1 - strength x (r / r_corner)^2``: the corners keep ``1 - strength`` of their light."""
    height, width = img.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((xs - width / 2) ** 2 + (ys - height / 2) ** 2) / ((width / 2) ** 2 + (height / 2) ** 2)
    return np.clip(img * (1 - strength * r2)[..., None], 0, 255).astype(np.uint8)


def rescale(img: np.ndarray, zoom: float = 1.5) -> np.ndarray:
    """Enlarge the central ``1/zoom`` of the image to its full size (another magnification)."""
    height, width = img.shape[:2]
    h, w = round(height / zoom), round(width / zoom)
    top, left = (height - h) // 2, (width - w) // 2
    return cv2.resize(img[top:top + h, left:left + w], (width, height), interpolation=cv2.INTER_LINEAR)


def shift_image(img: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    """``img`` (uint8 H x W x 3 RGB) as the simulated second source ``shift`` (one of SHIFTS) would show it."""
    if shift == "colour":
        return colour_cast(img)
    if shift == "illumination":
        return illumination(img, rng)
    if shift == "blur":
        return blur(img)
    if shift == "jpeg":
        return jpeg(img)
    if shift == "vignette":
        return vignette(img)
    if shift == "scale":
        return rescale(img)
    if shift == "device":
        img = illumination(colour_cast(img, (1.1, 1.0, 0.88)), rng, low=0.75, high=1.1)
        return jpeg(vignette(blur(img, 0.005), 0.35), quality=40)
    raise ValueError(f"unknown shift {shift!r}; expected one of {', '.join(SHIFTS)}")


def write_shifted_ham10000(root: str | Path, image_ids: list[str], out: str | Path, shift: str | None,
                           seed: int = 0) -> Path:
    """Copy the images ``image_ids`` of the HAM10000 folder ``root`` (metadata.csv + images) to ``out`` in the same
    layout, each shifted by ``shift`` (None: unchanged bytes, the clean reference) with a generator seeded by
    (``seed``, its position). Shifted images are written as PNG, so nothing but the shift changes them.
    Returns ``out``."""
    root, out = Path(root), Path(out)
    metadata = pd.read_csv(root / "metadata.csv", dtype={"image_id": str})
    metadata = metadata.set_index("image_id").loc[image_ids].reset_index()
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(image_ids):
        source = root / "images" / f"{image_id}.jpg"
        if shift is None:
            (out / "images" / source.name).write_bytes(source.read_bytes())
            continue
        rgb = cv2.cvtColor(cv2.imread(str(source), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        shifted = shift_image(rgb, shift, np.random.default_rng([seed, k]))
        cv2.imwrite(str(out / "images" / f"{image_id}.png"), cv2.cvtColor(shifted, cv2.COLOR_RGB2BGR))
    metadata.to_csv(out / "metadata.csv", index=False)
    return out
