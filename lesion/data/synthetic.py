"""A procedural data set of dermoscopy-like images for the seven HAM10000 classes, with lesion masks.

It is the embedded default source: the whole workflow runs anywhere in minutes, and the masks let Grad-CAM be
scored. Each class has its own shape, border, colours and texture, loosely after the dermoscopic criteria:

- mel: large, irregular, asymmetric, several browns to black, blue-white veil, dark dots at the edge
- nv: round and regular, uniform brown with a faint pigment network
- bcc: pink translucent patch with red arborising (branching) vessels and blue-grey ovoid nests
- akiec: ill-defined red patch with rough white scale
- bkl: sharply bordered, waxy light brown with mottled texture and milia-like white dots
- df: small light-brown ring around a central white scar-like patch
- vasc: red to purple lacunae (packed round blobs), sharply bordered

A fifth of the lesions are look-alikes that borrow part of the colour and texture of a confusable class (nv/mel,
bcc/akiec, bkl/nv, df/nv, vasc/bcc), so the task is not trivially separable.

Images are drawn on varied skin with hair strands and, on some, a black dermatoscope vignette. Some lesions get a
second image (another view: rotated, shifted, other light and hair), so splits must be grouped by ``lesion_id``.
The class plan is drawn from ``default_rng(seed)`` and each lesion from ``default_rng((seed, lesion_index))``: the
same seed gives identical images.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from lesion.labels import DX_CLASSES

# Share of images per class: nv-heavy like HAM10000, but capped so each class keeps >= 10% of the images.
CLASS_WEIGHTS = {"mel": 0.13, "nv": 0.32, "bcc": 0.11, "akiec": 0.11, "bkl": 0.12, "df": 0.105, "vasc": 0.105}
SECOND_VIEW_RATE = 0.3  # share of lesions that get a second image
VIGNETTE_RATE = 0.3  # share of images with a black dermatoscope border
# Look-alikes, as in the clinic: this share of lesions borrows part of the look of a confusable class.
LOOKALIKE_RATE = 0.2
LOOKALIKES = {"mel": "nv", "nv": "mel", "bcc": "akiec", "akiec": "bcc", "bkl": "nv", "df": "nv", "vasc": "bcc"}
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "neck", "scalp")
DX_TYPE = {"mel": "histo", "nv": "follow_up", "bcc": "histo", "akiec": "histo", "bkl": "consensus", "df": "consensus",
           "vasc": "consensus"}
MEAN_AGE = {"mel": 62, "nv": 42, "bcc": 66, "akiec": 68, "bkl": 58, "df": 48, "vasc": 50}


def class_counts(count: int) -> dict[str, int]:
    """Images per class for ``count`` images: CLASS_WEIGHTS rounded down, the remainder going to nv."""
    counts = {dx: int(CLASS_WEIGHTS[dx] * count) for dx in DX_CLASSES}
    counts["nv"] += count - sum(counts.values())
    return counts


def generate(count: int, image_size: int, seed: int = 0) -> Iterator[dict]:
    """Yield ``count`` records {image_id, lesion_id, dx, image (uint8 S x S x 3), mask (bool S x S), age, sex,
    localization, dx_type}, deterministic for a given seed."""
    if count < 1 or image_size < 16:
        raise ValueError(f"synthetic: need count >= 1 and image_size >= 16, got count={count}, size={image_size}")
    plan = np.random.default_rng(seed)
    lesions: list[tuple[str, int]] = []  # (dx, number of views)
    for dx, n in class_counts(count).items():
        while n > 0:
            views = 2 if n >= 2 and plan.random() < SECOND_VIEW_RATE else 1
            lesions.append((dx, views))
            n -= views
    order = plan.permutation(len(lesions))
    image_index = 0
    for lesion_index, position in enumerate(order):
        dx, views = lesions[position]
        rng = np.random.default_rng((seed, int(lesion_index)))
        lesion = _lesion_params(dx, rng)
        meta = {
            "lesion_id": f"SYNL_{lesion_index:07d}",
            "dx": dx,
            "age": float(np.clip(round(rng.normal(MEAN_AGE[dx], 12) / 5) * 5, 5, 90)),
            "sex": str(rng.choice(["male", "female"])),
            "localization": str(rng.choice(LOCALIZATIONS)),
            "dx_type": DX_TYPE[dx],
        }
        for _ in range(views):
            image, mask = _render(lesion, image_size, rng)
            yield {"image_id": f"SYN_{image_index:07d}", **meta, "image": image, "mask": mask}
            image_index += 1


def _lesion_params(dx: str, rng: np.random.Generator) -> dict:
    """The shape and colours of one lesion (shared by all its views)."""
    irregular = {"mel": 0.2, "nv": 0.04, "bcc": 0.12, "akiec": 0.2, "bkl": 0.08, "df": 0.05, "vasc": 0.06}[dx]
    radius = {"mel": 0.33, "nv": 0.24, "bcc": 0.27, "akiec": 0.3, "bkl": 0.28, "df": 0.16, "vasc": 0.22}[dx]
    lookalike = rng.random() < LOOKALIKE_RATE
    harmonics = np.arange(2, 9)
    amplitude = irregular * rng.uniform(0.3, 1.0, harmonics.size) / np.sqrt(harmonics - 1)
    return {
        "dx": dx,
        "radius": radius * rng.uniform(0.8, 1.2),
        "aspect": rng.uniform(0.75, 1.0) if dx in ("mel", "akiec", "bkl") else rng.uniform(0.88, 1.0),
        "harmonics": harmonics,
        "amplitude": amplitude,
        "phase": rng.uniform(0, 2 * np.pi, harmonics.size),
        "edge": {"mel": 0.02, "nv": 0.03, "bcc": 0.04, "akiec": 0.09, "bkl": 0.012, "df": 0.06, "vasc": 0.012}[dx],
        "seed": int(rng.integers(2**31)),
        "skin": np.array([rng.uniform(200, 240), rng.uniform(150, 190), rng.uniform(130, 170)]),
        "lookalike": LOOKALIKES[dx] if lookalike else None,
        "lookalike_weight": rng.uniform(0.3, 0.6),
    }


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] (a cells x cells grid of uniforms, upsampled with bicubic interpolation)."""
    grid = rng.random((cells, cells)).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0)


