"""Images from other cameras and dermatoscopes than HAM10000's: other sizes and aspect ratios, PNG/TIFF/WebP/16-bit,
round fields of view (wholly inside the photo or cut by its edges) and square ones. The ingest preprocessing crops the
border, keeps the aspect (a round lesion stays round) and refuses what is too small; ``lesion evaluate --source folder``
scores such a folder with a trained run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import tiny_config
from lesion.config import DataConfig, dump_yaml
from lesion.data.preprocess import ImageError, decode_image, preprocess
from lesion.data.sources import read_folder
from lesion.rundir import RunDir

SKIN, LESION = (205, 150, 130), {"mel": (70, 45, 40), "nv": (120, 75, 50)}
# name: (width, height, field of view, disc radius as a share of the shorter side, file format)
IMAGES = {
    "photo": (1022, 767, None, 0, "jpg"),  # a larger photo without a dermatoscope border
    "round_square": (300, 300, "round", 0.5, "png"),  # round field of view touching the edges of a square image
    "round_inside": (640, 480, "round", 0.42, "jpg"),  # round field of view wholly inside a 4:3 photo
    "round_cut": (1600, 1200, "round", 0.62, "jpg"),  # round field of view cut by the top and bottom edges
    "square_fov": (800, 600, "square", 0.9, "png"),  # square field of view in black pillars
    "portrait": (480, 640, None, 0, "webp"),
    "frame": (600, 450, "square", 0.85, "tiff"),
    "sixteen_bit": (400, 300, None, 0, "png16"),
}
TOO_SMALL = (1, 10_000)  # width, height: refused


def scene(width: int, height: int, fov: str | None, share: float, dx: str, seed: int):
    """uint8 RGB skin with a centred round lesion and an optional black border, and the lesion mask."""
    rng = np.random.default_rng(seed)
    smooth = cv2.resize(rng.normal(0, 1, (height // 40 + 2, width // 40 + 2)).astype(np.float32), (width, height),
                        interpolation=cv2.INTER_CUBIC)
    img = np.array(SKIN, np.float32) * (1 + 0.05 * smooth[..., None]) + rng.normal(0, 4, (height, width, 1))
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot(yy - height / 2, xx - width / 2)
    mask = distance < 0.15 * min(width, height)
    img[mask] = LESION[dx]
    img = np.clip(img, 0, 255).astype(np.uint8)
    if fov == "round":
        img[distance > share * min(width, height)] = 3
    elif fov == "square":
        side = int(share * min(width, height))
        outside = np.ones((height, width), bool)
        top, left = (height - side) // 2, (width - side) // 2
        outside[top:top + side, left:left + side] = False
        img[outside] = 6
    return img, mask


def write(path: Path, img: np.ndarray, fmt: str) -> Path:
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if fmt == "png16":
        bgr, fmt = bgr.astype(np.uint16) * 257, "png"
    path = path.with_suffix("." + fmt)
    ok, data = cv2.imencode(path.suffix, bgr)
    assert ok, path
    path.write_bytes(data.tobytes())
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder source (mel/, nv/) of every IMAGES kind twice per class, plus a 1 x 10000 image; masks by file."""
    root = tmp_path_factory.mktemp("other-cameras")
    masks = {}
    for c, dx in enumerate(LESION):
        (root / dx).mkdir()
        for i, (name, (width, height, fov, share, fmt)) in enumerate(IMAGES.items()):
            for copy in range(2):
                img, mask = scene(width, height, fov, share, dx, seed=100 * c + 10 * i + copy)
                masks[write(root / dx / f"{name}_{copy}", img, fmt).name] = mask
        thin = np.full((TOO_SMALL[1], TOO_SMALL[0], 3), 180, np.uint8)
        write(root / dx / "thin", thin, "png")
    return root, masks


def box_ratio(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    return (np.ptp(cols) + 1) / (np.ptp(rows) + 1)


def test_folder_of_other_cameras_preprocesses_as_at_ingest(folder):
    root, masks = folder
    records, rejected = read_folder(root)
    assert not rejected and len(records) == 2 * (2 * len(IMAGES) + 1)
    config = DataConfig(image_size=64)
    scored = 0
    for record in records:
        img = decode_image(record["path"], max_pixels=config.max_image_pixels)
        name = Path(record["path"]).name
        if name.startswith("thin"):
            with pytest.raises(ImageError, match="1x10000 is smaller than the minimum side of 32 px"):
                preprocess(img, config)
            continue
        out, mask = preprocess(img, config, masks[name])
        scored += 1
        assert out.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert (out.max(axis=2) < 40).mean() < 0.01, f"{name}: black border left"
        assert 0.85 <= box_ratio(mask) <= 1.18, f"{name}: lesion stretched ({box_ratio(mask):.2f})"
        rows, cols = np.nonzero(mask)
        assert min(rows.min(), cols.min()) > 0 and max(rows.max(), cols.max()) < 63, f"{name}: lesion cut"
        lesion_colour = out[mask].mean(0)
        assert np.abs(lesion_colour - LESION[record["dx"]]).max() < 25, f"{name}: lesion not where its mask is"
        share = mask.sum() / (64 * 64)
        assert 0.03 < share < 0.3, f"{name}: lesion covers {share:.2f} of the image"
    assert scored == 4 * len(IMAGES)


@pytest.mark.timeout(600)
def test_evaluate_scores_a_folder_of_other_cameras(trained_run, folder, tmp_path, capsys):
    """``lesion evaluate --source folder --root DIR`` ingests the folder with the run's preprocessing and scores it;
    the too-small images are listed as rejected, with the reason."""
    from lesion.data.shards import read_info
    from pipelines.cli import main

    root, _ = folder
    run = RunDir(shutil.copytree(trained_run.root, tmp_path / "run"))
    config = tiny_config()
    config.evaluate.bootstrap = 0
    config.evaluate.cam_score_images = 0
    dump_yaml(config.to_dict(), tmp_path / "config.yaml")
    code = main(["evaluate", "--run", str(run.root), "--config", str(tmp_path / "config.yaml"),
                 "--source", "folder", "--root", str(root)])
    assert code == 0
    external = run.eval / "external" / root.name
    metrics = json.loads((external / "metrics.json").read_text())
    assert metrics["external"] is True and metrics["data"]["n_images"] == 4 * len(IMAGES)
    assert read_info(external).image_size == 32  # the run's cached size, whatever the photo's size
    with open(external / "data" / "rejected.csv", newline="") as handle:
        rejected = list(csv.DictReader(handle))
    assert len(rejected) == 2
    assert all("smaller than the minimum side" in " ".join(row.values()) for row in rejected)
    assert "ensemble" in capsys.readouterr().out
