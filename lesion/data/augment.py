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
from torchvision.transforms.v2.functional import gaussian_blur

# Ranges at strength 1 of each policy: rotation (+- degrees), zoom (scale 1 +- this), brightness, contrast and
# saturation (multiplicative, 1 +- this), hue (a rotation of the colour wheel, +- this share of a turn) and blur (the
# share of images defocused by a Gaussian of sigma 0.3-1.2 px). ``basic`` is the reference studies' augmentation;
# ``dermoscopy`` what the ISIC winners used: a lesion has no up, so any angle, and stronger colour and focus changes.
POLICIES = {
    "basic": {"rotation": 18.0, "zoom": 0.10, "brightness": 0.10, "contrast": 0.10, "saturation": 0.0, "hue": 0.0,
              "blur": 0.0},
    "dermoscopy": {"rotation": 180.0, "zoom": 0.20, "brightness": 0.20, "contrast": 0.20, "saturation": 0.20,
                   "hue": 0.03, "blur": 0.25},
}


def to_float(images: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N,H,W,3) (or (N,3,H,W) with ``channels_last=False``) -> float32 (N,3,H,W) in [0, 1], same device."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dimensions), got shape {tuple(images.shape)}")
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
    return images.float().div_(255.0).contiguous()


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator | None = None,
                  policy: str = "basic") -> torch.Tensor:
    """Random per-sample flips (h and v, p=0.5 each), rotation, zoom, brightness, contrast, saturation, hue and
    defocus of float (N,3,H,W) images in [0, 1], with the ranges of ``policy`` (``POLICIES``) times ``strength``.
    ``strength`` 0 returns ``x``.

    Geometry is one affine resampling per image (``affine_grid`` + ``grid_sample``, reflection padding, so no black
    corners that would look like a dermatoscope border). Parameters are drawn on the generator's device (CPU when
    none is given) and moved to ``x``'s device.
    """
    if policy not in POLICIES:
        raise ValueError(f"augmentation policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    if strength <= 0:
        return x
    limits = {key: value * strength for key, value in POLICIES[policy].items()}
    n, _, height, width = x.shape
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform(limit: float) -> torch.Tensor:
        return ((torch.rand(n, generator=generator, device=device) * 2 - 1) * limit).to(x.device, torch.float32)

    angle = uniform(math.radians(limits["rotation"]))
    zoom = 1 + uniform(limits["zoom"])
    flips = torch.rand(n, 2, generator=generator, device=device).to(x.device) < 0.5
    flip_x = 1 - 2 * flips[:, 0].float()
    flip_y = 1 - 2 * flips[:, 1].float()
    brightness = 1 + uniform(limits["brightness"])
    contrast = 1 + uniform(limits["contrast"])

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
    if limits["saturation"] > 0 or limits["hue"] > 0:
        out = _colour(out, 1 + uniform(limits["saturation"]), uniform(2 * math.pi * limits["hue"]))
    if limits["blur"] > 0:
        chosen = (torch.rand(n, generator=generator, device=device) < limits["blur"]).to(x.device)
        sigma = 0.3 + 0.9 * float(torch.rand(1, generator=generator, device=device))
        radius = math.ceil(3 * sigma)
        blurred = gaussian_blur(out, [2 * radius + 1] * 2, [sigma, sigma])
        out = torch.where(chosen.view(n, 1, 1, 1), blurred, out)
    return out.clamp_(0.0, 1.0).to(x.dtype)


def _colour(x: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Scale each image's saturation (distance from the grey axis) and rotate its hues by ``hue`` radians about the
    grey axis, as one 3x3 colour matrix per image."""
    n = x.shape[0]
    axis = torch.full((3,), 1 / math.sqrt(3), device=x.device)
    grey = torch.outer(axis, axis)  # projection onto the grey axis
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=x.device) / math.sqrt(3)
    eye = torch.eye(3, device=x.device)
    cos, sin = torch.cos(hue).view(n, 1, 1), torch.sin(hue).view(n, 1, 1)
    rotation = grey + cos * (eye - grey) + sin * cross  # Rodrigues' rotation about the grey axis
    matrix = grey + saturation.view(n, 1, 1) * (rotation - grey)
    return torch.einsum("nij,njhw->nihw", matrix, x)


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


def save_augment_figure(images: np.ndarray, path: str | Path, strength: float = 1.0, seed: int = 0,
                        policy: str = "basic") -> Path:
    """Write a PNG of original/augmented pairs (one pair per row) of uint8 (N,H,W,3) images."""
    from lesion.data.preprocess import save_pairs_figure

    generator = torch.Generator().manual_seed(seed)
    augmented = to_uint8(augment_batch(to_float(torch.as_tensor(np.ascontiguousarray(images))), strength, generator,
                                       policy))
    titles = [("original", f"augmented (strength {strength:g})")] * len(images)
    return save_pairs_figure(zip(images, augmented), path, titles, width=5)
