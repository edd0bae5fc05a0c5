"""Batch image transforms as tensor operations: training augmentation and THE evaluation transform (model_input).

All functions work on whatever device the batch is on (CPU or GPU); random parameters are drawn per sample from a
``torch.Generator`` so an augmented epoch can be reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 18.0  # rotation range at strength 1 (+-)
MAX_ZOOM = 0.10  # zoom range at strength 1 (scale 1 +- this)
MAX_BRIGHTNESS = 0.10  # brightness range at strength 1 (multiplicative, 1 +- this)
MAX_CONTRAST = 0.10  # contrast range at strength 1 (around each image's mean, 1 +- this)


def to_float(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N,H,W,3) (or (N,3,H,W) with ``channels_last=False``) -> float32 (N,3,H,W) in [0, 1], same device."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape {tuple(images.shape)}")
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
    return images.float().div_(255.0).contiguous()


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-sample flips (h and v, p=0.5 each), rotation (+-18 deg x strength), zoom (+-10% x strength),
    brightness and contrast (+-10% x strength) of float (N,3,H,W) images in [0, 1]. ``strength`` 0 returns ``x``.

    Geometry is one affine resampling per image (``affine_grid`` + ``grid_sample``, reflection padding, so no black
    corners that would look like a dermatoscope border). Parameters are drawn on the generator's device (CPU when
    none is given) and moved to ``x``'s device.
    """
    if strength <= 0:
        return x
    n, _, height, width = x.shape
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform(limit: float) -> torch.Tensor:
        return ((torch.rand(n, generator=generator, device=device) * 2 - 1) * limit).to(x.device, torch.float32)

    angle = uniform(math.radians(MAX_ROTATION_DEG) * strength)
    zoom = 1 + uniform(MAX_ZOOM * strength)
    flips = torch.rand(n, 2, generator=generator, device=device).to(x.device) < 0.5
    flip_x = 1 - 2 * flips[:, 0].float()
    flip_y = 1 - 2 * flips[:, 1].float()
    brightness = 1 + uniform(MAX_BRIGHTNESS * strength)
    contrast = 1 + uniform(MAX_CONTRAST * strength)

    # Output -> input sampling map in normalised coordinates; the aspect factor keeps rotations rigid on
    # non-square images.
    aspect = height / width
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * aspect * flip_y
    theta[:, 1, 0] = sin / aspect * flip_x
    theta[:, 1, 1] = cos * flip_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast.view(n, 1, 1, 1) + mean
    out = out * brightness.view(n, 1, 1, 1)
    return out.clamp_(0.0, 1.0).to(x.dtype)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of (N,3,H,W)."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,3,H,W) to (N,3,size,size) with antialiased bilinear interpolation (no-op when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def model_input(
    images: torch.Tensor | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    size: int,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """THE evaluation transform: uint8 (N,H,W,3) -> normalised float32 (N,3,size,size) on ``device``."""
    tensor = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"model_input expects uint8 (N,H,W,3) images, got {tensor.dtype} {tuple(tensor.shape)}")
    x = to_float(tensor.to(device, non_blocking=True))
    return normalize(resize(x, size), mean, std)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [0, 1] -> uint8 (N,H,W,3) numpy (for figures)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def save_augment_figure(images: np.ndarray, path: str | Path, strength: float = 1.0, seed: int = 0) -> Path:
    """Write a PNG of original/augmented pairs (one pair per row) of uint8 (N,H,W,3) images."""
    from lesion.data.preprocess import save_pairs_figure

    generator = torch.Generator().manual_seed(seed)
    augmented = to_uint8(augment_batch(to_float(torch.as_tensor(np.ascontiguousarray(images))), strength, generator))
    titles = [("original", f"augmented (strength {strength:g})")] * len(images)
    return save_pairs_figure(zip(images, augmented), path, titles, width=5)