def _render(lesion: dict, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one view of ``lesion`` at twice ``image_size`` and downsample (anti-aliasing)."""
    size = image_size * 2
    dx = lesion["dx"]
    texture = np.random.default_rng(lesion["seed"])  # lesion-intrinsic texture: the same in every view
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    cx, cy = rng.normal(0, 0.05, 2)
    turn = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.9, 1.1)
    x, y = xx - cx, yy - cy
    u = (np.cos(turn) * x + np.sin(turn) * y) / scale
    v = (-np.sin(turn) * x + np.cos(turn) * y) / (scale * lesion["aspect"])
    dist = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    wobble = np.cos(theta[..., None] * lesion["harmonics"] + lesion["phase"]) @ lesion["amplitude"]
    boundary = lesion["radius"] * (1.0 + wobble)
    inside = np.clip((boundary - dist) / lesion["edge"] + 0.5, 0.0, 1.0)
    rel = dist / np.maximum(boundary, 1e-3)  # 0 at the centre, 1 at the border

    light = rng.uniform(0.85, 1.1)
    skin = lesion["skin"] * light * (0.92 + 0.16 * _smooth_noise(rng, size, 4))[..., None]
    skin = skin + rng.normal(0, 3, (size, size, 1))
    colour = _lesion_colour(dx, lesion, texture, size, rel, u, v)
    if lesion["lookalike"]:
        other = _lesion_colour(lesion["lookalike"], lesion, texture, size, rel, u, v)
        colour = colour * (1 - lesion["lookalike_weight"]) + other * lesion["lookalike_weight"]
    image = skin * (1 - inside[..., None]) + colour * light * inside[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    if dx == "bcc":
        _draw_vessels(image, texture, size, lesion["radius"] * size, (cx + 0.5) * size, (cy + 0.5) * size, turn)
    _draw_hair(image, rng, size)
    if rng.random() < VIGNETTE_RATE:
        image = _vignette(image, rng, xx, yy)
    small = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(inside, (image_size, image_size), interpolation=cv2.INTER_AREA) >= 0.5
    return small, mask


def _lesion_colour(dx, lesion, texture, size, rel, u, v) -> np.ndarray:
    """H x W x 3 float colour of the lesion body for class ``dx`` (outside the lesion it is masked away)."""
    blend = _smooth_noise(texture, size, 5)[..., None]
    fine = texture.normal(0, 1, (size, size, 1)).astype(np.float32)
    if dx == "mel":
        dark = np.array([45, 25, 20]) + 20 * fine
        brown = np.array([120, 70, 40])
        colour = brown * (1 - blend) + dark * blend
        veil = np.clip(_smooth_noise(texture, size, 3) * 2.2 - 1.2, 0, 1)[..., None]
        colour = colour * (1 - veil) + np.array([120, 135, 165]) * veil
        rim = ((rel > 0.75) & (texture.random((size, size)) < 0.02))[..., None]
        return np.where(rim, np.array([20, 12, 10]), colour)
    if dx == "nv":
        network = 0.5 + 0.5 * np.cos(u * size * 0.9) * np.cos(v * size * 0.9)
        base = np.array([140, 90, 55]) * (0.9 + 0.2 * rel[..., None])
        return base - 18 * network[..., None] + 3 * fine
    if dx == "bcc":
        colour = np.array([215, 120, 130]) + 10 * fine
        nests = np.clip(_smooth_noise(texture, size, 6) * 3 - 2.2, 0, 1)[..., None]
        return colour * (1 - nests) + np.array([95, 105, 125]) * nests
    if dx == "akiec":
        colour = np.array([205, 95, 85]) + 12 * fine
        scale = np.clip(_smooth_noise(texture, size, 12) * 2.5 - 1.4, 0, 1) * (texture.random((size, size)) < 0.6)
        return colour * (1 - scale[..., None]) + np.array([245, 235, 225]) * scale[..., None]
    if dx == "bkl":
        mottle = _smooth_noise(texture, size, 14)[..., None]
        colour = np.array([170, 120, 75]) * (0.8 + 0.35 * mottle) + 6 * fine
        milia = (texture.random((size, size)) < 0.004).astype(np.uint8)
        milia = cv2.dilate(milia, np.ones((3, 3), np.uint8)).astype(bool)[..., None]
        return np.where(milia, np.array([240, 230, 200]), colour)
    if dx == "df":
        ring = np.array([150, 100, 70]) + 8 * fine
        patch = np.clip(1.6 - rel * 2.6, 0, 1)[..., None]
        return ring * (1 - patch) + np.array([245, 235, 230]) * patch
    lacunae = _lacunae(texture, size, u, v, lesion["radius"])
    red = np.array([170, 30, 55]) * (1 - blend) + np.array([110, 30, 90]) * blend
    return red * (0.55 + 0.45 * lacunae[..., None]) + np.array([235, 150, 160]) * 0.35 * (1 - lacunae[..., None])


def _lacunae(texture, size, u, v, radius) -> np.ndarray:
    """Packed round blobs in lesion coordinates: 1 inside a lacuna, 0 in the septa between them."""
    cell = radius / 3.5
    gu, gv = np.floor(u / cell), np.floor(v / cell)
    jitter_u = np.sin(gu * 12.9898 + gv * 78.233 + texture.random()) * 0.15
    jitter_v = np.sin(gu * 39.346 + gv * 11.135 + texture.random()) * 0.15
    du = u / cell - gu - 0.5 - jitter_u
    dv = v / cell - gv - 0.5 - jitter_v
    return np.clip((0.42 - np.sqrt(du * du + dv * dv)) * 8, 0, 1)


def _draw_vessels(image, texture, size, radius, cx, cy, turn) -> None:
    """Bright red arborising vessels: a few trunks that fork twice, drawn in place (bright enough in the red
    channel that hair removal, which looks at the brightest channel, keeps them)."""
    width = max(1, round(size / 100))
    for _ in range(texture.integers(3, 6)):
        angle = turn + texture.uniform(0, 2 * np.pi)
        start = np.array([cx, cy]) + texture.uniform(0, 0.6) * radius * np.array([np.cos(angle), np.sin(angle)])
        branches = [(start, texture.uniform(0, 2 * np.pi), radius * 0.5)]
        for _depth in range(3):
            grown = []
            for point, direction, length in branches:
                end = point + length * np.array([np.cos(direction), np.sin(direction)])
                cv2.line(image, tuple(np.round(point).astype(int)), tuple(np.round(end).astype(int)),
                         (235, 35, 50), width, cv2.LINE_AA)
                for fork in (-0.5, 0.5):
                    grown.append((end, direction + fork + texture.normal(0, 0.2), length * 0.6))
            branches = grown


def _draw_hair(image, rng, size) -> None:
    """0 to 6 dark, gently curved hair strands, drawn in place."""
    count = int(rng.choice([0, 0, 1, 2, 3, 6]))
    width = max(1, round(size / 110))
    for _ in range(count):
        start = rng.uniform(-0.1, 1.1, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        bend = rng.normal(0, 0.3)
        steps = np.linspace(0, 1, 12)
        heading = angle + bend * steps
        length = rng.uniform(0.4, 1.0) * size
        points = start + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * length / 12, 0)
        shade = int(rng.uniform(15, 60))
        cv2.polylines(image, [np.round(points).astype(np.int32)], False, (shade, shade * 0.8, shade * 0.7),
                      width, cv2.LINE_AA)


def _vignette(image, rng, xx, yy) -> np.ndarray:
    """Darken outside a centred disc (circular dermatoscope field) or a frame (rectangular bars) to near black."""
    if rng.random() < 0.6:
        radius = rng.uniform(0.42, 0.6)
        outside = np.clip((np.sqrt(xx * xx + yy * yy) - radius) * 40, 0, 1)
    else:
        margin = rng.uniform(0.04, 0.12, 4)
        outside = ((xx < margin[0] - 0.5) | (xx > 0.5 - margin[1]) | (yy < margin[2] - 0.5) | (yy > 0.5 - margin[3]))
        outside = outside.astype(np.float32)
    black = rng.uniform(0, 18)
    out = image * (1 - outside[..., None]) + black * outside[..., None]
    return out.astype(np.uint8)
